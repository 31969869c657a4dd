"""Scenario plans and the criteria the drill grades itself with, on
synthetic runs (no processes): each criterion passes a run that has the
property and fails one that lacks it."""
from __future__ import annotations

import pytest

from lbtwist.drill.recorder import Recorder
from lbtwist.drill.runner import RunResult
from lbtwist.drill.scenarios import (
    SCENARIOS, active_bound, attempts_bounded, evaluate, failed_tries, p99_within, plan_for, recovers,
    state_changes, success_at_least,
)


def run_with(latency_of, seconds=30, rate=100, fail_at=(), backend_factor=1.0, states=None) -> RunResult:
    """A run whose requests (``rate`` per second) take ``latency_of(second)``."""
    rec = Recorder(0.0, seconds)
    for sec in range(seconds):
        for k in range(rate):
            t = sec + k / rate
            rec.arrival(t)
            rec.attempt(t, retry=False)
            ok = sec not in fail_at
            if not ok:
                rec.attempt(t + 0.5, retry=True)
            rec.result(t, t + latency_of(sec), ok, 1 if ok else 2, "200" if ok else "503")
    for sec in range(seconds + 1):
        rec.backend_sample(sec + 0.5, [{"name": "b0", "counters": {"attempts": int(sec * rate * backend_factor)}}])
        if states:
            rec.lb_sample(sec + 0.5, states(sec))
    r = RunResult(scenario="x", target="lbtwist", duration=seconds, window=(10, 20))
    r.series, r.recorder = rec.series(), rec
    return r


def test_every_scenario_has_a_short_plan_within_budget():
    total = 0.0
    for name in SCENARIOS:
        p = plan_for(name, short=True)
        assert p.name == name and p.criteria and p.steps
        assert p.duration <= 45, name
        assert all(0 < s.at < p.duration for s in p.steps), name
        assert set(p.in_pool) <= {b for g in p.groups for b in g.backends}
        total += p.duration
        full = plan_for(name)
        assert full.duration > p.duration
    assert total <= 300


def test_unknown_scenario():
    with pytest.raises(ValueError, match="gray-failure"):
        plan_for("grey")


def test_p99_within_judges_the_window_against_the_baseline():
    calm = run_with(lambda s: 0.004)
    c = p99_within(15, 30, 10, "p99")
    ok, measured, threshold = c.check(calm)
    assert ok and "50 ms" in threshold
    slow = run_with(lambda s: 0.004 if s < 20 else 0.9)
    ok, measured, _ = c.check(slow)
    assert not ok and "900 ms" in measured
    # a whole slow second is 100 of the window's 1500 requests, more than the 1% a p99 forgives
    blip = run_with(lambda s: 0.2 if s == 22 else 0.004)
    ok, measured, _ = c.check(blip)
    assert not ok and "t=22s" in measured


def test_success_and_failed_tries():
    r = run_with(lambda s: 0.004, fail_at={12})
    ok, measured, _ = success_at_least(99.5, 10, 20).check(r)
    assert not ok and "100 of 1000 failed" in measured
    assert success_at_least(99.5, 0, 10).check(r)[0]
    assert failed_tries(r, 0, 30) == 100 + 100  # each failed request: one retry, one final failure


def test_attempts_bounded_catches_amplification():
    assert attempts_bounded(1.2, 0, 30).check(run_with(lambda s: 0.004))[0]
    ok, measured, _ = attempts_bounded(1.2, 0, 30).check(run_with(lambda s: 0.004, backend_factor=2.0))
    assert not ok and "2.00x" in measured


def test_recovers_needs_success_and_p99_after_the_trigger():
    assert recovers(20, 5, 30, 10, 99.0).check(run_with(lambda s: 0.004, fail_at={21}))[0]
    stuck = run_with(lambda s: 0.004 if s < 15 else 2.0, fail_at=set(range(15, 30)))
    ok, measured, _ = recovers(20, 5, 30, 10, 99.0).check(stuck)
    assert not ok and "seconds under" in measured


def test_state_changes_count_flips_in_and_out():
    flappy = run_with(lambda s: 0.004, states=lambda s: {"b1": "unhealthy" if (s // 3) % 2 else "healthy"})
    assert state_changes(flappy, "b1", 0, 30) == 9
    steady = run_with(lambda s: 0.004, states=lambda s: {"b1": "healthy"})
    assert state_changes(steady, "b1", 0, 30) == 0


def test_active_bound_follows_the_defaults():
    assert active_bound() == 5.0 * 3 + 2.0


def test_a_criterion_that_cannot_be_measured_fails():
    p = plan_for("hard-kill", short=True)
    r = RunResult(scenario="hard-kill", target="lbtwist", duration=p.duration, window=p.window)
    out = evaluate(p, r)  # no series at all
    assert out and not any(c["passed"] for c in out)
    assert not r.passed


def test_every_plan_fits_its_own_minimum_and_shorter_is_refused():
    for name in SCENARIOS:
        for short in (True, False):
            p = plan_for(name, short=short)
            assert 0 < p.min_duration <= p.duration, (name, short)
            shortest = plan_for(name, short=short, duration=p.min_duration)
            assert shortest.duration == p.min_duration
            assert all(0 < s.at < shortest.duration for s in shortest.steps), (name, short)
            assert shortest.window[0] < shortest.window[1] <= shortest.duration, (name, short)
            with pytest.raises(ValueError, match=f"the minimum is {p.min_duration:g} s"):
                plan_for(name, short=short, duration=p.min_duration - 1)
    with pytest.raises(ValueError, match="--duration 8 is shorter than the scenario's phases; the minimum is 35 s"):
        plan_for("gray-failure", duration=8)
    with pytest.raises(ValueError, match="--rate 0 must be above 0"):
        plan_for("gray-failure", rate=0)


def test_gray_failure_windows_are_never_empty_at_the_minimum():
    """The bug: --duration 8 judged the p99 'for arrivals t=30s..8s'. At the
    minimum duration every criterion's window holds requests."""
    for short in (True, False):
        p = plan_for("gray-failure", short=short, duration=plan_for("gray-failure", short=short).min_duration)
        r = run_with(lambda s: 0.004, seconds=int(p.duration))
        for c in evaluate(p, r):
            assert c["passed"], c
            assert "n/a" not in c["measured"] and "no requests" not in c["measured"], c


def test_two_liars_plan():
    p = plan_for("two-liars")
    assert [g.capacity for g in p.groups] == [4] and len(p.in_pool) == 12
    assert p.focus == ("b3", "b8") and p.rate == 300 and p.pool_overrides == {}
    assert [c.name for c in p.criteria] == [
        "client success >= 99.99% from t=20s", "p99.9 < 50 ms from t=20s (or 3x a noisy baseline)",
        "amplification < 1.02x from t=20s", "b3 and b8 out of rotation from t=20s"]


def test_two_liars_criteria_on_synthetic_runs():
    p = plan_for("two-liars", short=True)
    out = {"b3": "ejected", "b8": "ejected"}
    good = run_with(lambda s: 0.004, seconds=30, states=lambda s: dict(out) if s >= 6 else {"b3": "healthy", "b8": "healthy"})
    assert all(c["passed"] for c in evaluate(p, good)), evaluate(p, good)
    # the 503 liar back in rotation for the last 5 s (the bug in the issue)
    back = run_with(lambda s: 0.004, seconds=30, states=lambda s: {"b3": "ejected", "b8": "healthy" if s >= 25 else "ejected"})
    c = {c["name"]: c for c in evaluate(p, back)}["b3 and b8 out of rotation from t=15s"]
    assert not c["passed"] and "b8: out in 10 of 15 polls (in at t=25,26,27,28,29s), last state healthy" in c["measured"]
    # out again after a one-second return is fine
    blip = run_with(lambda s: 0.004, seconds=30, states=lambda s: {"b3": "healthy" if s == 20 else "ejected", "b8": "ejected"})
    assert {c["name"]: c for c in evaluate(p, blip)}["b3 and b8 out of rotation from t=15s"]["passed"]
    # 2 s of 100 requests: 2 over 60 ms is 0.13% of the window's 1500, above 0.1%
    slow_tail = run_with(lambda s: 0.004, seconds=30, states=lambda s: out)
    for sec in (16, 17):
        slow_tail.recorder.result(sec + 0.1, sec + 0.16, True, 1, "200")
    slow_tail.series = slow_tail.recorder.series()
    c = {c["name"]: c for c in evaluate(p, slow_tail)}["p99.9 < 50 ms from t=15s (or 3x a noisy baseline)"]
    assert not c["passed"] and "p99.9 60 ms" in c["measured"] and c["threshold"].startswith("< 50 ms")
    # on a box whose own tail is 40 ms before the fault, 60 ms is the box, not the target
    noisy = run_with(lambda s: 0.004, seconds=30, states=lambda s: out)
    for sec in range(2, 5):
        for k in range(2):
            noisy.recorder.result(sec + 0.1 * k, sec + 0.1 * k + 0.04, True, 1, "200")
    for sec in (16, 17):
        noisy.recorder.result(sec + 0.1, sec + 0.16, True, 1, "200")
    noisy.series = noisy.recorder.series()
    c = {c["name"]: c for c in evaluate(p, noisy)}["p99.9 < 50 ms from t=15s (or 3x a noisy baseline)"]
    assert c["passed"] and c["threshold"].startswith("< 120 ms"), c
    # a liar's 900 ms answers fail it even then
    for sec in (18, 19, 20):
        noisy.recorder.result(sec + 0.3, sec + 1.2, True, 1, "200")
    noisy.series = noisy.recorder.series()
    assert not {c["name"]: c for c in evaluate(p, noisy)}["p99.9 < 50 ms from t=15s (or 3x a noisy baseline)"]["passed"]
    amplified = run_with(lambda s: 0.004, seconds=30, states=lambda s: out, backend_factor=1.05)
    c = {c["name"]: c for c in evaluate(p, amplified)}["amplification < 1.02x from t=15s"]
    assert not c["passed"] and "1.050x" in c["measured"]
    failing = run_with(lambda s: 0.004, seconds=30, states=lambda s: out, fail_at={22})
    assert not evaluate(p, failing)[0]["passed"]


def _worker_kill_run(marks, fail_at=()):
    p = plan_for("worker-kill", short=True)
    r = run_with(lambda s: 0.004, seconds=int(p.duration), fail_at=set(fail_at))
    r.scenario, r.window, r.marks = "worker-kill", p.window, marks
    return p, r


WORKER_MARKS = {"victim_pid": 11, "victim_connections": 30, "spawned_after": 0.12, "replaced_after": 1.31,
                "replacement_pid": 13,
                "survivor_served_meanwhile": 42, "replacement_served_fresh": 19, "fresh_ok": 40}


def test_worker_kill_grades_replacement_failures_and_both_workers():
    p, r = _worker_kill_run(dict(WORKER_MARKS))
    got = {c["name"]: c for c in evaluate(p, r)}
    assert all(c["passed"] for c in got.values()), got
    assert got["replacement process started within 1s"]["measured"] == "0.12s"
    assert got["replacement serving within 5s"]["measured"] == "1.31s"
    slow = dict(WORKER_MARKS, spawned_after=1.6, replaced_after=5.5)
    out = {c["name"]: c for c in evaluate(p, _worker_kill_run(slow)[1])}
    assert not out["replacement process started within 1s"]["passed"] and not out["replacement serving within 5s"]["passed"]
    never = {k: v for k, v in WORKER_MARKS.items()
             if k not in ("spawned_after", "replaced_after", "replacement_pid", "replacement_served_fresh")}
    out = {c["name"]: c for c in evaluate(p, _worker_kill_run(never)[1])}
    assert not out["replacement serving within 5s"]["passed"] and not out["the replacement takes traffic"]["passed"]
    # the master's spare took the slot: started before the kill
    pre = dict(WORKER_MARKS, spawned_after=0.0, replacement_prestarted=True)
    got = {c["name"]: c for c in evaluate(p, _worker_kill_run(pre)[1])}["replacement process started within 1s"]
    assert got["passed"] and got["measured"] == "0.00s (the pre-started spare)"
    idle = dict(WORKER_MARKS, survivor_served_meanwhile=0)
    assert not {c["name"]: c for c in evaluate(p, _worker_kill_run(idle)[1])}["the other worker serves through"]["passed"]
    # more failed requests than the killed worker held: lost work beyond its own
    few = dict(WORKER_MARKS, victim_connections=3)
    out = {c["name"]: c for c in evaluate(p, _worker_kill_run(few, fail_at={int(p.window[0]) + 1})[1])}
    assert not out["failed client requests <= connections the killed worker held"]["passed"]
    assert p.config_overrides == {"workers": 2}


def test_worker_kill_counts_tries_that_waited_for_the_replacement_as_the_killed_workers():
    """Its open connections are reset (retried at once); a connection the
    kernel queued on its socket waits for the replacement and, if that takes
    over 1 s, times out: counted against the killed worker, reported apart.
    A timeout long after the replacement serves is not."""
    p = plan_for("worker-kill", short=True)
    kill = int(p.window[0])

    def run(timeout_seconds):
        _, r = _worker_kill_run(dict(WORKER_MARKS, victim_connections=1, replaced_after=1.4))
        for sec in timeout_seconds:  # one extra try that timed out, ending in that second
            r.recorder.attempt(sec - 0.9, retry=True)
            r.recorder.try_result(sec + 0.1, "timeout")
        r.series = r.recorder.series()
        return {c["name"]: c for c in evaluate(p, r)}

    name = "failed client tries <= connections the killed worker held, its queue included"
    got = run([kill + 1, kill + 2])
    assert got[name]["passed"], got[name]
    assert "1 open connections at the kill + 2 tries that timed out waiting" in got[name]["threshold"]
    late = run([kill + 7, kill + 8])  # long after the replacement serves: not its queue
    assert not late[name]["passed"] and "+ 0 tries that timed out" in late[name]["threshold"]
