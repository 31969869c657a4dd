"""Per-second series: what goes in which second, percentiles, backend
deltas across restarts, shares and balancer state counts."""
from __future__ import annotations

import pytest

from lbtwist.drill.recorder import Recorder, percentile


def test_percentile_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == 50.0
    assert percentile(xs, 99) == 99.0
    assert percentile(xs, 99.9) == 100.0
    assert percentile([], 50) is None


def test_client_figures_by_arrival_second_throughput_by_completion():
    r = Recorder(t0=100.0, seconds=4)
    r.arrival(100.2)
    r.attempt(100.2, retry=False)
    r.attempt(101.2, retry=True)  # a retry one second later
    r.result(100.2, 101.5, ok=True, attempts=2, outcome="200")
    r.arrival(100.7)
    r.attempt(100.7, retry=False)
    r.result(100.7, 100.71, ok=False, attempts=3, outcome="503")
    s = r.series()
    assert s["offered"] == [2, 0, 0, 0]
    assert s["attempts"] == [2, 1, 0, 0] and s["retries"] == [0, 1, 0, 0]
    assert s["finished"][0] == 2 and s["failed"][0] == 1 and s["success_rate"][0] == 50.0
    assert s["goodput"] == [0, 1, 0, 0]  # counted when it completed
    assert s["p99"][0] == pytest.approx(1.3)
    assert s["outcomes"][0] == {"200": 1, "503": 1}
    t = r.totals()
    assert t["offered"] == 2 and t["ok"] == 1 and t["retries"] == 1


def test_backend_rates_are_counter_deltas_and_survive_restarts():
    r = Recorder(t0=0.0, seconds=5)
    rows = lambda a, b: [{"name": "b0", "counters": {"attempts": a}}, {"name": "b1", "counters": {"attempts": b}}]
    r.backend_sample(0.5, rows(0, 0))
    r.backend_sample(1.5, rows(30, 10))
    r.backend_gone(2.5, ["b1"])  # b1's process died
    r.backend_sample(2.5, rows(60, 0)[:1])
    r.backend_sample(3.5, rows(90, 20))  # b1 restarted: counts from zero
    s = r.series()
    assert s["backend_rate"]["b0"][1:4] == [30.0, 30.0, 30.0]
    assert s["backend_rate"]["b1"][1:4] == [10.0, 0.0, 20.0]
    assert s["backend_attempts"][1] == 40.0
    assert s["share"]["b0"][1] == 75.0 and s["share"]["b1"][1] == 25.0
    assert s["share"]["b0"][0] is None  # nothing known yet


def test_balancer_state_counts():
    r = Recorder(t0=0.0, seconds=2)
    r.lb_sample(0.5, {"b0": "healthy", "b1": "slow_start", "b2": "ejected", "b3": "draining"})
    s = r.series()
    assert s["healthy"] == [2, None] and s["out_of_rotation"] == [2, None]


def test_cpu_percent_from_cumulative_seconds():
    r = Recorder(t0=0.0, seconds=3)
    r.cpu_sample(0.5, "balancer", 1.0)
    r.cpu_sample(1.5, "balancer", 1.25)
    r.cpu_sample(2.5, "balancer", None)
    assert r.series()["cpu"]["balancer"] == [None, 25.0, None]
