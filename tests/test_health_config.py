"""The health config: the issue's YAML shape loads, and health blocks that
cannot work are errors at load time, on the right line."""
from __future__ import annotations

import textwrap

import pytest

import lbtwist.balancers.builtin
import lbtwist.health.builtin
from lbtwist.config import ConfigError, load_config
from lbtwist.registry import Registry


def _registry() -> Registry:
    reg = Registry()
    reg.register(lbtwist.balancers.builtin, "lbtwist.balancers")
    reg.register(lbtwist.health.builtin, "lbtwist.health.builtin")
    reg.collect()
    return reg


REG = _registry()

SHAPE = """\
pools:
  - name: app
    slow_start: 30s
    drain_timeout: 30s
    backends:
      - address: "127.0.0.1:9001"
    health:
      active: {kind: http, path: /healthz, interval: 5s, timeout: 2s, unhealthy_threshold: 3, healthy_threshold: 2}
      passive: {consecutive_5xx: 5, consecutive_gateway_failures: 5, base_ejection_time: 30s, max_ejection_percent: 50}
      panic_threshold: 50
"""


def problems(text):
    try:
        return load_config(textwrap.dedent(text), REG, source_name="t.yaml").warnings
    except ConfigError as e:
        return e.problems


def test_the_issue_shape_loads():
    cfg = load_config(SHAPE, REG, source_name="t.yaml").config
    pool = cfg.pools[0]
    assert (pool.slow_start, pool.drain_timeout) == (30.0, 30.0)
    a = pool.health.active
    assert (a.kind, a.path, a.interval, a.timeout, a.unhealthy_threshold, a.healthy_threshold) == (
        "http", "/healthz", 5.0, 2.0, 3, 2)
    p = pool.health.passive
    assert (p.consecutive_5xx, p.consecutive_gateway_failures, p.base_ejection_time, p.max_ejection_percent) == (
        5, 5, 30.0, 50.0)
    assert pool.health.panic_threshold == 50.0


def test_passive_is_on_and_active_off_by_default():
    cfg = load_config("pools:\n  - name: app\n    backends: [{address: '127.0.0.1:1'}]\n", REG).config
    h = cfg.pools[0].health
    assert h.active is None
    assert h.passive.enabled and h.passive.latency.enabled


def errors(text):
    return [(p.line, p.message) for p in problems(text) if p.severity == "error"]


def test_timeout_not_below_interval_is_an_error():
    errs = errors(SHAPE.replace("timeout: 2s", "timeout: 5s"))
    assert (8, "probe timeout (5s) must be below the interval (5s)") in errs


@pytest.mark.parametrize("change,message", [
    ("kind: http,", "unknown health probe kind 'htp' (did you mean 'http'?)"),
    ("unhealthy_threshold: 3", "must be at least 1"),
    ("path: /healthz", "health probe 'http': path must start with '/', got 'healthz'"),
    ("base_ejection_time: 30s", "below base_ejection_time (30s)"),
    ("max_ejection_percent: 50", "150 is not a percentage (0-100)"),
    ("panic_threshold: 50", "101 is not a percentage (0-100)"),
])
def test_bad_health_settings(change, message):
    replacement = {
        "kind: http,": "kind: htp,",
        "unhealthy_threshold: 3": "unhealthy_threshold: 0",
        "path: /healthz": "path: healthz",
        "base_ejection_time: 30s": "base_ejection_time: 30s, max_ejection_time: 10s",
        "max_ejection_percent: 50": "max_ejection_percent: 150",
        "panic_threshold: 50": "panic_threshold: 101",
    }[change]
    errs = errors(SHAPE.replace(change, replacement))
    assert any(message in m for _, m in errs), errs


def test_deep_check_example_in_etc_is_valid():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "etc" / "health-deep-check.yaml"
    loaded = load_config(path, Registry.default())
    assert loaded.warnings == []
    app, redis = loaded.config.pools
    assert app.health.active.path == "/healthz?deep=1" and app.health.active.body_match
    assert redis.health.active.kind == "tcp_banner"
    assert redis.health.active.options == {"send": "PING\r\n", "expect": "+PONG"}


@pytest.mark.parametrize("failure_rate,message", [
    ("{threshold: 0}", "0 is not a percentage above 0 (0-100]"),
    ("{threshold: 120}", "120 is not a percentage above 0 (0-100]"),
    ("{min_requests: 0}", "must be at least 1"),
    ("{min_requests: 5, request_volume: 4}", "(4) is below min_requests (5): no backend could be judged"),
    ("{window: 0s}", "must be above 0"),
])
def test_bad_failure_rate_settings(failure_rate, message):
    text = SHAPE.replace("max_ejection_percent: 50}", f"max_ejection_percent: 50, failure_rate: {failure_rate}}}")
    errs = errors(text)
    assert any(message in m for _, m in errs), errs


def test_failure_rate_and_balancer_estimate_load():
    text = SHAPE.replace("max_ejection_percent: 50}", "max_ejection_percent: 50, failure_rate: {threshold: 80, "
                         "request_volume: 20, window: 2m}, latency: {balancer_estimate: false}}")
    p = load_config(text, REG, source_name="t.yaml").config.pools[0].health.passive
    assert (p.failure_rate.threshold, p.failure_rate.request_volume, p.failure_rate.window) == (80.0, 20, 120.0)
    assert p.failure_rate.enabled and p.failure_rate.min_requests == 3
    assert p.latency.balancer_estimate is False
