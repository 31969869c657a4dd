"""Resilience config: the issue's shape loads, defaults are the contract's,
and validation reports timeouts that do not descend, with the keys involved."""
import textwrap

import pytest

from lbtwist.config.loader import load
from lbtwist.config.validate import descending_timeouts, resilience_settings, validate
from lbtwist.resilience import PoolResilience, RouteResilience

ISSUE_EXAMPLE = """
listeners:
  - name: web
    bind: tcp:0:interface=127.0.0.1
    mode: http
    pool: app
    routes:
      - match: {path_prefix: /}
        pool: app
        timeout: 3s
        retry: {retry_on: [connect-failure, reset, timeout, 503], max_attempts: 2, per_try_timeout: 1s,
                backoff: {base: 25ms, max: 250ms}, budget_percent: 10, min_retries_per_second: 3}
        rate_limit: {rate: 100, burst: 200, key: client}
pools:
  - name: app
    backends: [{address: "127.0.0.1:9001"}]
    circuit_breaker: {consecutive_failures: 5, open_for: 10s, half_open_requests: 3}
    limits: {max_connections: 1024, max_pending: 256, max_requests: 1024, max_retries: 3}
"""


def problems(text, checks=(resilience_settings, descending_timeouts)):
    res = load(textwrap.dedent(text), "t.yaml")
    assert [str(p) for p in res.problems] == []
    return [(p.severity, p.path, p.message) for p in validate(res.config, res.positions, None, source="t.yaml", checks=checks)], res


def route_yaml(route="", pool="", listener=""):
    return f"""
listeners:
  - name: web
    bind: tcp:0:interface=127.0.0.1
    mode: http
{textwrap.indent(textwrap.dedent(listener), "    ")}
    routes:
      - match: {{path_prefix: /}}
        pool: app
{textwrap.indent(textwrap.dedent(route), "        ")}
pools:
  - name: app
    backends: [{{address: "127.0.0.1:9001"}}]
{textwrap.indent(textwrap.dedent(pool), "    ")}
"""


def test_issue_example_loads_builds_and_is_clean():
    found, res = problems(ISSUE_EXAMPLE)
    assert found == []
    route = res.config.listeners[0].routes[0]
    rr = RouteResilience.from_config(route, name="web/0")
    assert rr.timeout == 3.0 and rr.policy.per_try_timeout == 1.0
    assert rr.policy.statuses == {503} and rr.policy.backoff.cap == 0.25
    assert rr.rate_limiter.rate == 100 and rr.rate_limiter.burst == 200
    pr = PoolResilience.from_config(res.config.pools[0])
    assert pr.breakers.settings.half_open_requests == 3 and pr.limits.settings.max_pending == 256
    assert pr.budget is None


def test_default_route_config_is_the_contract():
    found, res = problems(route_yaml())
    assert found == []
    r = res.config.listeners[0].routes[0].retry
    assert r.retry_on == ["connect-failure", "reset"] and r.max_attempts == 2
    assert (r.budget_percent, r.min_retries_per_second, r.budget_window) == (10.0, 3.0, 10.0)


def test_per_try_timeout_not_below_route_timeout_with_timeout_retries_is_an_error():
    found, _ = problems(route_yaml("timeout: 5s\nretry: {retry_on: [timeout], per_try_timeout: 5s}"))
    assert found == [(
        "error", "listeners[0].routes[0].retry.per_try_timeout",
        "per_try_timeout (5s) is not below the route timeout (listeners[0].routes[0].timeout = 5s): "
        "a try can never time out before the whole request does, so 'timeout' retries can never happen",
    )]


def test_per_try_timeout_useless_without_timeout_retries_is_a_warning():
    found, _ = problems(route_yaml("timeout: 5s\nretry: {per_try_timeout: 8s}"))
    assert [(s, p) for s, p, _ in found] == [("warning", "listeners[0].routes[0].retry.per_try_timeout")]
    assert "has no effect" in found[0][2]


def test_tries_times_per_try_over_route_timeout_warns_and_names_listener_default():
    found, _ = problems(route_yaml(
        "retry: {retry_on: [timeout], max_attempts: 3, per_try_timeout: 25s}", listener="http: {request_timeout: 60s}"))
    assert len(found) == 1 and found[0][0] == "warning"
    assert "listeners[0].http.request_timeout = 60s" in found[0][2] and "cut short" in found[0][2]


def test_timeout_retry_without_per_try_timeout_warns():
    found, _ = problems(route_yaml("retry: {retry_on: [timeout, reset]}"))
    assert [(s, p) for s, p, _ in found] == [("warning", "listeners[0].routes[0].retry.retry_on")]


def test_client_idle_must_exceed_route_timeout():
    found, _ = problems(route_yaml("timeout: 30s", listener="idle_timeout: 30s"))
    assert [(s, p) for s, p, _ in found] == [("warning", "listeners[0].idle_timeout")]
    assert "listeners[0].routes[0].timeout = 30s" in found[0][2]


def test_connect_timeout_that_eats_the_try():
    found, _ = problems(route_yaml("timeout: 2s", pool="connect_timeout: 5s"))
    assert [(s, p) for s, p, _ in found] == [("warning", "pools[0].connect_timeout")]
    assert "never retried" in found[0][2]


def test_probe_timeout_not_below_interval_warns():
    found, _ = problems(route_yaml(pool="health: {active: {interval: 2s, timeout: 2s}}"))
    assert [(s, p) for s, p, _ in found] == [("warning", "pools[0].health.active.timeout")]


def test_retries_asked_but_pool_allows_none():
    found, _ = problems(route_yaml("retry: {max_attempts: 3}", pool="limits: {max_retries: 0}"))
    assert [(s, p) for s, p, _ in found] == [("warning", "pools[0].limits.max_retries")]


@pytest.mark.parametrize("route, pool, path, fragment", [
    ("retry: {retry_on: [conect-failure]}", "", "listeners[0].routes[0].retry.retry_on", "did you mean"),
    ("retry: {retry_on: [200]}", "", "listeners[0].routes[0].retry.retry_on", "4xx/5xx"),
    ("retry: {max_attempts: 0}", "", "listeners[0].routes[0].retry.max_attempts", "at least 1"),
    ("retry: {backoff: {base: 1s, max: 100ms}}", "", "listeners[0].routes[0].retry.backoff", "above max"),
    ("retry: {idempotency_header: 'bad header'}", "", "listeners[0].routes[0].retry.idempotency_header", "valid header"),
    ("rate_limit: {rate: 0}", "", "listeners[0].routes[0].rate_limit.rate", "above 0"),
    ("rate_limit: {rate: 5, burst: 0.5}", "", "listeners[0].routes[0].rate_limit.burst", "at least 1"),
    ("rate_limit: {rate: 5, key: ip}", "", "listeners[0].routes[0].rate_limit.key", "client, route or header"),
    ("", "circuit_breaker: {open_for: 0}", "pools[0].circuit_breaker.open_for", "above 0"),
    ("", "circuit_breaker: {half_open_requests: 0}", "pools[0].circuit_breaker.half_open_requests", "never closes"),
    ("", "circuit_breaker: {failure_statuses: [5030]}", "pools[0].circuit_breaker.failure_statuses[0]", "not an HTTP"),
    ("", "limits: {max_requests: 0}", "pools[0].limits.max_requests", "never serve"),
    ("", "retry_budget: {window: 0}", "pools[0].retry_budget.window", "above 0"),
])
def test_setting_errors_name_the_key(route, pool, path, fragment):
    found, _ = problems(route_yaml(route, pool), checks=(resilience_settings,))
    assert len(found) == 1, found
    severity, p, message = found[0]
    assert (severity, p) == ("error", path) and fragment in message


def test_problems_carry_lines():
    res = load(route_yaml("timeout: 5s\nretry: {retry_on: [timeout], per_try_timeout: 5s}"), "t.yaml")
    (p,) = validate(res.config, res.positions, None, source="t.yaml", checks=(descending_timeouts,))
    assert str(p).startswith("t.yaml:11: listeners[0].routes[0].retry.per_try_timeout:")


def test_disabled_breaker_may_have_zero_open_for():
    found, _ = problems(route_yaml(pool="circuit_breaker: {consecutive_failures: 0, open_for: 0}"))
    assert found == []
