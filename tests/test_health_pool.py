"""The health parts of the pool on task.Clock: panic mode, 'unknown'
backends, slow-start ramps (for every algorithm), states, draining."""
from __future__ import annotations

import collections
import random

import pytest
from twisted.internet import task

import lbtwist.balancers.builtin
from lbtwist.health.drain import DRAINED, EXPIRED, UNDRAINED, drain_backend
from lbtwist.pool import Backend, Health, PickContext, Pool
from lbtwist.registry import Registry
from support.fakes import FirstBalancer, Logged


def make(n=4, **kw):
    clock = task.Clock()
    pool = Pool("app", [Backend(f"127.0.0.1:{9000 + i}") for i in range(n)], FirstBalancer(), clock, **kw)
    events = []
    pool.subscribe(lambda p, b, state, reason: events.append((b.address if b else None, state, reason)))
    return clock, pool, events


class TestPanic:
    def test_enters_and_leaves_panic_once_with_a_log(self):
        clock, pool, events = make(4)
        a, b, c, d = pool.backends()
        with Logged() as log:
            pool.set_health(a, Health.UNHEALTHY, "3 probes timed out after 2s")
            pool.set_health(b, Health.UNHEALTHY, "3 probes timed out after 2s")
            assert not pool.panic  # 2 of 4 is exactly 50%: not below
            assert set(pool.candidates(0)) == {c, d}
            pool.set_health(c, Health.UNHEALTHY, "3 probes failed: connection refused")
            # evaluated at the change, not at the next request
            assert pool.panic
            assert set(pool.candidates(0)) == {a, b, c, d}
            pool.set_health(c, Health.HEALTHY, "2 probes passed")
            assert not pool.panic
        texts = log.texts()
        assert sum("panic mode, only" in t for t in texts) == 1
        assert any("only 1 of 4 backends usable; routing across all of them" in t for t in texts)
        assert sum("left panic mode" in t for t in texts) == 1
        assert [s for _, s, _ in events if s in ("panic", "normal")] == ["panic", "normal"]
        assert "backend 127.0.0.1:9000: unhealthy (3 probes timed out after 2s)" in "\n".join(texts)

    def test_ejections_count_toward_panic(self):
        clock, pool, events = make(3)
        a, b, c = pool.backends()
        pool.eject(a, 30, "5 consecutive 5xx")
        assert not pool.panic
        pool.eject(b, 30, "5 consecutive 5xx")
        assert pool.panic and set(pool.candidates(0)) == {a, b, c}
        clock.advance(30)
        assert set(pool.candidates(clock.seconds())) == {a, b, c}
        assert not pool.panic

    def test_threshold_zero_never_panics(self):
        clock, pool, events = make(2, panic_threshold=0)
        for b in pool.backends():
            pool.set_health(b, Health.UNHEALTHY, "down")
        assert not pool.panic and pool.candidates(0) == ()
        assert pool.select(PickContext(now=0)) is None

    def test_unknown_backends_neither_serve_nor_cause_panic(self):
        clock, pool, events = make(2)
        for i in range(6):
            nb = Backend(f"127.0.0.1:{9100 + i}")
            nb.health = Health.UNKNOWN
            pool.add_backend(nb)
        assert not pool.panic
        assert len(pool.candidates(0)) == 2
        # a pool that is all unknown (start-up) has nothing to route to, and no panic
        clock2, pool2, _ = make(2)
        for b in pool2.backends():
            pool2.set_health(b, Health.UNKNOWN, "awaiting first probe")
        assert pool2.candidates(0) == () and not pool2.panic


class TestSlowStartStarts:
    @pytest.mark.parametrize("how", ["probe", "ejection", "drain", "enable"])
    def test_ramp_restarts_whenever_a_backend_comes_back(self, how):
        clock, pool, _ = make(2, slow_start=30.0)
        b = pool.backends()[0]
        clock.advance(100)
        assert b.ramp(clock.seconds()) == 1.0
        if how == "probe":
            pool.set_health(b, Health.UNHEALTHY, "down")
            clock.advance(5)
            pool.set_health(b, Health.HEALTHY, "2 probes passed")
        elif how == "ejection":
            pool.eject(b, clock.seconds() + 5, "5 consecutive 5xx")
            clock.advance(5)
            pool.unject(b, "ejection over")
        elif how == "drain":
            pool.set_draining(b, True, "deploy")
            clock.advance(5)
            pool.set_draining(b, False, "deploy done")
        else:
            pool.set_enabled(b, False, "admin")
            clock.advance(5)
            pool.set_enabled(b, True, "admin")
        now = clock.seconds()
        assert b.effective_weight(now) == pytest.approx(0.1)
        assert b.state(now) == "slow_start"
        assert b.effective_weight(now + 15) == pytest.approx(0.5)
        assert b.effective_weight(now + 30) == 1.0
        assert b.state(now + 30) == "healthy"

    def test_states(self):
        clock, pool, _ = make(1)
        b = pool.backends()[0]
        assert b.state(0) == "healthy"
        pool.set_health(b, Health.UNKNOWN, "new")
        assert b.state(0) == "unknown"
        pool.set_health(b, Health.UNHEALTHY, "down")
        pool.eject(b, 10, "5xx")
        assert b.state(0) == "ejected" and b.state(10) == "unhealthy"
        pool.set_draining(b, True, "x")
        assert b.state(0) == "draining"
        pool.set_enabled(b, False, "x")
        assert b.state(0) == "disabled"
        assert b.reason == "disabled: x"


#: Hash algorithms keep key affinity instead: a ramp would remap keys for the whole ramp.
HASHING = {"ring_hash", "maglev"}


def algorithms():
    reg = Registry()
    reg.register(lbtwist.balancers.builtin, "lbtwist.balancers")
    reg.collect()
    return reg, sorted(set(reg.balancers) - HASHING)


def share_of(pool, balancer_clock, newcomer, t0, seconds, rate=2000, concurrency=12, latency=0.004):
    """Drive picks at ``rate``/s for ``seconds`` from t0, with work in flight
    (so load-aware algorithms see outstanding counts and latencies)."""
    clock = balancer_clock
    clock.advance(t0 - clock.seconds())
    counts = collections.Counter()
    inflight = collections.deque()
    steps = int(rate * seconds)
    for _ in range(steps):
        clock.advance(1.0 / rate)
        b = pool.select(PickContext(now=clock.seconds(), key=str(random.random()).encode()))
        pool.on_start(b)
        counts[b] += 1
        inflight.append(b)
        if len(inflight) >= concurrency:
            done = inflight.popleft()
            pool.on_finish(done, latency, True, "ok")
    while inflight:
        pool.on_finish(inflight.popleft(), latency, True, "ok")
    return counts[newcomer] / steps


@pytest.mark.parametrize("name", algorithms()[1])
def test_slow_start_holds_back_a_joining_backend_for_every_algorithm(name):
    reg, _ = algorithms()
    clock = task.Clock()
    balancer = reg.make_balancer(name, {}, clock=clock, rng=random.Random(5))
    backends = [Backend(f"127.0.0.1:{9000 + i}") for i in range(4)]
    pool = Pool("app", backends, balancer, clock, slow_start=30.0, rng=random.Random(5))
    newcomer = backends[3]
    pool.set_health(newcomer, Health.UNKNOWN, "new")
    share_of(pool, clock, newcomer, 1.0, 1.0)  # warm the others up
    pool.set_health(newcomer, Health.HEALTHY, "first probe passed")
    joined = clock.seconds()
    early = share_of(pool, clock, newcomer, joined, 1.0)
    late = share_of(pool, clock, newcomer, joined + 31.0, 1.0)
    # fair share is 25%: a cold node starts near 10% of it, then gets its due
    assert early < 0.25 * 0.4, (name, early)
    assert late > 0.25 * 0.6, (name, late)


class TestDrain:
    def test_drained_when_the_last_unit_finishes(self):
        clock, pool, events = make(2, drain_timeout=30.0)
        b = pool.backends()[0]
        pool.on_start(b)
        pool.on_start(b)
        results = []
        drain_backend(pool, b, clock, "removed from config").addCallback(results.append)
        assert b not in pool.candidates(0)
        assert events[-1] == (b.address, "draining", "removed from config")
        pool.on_finish(b, 0.1, True, "ok")
        assert results == []
        clock.advance(10)
        pool.on_finish(b, 0.1, True, "ok")
        assert results == [DRAINED]
        assert events[-1][:2] == (b.address, "drained")
        assert clock.getDelayedCalls() == []

    def test_expires_after_drain_timeout_and_tells_the_data_plane(self):
        clock, pool, events = make(2, drain_timeout=30.0)
        b = pool.backends()[0]
        pool.on_start(b)
        results = []
        drain_backend(pool, b, clock, "shutdown").addCallback(results.append)
        clock.advance(29.9)
        assert results == []
        clock.advance(0.1)
        assert results == [EXPIRED]
        assert events[-1] == (b.address, "drain-expired", "drain_timeout 30s passed with 1 in flight")

    def test_idle_backend_drains_at_once_and_undrain_ends_it(self):
        clock, pool, events = make(2)
        b, c = pool.backends()
        results = []
        drain_backend(pool, b, clock, "admin").addCallback(results.append)
        assert results == [DRAINED]
        pool.on_start(c)
        drain_backend(pool, c, clock, "admin").addCallback(results.append)
        pool.set_draining(c, False, "admin changed its mind")
        assert results == [DRAINED, UNDRAINED]
        assert clock.getDelayedCalls() == []
