"""Probe scheduling on task.Clock: thresholds, jitter, stagger, the detection
bound for a dead backend, and loops that never die."""
from __future__ import annotations

import random

import pytest
from twisted.internet import defer, task
from zope.interface import implementer

from lbtwist.config.model import ActiveHealthConfig
from lbtwist.health import ProbeResult
from lbtwist.health.scheduler import ProbeLoop, ProbeScheduler, Thresholds, summarize
from lbtwist.interfaces import IHealthProbe
from lbtwist.pool import Backend, Health, PickContext, Pool
from support.fakes import FirstBalancer


@implementer(IHealthProbe)
class ScriptedProbe:
    """Answers per backend: 'ok', 'fail', 'hang' (never answers) or 'raise'."""

    def __init__(self, clock, mode="ok"):
        self.clock = clock
        self.mode: dict[str, str] = {}
        self.default = mode
        self.calls: list[tuple[float, str]] = []

    def probe(self, backend):
        self.calls.append((self.clock.seconds(), backend.address))
        mode = self.mode.get(backend.address, self.default)
        if mode == "ok":
            return defer.succeed(ProbeResult(True, "status 200", 0.001))
        if mode == "fail":
            return defer.succeed(ProbeResult(False, "connection refused"))
        if mode == "raise":
            raise RuntimeError("probe bug")
        return defer.Deferred()  # hang


def make_pool(clock, n=3, health=Health.HEALTHY):
    backends = [Backend(f"127.0.0.1:{9000 + i}") for i in range(n)]
    for b in backends:
        b.health = health
    return Pool("app", backends, FirstBalancer(), clock)


def ok(reason="status 200"):
    return ProbeResult(True, reason)


def bad(reason="connection refused"):
    return ProbeResult(False, reason)


class TestThresholds:
    def test_unknown_joins_on_first_pass(self):
        t = Thresholds(3, 2)
        assert t.record(Health.UNKNOWN, ok()) == (Health.HEALTHY, "first probe passed (status 200)")

    def test_unknown_goes_unhealthy_after_threshold(self):
        t = Thresholds(3, 2)
        assert t.record(Health.UNKNOWN, bad()) is None
        assert t.record(Health.UNKNOWN, bad()) is None
        assert t.record(Health.UNKNOWN, bad()) == (Health.UNHEALTHY, "3 probes failed: connection refused")

    def test_healthy_needs_consecutive_failures(self):
        t = Thresholds(3, 2)
        assert t.record(Health.HEALTHY, bad()) is None
        assert t.record(Health.HEALTHY, bad()) is None
        # one pass resets the run: a single lost probe never takes a backend out
        assert t.record(Health.HEALTHY, ok()) is None
        assert t.record(Health.HEALTHY, bad()) is None
        assert t.record(Health.HEALTHY, bad()) is None
        state, reason = t.record(Health.HEALTHY, bad("timed out after 2s"))
        assert state is Health.UNHEALTHY
        assert reason == "3 probes failed (last: timed out after 2s)"

    def test_unhealthy_needs_consecutive_passes(self):
        t = Thresholds(3, 2)
        assert t.record(Health.UNHEALTHY, ok()) is None
        assert t.record(Health.UNHEALTHY, bad()) is None
        assert t.record(Health.UNHEALTHY, ok()) is None
        assert t.record(Health.UNHEALTHY, ok()) == (Health.HEALTHY, "2 probes passed (status 200)")

    def test_summaries(self):
        assert summarize(["timed out after 2s"] * 3) == "3 probes timed out after 2s"
        assert summarize(["status 503 (expected 200-399)"] * 2) == "2 probes failed: status 503 (expected 200-399)"


def loop_for(clock, pool, backend, probe, *, interval=5.0, timeout=2.0, jitter=0.1, seed=1,
             unhealthy=3, healthy=2):
    return ProbeLoop(pool, backend, probe, clock, interval=interval, timeout=timeout,
                     thresholds=Thresholds(unhealthy, healthy), jitter=jitter,
                     rng=random.Random(seed))


class TestProbeLoop:
    def test_intervals_are_jittered_but_never_longer(self):
        clock = task.Clock()
        pool = make_pool(clock, 1)
        probe = ScriptedProbe(clock)
        loop = loop_for(clock, pool, pool.backends()[0], probe, jitter=0.2)
        loop.start(0)
        clock.pump([0.05] * 2000)  # 100 s
        times = [t for t, _ in probe.calls]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(gaps) > 18
        assert all(4.0 - 0.051 <= g <= 5.0 + 0.051 for g in gaps), gaps
        assert len({round(g, 1) for g in gaps}) > 3  # actually jittered
        loop.stop()
        assert clock.getDelayedCalls() == []

    def test_hanging_probe_is_bounded_by_timeout(self):
        clock = task.Clock()
        pool = make_pool(clock, 1)
        b = pool.backends()[0]
        probe = ScriptedProbe(clock, "hang")
        loop = loop_for(clock, pool, b, probe, jitter=0.0)
        loop.start(0)
        clock.advance(0)
        assert len(probe.calls) == 1
        clock.advance(1.999)
        assert loop.last is None
        clock.advance(0.001)
        assert loop.last == ProbeResult(False, "timed out after 2s")
        # next probe 5 s after the previous one *started*, not after the timeout
        clock.advance(2.999)
        assert len(probe.calls) == 1
        clock.advance(0.001)
        assert len(probe.calls) == 2
        clock.pump([0.5] * 14)  # t = 12: probe 2 timed out at 7, probe 3 at 12
        assert b.health is Health.UNHEALTHY
        assert b.reason == "unhealthy: 3 probes timed out after 2s"
        loop.stop()
        assert clock.getDelayedCalls() == []

    def test_a_raising_probe_does_not_kill_the_loop(self):
        clock = task.Clock()
        pool = make_pool(clock, 1)
        b = pool.backends()[0]
        probe = ScriptedProbe(clock, "raise")
        loop = loop_for(clock, pool, b, probe, jitter=0.0)
        loop.start(0)
        clock.pump([1.0] * 16)
        assert len(probe.calls) == 4
        assert b.health is Health.UNHEALTHY
        assert "RuntimeError: probe bug" in b.reason
        probe.default = "ok"
        clock.pump([1.0] * 10)
        assert b.health is Health.HEALTHY
        loop.stop()

    def test_stop_cancels_inflight_probe_and_timers(self):
        clock = task.Clock()
        pool = make_pool(clock, 1)
        probe = ScriptedProbe(clock, "hang")
        loop = loop_for(clock, pool, pool.backends()[0], probe)
        loop.start(0)
        clock.advance(0.5)
        assert clock.getDelayedCalls() != []  # the timeout of the in-flight probe
        loop.stop()
        assert clock.getDelayedCalls() == []
        clock.advance(10)
        assert loop.last is None and len(probe.calls) == 1

    @pytest.mark.parametrize("mode", ["fail", "hang"])
    def test_dead_backend_out_within_bound(self, mode):
        """Whatever the phase of the kill relative to the probe loop, the
        backend is out within interval x unhealthy_threshold + timeout."""
        interval, timeout, threshold = 5.0, 2.0, 3
        bound = interval * threshold + timeout
        worst = 0.0
        for phase in [i * 0.37 for i in range(14)]:
            clock = task.Clock()
            pool = make_pool(clock, 1)
            b = pool.backends()[0]
            probe = ScriptedProbe(clock, "ok")
            loop = loop_for(clock, pool, b, probe, interval=interval, timeout=timeout,
                            unhealthy=threshold, seed=int(phase * 100))
            loop.start(0.3)
            clock.pump([0.1] * 200)
            clock.advance(phase)
            killed = clock.seconds()
            probe.default = mode
            while b.health is Health.HEALTHY and clock.seconds() < killed + 60:
                clock.advance(0.01)
            took = clock.seconds() - killed
            worst = max(worst, took)
            assert took <= bound + 0.011, (phase, took)
            loop.stop()
        assert worst > interval * (threshold - 1)  # the bound is not vacuous


class TestScheduler:
    def cfg(self, **kw):
        base = dict(interval=5.0, timeout=2.0, stagger=1.0, jitter=0.1)
        base.update(kw)
        return ActiveHealthConfig(**base)

    def test_first_probes_are_staggered(self):
        clock = task.Clock()
        pool = make_pool(clock, 10, Health.UNKNOWN)
        probe = ScriptedProbe(clock)
        sched = ProbeScheduler(pool, probe, self.cfg(), clock, random.Random(7))
        sched.start()
        clock.pump([0.01] * 100)
        firsts = sorted(t for t, _ in probe.calls)
        assert len(firsts) == 10
        # spread over the 1 s window, one per 0.1 s slot
        for i, t in enumerate(firsts):
            assert i * 0.1 - 0.011 <= t <= (i + 1) * 0.1 + 0.011
        assert all(b.health is Health.HEALTHY for b in pool.backends())
        sched.stop()
        assert clock.getDelayedCalls() == []

    def test_loops_started_together_drift_apart(self):
        clock = task.Clock()
        pool = make_pool(clock, 8)
        probe = ScriptedProbe(clock)
        sched = ProbeScheduler(pool, probe, self.cfg(stagger=0.0), clock, random.Random(3))
        sched.start()
        clock.pump([0.01] * 5000)  # 50 s: ~10 rounds
        last_round: dict[str, float] = {}
        for t, addr in probe.calls:
            last_round[addr] = t
        times = sorted(last_round.values())
        # stagger 0 puts all first probes at t=0; jitter alone spreads them out
        assert probe.calls[0][0] == probe.calls[7][0]
        assert times[-1] - times[0] > 1.0
        sched.stop()

    def test_added_backend_waits_for_its_first_probe(self):
        clock = task.Clock()
        pool = make_pool(clock, 2)
        probe = ScriptedProbe(clock, "hang")
        sched = ProbeScheduler(pool, probe, self.cfg(), clock, random.Random(1))
        sched.start()
        new = Backend("127.0.0.1:9999")
        pool.add_backend(new)
        sched.add(new)
        assert new.health is Health.UNKNOWN
        assert new not in pool.candidates(clock.seconds())
        probe.mode[new.address] = "ok"
        clock.pump([0.01] * 101)
        assert new.health is Health.HEALTHY
        assert new in pool.candidates(clock.seconds())
        assert new.reason == "healthy: first probe passed (status 200)"
        sched.stop()

    def test_assume_healthy_admits_at_once(self):
        clock = task.Clock()
        pool = make_pool(clock, 2)
        probe = ScriptedProbe(clock, "hang")
        sched = ProbeScheduler(pool, probe, self.cfg(assume_healthy=True), clock, random.Random(1))
        sched.start()
        new = Backend("127.0.0.1:9999")
        pool.add_backend(new)
        sched.add(new)
        assert new.health is Health.HEALTHY
        assert new in pool.candidates(clock.seconds())
        sched.stop()

    def test_remove_stops_the_loop(self):
        clock = task.Clock()
        pool = make_pool(clock, 2)
        probe = ScriptedProbe(clock)
        sched = ProbeScheduler(pool, probe, self.cfg(), clock, random.Random(1))
        sched.start()
        gone = pool.backends()[0]
        sched.remove(gone)
        pool.remove_backend(gone)
        clock.pump([0.1] * 200)
        assert gone.address not in {a for _, a in probe.calls}
        assert pool.select(PickContext(now=clock.seconds())) is pool.backends()[0]
        sched.stop()
