"""The admin API over real HTTP parsing in memory (treq's StubTreq): pools and
backends with state, operator actions, refusals that change nothing, auth,
config view and reload."""
from __future__ import annotations

import base64
import json

import pytest
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock

from lbtwist.admin.api import AdminResource
from lbtwist.admin.auth import Guard, admin_config_problems, bind_is_loopback, read_token
from lbtwist.admin.live import Live
from lbtwist.admin.metrics import make_registry
from lbtwist.admin.state import StateView
from lbtwist.config.model import AdminConfig, Config, ListenerConfig, PoolConfig
from lbtwist.pool import Backend, Health, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime
from lbtwist.traffic import TrafficRecord
from support.fakes import FirstBalancer

BASE = "http://127.0.0.1:9900"
TOKEN = "s3cret-token-0123456789"


class Env:
    def __init__(self, token=None, loopback=True, reload=None):
        self.clock = Clock()
        self.clock.advance(10_000)
        self.config = Config(
            pools=[PoolConfig(name="web", algorithm="round_robin", slow_start=20.0)],
            listeners=[ListenerConfig(name="edge", bind="tcp:8080", mode="http", pool="web")],
            admin=AdminConfig(bind="tcp:9900:interface=127.0.0.1", token=token),
        )
        self.rt = Runtime(reactor=self.clock, registry=Registry(), config=self.config)
        self.pool = Pool("web", [Backend(address="127.0.0.1:9001"), Backend(address="127.0.0.1:9002", name="b2")],
                         FirstBalancer(), self.clock, slow_start=20.0)
        self.rt.pools["web"] = self.pool
        self.rt.pool_configs["web"] = self.config.pools[0]
        self.live = Live(self.rt, self.clock)
        self.live.attach()
        self.view = StateView(self.rt, self.live, self.clock)
        self.registry = make_registry(self.rt, self.live, self.clock, process=False)
        self.resource = AdminResource(self.rt, self.view, self.registry, Guard(token, loopback), reload)
        self.http = StubTreq(self.resource)

    def request(self, method, path, body=None, headers=None):
        d = self.http.request(method, BASE + path, data=body, headers=headers or {})
        self.http.flush()
        resp = _result(d)
        raw = _result(resp.content())
        ctype = resp.headers.getRawHeaders(b"content-type", [b""])[0]
        return resp.code, (json.loads(raw) if ctype.startswith(b"application/json") else raw), resp

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)


def _result(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "request did not complete"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def backend_path(addr: str, action: str = "") -> str:
    return f"/api/pools/web/backends/{addr}" + (f"/{action}" if action else "")


def test_pools_lists_backends_with_state_counters_and_percentiles():
    env = Env()
    a, b = env.pool.backends()
    for i in range(50):
        env.pool.on_start(a)
        env.pool.on_finish(a, 0.010 if i < 49 else 0.500, True, "ok")
    env.pool.on_start(b)
    env.pool.on_finish(b, 0.03, False, "5xx")
    env.pool.on_start(b)  # in flight
    env.rt.traffic.publish(TrafficRecord(kind="http", listener="edge", start=0, duration=0.01, pool="web",
                                         backend=a.address, status=200, tries=1))
    env.clock.advance(1)
    env.pool.eject(b, env.clock.seconds() + 30, "5 consecutive 5xx")
    code, body, _ = env.get("/api/pools")
    assert code == 200
    (pool,) = body["pools"]
    assert pool["name"] == "web" and pool["algorithm"] == "round_robin"
    assert (pool["backends_total"], pool["backends_healthy"]) == (2, 2)
    ba, bb = pool["backends"]
    assert ba["state"] == "healthy" and ba["in_rotation"] is True
    assert ba["stats"]["requests"] == 50 and ba["stats"]["p50_ms"] == pytest.approx(10, rel=0.05)
    assert ba["stats"]["p99_ms"] == pytest.approx(500, rel=0.05)
    assert ba["responses"] == {"2xx": 1}
    assert len(ba["history"]["requests"]) == 59 and ba["history"]["requests"][-1] == 50
    assert bb["state"] == "ejected" and bb["ejected"] is True and bb["ejected_remaining_s"] == pytest.approx(30)
    assert bb["ejections"] == 1 and bb["active"] == 1 and bb["stats"]["error_rate"] == 1.0
    assert bb["name"] == "b2"
    assert body["listeners"][0]["name"] == "edge" and body["listeners"][0]["finished"] == {"http": 1}


def test_history_can_be_left_out():
    env = Env()
    _, body, _ = env.get("/api/pools?history=0")
    assert "history" not in body["pools"][0]["backends"][0]


def test_drain_undrain_enable_disable_change_pool_state():
    env = Env()
    a = env.pool.backends()[0]
    code, body, _ = env.post(backend_path(a.address, "drain"))
    assert code == 200 and body["draining"] is True and body["state"] == "draining"
    assert a.draining and a not in env.pool.candidates(env.clock.seconds())
    assert "admin API" in a.reason
    code, body, _ = env.post(backend_path(a.address, "undrain"))
    assert code == 200 and not a.draining
    # rejoining ramps up through slow start again
    assert body["state"] == "slow_start" and body["slow_start"]["active"] is True
    env.clock.advance(5)
    _, body, _ = env.get(backend_path(a.address))
    assert body["slow_start"]["progress"] == pytest.approx(0.25)
    assert body["slow_start"]["remaining_s"] == pytest.approx(15)
    code, body, _ = env.post(backend_path(a.address, "disable"))
    assert code == 200 and a.enabled is False and body["state"] == "disabled"
    code, body, _ = env.post(backend_path(a.address, "enable"))
    assert code == 200 and a.enabled is True


def test_set_weight_and_lookup_by_name():
    env = Env()
    code, body, _ = env.request("PUT", "/api/pools/web/backends/b2/weight", b'{"weight": 3.5}')
    assert code == 200 and body["weight"] == 3.5
    assert env.pool.get("127.0.0.1:9002").weight == 3.5


@pytest.mark.parametrize(
    "method,path,body,status,needle",
    [
        ("GET", "/api/pools/nope", None, 404, "unknown pool 'nope'; pools: web"),
        ("POST", "/api/pools/web/backends/10.0.0.9:80/drain", None, 404, "has no backend '10.0.0.9:80'"),
        ("POST", "/api/pools/web/backends/127.0.0.1:9001/explode", None, 404, "unknown action 'explode'"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": -1}', 400, "between 0 and"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": 1000001}', 400, "between 0 and 1000000, got 1000001"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": 1000000.5}', 400, "got 1000000.5"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": "7"}', 400, "must be a number"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": true}', 400, "must be a number"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": 1e400}', 400, "must be a number"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"wieght": 2}', 400, '{"weight": N}'),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", b'{"weight": 2', 400, "malformed JSON"),
        ("PUT", "/api/pools/web/backends/127.0.0.1:9001/weight", None, 400, "JSON body is required"),
        ("POST", "/api/pools/web/backends/127.0.0.1:9001/drain", b"{nope", 400, "malformed JSON"),
        ("GET", "/api/pools/web/backends/127.0.0.1:9001/drain", None, 405, "use POST"),
        ("DELETE", "/api/pools", None, 405, "not allowed"),
        ("GET", "/api/nothing", None, 404, "no such path"),
    ],
)
def test_bad_input_gets_a_json_error_and_changes_nothing(method, path, body, status, needle):
    env = Env()
    before = [(b.weight, b.draining, b.enabled) for b in env.pool.backends()]
    version = env.pool.version
    code, out, _ = env.request(method, path, body)
    assert code == status
    assert out["status"] == status and needle in out["error"]
    assert [(b.weight, b.draining, b.enabled) for b in env.pool.backends()] == before
    assert env.pool.version == version


def test_oversized_body_is_refused():
    env = Env()
    code, out, _ = env.request("PUT", backend_path("127.0.0.1:9001", "weight"), b'{"weight": 1}' + b" " * 70000)
    assert code == 413 and env.pool.backends()[0].weight == 1.0


def test_providers_appear_in_backend_and_pool_json_and_a_broken_one_is_contained():
    env = Env()
    env.rt.backend_state["breaker"] = lambda pool, b: {"state": "half-open", "opened_total": 2}
    env.rt.pool_state["retry_budget"] = lambda pool: {"available": 3.0}
    env.rt.backend_state["probe"] = lambda pool, b: (_ for _ in ()).throw(RuntimeError("probe table gone"))
    code, body, _ = env.get("/api/pools")
    assert code == 200
    b = body["pools"][0]["backends"][0]
    assert b["breaker"] == {"state": "half-open", "opened_total": 2}
    assert b["probe"]["error"] == "RuntimeError: probe table gone"
    assert body["pools"][0]["retry_budget"] == {"available": 3.0}


def test_config_view_redacts_the_token():
    env = Env(token=TOKEN)
    code, body, _ = env.get("/api/config", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200
    assert body["admin"]["token"] == "***" and TOKEN not in json.dumps(body)
    assert body["pools"][0]["slow_start"] == 20.0


def test_token_required_when_configured():
    env = Env(token=TOKEN, loopback=False)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": "Basic !!!"}):
        code, body, resp = env.get("/api/pools", headers=headers)
        assert code == 401 and body["error"] == "missing or wrong bearer token"
        challenges = resp.headers.getRawHeaders(b"www-authenticate")
        assert any(c.startswith(b"Bearer") for c in challenges) and any(c.startswith(b"Basic") for c in challenges)
    code, _, _ = env.post(backend_path("127.0.0.1:9001", "drain"))
    assert code == 401 and not env.pool.backends()[0].draining
    assert env.get("/metrics")[0] == 401
    assert env.get("/api/pools", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    # a browser's Basic prompt: any user name, the token as password
    basic = base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    assert env.get("/", headers={"Authorization": f"Basic {basic}"})[0] == 200


def test_cross_site_post_and_dns_rebinding_are_refused_on_loopback():
    env = Env()
    a = env.pool.backends()[0]
    code, body, _ = env.post(backend_path(a.address, "drain"), headers={"Origin": "https://evil.example"})
    assert code == 403 and "cross-origin" in body["error"] and not a.draining
    code, body, _ = env.get("/api/pools", headers={"Host": "evil.example:9900"})
    assert code == 403 and "not a loopback name" in body["error"]
    code, _, _ = env.post(backend_path(a.address, "drain"), headers={"Origin": "http://127.0.0.1:9900"})
    assert code == 200 and a.draining  # the dashboard itself (same origin)


def test_reload_success_failure_and_absence():
    calls = []

    def good():
        calls.append(1)
        return defer.succeed("2 listeners, 1 pool")

    env = Env(reload=good)
    code, body, _ = env.post("/api/reload")
    assert code == 200 and body == {"reloaded": True, "result": "2 listeners, 1 pool"} and calls == [1]
    assert env.get("/api/reload")[0] == 405

    def bad():
        raise ValueError("pools[0].algorithm: unknown algorithm 'rr'")

    env = Env(reload=bad)
    code, body, _ = env.post("/api/reload")
    assert code == 422 and body["reloaded"] is False and "unknown algorithm" in body["error"]

    env = Env()
    code, body, _ = env.post("/api/reload")
    assert code == 501


def test_dashboard_and_metrics_are_served():
    env = Env()
    code, html, resp = env.get("/")
    assert code == 200 and b"dashboard.js" in html
    assert resp.headers.getRawHeaders(b"content-security-policy")
    code, js, _ = env.get("/dashboard.js")
    assert code == 200 and b"api/pools" in js
    code, text, resp = env.get("/metrics")
    assert code == 200 and b"lbtwist_pool_backends{pool=\"web\"} 2.0" in text
    assert resp.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")


@pytest.mark.parametrize(
    "bind,loopback",
    [
        ("tcp:9900:interface=127.0.0.1", True),
        ("tcp:9900:interface=127.9.9.9", True),
        ("tcp6:9900:interface=\\:\\:1", True),
        ("tcp:9900:interface=localhost", True),
        ("unix:/run/lbtwist/admin.sock", True),
        ("tcp:9900", False),
        ("tcp:9900:interface=0.0.0.0", False),
        ("tcp:9900:interface=10.1.2.3", False),
        ("tcp6:9900", False),
    ],
)
def test_loopback_detection(bind, loopback):
    assert bind_is_loopback(bind) is loopback


def test_non_loopback_bind_needs_a_token(tmp_path):
    assert admin_config_problems(AdminConfig(bind="tcp:9900:interface=127.0.0.1")) == []
    (problem,) = admin_config_problems(AdminConfig(bind="tcp:9900"))
    assert problem[0] == "admin.bind" and "token_file" in problem[1]
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert admin_config_problems(AdminConfig(bind="tcp:9900", token_file=str(f))) == []
    assert read_token(AdminConfig(bind="tcp:9900", token_file=str(f))) == TOKEN
    (problem,) = admin_config_problems(AdminConfig(bind="tcp:9900", token_file=str(tmp_path / "missing")))
    assert problem[0] == "admin.token_file" and "cannot read" in problem[1]
    (problem,) = admin_config_problems(AdminConfig(bind="tcp:9900", token="short"))
    assert problem[0] == "admin.token" and "16 characters" in problem[1]


def test_admin_drain_enforces_the_pool_drain_timeout():
    """An admin drain gets the same timer as config removal: at the pool's
    drain_timeout the data plane is told to cut the work left; undrain first
    stops the timer; a second drain does not restart it."""
    env = Env()
    env.pool.drain_timeout = 2.0
    a, b = env.pool.backends()
    seen = []
    env.pool.subscribe(lambda pool, backend, state, reason: seen.append((backend, state)))
    env.pool.on_start(a)  # a request in flight on a
    assert env.post(backend_path(a.address, "drain"))[0] == 200
    env.clock.advance(1.0)
    assert env.post(backend_path(a.address, "drain"))[0] == 200  # again: same deadline
    env.clock.advance(0.9)
    assert (a, "drain-expired") not in seen
    env.clock.advance(0.2)
    assert seen.count((a, "drain-expired")) == 1
    env.clock.advance(5)
    assert seen.count((a, "drain-expired")) == 1

    env.pool.on_start(b)
    assert env.post(backend_path(b.address, "drain"))[0] == 200
    env.clock.advance(1.0)
    assert env.post(backend_path(b.address, "undrain"))[0] == 200
    env.clock.advance(5)
    assert (b, "drain-expired") not in seen and not b.draining


def test_listener_retries_are_listed_per_route_label_with_sums():
    """GET /api/listeners carries the retries section the dashboard and
    scripts read: sums per listener, and per route keyed by its label."""
    from lbtwist.config.model import RouteConfig
    from support.l7 import MemHarness, listener_config

    routes = [RouteConfig(name="api", match={"path_prefix": "/api"}, pool="app"), RouteConfig(match={}, pool="app")]
    h = MemHarness(listener=listener_config(routes=routes))
    live = Live(h.runtime, h.reactor)
    view = StateView(h.runtime, live, h.reactor)
    resource = AdminResource(h.runtime, view, make_registry(h.runtime, live, h.reactor, process=False),
                             Guard(None, True), None)
    http = StubTreq(resource)
    d = http.request("GET", BASE + "/api/listeners")
    http.flush()
    body = json.loads(_result(_result(d).content()))
    (web,) = [x for x in (body["listeners"] if isinstance(body, dict) else body) if x["name"] == "web"]
    retries = web["retries"]
    assert sorted(retries["by_route"]) == ["api", "app", "default"]
    assert retries["retries_all_routes_total"] == 0 and retries["budget_exhausted_all_routes_total"] == 0
    assert retries["by_route"]["api"]["requests_total"] == 0
