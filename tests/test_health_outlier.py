"""Passive outlier detection on task.Clock: consecutive-failure rules, the
latency rule, ejection growth and decay, the ejection cap, and the return
through slow start."""
from __future__ import annotations

import attrs
from twisted.internet import task

from lbtwist.config.model import LatencyOutlierConfig, PassiveHealthConfig
from lbtwist.health.outlier import OutlierDetector
from lbtwist.pool import Backend, PickContext, Pool
from support.fakes import FirstBalancer, Logged


def setup(n=3, slow_start=0.0, **cfg):
    clock = task.Clock()
    pool = Pool("app", [Backend(f"127.0.0.1:{9000 + i}") for i in range(n)], FirstBalancer(),
                clock, slow_start=slow_start)
    det = OutlierDetector(pool, PassiveHealthConfig(**cfg))
    pool.observe_outcomes(det.on_outcome)
    return clock, pool, det


def work(pool, backend, outcome="ok", latency=0.003, times=1):
    for _ in range(times):
        pool.on_start(backend)
        pool.on_finish(backend, latency, outcome == "ok", outcome)


def out(pool, clock):
    now = clock.seconds()
    return {b.address for b in pool.backends() if b.ejected_until is not None and b.ejected_until > now}


def run_until_returned(clock, det, b):
    """Drive the detector the way the service does: wake when tick asks."""
    while True:
        nxt = det.tick(clock.seconds())
        if b.ejected_until is None:
            return
        clock.advance(nxt - clock.seconds())


class TestConsecutive:
    def test_five_5xx_eject_four_do_not(self):
        clock, pool, det = setup()
        b = pool.backends()[1]
        work(pool, b, "5xx", times=4)
        assert out(pool, clock) == set()
        work(pool, b, "5xx")
        assert out(pool, clock) == {b.address}
        assert b.ejected_until == 30.0
        assert b.reason == "ejected: 5 consecutive 5xx; out for 30s (ejection 1)"
        assert b not in pool.candidates(clock.seconds())

    def test_ok_resets_and_cancelled_is_ignored(self):
        clock, pool, det = setup()
        b = pool.backends()[0]
        work(pool, b, "5xx", times=4)
        work(pool, b, "ok")
        work(pool, b, "5xx", times=4)
        work(pool, b, "cancelled", times=10)
        assert out(pool, clock) == set()
        work(pool, b, "5xx")
        assert out(pool, clock) == {b.address}

    def test_gateway_failures_count_on_their_own(self):
        clock, pool, det = setup()
        b = pool.backends()[0]
        for _ in range(4):
            work(pool, b, "gateway")
            work(pool, b, "5xx")
        assert out(pool, clock) == set()
        work(pool, b, "gateway")
        assert out(pool, clock) == {b.address}
        assert "5 consecutive gateway failures" in b.reason

    def test_zero_disables_a_rule(self):
        clock, pool, det = setup(consecutive_5xx=0)
        b = pool.backends()[0]
        work(pool, b, "5xx", times=50)
        assert out(pool, clock) == set()


class TestEjectionTime:
    def test_grows_per_repeat_and_is_capped(self):
        clock, pool, det = setup(base_ejection_time=30.0, max_ejection_time=100.0)
        b = pool.backends()[0]
        lengths = []
        for _ in range(5):
            work(pool, b, "5xx", times=5)
            start = clock.seconds()
            lengths.append(b.ejected_until - start)
            # return exactly when the ejection ends, then fail again at once
            run_until_returned(clock, det, b)
            assert clock.seconds() - start == lengths[-1]
        assert lengths == [30.0, 60.0, 90.0, 100.0, 100.0]

    def test_multiplier_decays_with_good_behaviour(self):
        clock, pool, det = setup(base_ejection_time=30.0)
        b = pool.backends()[0]
        for _ in range(3):
            work(pool, b, "5xx", times=5)
            run_until_returned(clock, det, b)
        assert det.tracks[b].ejections == 3
        # two base periods of clean service forget two offences
        for _ in range(60):
            clock.advance(1.0)
            det.tick(clock.seconds())
        assert det.tracks[b].ejections == 1
        work(pool, b, "5xx", times=5)
        assert b.ejected_until - clock.seconds() == 60.0

    def test_tick_wakes_exactly_at_the_return(self):
        clock, pool, det = setup(interval=1.0)
        b = pool.backends()[0]
        clock.advance(0.25)
        work(pool, b, "5xx", times=5)
        clock.advance(29.5)
        assert det.tick(clock.seconds()) == 30.25
        clock.advance(0.5)
        assert det.tick(clock.seconds()) == 30.25 + 1.0
        assert b.ejected_until is None
        assert b.reason == "returned: ejection over"


class TestCap:
    def test_at_most_half_of_the_pool(self):
        clock, pool, det = setup(n=4)
        a, b, c, d = pool.backends()
        with Logged() as log:
            for x in (a, b, c):
                work(pool, x, "5xx", times=5)
            work(pool, c, "5xx", times=5)  # still refused, logged only once
        assert out(pool, clock) == {a.address, b.address}
        refusals = [t for t in log.texts() if "max_ejection_percent" in t]
        assert len(refusals) == 1
        assert "127.0.0.1:9002" in refusals[0] and "2 of 4 already out" in refusals[0]
        # two backends keep serving: the rest is never emptied by passive checks
        assert set(pool.candidates(clock.seconds())) == {c, d}
        # once one returns, the next offender can go
        clock.advance(30)
        det.tick(clock.seconds())
        work(pool, c, "5xx", times=5)
        assert c.address in out(pool, clock)

    def test_small_pools(self):
        clock, pool, det = setup(n=2)
        assert det.max_ejected() == 1
        clock, pool, det = setup(n=1)
        assert det.max_ejected() == 0
        work(pool, pool.backends()[0], "5xx", times=10)
        assert out(pool, clock) == set()
        clock, pool, det = setup(n=10, max_ejection_percent=25)
        assert det.max_ejected() == 2
        clock, pool, det = setup(n=10, max_ejection_percent=0)
        assert det.max_ejected() == 0


class TestLatencyRule:
    def test_gray_backend_is_ejected(self):
        clock, pool, det = setup(n=4)
        gray = pool.backends()[2]
        for _ in range(20):
            clock.advance(0.05)
            for b in pool.backends():
                work(pool, b, "ok", latency=0.9 if b is gray else 0.003)
        det.tick(clock.seconds())
        assert out(pool, clock) == {gray.address}
        assert gray.reason.startswith("ejected: latency 900ms is 300x the pool median 3.0ms")

    def test_one_slow_request_is_not_enough(self):
        clock, pool, det = setup(n=3)
        b0 = pool.backends()[0]
        for _ in range(30):
            clock.advance(0.05)
            for b in pool.backends():
                work(pool, b, "ok", latency=0.003)
        work(pool, b0, "ok", latency=2.0)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_needs_recent_evidence(self):
        clock, pool, det = setup(n=3, latency=LatencyOutlierConfig(min_requests=5))
        gray = pool.backends()[0]
        for b in pool.backends()[1:]:
            work(pool, b, "ok", latency=0.003, times=20)
        work(pool, gray, "ok", latency=0.9, times=4)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()
        work(pool, gray, "ok", latency=0.9)
        det.tick(clock.seconds())
        assert out(pool, clock) == {gray.address}

    def test_evidence_fades(self):
        clock, pool, det = setup(n=3)
        gray = pool.backends()[0]
        for b in pool.backends():
            work(pool, b, "ok", latency=0.9 if b is gray else 0.003, times=6)
        clock.advance(30)  # three windows later, 6 requests decayed below 5
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_floor_and_factor(self):
        # 60 ms against 3 ms is 20x but under min_latency (100 ms): a fast pool's noise
        clock, pool, det = setup(n=3)
        for i, b in enumerate(pool.backends()):
            work(pool, b, "ok", latency=0.06 if i == 0 else 0.003, times=10)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()
        # 400 ms against 100 ms is only 4x (factor 5)
        clock, pool, det = setup(n=3)
        for i, b in enumerate(pool.backends()):
            work(pool, b, "ok", latency=0.4 if i == 0 else 0.1, times=10)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_off(self):
        clock, pool, det = setup(n=3, latency=LatencyOutlierConfig(enabled=False))
        for i, b in enumerate(pool.backends()):
            work(pool, b, "ok", latency=5.0 if i == 0 else 0.003, times=10)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()


class TestReturn:
    def test_returns_through_slow_start(self):
        clock, pool, det = setup(n=2, slow_start=30.0)
        b = pool.backends()[0]
        work(pool, b, "gateway", times=5)
        assert b.state(clock.seconds()) == "ejected"
        clock.advance(30)
        det.tick(clock.seconds())
        now = clock.seconds()
        assert b.ejected_until is None
        assert b.reason == "returned: ejection over; slow start 30s"
        assert b in pool.candidates(now)
        assert b.state(now) == "slow_start"
        ramp = []
        for _ in range(4):
            ramp.append(round(b.effective_weight(clock.seconds()), 3))
            clock.advance(10)
        assert ramp == [0.1, 0.333, 0.667, 1.0]
        assert b.state(clock.seconds()) == "healthy"

    def test_counters_restart_after_return(self):
        clock, pool, det = setup(n=3)
        b = pool.backends()[0]
        work(pool, b, "5xx", times=5)
        clock.advance(30)
        det.tick(clock.seconds())
        work(pool, b, "5xx", times=4)
        assert b.ejected_until is None

    def test_removed_backend_is_forgotten(self):
        clock, pool, det = setup(n=3)
        b = pool.backends()[0]
        work(pool, b, "5xx", times=3)
        pool.remove_backend(b)
        det.forget(b)
        det.on_outcome(b, clock.seconds(), 0.001, "5xx")
        assert b not in det.tracks
        assert pool.select(PickContext(now=clock.seconds())) is pool.backends()[0]


def test_config_defaults_survive_the_gray_failure_untuned():
    cfg = PassiveHealthConfig()
    assert attrs.asdict(cfg) == {
        "enabled": True, "consecutive_5xx": 5, "consecutive_gateway_failures": 5,
        "base_ejection_time": 30.0, "max_ejection_time": 300.0, "max_ejection_percent": 50.0,
        "interval": 1.0,
        "latency": {"enabled": True, "factor": 5.0, "min_latency": 0.1, "min_requests": 3, "window": 10.0,
                    "balancer_estimate": True},
        "failure_rate": {"enabled": True, "threshold": 50.0, "min_requests": 3, "window": 30.0},
    }
