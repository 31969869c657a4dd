"""The configs drills run against: lbtwist's (defaults and naive) pass
lbtwist's own validation; HAProxy's passes ``haproxy -c``; HAProxy's stats
CSV maps onto lbtwist's state words."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from lbtwist.config import load_config
from lbtwist.drill.configs import BackendRef, Setup, haproxy_config, haproxy_states, lbtwist_config, to_yaml

SETUP = Setup(listen_port=18080, admin_port=18081,
              backends=(BackendRef("b0", 19001), BackendRef("b1", 19002)))


def _load(tmp_path, cfg):
    p = tmp_path / "lb.yaml"
    p.write_text(to_yaml(cfg))
    return load_config(str(p))


def test_defaults_config_sets_only_what_a_user_must(tmp_path):
    cfg = lbtwist_config(SETUP)
    loaded = _load(tmp_path, cfg)
    assert not loaded.warnings
    pool = loaded.config.pools[0]
    assert pool.algorithm == "p2c"  # the shipped default, untouched
    assert pool.health.active.kind == "http" and pool.health.active.path == "/healthz"
    assert pool.health.passive.enabled
    assert [b.address for b in pool.backends] == ["127.0.0.1:19001", "127.0.0.1:19002"]
    assert loaded.config.listeners[0].mode == "http"
    assert loaded.config.admin.bind == "tcp:18081:interface=127.0.0.1"
    assert set(cfg["pools"][0]) == {"name", "backends", "health"}


def test_scenario_overrides_apply_to_the_lbtwist_target_only(tmp_path):
    s = Setup(listen_port=1, admin_port=2, backends=SETUP.backends, pool_overrides={"slow_start": "30s"})
    assert _load(tmp_path, lbtwist_config(s)).config.pools[0].slow_start == 30.0
    assert _load(tmp_path, lbtwist_config(s, naive=True)).config.pools[0].slow_start == 0.0


def test_naive_config_is_the_field_guides_setup(tmp_path):
    loaded = _load(tmp_path, lbtwist_config(SETUP, naive=True))
    pool = loaded.config.pools[0]
    assert pool.algorithm == "round_robin"
    assert pool.health.active is not None and not pool.health.passive.enabled
    assert pool.circuit_breaker.consecutive_failures == 0
    retry = loaded.config.listeners[0].routes[0].retry
    assert retry.budget_percent == 100.0  # retries without a budget


@pytest.mark.skipif(shutil.which("haproxy") is None and not shutil.os.path.exists("/usr/sbin/haproxy"),
                    reason="haproxy not installed (only the --compare haproxy target needs it)")
def test_haproxy_config_is_valid(tmp_path):
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    cfg = tmp_path / "h.cfg"
    cfg.write_text(haproxy_config(SETUP, str(tmp_path / "h.sock")))
    out = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    text = cfg.read_text()
    assert "balance leastconn" in text and "option httpchk GET /healthz" in text
    assert "inter 5s" in text and "fall 3 rise 2" in text  # lbtwist's active-check defaults


def test_haproxy_states_from_stats_csv():
    csv = (
        "# pxname,svname,qcur,status,weight\n"
        "web,FRONTEND,,OPEN,\n"
        "app,b0,0,UP,1\n"
        "app,b1,0,DOWN,1\n"
        "app,b2,0,UP 1/3,1\n"
        "app,b3,0,DRAIN,1\n"
        "app,b4,0,MAINT,1\n"
        "app,BACKEND,0,UP,4\n"
    )
    assert haproxy_states(csv) == {"b0": "healthy", "b1": "unhealthy", "b2": "healthy",
                                   "b3": "draining", "b4": "disabled"}
    assert haproxy_states("garbage") == {}


def test_yaml_round_trips():
    assert yaml.safe_load(to_yaml(lbtwist_config(SETUP))) == lbtwist_config(SETUP)
