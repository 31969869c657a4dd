"""Per-backend figures: the sans-IO window (rates, error rates, percentiles,
history), the live feed from pools and traffic records, and the Prometheus
exposition built from them, including parts that plug in through providers."""
from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from lbtwist.admin.live import Live
from lbtwist.admin.metrics import exposition, make_registry
from lbtwist.admin.window import Meter, percentile, fine_index, fine_value, spread
from lbtwist.config.model import Config, ListenerConfig, PoolConfig
from lbtwist.pool import Backend, Health, PickContext, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime
from lbtwist.traffic import TrafficRecord
from support.fakes import FirstBalancer


def make_runtime(clock: Clock, n: int = 3, listeners=("web",)) -> Runtime:
    cfg = Config(
        pools=[PoolConfig(name="web", algorithm="round_robin")],
        listeners=[ListenerConfig(name=name, bind="tcp:0", mode="http", pool="web") for name in listeners],
    )
    rt = Runtime(reactor=clock, registry=Registry(), config=cfg)
    backends = [Backend(address=f"127.0.0.1:{9001 + i}") for i in range(n)]
    rt.pools["web"] = Pool("web", backends, FirstBalancer(), clock)
    rt.pool_configs["web"] = cfg.pools[0]
    return rt


def families(registry) -> dict:
    text = exposition(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams, family, name=None, **labels):
    fam = fams[family]
    name = name or family
    for s in fam.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


# -- the window -----------------------------------------------------------------


def test_fine_histogram_resolution_is_within_five_percent():
    for lat in (0.0001, 0.0034, 0.05, 0.2, 1.7, 42.0):
        assert abs(fine_value(fine_index(lat)) - lat) / lat < 0.05


def test_window_rate_error_rate_and_percentiles():
    m = Meter()
    # 10 complete seconds, 100 tries each: latencies 1..100 ms, 2 errors a second
    for sec in range(100, 110):
        for i in range(100):
            m.observe(sec + i / 100.0, (i + 1) / 1000.0, error=i < 2)
    w = m.window(110.0, 10)
    assert w.count == 1000 and w.rps == pytest.approx(100.0)
    assert w.error_rate == pytest.approx(0.02)
    assert w.p50 == pytest.approx(0.050, rel=0.05)
    assert w.p99 == pytest.approx(0.099, rel=0.05)
    # the current, incomplete second is not counted: a rate must not dip each second
    m.observe(110.5, 0.5, False)
    assert m.window(110.9, 10).count == 1000
    # once its second completes it counts, and 10 s later it has left the window
    assert m.window(111.0, 10).count == 901
    assert m.window(120.0, 10).count == 1
    assert m.window(121.0, 10).count == 0
    assert m.window(200.0, 10).rps == 0 and m.window(200.0, 10).p99 is None


def test_window_forgets_slots_older_than_its_history():
    m = Meter(history=60)
    m.observe(10.0, 0.01, True)
    m.observe(70.0, 0.02, False)  # same slot index, a minute later
    w = m.window(71.0, 30)
    assert (w.count, w.errors) == (1, 0)
    assert m.count == 2 and m.errors == 1  # cumulative counters never forget


def test_series_is_per_second_oldest_first_with_gaps():
    m = Meter()
    m.observe(100.2, 0.010, False)
    m.observe(100.7, 0.030, True)
    m.observe(102.1, 0.020, False)
    s = m.series(103.0, 4)
    assert s["start"] == 99
    assert s["requests"] == [0, 2, 0, 1]
    assert s["errors"] == [0, 1, 0, 0]
    assert s["p99_ms"][0] is None and s["p99_ms"][2] is None
    assert s["p99_ms"][1] == pytest.approx(30.0, rel=0.05)


def test_cancelled_work_counts_but_has_no_latency():
    m = Meter()
    m.observe(5.0, None, False)
    assert m.count == 1 and m.latency_sum == 0 and m.prometheus_buckets()[-1] == ("+Inf", 0)


def test_spread_is_zero_when_even_and_grows_with_a_hot_backend():
    assert spread([10, 10, 10]) == 0
    assert spread([]) == 0 and spread([0, 0]) == 0
    assert spread([10, 10, 40]) > spread([10, 12, 14]) > 0


def test_percentile_of_empty_histogram_is_none():
    assert percentile({}, 0.99) is None


# -- live feed ------------------------------------------------------------------


def test_live_counts_tries_per_backend_and_requests_per_pool():
    clock = Clock()
    clock.advance(1000)
    rt = make_runtime(clock)
    live = Live(rt, clock)
    live.attach()
    pool = rt.pools["web"]
    a, b, _ = pool.backends()
    # a request that failed on a (gateway) and was retried on b
    pool.on_start(a)
    pool.on_finish(a, 0.2, False, "gateway")
    pool.on_start(b)
    pool.on_finish(b, 0.01, True, "ok")
    rt.traffic.publish(TrafficRecord(kind="http", listener="web", start=0, duration=0.25, pool="web",
                                     backend=b.address, status=200, tries=2, bytes_in=10, bytes_out=99))
    assert live.backend("web", a.address).outcomes == {"gateway": 1}
    assert live.backend("web", a.address).meter.errors == 1
    assert live.backend("web", b.address).responses == {"2xx": 1}
    assert live.backend("web", a.address).responses == {}
    assert live.pool("web").retries == 1
    ll = live.listener("web")
    assert (ll.bytes_in, ll.bytes_out, ll.by_kind) == (10, 99, {"http": 1})
    pool.eject(a, clock.seconds() + 30, "5 consecutive 5xx")
    assert live.backend("web", a.address).ejections == 1
    live.detach()
    pool.on_start(a)
    pool.on_finish(a, 0.2, False, "gateway")
    assert live.backend("web", a.address).outcomes == {"gateway": 1}


def test_live_follows_a_pool_rebuilt_by_reload():
    clock = Clock()
    rt = make_runtime(clock, n=2)
    live = Live(rt, clock)
    live.attach()
    old = rt.pools["web"]
    old.on_start(old.backends()[0])
    old.on_finish(old.backends()[0], 0.01, True, "ok")
    # reload: same pool name, new objects, one backend gone and one new
    new = Pool("web", [Backend(address="127.0.0.1:9001"), Backend(address="127.0.0.1:9555")], FirstBalancer(), clock)
    rt.pools["web"] = new
    live.sync()
    assert ("web", "127.0.0.1:9002") not in live.backends
    assert live.backend("web", "127.0.0.1:9001").meter.count == 1  # survives the reload
    new.on_start(new.backends()[1])
    new.on_finish(new.backends()[1], 0.01, True, "ok")
    assert live.backend("web", "127.0.0.1:9555").meter.count == 1
    old.on_start(old.backends()[0])
    old.on_finish(old.backends()[0], 0.01, True, "ok")  # the retired pool no longer counts
    assert live.backend("web", "127.0.0.1:9001").meter.count == 1


# -- Prometheus -----------------------------------------------------------------


def test_metrics_break_down_per_backend_and_quantiles_are_computable():
    clock = Clock()
    clock.advance(5000)
    rt = make_runtime(clock)
    live = Live(rt, clock)
    live.attach()
    reg = make_registry(rt, live, clock, process=False)
    pool = rt.pools["web"]
    a, b, c = pool.backends()
    for i in range(200):  # a is fast, b is slow and failing: the fleet average would hide it
        pool.on_start(a)
        pool.on_finish(a, 0.004, True, "ok")
        pool.on_start(b)
        pool.on_finish(b, 0.8 if i % 4 else 0.02, i % 2 == 0, "ok" if i % 2 == 0 else "5xx")
    pool.on_start(c)  # one connection still open on c
    fams = families(reg)
    L = {"pool": "web"}
    assert sample(fams, "lbtwist_backend_tries", "lbtwist_backend_tries_total", backend=a.address, outcome="ok", **L) == 200
    assert sample(fams, "lbtwist_backend_tries", "lbtwist_backend_tries_total", backend=b.address, outcome="5xx", **L) == 100
    assert sample(fams, "lbtwist_backend_active", backend=c.address, **L) == 1
    assert sample(fams, "lbtwist_backend_health", backend=a.address, state="healthy", **L) == 1
    assert sample(fams, "lbtwist_backend_health", backend=a.address, state="unhealthy", **L) == 0

    def quantile(backend, q):
        h = fams["lbtwist_backend_latency_seconds"]
        buckets = sorted(
            (float(s.labels["le"]), s.value) for s in h.samples
            if s.name.endswith("_bucket") and s.labels["backend"] == backend
        )
        total = buckets[-1][1]
        for le, n in buckets:
            if n >= q * total:
                return le
        return math.inf

    assert quantile(a.address, 0.99) <= 0.005  # p99 of a within its bucket
    assert quantile(b.address, 0.5) >= 0.5 and quantile(b.address, 0.99) <= 1.0
    assert sample(fams, "lbtwist_backend_latency_seconds", "lbtwist_backend_latency_seconds_count",
                  backend=b.address, **L) == 200


def test_state_metrics_follow_pool_changes():
    clock = Clock()
    clock.advance(100)
    rt = make_runtime(clock, n=4)
    live = Live(rt, clock)
    live.attach()
    reg = make_registry(rt, live, clock, process=False)
    pool = rt.pools["web"]
    a, b, c, d = pool.backends()
    pool.set_health(a, Health.UNHEALTHY, "3 probes failed")
    pool.eject(b, clock.seconds() + 30, "5 consecutive gateway failures")
    pool.set_draining(c, True, "test")
    fams = families(reg)
    L = {"pool": "web"}
    assert sample(fams, "lbtwist_pool_backends", **L) == 4
    assert sample(fams, "lbtwist_pool_backends_healthy", **L) == 3  # an ejected backend is still healthy
    # only d is fully usable: 1 of 3 live is under the 50% panic threshold, so
    # the pool routes across all three that are enabled and not draining
    assert sample(fams, "lbtwist_pool_panic", **L) == 1
    assert sample(fams, "lbtwist_pool_backends_in_rotation", **L) == 3
    assert sample(fams, "lbtwist_backend_state", backend=b.address, state="ejected", **L) == 1
    assert sample(fams, "lbtwist_backend_state", backend=c.address, state="draining", **L) == 1
    assert sample(fams, "lbtwist_backend_in_rotation", backend=d.address, **L) == 1
    assert sample(fams, "lbtwist_backend_ejections", "lbtwist_backend_ejections_total", backend=b.address, **L) == 1
    assert sample(fams, "lbtwist_backend_state_changes", "lbtwist_backend_state_changes_total",
                  backend=a.address, to="unhealthy", **L) == 1
    # the ejection expires: b is back, panic ends, a (unhealthy) leaves rotation
    clock.advance(31)
    fams = families(reg)
    assert sample(fams, "lbtwist_pool_panic", **L) == 0
    assert sample(fams, "lbtwist_backend_in_rotation", backend=b.address, **L) == 1
    assert sample(fams, "lbtwist_backend_in_rotation", backend=a.address, **L) == 0


def test_load_spread_flags_a_backend_taking_more_than_its_share():
    clock = Clock()
    clock.advance(100)
    rt = make_runtime(clock, n=3)
    live = Live(rt, clock)
    live.attach()
    reg = make_registry(rt, live, clock, process=False)
    pool = rt.pools["web"]
    a, b, c = pool.backends()
    for _ in range(10):
        for backend, n in ((a, 10), (b, 10), (c, 10)):
            for _ in range(n):
                pool.on_start(backend)
                pool.on_finish(backend, 0.01, True, "ok")
        clock.advance(1)
    even = sample(families(reg), "lbtwist_pool_load_spread", pool="web")
    for _ in range(10):
        for backend, n in ((a, 10), (b, 10), (c, 40)):
            for _ in range(n):
                pool.on_start(backend)
                pool.on_finish(backend, 0.01, True, "ok")
        clock.advance(1)
    hot = sample(families(reg), "lbtwist_pool_load_spread", pool="web")
    assert even == pytest.approx(0.0, abs=1e-9)
    assert hot > 0.5


def test_providers_become_metrics_and_json_without_code_here():
    """How breakers, retry budgets and TLS plug in: one registration each."""
    clock = Clock()
    rt = make_runtime(clock, n=2, listeners=("edge",))
    live = Live(rt, clock)
    live.attach()
    reg = make_registry(rt, live, clock, process=False)
    states = {"127.0.0.1:9001": "open", "127.0.0.1:9002": "closed"}
    rt.backend_state["breaker"] = lambda pool, b: {"state": states[b.address], "opened_total": 3, "note": "free text stays JSON-only"}
    rt.pool_state["retry_budget"] = lambda pool: {"retries_total": 12, "exhausted_total": 2, "available": 4.5}
    rt.listener_state["tls"] = lambda name: {"handshakes_full_total": 7, "handshakes_resumed_total": 93, "connections": 5}
    rt.backend_state["broken"] = lambda pool, b: 1 / 0
    fams = families(reg)
    L = {"pool": "web"}
    assert sample(fams, "lbtwist_backend_breaker_state", backend="127.0.0.1:9001", state="open", **L) == 1
    assert sample(fams, "lbtwist_backend_breaker_state", backend="127.0.0.1:9002", state="closed", **L) == 1
    assert fams["lbtwist_backend_breaker_opened"].type == "counter"
    assert sample(fams, "lbtwist_pool_retry_budget_exhausted", "lbtwist_pool_retry_budget_exhausted_total", **L) == 2
    assert sample(fams, "lbtwist_pool_retry_budget_available", **L) == 4.5
    assert sample(fams, "lbtwist_listener_tls_handshakes_resumed", "lbtwist_listener_tls_handshakes_resumed_total", listener="edge") == 93
    assert sample(fams, "lbtwist_listener_tls_connections", listener="edge") == 5
    assert not any("note" in name for name in fams)


def test_each_runtime_has_its_own_registry():
    c1, c2 = Clock(), Clock()
    rt1, rt2 = make_runtime(c1, n=1), make_runtime(c2, n=2)
    r1 = make_registry(rt1, Live(rt1, c1), c1, process=False)
    r2 = make_registry(rt2, Live(rt2, c2), c2, process=False)
    assert sample(families(r1), "lbtwist_pool_backends", pool="web") == 1
    assert sample(families(r2), "lbtwist_pool_backends", pool="web") == 2
    from prometheus_client import REGISTRY

    assert "lbtwist_pool_backends" not in exposition(REGISTRY).decode()


# -- http listeners: connection counters from the listener itself -------------------------------


def test_http_listener_exports_accepted_and_refused_connections_across_a_reload():
    from types import SimpleNamespace

    from twisted.application.service import MultiService
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from lbtwist.admin import AdminService
    from lbtwist.config.model import AdminConfig
    from lbtwist.l7.listener import HttpListenerService
    from support.l7 import listener_config, make_runtime as l7_runtime

    reactor = MemoryReactorClock()
    cfg = ListenerConfig(name="web", bind="tcp:0", mode="http", pool="app", max_connections=2)
    rt = l7_runtime(reactor, {"app": ["10.0.0.1:80"]}, cfg)
    svc = HttpListenerService(cfg, rt)
    group = MultiService()
    svc.setServiceParent(group)
    admin = AdminService(AdminConfig(bind="tcp:0:interface=127.0.0.1"), rt, process_metrics=False)
    admin.parent = SimpleNamespace(listeners=group)

    def connect():
        p = svc.factory.buildProtocol(None)
        p.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1000)))
        return p

    first = connect()
    connect()
    connect()  # over max_connections: refused with a 503
    first.connectionLost(None)
    svc.reconfigure(cfg)  # a reload keeps the counts
    connect()
    admin.startService()
    try:
        fams = families(admin.registry)
        assert sample(fams, "lbtwist_listener_connections_accepted", "lbtwist_listener_connections_accepted_total", listener="web") == 3
        assert sample(fams, "lbtwist_listener_connections_refused", "lbtwist_listener_connections_refused_total", listener="web") == 1
        assert sample(fams, "lbtwist_listener_connections_active", listener="web") == 2
    finally:
        admin.stopService()


# -- retries per route: the route's label, not its index, and a per-listener sum --------------


def test_retries_are_labelled_by_route_with_a_per_listener_sum():
    from lbtwist.config.model import RouteConfig
    from support.l7 import MemHarness, listener_config, ok

    routes = [RouteConfig(match={"path_prefix": "/new"}, pool="app"),  # inserted first: no index shifts others
              RouteConfig(name="api", match={"path_prefix": "/api"}, pool="app"),
              RouteConfig(match={}, pool="app")]
    h = MemHarness({"app": ["10.0.0.1:80", "10.0.0.2:80"]}, listener=listener_config(routes=routes))
    proto, t = h.client()
    for path in (b"/api/1", b"/api/2", b"/other"):
        proto.dataReceived(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
        h.refuse()  # the first try fails to connect: retried on the other backend, after a backoff
        h.advance(1.0)
        h.accept().reply(ok(headers=[(b"connection", b"close")]))
    json_state = h.runtime.listener_state["retries"]("web")
    assert json_state["by_route"]["api"]["retries_total"] == 2 and json_state["retries_all_routes_total"] == 3
    assert set(json_state["by_route"]) == {"app", "api", "app~2", "default"}
    live = Live(h.runtime, h.reactor)
    fams = families(make_registry(h.runtime, live, h.reactor, process=False))
    fam = "lbtwist_listener_retries"
    assert fams[fam].type == "counter"
    assert sample(fams, fam, "lbtwist_listener_retries_total", listener="web", route="api") == 2
    assert sample(fams, fam, "lbtwist_listener_retries_total", listener="web", route="app~2") == 1
    assert sample(fams, fam, "lbtwist_listener_retries_total", listener="web", route="app") == 0
    assert sample(fams, "lbtwist_listener_retries_all_routes", "lbtwist_listener_retries_all_routes_total", listener="web") == 3
    assert sample(fams, "lbtwist_listener_retries_requests", "lbtwist_listener_retries_requests_total", listener="web", route="api") == 2
    # no series carries a route index or label in its name
    assert not any(name.startswith(("lbtwist_listener_retries_0", "lbtwist_listener_retries_api")) for name in fams)
    assert not any("retries_retries" in name for name in fams)
