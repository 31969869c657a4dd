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
        "failure_rate": {"enabled": True, "threshold": 50.0, "min_requests": 3, "request_volume": 10,
                         "window": 60.0},
    }


# -- the two liars: a fast-failing backend and a slow one, both starved by the algorithm --


def busy_peers(pool, clock, skip, seconds=10.0, rate=20, latency=0.003):
    """Every backend but ``skip`` serves ``rate`` ok requests a second."""
    for _ in range(int(seconds * rate)):
        clock.advance(1.0 / rate)
        for b in pool.backends():
            if b not in skip:
                work(pool, b, "ok", latency=latency)


class TestFailureRate:
    def test_a_fast_failing_backend_tried_now_and_then_is_ejected(self):
        """The 503 liar: the balancer's failure penalty lets it see a try only
        every few seconds, so 5 in a row take a minute; 3 failed tries of 3
        while the peers succeed are enough."""
        clock, pool, det = setup(n=6)
        liar = pool.backends()[4]
        for i in range(3):
            busy_peers(pool, clock, {liar}, seconds=4.0)
            work(pool, liar, "5xx", latency=0.001)
            det.tick(clock.seconds())
            assert (liar.address in out(pool, clock)) == (i == 2)
        assert liar.reason.startswith("ejected: 100% of its recent tries failed (3 of 3), "
                                      "the pool median 0%")
        assert det.snapshot(liar, clock.seconds())["recent_failure_percent"] == 100.0

    def test_gateway_failures_count_too(self):
        clock, pool, det = setup(n=4)
        liar = pool.backends()[0]
        busy_peers(pool, clock, {liar}, seconds=2.0)
        for outcome in ("gateway", "5xx", "gateway"):
            work(pool, liar, outcome)
        assert out(pool, clock) == {liar.address}

    def test_a_busy_backend_survives_a_few_failures(self):
        clock, pool, det = setup(n=4)
        b = pool.backends()[1]
        busy_peers(pool, clock, set(), seconds=5.0)
        work(pool, b, "5xx", times=4)  # 4 of its last 10 (and 4 in a row, under consecutive_5xx)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()
        assert det.snapshot(b, clock.seconds())["recent_failure_percent"] == 40.0

    def test_a_busy_backend_the_balancer_then_avoids_is_judged_by_its_failures(self):
        """The two-liars drill under workers (b8, measured: 4 consecutive
        5xx, then no try for 20 s): a busy backend turns to fast 503s, gets
        4 tries spread over 2 s (p2c's failure penalty repels it), then none.
        Its last 10 tries still hold 6 successes from before the fault (40%,
        under the 50% threshold) and 4 in a row is under consecutive_5xx, so
        it stayed in rotation. Once the balancer avoids it (the median peer
        has been tried request_volume times since its last try), successes
        from before its failure run no longer speak for it."""
        clock, pool, det = setup(n=6)
        liar = pool.backends()[4]
        busy_peers(pool, clock, set(), seconds=5.0)  # the liar is busy too
        for _ in range(4):
            work(pool, liar, "5xx", latency=0.001)
            det.tick(clock.seconds())
            assert out(pool, clock) == set()  # the peers have not moved on yet
            busy_peers(pool, clock, {liar}, seconds=0.5)
        assert det.recent_failures(liar, clock.seconds()) == (10, 4)
        det.tick(clock.seconds())
        assert out(pool, clock) == {liar.address}
        assert liar.reason.startswith(
            "ejected: its last 4 tries failed and the balancer has avoided it since "
            "(the median backend was tried 10 times meanwhile), the pool median 0%")

    def test_a_busy_backend_still_tried_after_a_few_failures_stays(self):
        """The same 4 failures, but the backend keeps being tried and
        succeeds: not avoided, not ejected."""
        clock, pool, det = setup(n=6)
        b = pool.backends()[4]
        busy_peers(pool, clock, set(), seconds=5.0)
        work(pool, b, "5xx", times=4)
        busy_peers(pool, clock, set(), seconds=3.0)
        for _ in range(3):
            det.tick(clock.seconds())
            busy_peers(pool, clock, set(), seconds=1.0)
        assert out(pool, clock) == set()

    def test_an_avoided_backend_needs_min_requests_failures_in_a_row(self):
        clock, pool, det = setup(n=6)
        liar = pool.backends()[4]
        busy_peers(pool, clock, set(), seconds=5.0)
        work(pool, liar, "5xx")
        work(pool, liar, "ok")
        work(pool, liar, "5xx", times=2)  # a run of 2, under min_requests (3)
        for _ in range(5):
            busy_peers(pool, clock, {liar}, seconds=1.0)
            det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_a_pool_wide_failure_is_not_an_outlier(self):
        """Every backend fails 60% of its tries (a shared dependency is down):
        ejecting would only shrink the pool."""
        clock, pool, det = setup(n=4, consecutive_5xx=0)
        for i in range(50):
            clock.advance(0.1)
            for b in pool.backends():
                work(pool, b, "5xx" if i % 5 < 3 else "ok")
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_needs_peers_with_evidence(self):
        clock, pool, det = setup(n=3)
        liar = pool.backends()[0]
        work(pool, liar, "5xx", times=3)
        assert out(pool, clock) == set()
        # the peers' traffic arrives later: the tick judges the liar, whose last try failed
        busy_peers(pool, clock, {liar}, seconds=1.0)
        det.tick(clock.seconds())
        assert out(pool, clock) == {liar.address}

    def test_only_the_last_tries_within_the_window_count(self):
        clock, pool, det = setup(n=4)
        liar = pool.backends()[0]
        busy_peers(pool, clock, {liar}, seconds=1.0)
        work(pool, liar, "5xx", times=2)
        busy_peers(pool, clock, {liar}, seconds=61.0)  # those two are older than the 60 s window
        work(pool, liar, "5xx")
        assert out(pool, clock) == set()
        b = pool.backends()[1]  # a busy backend: only its last 10 tries are its record
        work(pool, b, "5xx")
        work(pool, b, "ok", times=3)
        work(pool, b, "5xx")
        work(pool, b, "ok", times=2)
        work(pool, b, "5xx", times=2)
        assert det.recent_failures(b, clock.seconds()) == (10, 4)
        assert out(pool, clock) == set()
        work(pool, b, "5xx")  # 5 of the last 10
        assert out(pool, clock) == {b.address}

    def test_a_returning_liar_goes_back_out_on_its_first_failure(self):
        """The record is kept (its clock stops while the backend is out), so
        the backend is judged by its recent results at once, not after 3 new
        tries that, starved by the balancer, would take a minute."""
        clock, pool, det = setup(n=4)
        liar = pool.backends()[0]
        busy_peers(pool, clock, {liar}, seconds=1.0)
        work(pool, liar, "5xx", times=3)
        assert liar.ejected_until == clock.seconds() + 30.0
        busy_peers(pool, clock, {liar}, seconds=30.0)
        det.tick(clock.seconds())
        assert liar.ejected_until is None
        det.tick(clock.seconds())
        assert out(pool, clock) == set()  # no new try yet: nothing new to judge
        work(pool, liar, "5xx")
        assert liar.ejected_until == clock.seconds() + 60.0
        assert "(ejection 2)" in liar.reason

    def test_a_recovered_backend_earns_its_place_back(self):
        clock, pool, det = setup(n=4)
        b = pool.backends()[0]
        busy_peers(pool, clock, {b}, seconds=1.0)
        work(pool, b, "5xx", times=3)
        busy_peers(pool, clock, {b}, seconds=30.0)
        det.tick(clock.seconds())
        work(pool, b, "ok", times=5)  # 3 failures of 8 now: 38%
        det.tick(clock.seconds())
        work(pool, b, "5xx")  # 4 of 9: 44%, under the 50% threshold
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_ejections_stay_capped(self):
        """Three liars of four: max_ejection_percent (50%) lets two out, the
        third stays in; the pool keeps half its backends and does not panic."""
        clock, pool, det = setup(n=4)
        liars = pool.backends()[:3]
        busy_peers(pool, clock, set(liars), seconds=1.0)
        for _ in range(3):
            for b in liars:
                work(pool, b, "5xx")
            det.tick(clock.seconds())
        assert len(out(pool, clock)) == 2
        assert not pool.panic and len(pool.candidates(clock.seconds())) == 2

    def test_off(self):
        from lbtwist.config.model import FailureRateOutlierConfig

        clock, pool, det = setup(n=4, failure_rate=FailureRateOutlierConfig(enabled=False))
        liar = pool.backends()[0]
        busy_peers(pool, clock, {liar}, seconds=1.0)
        work(pool, liar, "5xx", times=4)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()


def ewma_setup(n=6, slow_start=0.0, **cfg):
    """A pool balanced by p2c over peak EWMA (the default algorithm), so the
    detector can read the balancer's latency estimate."""
    import random

    from lbtwist.balancers.ewma import PeakEwmaLoad
    from lbtwist.balancers.p2c import PowerOfTwoChoices

    clock = task.Clock()
    pool = Pool("app", [Backend(f"127.0.0.1:{9000 + i}") for i in range(n)],
                PowerOfTwoChoices(random.Random(3), PeakEwmaLoad()), clock, slow_start=slow_start)
    det = OutlierDetector(pool, PassiveHealthConfig(**cfg))
    pool.observe_outcomes(det.on_outcome)
    return clock, pool, det


class TestStarvedBackendLatency:
    def test_a_slow_backend_the_balancer_avoids_is_judged_by_its_last_results(self):
        """The gray failure under p2c: a backend serving 20 requests/s at 3 ms
        turns 900 ms; after two slow answers the balancer stops choosing it.
        Its decayed mean still holds its 40 fast requests (about 45 ms, and
        no new sample will move it), but the balancer's estimate (900 ms)
        says it is avoided, and its last 3 results have a median of 900 ms."""
        clock, pool, det = ewma_setup()
        slow = pool.backends()[3]
        busy_peers(pool, clock, set(), seconds=2.0)
        work(pool, slow, "ok", latency=0.9, times=2)
        mean, n = det.recent_latency(slow, clock.seconds())
        assert mean < 0.1 and n > 3  # the mean rule cannot see it
        for _ in range(10):
            busy_peers(pool, clock, {slow}, seconds=1.0)
            det.tick(clock.seconds())
        assert out(pool, clock) == {slow.address}
        assert slow.reason.startswith(
            "ejected: its last 3 requests took 900ms (median), 300x the pool's 3.0ms; "
            "avoided by the balancer (latency estimate 814ms)")

    def test_a_slow_backend_with_two_results_only(self):
        clock, pool, det = ewma_setup()
        slow = pool.backends()[3]
        busy_peers(pool, clock, {slow}, seconds=2.0)
        work(pool, slow, "ok", latency=0.9, times=2)
        det.tick(clock.seconds())
        assert out(pool, clock) == {slow.address}
        assert "its last 2 requests took 900ms" in slow.reason

    def test_tries_the_clients_gave_up_on_count_as_results(self):
        """Measured in the two-liars drill: the slow backend's only tries
        after the onset were abandoned by clients at their 1 s timeout
        ("cancelled", no latency sample for the detector), while the
        balancer's estimate had seen them take 1 s."""
        clock, pool, det = ewma_setup()
        slow = pool.backends()[3]
        busy_peers(pool, clock, set(), seconds=2.0)
        for _ in range(2):
            pool.on_start(slow)
            pool.on_finish(slow, 1.0, True, "cancelled")  # as the L7 proxy reports an abandoned try
        det.tick(clock.seconds())
        assert out(pool, clock) == {slow.address}
        assert "its last 3 requests took 1000ms (median)" in slow.reason

    def test_judged_even_after_its_evidence_faded(self):
        clock, pool, det = ewma_setup(latency=LatencyOutlierConfig(balancer_estimate=True))
        slow = pool.backends()[3]
        work(pool, slow, "ok", latency=0.9, times=4)
        busy_peers(pool, clock, {slow}, seconds=3.0)  # its 4 samples fade under 3
        det.tick(clock.seconds())
        assert out(pool, clock) == {slow.address}

    def test_off_without_balancer_estimate(self):
        clock, pool, det = ewma_setup(latency=LatencyOutlierConfig(balancer_estimate=False))
        slow = pool.backends()[3]
        busy_peers(pool, clock, {slow}, seconds=2.0)
        work(pool, slow, "ok", latency=0.9, times=2)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_one_slow_request_on_a_busy_backend_is_still_not_enough(self):
        clock, pool, det = ewma_setup(n=3)
        b0 = pool.backends()[0]
        busy_peers(pool, clock, set(), seconds=2.0)
        work(pool, b0, "ok", latency=2.0)  # its estimate jumps to 2 s; its mean barely moves
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_a_stall_of_the_whole_box_ejects_nobody(self):
        """Every backend's last results take 300 ms at once (the machine
        stalled): the last results are compared with the others' last
        results, not with their older means."""
        clock, pool, det = ewma_setup()
        busy_peers(pool, clock, set(), seconds=2.0)
        for b in pool.backends():
            work(pool, b, "ok", latency=0.3 + 0.01 * pool.backends().index(b), times=3)
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_a_backend_measured_fast_again_is_left_alone(self):
        """Its last results were slow, but the balancer's estimate has come
        back down (it will send it work and measure it): not avoided."""
        clock, pool, det = ewma_setup(n=3)
        b = pool.backends()[0]
        busy_peers(pool, clock, set(), seconds=1.0)
        work(pool, b, "ok", latency=0.5, times=3)
        busy_peers(pool, clock, {b}, seconds=60.0)  # idle: the estimate decays to 0.5 * exp(-6)
        assert pool.latency_estimate(b, clock.seconds()) < 0.002
        det.tick(clock.seconds())
        assert out(pool, clock) == set()

    def test_a_backend_in_slow_start_is_not_judged_by_its_estimate(self):
        """A cold newcomer gets few requests by design (slow start); being slow
        at first is what the ramp is for."""
        from lbtwist.pool import Health

        clock, pool, det = ewma_setup(slow_start=30.0)
        new = Backend("127.0.0.1:9100", health=Health.UNKNOWN)
        pool.add_backend(new)
        pool.set_health(new, Health.HEALTHY, "first probe passed")
        busy_peers(pool, clock, {new}, seconds=2.0)
        work(pool, new, "ok", latency=0.2, times=2)
        det.tick(clock.seconds())
        assert new.state(clock.seconds()) == "slow_start"
        assert out(pool, clock) == set()

    def test_both_liars_out_together(self):
        clock, pool, det = ewma_setup(n=12)
        slow, liar = pool.backends()[3], pool.backends()[8]
        busy_peers(pool, clock, {slow, liar}, seconds=2.0)
        work(pool, slow, "ok", latency=0.9, times=2)
        for _ in range(3):
            busy_peers(pool, clock, {slow, liar}, seconds=2.0)
            work(pool, liar, "5xx", latency=0.001)
            det.tick(clock.seconds())
        assert out(pool, clock) == {slow.address, liar.address}
