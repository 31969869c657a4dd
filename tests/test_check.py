"""``lbtwist check``: validation as twistd does it, then the operational
review; one test per finding with a config that has the keys, a clean config
with none, and the exit statuses."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest

from lbtwist.check import review, run
from lbtwist.config import load_config
from lbtwist.registry import Registry

from support.procs import REPO, source_env

REG = Registry.default(entry_points=False)

CLEAN = """\
listeners:
  - name: web
    bind: "tcp:8080:interface=127.0.0.1"
    mode: http
    pool: app
    http: {request_timeout: 30s}
  - name: db
    bind: "tcp:5432:interface=127.0.0.1"
    mode: tcp
    pool: pg
pools:
  - name: app
    algorithm: p2c
    slow_start: 30s
    drain_timeout: 45s
    health:
      active: {kind: http, path: /orders/probe, interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}
    backends: [{address: "10.0.0.1:80"}, {address: "10.0.0.2:80"}]
  - name: pg
    algorithm: least_connections
    slow_start: 30s
    health:
      active: {kind: tcp, interval: 5s, timeout: 2s}
    backends: [{address: "10.0.1.1:5432"}, {address: "10.0.1.2:5432"}]
admin:
  bind: "tcp:9900:interface=127.0.0.1"
deployment: {instances: 2, failover: keepalived VIP}
"""


def findings(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in review(load_config(text, REG).config):
        out.setdefault(f.id, []).append(f)
    return out


def edit(old: str, new: str, base: str = CLEAN) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


def test_clean_config_has_no_findings():
    assert findings(CLEAN) == {}


@pytest.mark.parametrize(
    "old,new,fid,key",
    [
        # retries without brakes
        ("    pool: app\n    http:", "    pool: app\n    routes: [{match: {path_prefix: /}, pool: app, retry: {budget_percent: 50}}]\n    http:",
         "retry-budget", "listeners[0].routes[0].retry.budget_percent"),
        ("    pool: app\n    http:", "    pool: app\n    routes: [{match: {path_prefix: /}, pool: app, retry: {backoff: {base: 0, max: 0}}}]\n    http:",
         "retry-backoff", "listeners[0].routes[0].retry.backoff.max"),
        ("    algorithm: p2c\n", "    algorithm: p2c\n    circuit_breaker: {consecutive_failures: 0}\n",
         "no-breaker", "pools[0].circuit_breaker.consecutive_failures"),
        # health checks that see nothing or flap
        ("    health:\n      active: {kind: http, path: /orders/probe, interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n", "",
         "no-active-health", "pools[0].health.active"),
        ("interval: 5s, timeout: 2s, unhealthy_threshold: 3", "interval: 5s, timeout: 4s, unhealthy_threshold: 3",
         "probe-timeout", "pools[0].health.active.timeout"),
        ("unhealthy_threshold: 3, healthy_threshold: 2", "unhealthy_threshold: 1, healthy_threshold: 2",
         "flapping", "pools[0].health.active.unhealthy_threshold"),
        ("unhealthy_threshold: 3, healthy_threshold: 2", "unhealthy_threshold: 3, healthy_threshold: 1",
         "flapping", "pools[0].health.active.healthy_threshold"),
        ("{kind: http, path: /orders/probe,", "{kind: tcp,", "shallow-probe", "pools[0].health.active.kind"),
        ("interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n",
         "interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n      passive: {enabled: false}\n",
         "no-passive-health", "pools[0].health.passive.enabled"),
        ("interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n",
         "interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n"
         "      passive: {consecutive_5xx: 0, consecutive_gateway_failures: 0, latency: {enabled: false}, "
         "failure_rate: {enabled: false}}\n",
         "no-passive-health", "pools[0].health.passive.consecutive_5xx"),
        # algorithms
        ("algorithm: p2c", "algorithm: round_robin", "load-blind", "pools[0].algorithm"),
        ("    algorithm: least_connections\n    slow_start: 30s\n", "    algorithm: least_connections\n",
         "no-slow-start", "pools[1].slow_start"),
        # stickiness and draining
        ("    http: {request_timeout: 30s}", "    http: {request_timeout: 10s, sticky_cookie: lb}", "sticky-drain", None),
        ("drain_timeout: 45s", "drain_timeout: 20s", "drain-shorter-than-requests", "pools[0].drain_timeout"),
        # the balancer itself
        ("deployment: {instances: 2, failover: keepalived VIP}\n", "", "single-instance", "deployment"),
        ("deployment: {instances: 2, failover: keepalived VIP}", "deployment: {instances: 1, failover: DNS}",
         "single-instance", "deployment.instances"),
        ("deployment: {instances: 2, failover: keepalived VIP}", "deployment: {instances: 2}",
         "single-instance", "deployment.failover"),
        ('  bind: "tcp:9900:interface=127.0.0.1"\n', '  bind: "tcp:9900:interface=127.0.0.1"\n  token: "0123456789abcdef0123"\n',
         "admin-token-inline", "admin.token"),
    ],
)
def test_each_finding_names_keys_risk_and_fix(old, new, fid, key):
    text = edit(old, new)
    if fid == "sticky-drain":
        text = edit("drain_timeout: 45s", "drain_timeout: 10s", text)
        key = "pools[0].drain_timeout"
    found = findings(text)
    assert fid in found, found
    f = found[fid][0]
    assert f.keys[0] == key
    assert f.risk and f.fix and "\n" not in f.risk and "\n" not in f.fix
    # the finding is what changed: nothing else fires on an otherwise clean config
    others = set(found) - {fid}
    assert others <= {"drain-shorter-than-requests"} if fid == "sticky-drain" else not others, found


def test_the_failure_rate_rule_alone_is_passive_detection():
    text = edit("interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n",
                "interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}\n"
                "      passive: {consecutive_5xx: 0, consecutive_gateway_failures: 0, latency: {enabled: false}}\n")
    assert "no-passive-health" not in findings(text)


def test_sticky_with_hashing_on_a_cookie_needs_a_long_drain():
    text = edit("algorithm: p2c", "algorithm: ring_hash")
    text = edit("    pool: app\n    http:", "    pool: app\n    routes: [{match: {path_prefix: /}, pool: app, hash_key: 'cookie:sid', timeout: 5s}]\n    http:", text)
    text = edit("drain_timeout: 45s", "drain_timeout: 5s", text)
    (f,) = findings(text)["sticky-drain"]
    assert f.keys == ("pools[0].drain_timeout", "listeners[0].routes[0].hash_key")


def test_token_file_readable_by_others(tmp_path):
    tok = tmp_path / "admin.token"
    tok.write_text("0123456789abcdef0123\n")
    os.chmod(tok, 0o644)
    text = edit('  bind: "tcp:9900:interface=127.0.0.1"\n', f'  bind: "tcp:9900:interface=127.0.0.1"\n  token_file: "{tok}"\n')
    assert "admin-token-readable" in findings(text)
    os.chmod(tok, 0o600)
    assert findings(text) == {}


def _run(tmp_path, text: str) -> tuple[int, str, str]:
    path = tmp_path / "lb.yaml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    return run(str(path), out, err), out.getvalue(), err.getvalue()


def test_exit_status_and_output(tmp_path):
    rc, out, _ = _run(tmp_path, CLEAN)
    assert rc == 0 and "ok (valid, no findings)" in out
    rc, out, _ = _run(tmp_path, edit("algorithm: p2c", "algorithm: round_robin"))
    assert rc == 1
    first, fix = out.splitlines()[:2]
    # file:line, the key, the finding's id and the risk; then the fix
    assert first.startswith(f"{tmp_path / 'lb.yaml'}:13: warning: pools[0].algorithm [load-blind]: round_robin ignores")
    assert fix.strip().startswith("fix: use algorithm: p2c")
    # an admin listener open to the network without a token is an error
    # (twistd refuses it too, so the validator reports it, on the admin.bind line)
    rc, _, err = _run(tmp_path, edit('bind: "tcp:9900:interface=127.0.0.1"', 'bind: "tcp:9900"'))
    assert rc == 2 and "admin.bind: 'tcp:9900' is reachable from other machines" in err
    # a config twistd would refuse: the validator's lines, exit 2
    rc, _, err = _run(tmp_path, edit("pool: app\n    http", "pool: nope\n    http"))
    assert rc == 2 and "unknown pool 'nope'" in err and "twistd lbtwist would refuse" in err


def test_command_line(tmp_path):
    (tmp_path / "lb.yaml").write_text(edit("deployment: {instances: 2, failover: keepalived VIP}\n", ""))
    out = subprocess.run([sys.executable, "-m", "lbtwist.cli", "check", "lb.yaml"], cwd=tmp_path,
                         env=source_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stdout + out.stderr
    assert "[single-instance]" in out.stdout and "fix: run at least two instances" in out.stdout


def test_sample_config_review_is_explained():
    """The shipped sample runs and gets the review's advice rather than errors."""
    found = findings((REPO / "etc" / "lbtwist.yaml").read_text())
    assert "single-instance" in found
    assert all(f.severity == "warning" for fs in found.values() for f in fs)
