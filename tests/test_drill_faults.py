"""The drill backend's behaviour model, on a fake clock: capacity and queue
(the latency knee), faults, abandoned work, cold start."""
from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock

from lbtwist.drill.faults import HANG, HEALTH, REAL, RESET, RESPOND, Faults, ServerModel, ServiceTime


def model(capacity: int = 2, median: float = 0.010) -> tuple[ServerModel, Clock]:
    clock = Clock()
    m = ServerModel("b0", clock, capacity=capacity, service=ServiceTime(median, 0.0), rng=random.Random(1))
    return m, clock


def test_capacity_is_a_knee_requests_beyond_it_queue_fifo():
    m, clock = model(capacity=2, median=0.010)
    done: list[tuple[int, float]] = []
    for i in range(5):
        d, _ = m.submit(REAL, lambda status, i=i: done.append((i, clock.seconds())))
        assert d.action == RESPOND
        assert d.queued == (i >= 2)
    assert m.busy == 2 and len(m.queue) == 3
    clock.pump([0.005] * 10)
    # two at a time, 10 ms each: 10, 10, 20, 20, 30 ms
    assert [i for i, _ in done] == [0, 1, 2, 3, 4]
    assert [round(t, 3) for _, t in done] == [0.010, 0.010, 0.020, 0.020, 0.030]
    assert m.busy == 0 and not m.queue
    assert m.counters.ok == 5 and m.counters.attempts == 5


def test_gray_failure_slows_real_paths_but_not_health():
    m, clock = model()
    m.faults.update({"latency": 0.9, "latency_scope": "real"})
    times: dict[str, float] = {}
    m.submit(REAL, lambda s: times.setdefault("real", clock.seconds()))
    m.submit(HEALTH, lambda s: times.setdefault("health", clock.seconds()))
    clock.pump([0.001] * 1000)
    assert times["health"] < 0.002
    assert times["real"] == pytest.approx(0.910, abs=0.002)
    assert m.counters.probes == 1 and m.counters.attempts == 1


def test_latency_on_all_paths_slows_health_too():
    m, clock = model()
    m.faults.update({"latency": 0.5, "latency_scope": "all"})
    seen: list[float] = []
    m.submit(HEALTH, lambda s: seen.append(clock.seconds()))
    clock.pump([0.01] * 60)
    assert seen and seen[0] >= 0.5


@pytest.mark.parametrize("fault,action", [("reset_rate", RESET), ("hang_rate", HANG)])
def test_reset_and_hang_faults(fault, action):
    m, clock = model()
    m.faults.update({fault: 1.0})
    d, job = m.submit(REAL, lambda s: pytest.fail("must not answer"))
    assert d.action == action and job is None
    assert m.busy == 0
    clock.advance(10)


def test_error_rate_answers_fast_with_the_status_without_a_worker():
    m, clock = model(capacity=1)
    m.faults.update({"error_rate": 1.0, "error_status": 503})
    got: list[int] = []
    for _ in range(3):
        d, _ = m.submit(REAL, got.append)
        assert d.status == 503
    assert m.busy == 0
    clock.advance(1)
    assert got == [503, 503, 503] and m.counters.errors == 3


def test_probe_fail_rate_fails_health_probes():
    m, clock = model()
    m.faults.update({"probe_fail_rate": 1.0})
    got: list[int] = []
    m.submit(HEALTH, got.append)
    clock.advance(1)
    assert got == [503] and m.counters.probes_failed == 1


def test_abandoned_work_still_occupies_a_worker():
    """A client that gives up does not free the worker: the retry storm's fuel."""
    m, clock = model(capacity=1, median=0.100)
    replies: list[int] = []
    _, job = m.submit(REAL, replies.append)
    m.submit(REAL, replies.append)
    m.abandon(job)
    clock.advance(0.05)
    assert m.busy == 1 and len(m.queue) == 1
    clock.advance(0.06)  # the abandoned one finishes (no reply), the next starts
    assert replies == [] and m.counters.abandoned == 1 and m.busy == 1
    clock.advance(0.1)
    assert replies == [200]


def test_cold_start_warms_under_traffic_and_again_after_a_restart():
    m, clock = model(median=0.010)
    m.faults.update({"cold_factor": 11.0, "cold_seconds": 10.0})
    m.restarted()
    clock.advance(30)  # idle time does not warm it up
    assert m.cold_multiplier(clock.seconds()) == pytest.approx(11.0)
    t: list[int] = []
    m.submit(REAL, t.append)  # the first request starts the warm-up
    clock.advance(0.109)
    assert t == []  # 10 ms x 11
    clock.advance(0.002)
    assert t == [200]
    clock.advance(5 - 0.111)
    assert m.cold_multiplier(clock.seconds()) == pytest.approx(6.0)
    clock.advance(5)
    assert m.cold_multiplier(clock.seconds()) == 1.0
    m.restarted()
    assert m.cold_multiplier(clock.seconds()) == pytest.approx(11.0)


def test_faults_update_reports_unknown_names_and_checks_values():
    f = Faults()
    assert f.update({"latency": "0.25", "nope": 1}) == ["nope"]
    assert f.latency == 0.25
    with pytest.raises(ValueError):
        f.update({"latency_scope": "some"})


def test_stop_cancels_every_timer():
    m, clock = model(capacity=1)
    for _ in range(3):
        m.submit(REAL, lambda s: None)
    m.stop()
    assert clock.getDelayedCalls() == []
