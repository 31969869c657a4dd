"""Token buckets per client, header or route; Retry-After; bounded memory."""
import pytest

from lbtwist.resilience.ratelimit import RateLimiter, parse_key
from lbtwist.routing import RequestHead


def head(client="10.0.0.1", headers=()):
    return RequestHead("GET", "/", "/", "example.com", tuple(headers), client)


def test_burst_then_rate():
    rl = RateLimiter(rate=10, burst=5)
    assert [rl.check("k", 0.0).allowed for _ in range(6)] == [True] * 5 + [False]
    d = rl.check("k", 0.0)
    assert not d.allowed and d.retry_after == pytest.approx(0.1)
    assert d.retry_after_header() == "1"
    assert rl.check("k", 0.1).allowed          # one token back after 1/rate
    assert not rl.check("k", 0.1).allowed
    assert all(rl.check("k", 10.0).allowed for _ in range(5))  # refilled, capped at burst
    assert not rl.check("k", 10.0).allowed
    assert rl.limited == 4


def test_sustained_rate_is_enforced():
    rl = RateLimiter(rate=100, burst=1)
    allowed = sum(rl.check("k", i * 0.001).allowed for i in range(10_000))  # 1000 req/s for 10 s
    assert 990 <= allowed <= 1001


def test_retry_after_header_rounds_up():
    rl = RateLimiter(rate=0.25, burst=1)
    rl.check("k", 0.0)
    d = rl.check("k", 0.0)
    assert d.retry_after == pytest.approx(4.0) and d.retry_after_header() == "4"
    d = rl.check("k", 1.5)
    assert d.retry_after == pytest.approx(2.5) and d.retry_after_header() == "3"


def test_keys_client_header_route():
    by_client = RateLimiter(rate=1, burst=1, key="client")
    assert by_client.check_request(head("10.0.0.1"), 0).allowed
    assert by_client.check_request(head("10.0.0.2"), 0).allowed
    assert not by_client.check_request(head("10.0.0.1"), 0).allowed

    by_header = RateLimiter(rate=1, burst=1, key="header:X-Api-Key")
    assert by_header.check_request(head("a", [("x-api-key", "k1")]), 0).allowed
    assert by_header.check_request(head("a", [("x-api-key", "k2")]), 0).allowed
    assert not by_header.check_request(head("b", [("x-api-key", "k1")]), 0).allowed
    # requests without the header share one bucket
    assert by_header.check_request(head("a"), 0).allowed
    assert not by_header.check_request(head("b"), 0).allowed

    whole = RateLimiter(rate=1, burst=2, key="route")
    assert whole.check_request(head("a"), 0).allowed and whole.check_request(head("b"), 0).allowed
    assert not whole.check_request(head("c"), 0).allowed


def test_memory_bounded_by_max_keys_lru():
    rl = RateLimiter(rate=1, burst=1, max_keys=100)
    rl.check("hot", 0.0)
    for i in range(10_000):
        rl.check(f"10.0.{i // 256}.{i % 256}", 0.0)
        if i % 50 == 0:
            assert not rl.check("hot", 0.0).allowed  # recently used: kept, still limited
    assert len(rl) <= 100
    assert rl.evicted > 9000


def test_idle_buckets_expire_without_changing_decisions():
    rl = RateLimiter(rate=10, burst=10)
    for i in range(1000):
        rl.check(f"c{i}", i * 0.01)
    # a key that took one token is full again 0.1 s later, hence dropped
    assert len(rl) <= 15  # one request refills in 1/rate = 0.1 s
    assert rl.evicted == 0  # expiry, not eviction: nobody was forgiven anything
    # a client that returns after expiry gets a full bucket, as it would have anyway
    assert all(rl.check("c0", 20.0).allowed for _ in range(10))


def test_parse_key_and_bad_settings():
    assert parse_key("client") == ("client", None)
    assert parse_key("header:X-Key") == ("header", "x-key")
    for bad in ("ip", "header:", "cookie:x"):
        with pytest.raises(ValueError):
            parse_key(bad)
    with pytest.raises(ValueError):
        RateLimiter(rate=0)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0.5)
    assert RateLimiter(rate=7).burst == 7.0  # burst defaults to rate
