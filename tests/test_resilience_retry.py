"""Retry policy, backoff with full jitter, replay buffer, Retry-After parsing."""
import random

import pytest

from lbtwist.config.model import RetryConfig, BackoffConfig
from lbtwist.resilience.retry import (
    Backoff,
    Failure,
    ReplayBuffer,
    RetryPolicy,
    parse_retry_after,
    parse_retry_on,
)


def test_parse_retry_on_kinds_statuses_and_aliases():
    kinds, statuses = parse_retry_on(["connect-failure", "reset", "timeout", 503, "gateway-error"])
    assert kinds == {Failure.CONNECT_FAILURE, Failure.RESET, Failure.TIMEOUT}
    assert statuses == {502, 503, 504}
    assert parse_retry_on(["5xx"])[1] == frozenset(range(500, 600))
    assert parse_retry_on(["503"])[1] == {503}


@pytest.mark.parametrize("bad, fragment", [
    ("conect-failure", "did you mean 'connect-failure'"),
    ("status", "unknown entry"),
    (200, "not a 4xx/5xx"),
    (True, "not a failure name"),
    (1.5, "not a failure name"),
])
def test_parse_retry_on_rejects_with_a_useful_message(bad, fragment):
    with pytest.raises(ValueError, match="retry_on") as e:
        parse_retry_on([bad])
    assert fragment in str(e.value)


def test_backoff_full_jitter_bounds_and_growth():
    b = Backoff(base=0.025, cap=0.25)
    assert [b.ceiling(n) for n in (1, 2, 3, 4, 5, 100)] == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25]
    rng = random.Random(7)
    for n in range(1, 12):
        draws = [b.delay(n, rng) for _ in range(2000)]
        assert all(0.0 <= d <= b.ceiling(n) for d in draws)
        # full jitter: draws cover the whole range, not a band near the ceiling
        assert min(draws) < 0.05 * b.ceiling(n)
        assert max(draws) > 0.95 * b.ceiling(n)
        mean = sum(draws) / len(draws)
        assert abs(mean - b.ceiling(n) / 2) < 0.05 * b.ceiling(n)


def test_backoff_is_reproducible_with_injected_rng():
    b = Backoff(0.1, 1.0)
    assert [b.delay(3, random.Random(1)) for _ in range(3)] == [b.delay(3, random.Random(1))] * 3


def test_backoff_rejects_base_above_cap():
    with pytest.raises(ValueError, match="above max"):
        Backoff(base=1.0, cap=0.5)
    with pytest.raises(ValueError):
        Backoff(0.1, 1.0).ceiling(0)


def test_default_policy_matches_the_contract():
    """A route that says nothing retries connect failures and resets of
    idempotent requests, once."""
    p = RetryPolicy.from_config(RetryConfig())
    assert p.max_attempts == 2
    assert p.retryable(Failure.CONNECT_FAILURE) and p.retryable(Failure.RESET)
    assert not p.retryable(Failure.TIMEOUT)
    assert not p.retryable(Failure.STATUS, 503)
    assert p.eligible("GET") and p.eligible("put") and p.eligible("DELETE")
    assert not p.eligible("POST") and not p.eligible("PATCH")
    assert p.eligible("POST", has_idempotency_key=True)
    assert p.eligible(None)  # L4: no method


def test_idempotency_key_header_detection():
    p = RetryPolicy.from_config(RetryConfig(idempotency_header="Idempotency-Key"))
    assert p.has_key([("idempotency-key", "abc")])
    assert not p.has_key([("idempotency-key", "  ")])
    assert not p.has_key([("x-other", "abc")])
    assert not RetryPolicy(idempotency_header=None).has_key([("idempotency-key", "abc")])


def test_statuses_are_withheld_only_when_retried():
    p = RetryPolicy.from_config(RetryConfig(retry_on=["reset", 503], backoff=BackoffConfig()))
    assert p.withhold(503) and not p.withhold(502) and not p.withhold(200)
    assert p.retryable(Failure.STATUS, 503) and not p.retryable(Failure.STATUS, 500)


def test_connect_only_policy_for_l4():
    p = RetryPolicy.connect_only(3)
    assert p.max_attempts == 3 and p.on == {Failure.CONNECT_FAILURE}
    assert p.backoff.ceiling(5) == 0.0


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(per_try_timeout=0)


def test_replay_buffer_keeps_up_to_limit_then_drops_everything():
    buf = ReplayBuffer(10)
    buf.append(b"hello")
    buf.append(b"world")
    assert buf.replayable and b"".join(buf) == b"helloworld"
    buf.append(b"!")
    assert not buf.replayable and buf.size == 11
    assert buf._chunks == []  # memory freed, not kept
    with pytest.raises(ValueError):
        list(buf)
    buf.append(b"more")  # ignored once overflowed
    assert buf._chunks == []


def test_replay_buffer_release():
    buf = ReplayBuffer(100)
    buf.append(b"x")
    buf.release()
    assert not buf.replayable


def test_parse_retry_after_forms():
    now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now) == 60.0
    assert parse_retry_after("Sun, 06 Nov 1994 08:40:37 GMT", now) == 0.0  # in the past
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None


def test_accepts_the_l7_parsers_bytes():
    """The L7 parser hands methods and headers over as bytes, names as received."""
    p = RetryPolicy()
    assert p.eligible(b"GET") and not p.eligible(b"POST")
    assert p.has_key([(b"Host", b"x"), (b"Idempotency-Key", b"k1")])
    assert not p.has_key([(b"Idempotency-Key", b" ")])
    assert parse_retry_after(b"7", 0.0) == 7.0
