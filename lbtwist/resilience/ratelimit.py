# -*- test-case-name: tests.test_resilience_ratelimit -*-
"""Per-route rate limiting with token buckets, sans-IO.

Buckets are keyed by client address, by a request header, or the route as a
whole. Each bucket refills at ``rate`` tokens per second up to ``burst``; a
request takes one token, and when none is left it gets 429 with a
``Retry-After`` saying when the next token arrives.

Memory is bounded for many keys: each bucket is one float (the time it
will be full again); a bucket that is full again is exactly like a missing
one, so such buckets are dropped as they age (least recently used first, a
few per call); and past ``max_keys`` the least recently used bucket is
dropped even if not yet full, which at worst forgives a client some debt.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import attrs

#: Requests without the keying header share this bucket.
MISSING_KEY = ""


@attrs.frozen
class RateDecision:
    allowed: bool
    #: Seconds until a token is available (0 when allowed).
    retry_after: float = 0.0

    def retry_after_header(self) -> str:
        """The ``Retry-After`` value: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


_ALLOW = RateDecision(True, 0.0)


def parse_key(key: str) -> tuple[str, str | None]:
    """``client`` | ``route`` | ``header:NAME`` -> (kind, lower-case header name)."""
    if key in ("client", "route"):
        return key, None
    kind, sep, name = key.partition(":")
    if kind == "header" and sep and name.strip():
        return "header", name.strip().lower()
    raise ValueError(f"rate_limit.key: {key!r} is not client, route or header:NAME")


class RateLimiter:
    """The buckets of one route."""

    #: Aged-out buckets dropped per call at most (amortises the sweep).
    SWEEP = 4

    def __init__(
        self, rate: float, burst: float | None = None, key: str = "client", max_keys: int = 100_000,
        name: str = "",
    ) -> None:
        if rate <= 0:
            raise ValueError("rate_limit.rate must be > 0")
        burst = rate if burst is None else burst
        if burst < 1:
            raise ValueError("rate_limit.burst must be >= 1")
        if max_keys < 1:
            raise ValueError("rate_limit.max_keys must be >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.kind, self.header = parse_key(key)
        self.max_keys = max_keys
        self.name = name
        #: Seconds one request's token takes to come back.
        self.interval = 1.0 / self.rate
        #: How far ahead of now a bucket's "full again" time may run: ``burst`` tokens.
        self.tolerance = self.burst * self.interval
        #: key -> time at which the bucket is full again (GCRA's "theoretical
        #: arrival time"): one float per key. Least recently used first.
        self._buckets: OrderedDict[Any, float] = OrderedDict()
        #: Requests refused (a counter for metrics).
        self.limited = 0
        #: Buckets dropped before they were full (max_keys reached).
        self.evicted = 0

    @classmethod
    def from_config(cls, cfg: Any, name: str = "") -> "RateLimiter":
        return cls(rate=cfg.rate, burst=cfg.burst, key=cfg.key, max_keys=cfg.max_keys, name=name)

    def __len__(self) -> int:
        return len(self._buckets)

    def key_for(self, head: Any) -> str:
        """The bucket key for a L{lbtwist.routing.RequestHead}."""
        if self.kind == "client":
            return head.client
        if self.kind == "route":
            return MISSING_KEY
        value = head.header(self.header)
        return MISSING_KEY if value is None else value

    def check_request(self, head: Any, now: float) -> RateDecision:
        return self.check(self.key_for(head), now)

    def check(self, key: Any, now: float, cost: float = 1.0) -> RateDecision:
        """Take ``cost`` tokens from ``key``'s bucket if it has them.

        The bucket is kept as the single time at which it will be full again
        (the generic cell rate algorithm, equivalent to a token bucket): it
        holds ``(now + tolerance - full_at) / interval`` tokens."""
        buckets = self._buckets
        full_at = buckets.get(key)
        if full_at is None:
            full_at = now
        else:
            buckets.move_to_end(key)
        new = (full_at if full_at > now else now) + cost * self.interval
        over = new - now - self.tolerance
        if over > 1e-9:  # tolerate float drift from many small steps
            self.limited += 1
            return RateDecision(False, over)
        buckets[key] = new
        if len(buckets) > self.max_keys:
            buckets.popitem(last=False)
            self.evicted += 1
        self._sweep(now)
        return _ALLOW

    def _sweep(self, now: float) -> None:
        """Drop a few least recently used buckets that are full again."""
        buckets = self._buckets
        for _ in range(self.SWEEP):
            if len(buckets) <= 1:
                return
            key = next(iter(buckets))
            if buckets[key] > now:
                return
            del buckets[key]
