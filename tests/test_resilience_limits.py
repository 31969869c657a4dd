"""Per-pool limits: acquire/release, refusals named, slots safe to release twice."""
import pytest

from lbtwist.resilience.limits import LIMIT_HEADER, Limit, LimitSettings, PoolLimits, overflow_headers


def test_each_limit_refuses_at_its_max_and_counts_refusals():
    lim = PoolLimits(LimitSettings(max_connections=2, max_pending=1, max_requests=3, max_retries=0))
    for kind, cap in ((Limit.CONNECTIONS, 2), (Limit.PENDING, 1), (Limit.REQUESTS, 3), (Limit.RETRIES, 0)):
        slots = [lim.try_acquire(kind) for _ in range(cap)]
        assert all(slots) and lim.in_use(kind) == cap
        assert not lim.available(kind)
        assert lim.try_acquire(kind) is None
        assert lim.try_acquire(kind) is None
        assert lim.refused[kind] == 2
        for s in slots:
            s.release()
        assert lim.in_use(kind) == 0


def test_limits_are_independent():
    lim = PoolLimits(LimitSettings(max_connections=1, max_pending=1, max_requests=1, max_retries=1))
    held = [lim.try_acquire(k) for k in Limit]
    assert all(held)
    assert all(lim.in_use(k) == 1 for k in Limit)


def test_double_release_is_harmless():
    lim = PoolLimits(LimitSettings(max_pending=1))
    s = lim.try_acquire(Limit.PENDING)
    s.release()
    s.release()
    assert lim.in_use(Limit.PENDING) == 0
    assert lim.try_acquire(Limit.PENDING) is not None
    assert lim.try_acquire(Limit.PENDING) is None


def test_bounded_under_a_flood():
    """Ten thousand arrivals against max_pending=256: never more than 256 held,
    every other one refused at once (nothing queues)."""
    lim = PoolLimits(LimitSettings(max_pending=256))
    held = []
    for _ in range(10_000):
        s = lim.try_acquire(Limit.PENDING)
        if s is not None:
            held.append(s)
    assert len(held) == 256 and lim.in_use(Limit.PENDING) == 256
    assert lim.refused[Limit.PENDING] == 10_000 - 256


def test_reconfigure_keeps_held_slots():
    lim = PoolLimits(LimitSettings(max_requests=2))
    a, b = lim.try_acquire(Limit.REQUESTS), lim.try_acquire(Limit.REQUESTS)
    lim.reconfigure(LimitSettings(max_requests=1))
    assert lim.try_acquire(Limit.REQUESTS) is None
    a.release()
    assert lim.try_acquire(Limit.REQUESTS) is None  # b still counts
    b.release()
    assert lim.try_acquire(Limit.REQUESTS) is not None


def test_overflow_header_names_the_limit():
    assert overflow_headers(Limit.PENDING) == [(LIMIT_HEADER.encode(), b"max_pending")]
    assert {k.value for k in Limit} == {"max_connections", "max_pending", "max_requests", "max_retries"}


def test_settings_reject_negative():
    with pytest.raises(ValueError, match="max_pending"):
        LimitSettings(max_pending=-1)
