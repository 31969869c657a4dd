"""Discovery logic, deterministic: the tracker's guard (last known set,
failures logged once, shrink held until confirmed), SRV priority, TTL
clamping, the DNS source over a fake resolver, the file source polled on a
task.Clock, and the service applying changes with the reload's diff."""
from __future__ import annotations

import os

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.names import dns, error

from lbtwist.config import load_config
from lbtwist.config.model import DnsDiscoveryConfig
from lbtwist.discovery.base import Endpoint, SourceTracker, select_priority
from lbtwist.discovery.dns import DnsSource, clamp_ttl
from lbtwist.discovery.file import FileSource, parse_backends
from lbtwist.pool import Health
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService


def eps(*ports: int, priority: int = 0, weight: float = 1.0) -> list[Endpoint]:
    return [Endpoint(f"127.0.0.1:{p}", weight=weight, priority=priority) for p in ports]


def addrs(endpoints) -> set[str]:
    return {e.address for e in endpoints}


@pytest.fixture
def logged():
    seen: list[str] = []

    def observer(event):
        if event.get("log_namespace", "").startswith("lbtwist.discovery"):
            seen.append(event["log_format"])

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def tracker(clock, changes, max_shrink=50.0) -> SourceTracker:
    return SourceTracker("p", "dns", "SRV x", clock, lambda: changes.append(1), max_shrink=max_shrink)


# -- the guard -------------------------------------------------------------------


def test_failures_keep_the_last_known_set_and_log_once(logged):
    clock = task.Clock()
    changes: list[int] = []
    t = tracker(clock, changes)
    t.update(eps(1, 2, 3))
    assert t.state == "ok" and addrs(t.accepted) == {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    for reason in ("timeout", "SERVFAIL", "NXDOMAIN"):
        clock.advance(5)
        t.failed(reason)
    t.update([])  # an empty answer is a failure too
    assert len(t.accepted) == 3 and changes == [1]
    assert t.state == "failing" and t.last_error == "empty answer" and t.failures == 4
    st = t.status(clock.seconds())
    assert st["up"] is False and st["age_seconds"] == 15.0 and st["backends"] == 3
    assert sum("failing" in f for f in logged) == 1
    t.update(eps(1, 2, 3))
    assert t.state == "ok" and changes == [1]  # same set: nothing to apply
    assert sum("recovered" in f for f in logged) == 1


def test_a_large_shrink_is_held_until_the_next_answer_confirms_it(logged):
    clock = task.Clock()
    changes: list[int] = []
    t = tracker(clock, changes)
    t.update(eps(1, 2, 3, 4))
    t.update(eps(1, 2))  # removes 50%: not more than max_shrink, applied
    assert addrs(t.accepted) == {"127.0.0.1:1", "127.0.0.1:2"} and len(changes) == 2
    t.update(eps(1, 2, 3, 4, 5, 6))
    t.update(eps(1, 2))  # removes 4 of 6: held
    assert len(t.accepted) == 6 and t.state == "held" and len(changes) == 3
    assert t.status(0)["held_backends"] == 2
    t.update(eps(1, 2))  # confirmed
    assert addrs(t.accepted) == {"127.0.0.1:1", "127.0.0.1:2"} and t.state == "ok"
    assert len(changes) == 4
    assert sum("held" in f for f in logged) == 1


def test_a_held_shrink_that_is_not_confirmed_is_dropped():
    clock = task.Clock()
    changes: list[int] = []
    t = tracker(clock, changes)
    t.update(eps(1, 2, 3, 4))
    t.update(eps(1))  # held
    t.update(eps(1, 2, 3, 4, 5))  # a different answer: the blip is forgotten
    assert len(t.accepted) == 5 and t.held is None and t.state == "ok"


def test_max_shrink_100_never_holds_and_0_holds_every_removal():
    clock = task.Clock()
    t = tracker(clock, [], max_shrink=100.0)
    t.update(eps(1, 2, 3, 4))
    t.update(eps(1))
    assert len(t.accepted) == 1
    t = tracker(clock, [], max_shrink=0.0)
    t.update(eps(1, 2, 3, 4))
    t.update(eps(1, 2, 3))
    assert len(t.accepted) == 4 and t.state == "held"


# -- SRV priority and TTLs -----------------------------------------------------------


def test_priority_lower_groups_only_when_no_preferred_backend_is_in_rotation():
    endpoints = eps(1, 2, priority=10, weight=3) + eps(3, priority=20, weight=5)
    up = {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    w = select_priority(endpoints, lambda a: a in up)
    assert w == {"127.0.0.1:1": 3.0, "127.0.0.1:2": 3.0, "127.0.0.1:3": 0.0}
    up = {"127.0.0.1:2", "127.0.0.1:3"}  # one preferred left: still preferred
    assert select_priority(endpoints, lambda a: a in up)["127.0.0.1:3"] == 0.0
    up = {"127.0.0.1:3"}
    w = select_priority(endpoints, lambda a: a in up)
    assert w == {"127.0.0.1:1": 0.0, "127.0.0.1:2": 0.0, "127.0.0.1:3": 5.0}
    w = select_priority(endpoints, lambda a: False)  # nothing known yet: the preferred group
    assert w["127.0.0.1:1"] == 3.0 and w["127.0.0.1:3"] == 0.0
    assert set(select_priority(eps(1, 2, weight=0), lambda a: True).values()) == {1.0}


@pytest.mark.parametrize("ttl,expected", [(30, 30.0), (0, 1.0), (86400, 60.0), (None, 5.0)])
def test_ttl_is_clamped(ttl, expected):
    assert clamp_ttl(ttl, 5.0, 1.0, 60.0) == expected


# -- DNS source over a fake resolver ---------------------------------------------------


def _srv(name: str, target: str, port: int, ttl: int, priority: int = 0, weight: int = 1):
    return dns.RRHeader(name=name, type=dns.SRV, ttl=ttl,
                        payload=dns.Record_SRV(priority, weight, port, target, ttl=ttl))


def _a(name: str, ip: str, ttl: int):
    return dns.RRHeader(name=name, type=dns.A, ttl=ttl, payload=dns.Record_A(ip, ttl=ttl))


class FakeResolver:
    """Answers from a script: each entry a (answers, additional) or an exception."""

    def __init__(self):
        self.srv: object = ([], [])
        self.a: dict[str, object] = {}
        self.aaaa: dict[str, object] = {}
        self.queries: list[str] = []

    def _answer(self, what):
        if isinstance(what, Exception):
            return defer.fail(what)
        answers, additional = what
        return defer.succeed((answers, [], additional))

    def lookupService(self, name, timeout=None):
        self.queries.append(f"SRV {name}")
        return self._answer(self.srv)

    def lookupAddress(self, name, timeout=None):
        self.queries.append(f"A {name}")
        return self._answer(self.a.get(name, error.DNSNameError()))

    def lookupIPV6Address(self, name, timeout=None):
        self.queries.append(f"AAAA {name}")
        return self._answer(self.aaaa.get(name, error.DNSNameError()))


def test_dns_srv_follows_ttl_and_keeps_the_set_through_failures():
    clock = task.Clock()
    res = FakeResolver()
    name = "_http._tcp.app.test"
    res.srv = ([_srv(name, "a.test", 9001, 30, weight=3), _srv(name, "b.test", 9002, 20, priority=5)],
               [_a("a.test", "127.0.0.1", 40)])
    res.a["b.test"] = ([_a("b.test", "127.0.0.2", 10)], [])
    cfg = DnsDiscoveryConfig(name=name)
    src = DnsSource(cfg, clock, resolver=res)
    changes: list[int] = []
    t = tracker(clock, changes)
    src.start(t)
    assert t.accepted == (Endpoint("127.0.0.1:9001", 3.0, None, 0), Endpoint("127.0.0.2:9002", 1.0, None, 5))
    assert src.next_in == 10.0  # the smallest TTL in the answer (b.test's A record)
    assert res.queries == [f"SRV {name}", "A b.test", "AAAA b.test"]  # a.test came in the additional section
    for failure in (error.DNSServerError(), defer.TimeoutError(), error.DNSNameError()):
        res.srv = failure
        clock.advance(src.next_in)
        assert len(t.accepted) == 2 and t.state == "failing"
        assert src.next_in == 5.0  # refresh after a failure
    assert t.last_error == "NXDOMAIN"
    res.srv = ([_srv(name, "a.test", 9001, 3600)], [_a("a.test", "127.0.0.1", 3600)])
    clock.advance(5.0)
    assert t.state == "ok" and addrs(t.accepted) == {"127.0.0.1:9001"}
    assert src.next_in == 60.0  # clamped to refresh_max
    src.stop()
    assert not clock.getDelayedCalls()


def test_dns_a_records_take_the_configured_port():
    clock = task.Clock()
    res = FakeResolver()
    res.a["app.test"] = ([_a("app.test", "127.0.0.3", 0), _a("app.test", "127.0.0.4", 0)], [])
    src = DnsSource(DnsDiscoveryConfig(name="app.test", type="A", port=8080), clock, resolver=res)
    t = tracker(clock, [])
    src.start(t)
    assert addrs(t.accepted) == {"127.0.0.3:8080", "127.0.0.4:8080"}
    assert src.next_in == 1.0  # TTL 0 clamped to refresh_min
    src.stop()


# -- file source, polled -------------------------------------------------------------------


def test_file_source_add_remove_rename_truncate_and_bad_content(tmp_path, logged):
    clock = task.Clock()
    path = tmp_path / "backends.yaml"
    path.write_text('- {address: "127.0.0.1:9001", weight: 2, name: a}\n- "127.0.0.1:9002"\n')
    src = FileSource(str(path), clock, poll_interval=1.0, inotify=False)
    changes: list[int] = []
    t = tracker(clock, changes, max_shrink=100.0)
    src.start(t)
    assert t.accepted == (Endpoint("127.0.0.1:9001", 2.0, "a"), Endpoint("127.0.0.1:9002", 1.0, None))
    # atomic rename of a JSON file over it
    tmp = tmp_path / "new.json"
    tmp.write_text('[{"address": "127.0.0.1:9002"}, {"address": "127.0.0.1:9003"}]')
    os.rename(tmp, path)
    clock.advance(1.0)
    assert addrs(t.accepted) == {"127.0.0.1:9002", "127.0.0.1:9003"}
    # truncated (caught mid-write): kept
    path.write_text("")
    clock.advance(1.0)
    assert len(t.accepted) == 2 and t.state == "failing" and t.last_error.endswith("empty")
    # broken content: kept, the error names the problem
    path.write_text('- {address: "127.0.0.1:9002", wieght: 1}\n')
    clock.advance(1.0)
    assert "unknown key 'wieght'" in t.last_error and len(t.accepted) == 2
    path.write_text("- {address: [1, 2\n")
    clock.advance(1.0)
    assert "not YAML/JSON" in t.last_error
    # missing
    path.unlink()
    clock.advance(1.0)
    assert "cannot read" in t.last_error and len(t.accepted) == 2
    assert sum("failing" in f for f in logged) == 1
    # back
    path.write_text('- "127.0.0.1:9003"\n')
    clock.advance(1.0)
    assert t.state == "ok" and addrs(t.accepted) == {"127.0.0.1:9003"}
    src.stop()
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize(
    "text,message",
    [
        ("{a: 1}", "expected a list of backends"),
        ('- "nope"', "is not host:port"),
        ('- {address: "127.0.0.1:1", weight: "x"}', "weight must be a number"),
        ('- {address: "127.0.0.1:1", weight: -1}', "weight must be >= 0"),
        ("- 7", "expected an address string"),
    ],
)
def test_file_content_errors_are_named(text, message):
    with pytest.raises(ValueError) as e:
        parse_backends(text, "f.yaml")
    assert message in str(e.value) and "f.yaml" in str(e.value)


# -- the service: changes go through the reload's diff -----------------------------------------


def _config(path: str, *, active: bool = False, static: str = "") -> str:
    health = ""
    if active:
        health = "    health: {active: {kind: tcp, interval: 1s, timeout: 500ms}}\n"
    return (
        "listeners: []\n"
        "pools:\n"
        "  - name: web\n"
        "    slow_start: 10s\n"
        f"{static}"
        f"    discovery: [{{file: {path!r}, poll_interval: 1s}}]\n"
        f"{health}"
    )


def test_service_applies_discovered_changes_as_the_reload_diff(tmp_path):
    reactor = MemoryReactorClock()
    reg = Registry.default(entry_points=False)
    path = tmp_path / "b.yaml"
    path.write_text('- "127.0.0.1:9001"\n- "127.0.0.1:9002"\n')
    static = '    backends: [{address: "127.0.0.1:9100"}]\n'
    loaded = load_config(_config(str(path), active=True, static=static), reg)
    svc = LbtwistService(loaded.config, reactor, reg)
    # discovery sources are built for the service; inotify needs a real reactor
    svc.startService()
    pool = svc.runtime.pools["web"]
    assert {b.address for b in pool.backends()} == {"127.0.0.1:9100", "127.0.0.1:9001", "127.0.0.1:9002"}
    b1 = pool.get("127.0.0.1:9001")
    assert b1.health is Health.UNKNOWN  # new backends wait for their health check
    pool.set_health(b1, Health.HEALTHY, "probe passed")
    b1.active = 1  # in flight: must drain, not be cut
    path.write_text('- "127.0.0.1:9002"\n- "127.0.0.1:9003"\n')
    reactor.advance(1.0)
    assert pool.get("127.0.0.1:9001") is b1 and b1.draining  # removed: drains first
    assert pool.get("127.0.0.1:9003").health is Health.UNKNOWN
    assert pool.get("127.0.0.1:9100") is not None  # static backends stay
    b2 = pool.get("127.0.0.1:9002")
    pool.on_finish(b1, 0.01, True)
    assert pool.get("127.0.0.1:9001") is None  # drained, then removed
    assert pool.get("127.0.0.1:9002") is b2  # unchanged: same object, same state
    state = svc.runtime.pool_state["discovery"](pool)
    assert state["sources"][0]["state"] == "ok" and state["sources"][0]["backends"] == 2
    # a broken file never empties the pool
    path.write_text("oops: [")
    reactor.advance(1.0)
    assert {b.address for b in pool.backends()} == {"127.0.0.1:9100", "127.0.0.1:9002", "127.0.0.1:9003"}
    assert svc.runtime.pool_state["discovery"](pool)["sources"][0]["state"] == "failing"
    # a reload keeps the discovered backends
    d = svc.apply(load_config(_config(str(path), active=True), reg).config)
    assert d.called
    assert {b.address for b in pool.backends()} >= {"127.0.0.1:9002", "127.0.0.1:9003"}
    assert pool.get("127.0.0.1:9002") is b2
    svc.stopService()


def test_metrics_export_discovery_series(tmp_path):
    from lbtwist.admin.metrics import discovery_metrics

    reactor = MemoryReactorClock()
    reg = Registry.default(entry_points=False)
    path = tmp_path / "b.yaml"
    path.write_text('- "127.0.0.1:9001"\n')
    svc = LbtwistService(load_config(_config(str(path)), reg).config, reactor, reg)
    svc.startService()
    path.unlink()
    for _ in range(3):
        reactor.advance(1.0)
    fams = {f.name: f for f in discovery_metrics(svc.runtime, reactor.seconds())}
    assert fams["lbtwist_discovery_up"].samples[0].value == 0.0
    assert fams["lbtwist_discovery_age_seconds"].samples[0].value == 3.0
    assert fams["lbtwist_discovery_backends"].samples[0].value == 1.0
    assert fams["lbtwist_discovery_failures"].samples[0].value == 3.0
    failing = [s for s in fams["lbtwist_discovery_state"].samples if s.labels["state"] == "failing"]
    assert failing[0].value == 1.0 and failing[0].labels["pool"] == "web"
    svc.stopService()


@pytest.mark.parametrize(
    "item,message",
    [
        ("{}", "exactly one of dns, file, plugin (got none)"),
        ("{file: a.yaml, dns: {name: x}}", "exactly one of dns, file, plugin (got dns, file)"),
        ("{dns: {name: x.test, type: A}}", "type A needs port"),
        ("{dns: {name: _x._tcp.test, port: 80}}", "SRV records carry their ports"),
        ("{dns: {name: x, type: MX}}", "MX"),
        ("{dns: {name: x, resolver: nope}}", "'nope' is not host:port"),
        ("{dns: {name: x, refresh_min: 2m}}", "is above refresh_max"),
        ("{file: a.yaml, max_shrink: 150}", "150 is a percentage"),
        ("{plugin: consul}", "unknown discovery source 'consul'"),
    ],
)
def test_bad_discovery_config_is_named(item, message):
    from lbtwist.config import ConfigError

    reg = Registry.default(entry_points=False)
    text = f"listeners: []\npools:\n  - name: web\n    discovery: [{item}]\n"
    with pytest.raises(ConfigError) as e:
        load_config(text, reg)
    assert message in str(e.value)


def test_reload_replacing_the_sources_keeps_the_backends_until_the_new_ones_answer(tmp_path):
    reactor = MemoryReactorClock()
    reg = Registry.default(entry_points=False)
    first = tmp_path / "a.yaml"
    first.write_text('- "127.0.0.1:9001"\n- "127.0.0.1:9002"\n')
    svc = LbtwistService(load_config(_config(str(first)), reg).config, reactor, reg)
    svc.startService()
    pool = svc.runtime.pools["web"]
    b2 = pool.get("127.0.0.1:9002")
    second = tmp_path / "b.yaml"  # not written yet: the new source fails first
    d = svc.apply(load_config(_config(str(second)), reg).config)
    assert d.called
    live = lambda: {b.address for b in pool.backends() if not b.draining}  # noqa: E731
    assert live() == {"127.0.0.1:9001", "127.0.0.1:9002"}
    assert svc.discovery["web"].trackers[0].state == "failing"
    reactor.advance(1.0)
    assert live() == {"127.0.0.1:9001", "127.0.0.1:9002"}
    second.write_text('- "127.0.0.1:9002"\n- "127.0.0.1:9003"\n')
    reactor.advance(1.0)
    assert live() == {"127.0.0.1:9002", "127.0.0.1:9003"} and pool.get("127.0.0.1:9002") is b2
    first.write_text('- "127.0.0.1:9009"\n')  # the old source is stopped: not read any more
    reactor.advance(1.0)
    assert pool.get("127.0.0.1:9009") is None
    svc.stopService()


def test_admin_pool_json_and_metrics_exposition_show_the_sources(tmp_path):
    from lbtwist.admin.live import Live
    from lbtwist.admin.metrics import exposition, make_registry
    from lbtwist.admin.state import StateView

    reactor = MemoryReactorClock()
    reg = Registry.default(entry_points=False)
    path = tmp_path / "b.yaml"
    path.write_text('- "127.0.0.1:9001"\n')
    svc = LbtwistService(load_config(_config(str(path)), reg).config, reactor, reg)
    svc.startService()
    live = Live(svc.runtime, reactor)
    live.attach()
    pool = svc.runtime.pools["web"]
    view = StateView(svc.runtime, live, reactor).pool(pool, reactor.seconds(), history=False)
    (source,) = view["discovery"]["sources"]
    assert source["kind"] == "file" and source["state"] == "ok" and source["backends"] == 1
    text = exposition(make_registry(svc.runtime, live, reactor, process=False)).decode()
    assert 'lbtwist_discovery_up{pool="web",source="file"' in text
    assert "lbtwist_discovery_failures_total" in text
    svc.stopService()


def test_srv_target_dot_means_no_service():
    clock = task.Clock()
    res = FakeResolver()
    name = "_http._tcp.none.test"
    res.srv = ([_srv(name, "", 0, 30)], [])  # the root name, "." on the wire
    src = DnsSource(DnsDiscoveryConfig(name=name), clock, resolver=res)
    t = tracker(clock, [])
    src.start(t)
    assert t.accepted is None and t.last_error == "empty answer"
    src.stop()


def test_dns_aaaa_addresses_are_bracketed():
    clock = task.Clock()
    res = FakeResolver()
    rr = dns.RRHeader(name="v6.test", type=dns.AAAA, ttl=30, payload=dns.Record_AAAA("::1", ttl=30))
    res.aaaa["v6.test"] = ([rr], [])
    src = DnsSource(DnsDiscoveryConfig(name="v6.test", type="AAAA", port=8080), clock, resolver=res)
    t = tracker(clock, [])
    src.start(t)
    assert addrs(t.accepted) == {"[::1]:8080"} and src.next_in == 30.0
    src.stop()
