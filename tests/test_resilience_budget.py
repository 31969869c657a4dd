"""Retry budget accounting over a sliding window, with a per-second floor."""
import pytest

from lbtwist.resilience.budget import RetryBudget


def spend(budget: RetryBudget, now: float) -> int:
    """Take every retry the budget allows at ``now``; return how many."""
    n = 0
    while budget.try_retry(now):
        n += 1
        assert n < 100_000
    return n


def test_floor_alone_allows_min_per_second_times_window():
    b = RetryBudget(percent=10, min_per_second=3, window=10)
    assert spend(b, 0.0) == 30
    assert b.exhausted == 1 and b.retries_total == 30


def test_percent_of_requests_adds_to_the_floor():
    b = RetryBudget(percent=10, min_per_second=0, window=10)
    for i in range(1000):
        b.record_request(i * 0.001)
    assert spend(b, 1.0) == 100
    assert not b.can_retry(1.0)


def test_zero_percent_zero_floor_never_retries():
    b = RetryBudget(percent=0, min_per_second=0, window=10)
    for _ in range(100):
        b.record_request(0.0)
    assert not b.try_retry(0.0)
    assert b.exhausted == 1


def test_old_requests_and_retries_leave_the_window():
    b = RetryBudget(percent=50, min_per_second=0, window=10, slots=10)
    for _ in range(10):
        b.record_request(0.5)
    assert spend(b, 0.5) == 5
    # still inside the window: nothing new
    assert not b.can_retry(9.0)
    # slot of t=0.5 (epoch 0) leaves once epoch 10 begins: credit and debt both gone
    assert b.snapshot(10.0).requests == 0 and b.snapshot(10.0).retries == 0
    assert not b.can_retry(10.0)  # no requests, no floor
    b.record_request(10.0)
    b.record_request(10.0)
    assert spend(b, 10.0) == 1


def test_can_retry_has_no_side_effects():
    b = RetryBudget(percent=0, min_per_second=1, window=1)
    for _ in range(5):
        assert b.can_retry(0.0)
    assert b.retries_total == 0 and b.exhausted == 0


def test_long_run_bound_holds_under_sustained_failure():
    """Every request fails and asks for a retry at once: over a long run the
    retries stay within percent x requests + floor x (duration + window)."""
    pct, floor, window = 10.0, 3.0, 10.0
    b = RetryBudget(pct, floor, window)
    rate, duration = 200, 60.0  # requests per second, seconds
    requests = retries = 0
    for i in range(int(rate * duration)):
        now = i / rate
        b.record_request(now)
        requests += 1
        if b.try_retry(now):
            retries += 1
    bound = requests * pct / 100 + floor * (duration + window)
    assert retries <= bound
    # and the budget is not stingy either: it grants most of what it may
    assert retries >= requests * pct / 100 * 0.9


def test_snapshot_reports_window_state():
    b = RetryBudget(20, 1, 5)
    for _ in range(10):
        b.record_request(1.0)
    b.try_retry(1.0)
    s = b.snapshot(1.0)
    assert (s.requests, s.retries, s.allowance, s.exhausted) == (10, 1, 2 + 5, 0)


@pytest.mark.parametrize("kwargs", [dict(percent=-1), dict(min_per_second=-1), dict(window=0), dict(slots=0)])
def test_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)
