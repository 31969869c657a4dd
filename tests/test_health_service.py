"""HealthService on a MemoryReactorClock: it runs probes (a plugin kind here)
and passive detection for every pool, follows membership changes, drains and
removes backends, and leaves no timer behind when stopped."""
from __future__ import annotations

import random

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

import lbtwist.health.builtin
from lbtwist import hookimpl
from lbtwist.config.model import ActiveHealthConfig, Config, HealthConfig, PassiveHealthConfig, PoolConfig
from lbtwist.health import ProbeResult
from lbtwist.health.drain import DRAINED
from lbtwist.health.service import HealthService
from lbtwist.interfaces import IHealthProbe
from lbtwist.pool import Backend, Health, PickContext, Pool
from lbtwist.registry import ProbeSpec, Registry
from lbtwist.runtime import Runtime
from support.fakes import FirstBalancer


@implementer(IHealthProbe)
class Scripted:
    """A plugin probe kind whose verdict per address the test sets."""

    down: set[str] = set()

    def __init__(self, options, reactor):
        self.options = options

    def probe(self, backend):
        if backend.address in Scripted.down:
            return defer.succeed(ProbeResult(False, "scripted down"))
        return defer.succeed(ProbeResult(True, "scripted up"))


class ScriptedPlugin:
    @hookimpl
    def lbtwist_health_probes(self):
        return [ProbeSpec("scripted", lambda options, *, reactor: Scripted(options, reactor))]


def runtime(**active):
    reg = Registry()
    reg.register(lbtwist.health.builtin, "lbtwist.health.builtin")
    reg.register(ScriptedPlugin(), "scripted")
    reg.collect()
    reactor = MemoryReactorClock()
    rt = Runtime(reactor=reactor, registry=reg, config=Config())
    acfg = ActiveHealthConfig(kind="scripted", interval=1.0, timeout=0.5, stagger=0.5,
                              options={"x": 1}, **active)
    for name, health in (("probed", HealthConfig(active=acfg)), ("passive", HealthConfig())):
        backends = [Backend(f"127.0.0.1:{9000 + i}") for i in range(3)]
        if health.active is not None:
            for b in backends:
                b.health = Health.UNKNOWN  # as the pool builder does when an active check exists
        rt.pools[name] = Pool(name, backends, FirstBalancer(), reactor, slow_start=10.0, drain_timeout=5.0)
        rt.pool_configs[name] = PoolConfig(name=name, health=health)
    Scripted.down = set()
    return rt


def test_probes_let_backends_in_and_take_dead_ones_out():
    rt = runtime()
    svc = HealthService(rt, rng=random.Random(1))
    svc.startService()
    pool, clock = rt.pools["probed"], rt.reactor
    assert pool.candidates(0) == ()
    clock.pump([0.1] * 6)
    assert all(b.health is Health.HEALTHY for b in pool.backends())
    Scripted.down.add("127.0.0.1:9001")
    clock.pump([0.1] * 40)
    b1 = pool.get("127.0.0.1:9001")
    assert b1.health is Health.UNHEALTHY
    assert b1.reason == "unhealthy: 3 probes failed: scripted down"
    st = svc.status()["probed"]
    entry = next(e for e in st["backends"] if e["address"] == "127.0.0.1:9001")
    assert entry["state"] == "unhealthy" and entry["last_probe"]["reason"] == "scripted down"
    assert svc.pools["probed"].scheduler.probe.options == {"x": 1, "timeout": 0.5}
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_passive_detection_is_wired_for_every_pool():
    rt = runtime()
    svc = HealthService(rt)
    svc.startService()
    clock = rt.reactor
    pool = rt.pools["passive"]
    b = pool.backends()[0]
    for _ in range(5):
        pool.on_start(b)
        pool.on_finish(b, 0.01, False, "5xx")
    assert b.state(clock.seconds()) == "ejected"
    assert b.reason == "ejected: 5 consecutive 5xx; out for 30s (ejection 1)"
    clock.pump([1.0] * 30)
    # returned by the service's timer at the end of the ejection, into slow start
    assert b.ejected_until is None and b.changed_at == 30.0
    assert b.state(clock.seconds()) == "slow_start"
    svc.stopService()
    # stopped: outcomes are no longer watched
    for _ in range(10):
        pool.on_finish(b, 0.01, False, "5xx")
    assert b.ejected_until is None
    assert clock.getDelayedCalls() == []


def test_backends_added_and_removed_at_runtime():
    rt = runtime()
    svc = HealthService(rt, rng=random.Random(2))
    svc.startService()
    clock, pool = rt.reactor, rt.pools["probed"]
    clock.pump([0.1] * 6)
    new = Backend("127.0.0.1:9100")
    svc.add_backend("probed", new)
    assert new.health is Health.UNKNOWN and new not in pool.candidates(clock.seconds())
    clock.pump([0.1] * 6)
    assert new.health is Health.HEALTHY and new in pool.candidates(clock.seconds())
    # removal drains first: in-flight work may finish
    pool.on_start(new)
    done = []
    svc.remove_backend("probed", "127.0.0.1:9100").addCallback(done.append)
    assert new.draining and pool.get("127.0.0.1:9100") is new
    clock.advance(1.0)
    pool.on_finish(new, 0.5, True, "ok")
    assert done == [DRAINED]
    assert pool.get("127.0.0.1:9100") is None
    assert new not in svc.pools["probed"].scheduler.loops
    svc.stopService()
    assert clock.getDelayedCalls() == []


def test_drain_timeout_comes_from_the_pool():
    rt = runtime()
    svc = HealthService(rt)
    svc.startService()
    clock, pool = rt.reactor, rt.pools["passive"]
    b = pool.backends()[1]
    pool.on_start(b)
    seen, done = [], []
    pool.subscribe(lambda p, bb, state, reason: seen.append(state))
    svc.drain("passive", b.address).addCallback(done.append)
    clock.advance(4.9)
    assert done == []
    clock.advance(0.1)
    assert done == ["expired"] and "drain-expired" in seen
    assert pool.select(PickContext(now=clock.seconds())) is not b
    svc.stopService()


def test_pool_added_on_reload_and_removed():
    rt = runtime()
    svc = HealthService(rt)
    svc.startService()
    clock = rt.reactor
    pool = Pool("late", [Backend("127.0.0.1:9200")], FirstBalancer(), clock)
    ph = svc.add_pool(pool, HealthConfig(passive=PassiveHealthConfig(consecutive_gateway_failures=2)))
    assert ph.running
    b = pool.backends()[0]
    pool2 = Pool("late2", [Backend("127.0.0.1:9201"), Backend("127.0.0.1:9202")], FirstBalancer(), clock)
    svc.add_pool(pool2, HealthConfig(passive=PassiveHealthConfig(consecutive_gateway_failures=2)))
    b2 = pool2.backends()[0]
    for _ in range(2):
        pool2.on_start(b2)
        pool2.on_finish(b2, 3.0, False, "gateway")
    assert b2.state(clock.seconds()) == "ejected"
    svc.remove_pool("late2")
    assert "late2" not in svc.status()
    svc.stopService()
    assert clock.getDelayedCalls() == []
    assert b.state(clock.seconds()) == "healthy"


def test_latency_rule_is_off_for_pools_behind_l4_listeners():
    """An L4 connection's latency is its lifetime: a backend holding long
    connections must not look like a gray failure."""
    from lbtwist.config.model import ListenerConfig

    rt = runtime()
    rt.config = Config(listeners=[ListenerConfig(name="db", bind="tcp:0", mode="tcp", pool="passive"),
                                  ListenerConfig(name="web", bind="tcp:0", mode="http", pool="probed")])
    svc = HealthService(rt)
    svc.startService()
    pool, clock = rt.pools["passive"], rt.reactor
    long_lived = pool.backends()[0]
    for _ in range(20):
        for b in pool.backends():
            pool.on_start(b)
            pool.on_finish(b, 600.0 if b is long_lived else 0.5, True, "ok")
    clock.pump([0.5] * 4)
    assert long_lived.state(clock.seconds()) == "healthy"
    assert not svc.pools["passive"].detector.cfg.latency.enabled
    assert svc.pools["probed"].detector.cfg.latency.enabled
    # the failure rules still apply to L4 pools
    for _ in range(5):
        pool.on_start(long_lived)
        pool.on_finish(long_lived, 3.0, False, "gateway")
    assert long_lived.state(clock.seconds()) == "ejected"
    svc.stopService()


def test_probe_and_outlier_state_reach_the_admin_api_and_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from lbtwist.admin.live import Live
    from lbtwist.admin.metrics import exposition, make_registry
    from lbtwist.admin.state import StateView

    rt = runtime()
    svc = HealthService(rt, rng=random.Random(1))
    svc.startService()
    clock = rt.reactor
    Scripted.down.add("127.0.0.1:9001")
    clock.pump([0.1] * 12)
    passive = rt.pools["passive"]
    pb = passive.backends()[0]
    for _ in range(2):
        passive.on_start(pb)
        passive.on_finish(pb, 0.01, False, "5xx")
    live = Live(rt, clock)
    view = StateView(rt, live, clock).overview(history=False)
    pools = {p["name"]: {b["address"]: b for b in p["backends"]} for p in view["pools"]}
    up, down = pools["probed"]["127.0.0.1:9000"], pools["probed"]["127.0.0.1:9001"]
    assert up["probe"]["ok"] is True and up["probe"]["reason"] == "scripted up" and up["probe"]["probes_total"] >= 1
    assert down["probe"]["ok"] is False and down["probe"]["reason"] == "scripted down"
    outlier = pools["passive"]["127.0.0.1:9000"]["outlier"]
    assert outlier["consecutive_5xx"] == 2
    assert (outlier["recent_tries"], outlier["recent_failure_percent"], outlier["failure_run"]) == (2, 100.0, 2)
    assert "probe" not in pools["passive"]["127.0.0.1:9000"]  # no active checks there

    fams = {f.name: f for f in text_string_to_metric_families(exposition(make_registry(rt, live, clock, process=False)).decode())}

    def value(family, **labels):
        return next(s.value for s in fams[family].samples if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("lbtwist_backend_probe_ok", pool="probed", backend="127.0.0.1:9000") == 1.0
    assert value("lbtwist_backend_probe_ok", pool="probed", backend="127.0.0.1:9001") == 0.0
    assert value("lbtwist_backend_outlier_consecutive_5xx", pool="passive", backend="127.0.0.1:9000") == 2.0
    assert value("lbtwist_backend_outlier_failure_run", pool="passive", backend="127.0.0.1:9000") == 2.0
    assert "lbtwist_backend_probe_probes" in fams  # a counter (probes_total)
    svc.stopService()
    assert "probe" not in rt.backend_state and "outlier" not in rt.backend_state
