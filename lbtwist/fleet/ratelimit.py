# -*- test-case-name: tests.test_fleet_ratelimit -*-
"""Fleet-scope rate limits: the GCRA state of each bucket lives in Redis,
and each instance leases tokens from it in batches.

The bucket is the same as the local limiter's (L{lbtwist.resilience.ratelimit}:
``rate`` tokens per second, ``burst`` at most, one float per key: the time
it is full again), kept under one Redis key and changed by one atomic Lua
script (L{LEASE_SCRIPT}, by EVALSHA) that grants up to ``want`` tokens, or
none and the milliseconds until the next one. The rate and burst are the
local limiter's own (one definition), passed with each call.

An instance spends leased tokens locally, so a hot key does not pay a Redis
round trip per request: the first request of a key asks for one token; a
lease that was used up before it expired doubles the next ask, up to
``lease_max``; one that expired unspent halves it. A refill is asked for in
the background when half the lease is spent, so requests rarely wait. A
refusal is remembered until the retry time Redis gave (a refused client
hammering costs no Redis calls either).

Over-admission bound: every token is taken from the shared bucket before it
is spent, so over a long run the fleet admits at most what one bucket
allows. Leasing only shifts when a token is spent, by at most ``lease_time``
(unspent tokens are dropped then), so over any window of W seconds the
fleet admits at most ``burst + rate * (W + lease_time)`` and at most
``burst + rate * W + instances * lease_max`` requests (each batch expires
``lease_time`` after it was granted, whatever came later, and a refill asks
only for what tops the lease up to its size: an instance never holds more
than ``lease_max`` tokens of a key). Tokens dropped
unspent are lost to the bucket (under-admission, bounded by ``lease_max``
per key and lease).

A request waits on Redis only when its key has no tokens left, and at most
``timeout`` (its own timer: then the local limiter decides it, even when
its call was followed by another because more requests joined it than it
asked tokens for); when Redis fails (or the link is down) the decision is
the local limiter's, with the same rate and burst, per instance.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from lbtwist.resilience.ratelimit import RateDecision, RateLimiter

LEASE_SCRIPT = """
-- lbtwist fleet rate limit: lease up to ARGV[3] tokens of a GCRA bucket.
-- KEYS[1]: the bucket (its value: the time it is full again, in microseconds).
-- ARGV[1]: microseconds per token; ARGV[2]: burst in microseconds (tokens * ARGV[1]).
-- Returns {granted, retry_ms}: retry_ms > 0 only when nothing was granted.
local per = tonumber(ARGV[1])
local span = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local stored = redis.call('GET', KEYS[1])
local full_at = now
if stored then
  full_at = math.max(tonumber(stored) or now, now)
end
local free = math.floor((now + span - full_at) / per + 0.000001)
if free < 1 then
  return {0, math.max(1, math.ceil((full_at + per - span - now) / 1000))}
end
local n = math.min(free, want)
full_at = full_at + n * per
redis.call('SET', KEYS[1], string.format('%.0f', full_at), 'PX', math.ceil((full_at - now) / 1000) + 1)
return {n, 0}
"""


class _Lease:
    __slots__ = ("tokens", "batches", "expires", "denied_until", "ask", "pending", "waiters")

    def __init__(self) -> None:
        #: Tokens held, in batches [count, expires] oldest first: a batch is
        #: dropped ``lease_time`` after it was granted, whatever came later.
        self.tokens = 0
        self.batches: deque[list] = deque()
        #: When the newest batch expires (a key spending it before then is hot).
        self.expires = 0.0
        self.denied_until = 0.0
        self.ask = 1
        self.pending = False
        #: [Deferred, its timeout call] of requests waiting for tokens
        self.waiters: list[list] = []

    def add(self, n: int, expires: float) -> None:
        self.batches.append([n, expires])
        self.tokens += n
        self.expires = expires

    def take(self) -> None:
        first = self.batches[0]
        first[0] -= 1
        self.tokens -= 1
        if first[0] == 0:
            self.batches.popleft()

    def expire(self, now: float) -> int:
        """Drop the batches too old to spend; how many tokens went."""
        dropped = 0
        batches = self.batches
        while batches and batches[0][1] <= now:
            dropped += batches.popleft()[0]
        self.tokens -= dropped
        return dropped

    def clear(self) -> None:
        self.batches.clear()
        self.tokens = 0


class FleetRateLimiter:
    """Drop-in for L{RateLimiter} in a route: L{check_request} returns a
    L{RateDecision} at once, or (when the key needs tokens from Redis) a
    Deferred firing with one within ``timeout``."""

    def __init__(self, local: RateLimiter, link: Any, bucket: str, clock: Any, *,
                 lease_max: int, lease_time: float, timeout: float = 0.05, fallback: RateLimiter | None = None) -> None:
        #: the whole limit (rate, burst, key): the Redis bucket's parameters
        self.shared = local
        #: what decides while Redis is unusable (a worker's share of the limit)
        self.local = local if fallback is None else fallback
        self.link = link
        #: Redis key prefix of this route's buckets.
        self.bucket = bucket
        self.clock = clock
        self.lease_max = max(1, min(lease_max, int(local.burst)))
        self.lease_time = lease_time
        #: Longest a request waits for tokens; then the local limiter decides.
        self.timeout = timeout
        self._leases: OrderedDict[Any, _Lease] = OrderedDict()
        self._per_us = local.interval * 1e6
        self._span_us = local.tolerance * 1e6
        #: decisions by where they were made: fleet (Redis answered for this
        #: request), lease (leased tokens or a remembered refusal), local (fallback)
        self.decisions = {"fleet": 0, "lease": 0, "local": 0}
        self.limited_by = {"fleet": 0, "lease": 0, "local": 0}
        self.redis_calls = 0
        self.tokens_leased = 0
        self.tokens_dropped = 0

    # the RateLimiter surface the data plane and metrics use
    @property
    def limited(self) -> int:
        return sum(self.limited_by.values())

    @property
    def name(self) -> str:
        return self.local.name

    def key_for(self, head: Any) -> str:
        return self.local.key_for(head)

    def __len__(self) -> int:
        return len(self._leases)

    def check_request(self, head: Any, now: float) -> RateDecision | defer.Deferred:
        return self.check(self.key_for(head), now)

    # -- deciding -------------------------------------------------------------------

    def _count(self, source: str, d: RateDecision) -> RateDecision:
        self.decisions[source] += 1
        if not d.allowed:
            self.limited_by[source] += 1
        return d

    def check(self, key: Any, now: float) -> RateDecision | defer.Deferred:
        if not self.link.up:
            return self._count("local", self.local.check(key, now))
        lease = self._lease(key)
        if lease.denied_until > now:
            return self._count("lease", RateDecision(False, lease.denied_until - now))
        if lease.batches and lease.batches[0][1] <= now:
            dropped = lease.expire(now)
            if dropped:
                self.tokens_dropped += dropped
                lease.ask = max(1, lease.ask // 2)  # leased more than this key spends
        if lease.tokens > 0:
            lease.take()
            if not lease.pending and lease.tokens <= lease.ask // 2 and lease.ask > 1:
                self._fetch(key, lease, now)  # refill in the background
            return self._count("lease", RateDecision(True))
        d = defer.Deferred()
        waiter = [d, None]
        waiter[1] = self.clock.callLater(self.timeout, self._too_late, key, lease, waiter)
        lease.waiters.append(waiter)
        if not lease.pending:
            self._fetch(key, lease, now)
        return d

    def _too_late(self, key: Any, lease: _Lease, waiter: list) -> None:
        """A request waited ``timeout`` for tokens: the local limiter decides it."""
        if waiter in lease.waiters:
            lease.waiters.remove(waiter)
            waiter[0].callback(self._count("local", self.local.check(key, self.clock.seconds())))

    @staticmethod
    def _answer(waiter: list, d: RateDecision) -> None:
        timer = waiter[1]
        if timer is not None and timer.active():
            timer.cancel()
        waiter[0].callback(d)

    def _lease(self, key: Any) -> _Lease:
        leases = self._leases
        lease = leases.get(key)
        if lease is None:
            lease = leases[key] = _Lease()
            if len(leases) > self.local.max_keys:
                old_key, old = next(iter(leases.items()))
                if not old.pending:
                    del leases[old_key]
        else:
            leases.move_to_end(key)
        return lease

    def _fetch(self, key: Any, lease: _Lease, now: float) -> None:
        if lease.expires > now:  # the last lease is spent (or nearly) before it expired: a hot key
            lease.ask = min(self.lease_max, lease.ask * 2)
        lease.pending = True
        self.redis_calls += 1
        want = max(1, lease.ask - lease.tokens)  # never more than lease_max held
        d = self.link.evalsha("lease", [f"{self.bucket}{key}"], [f"{self._per_us:.3f}", f"{self._span_us:.3f}", want])
        d.addCallbacks(self._answered, self._failed, callbackArgs=(key, lease, want), errbackArgs=(key, lease))

    def _answered(self, reply: Any, key: Any, lease: _Lease, want: int) -> None:
        lease.pending = False
        now = self.clock.seconds()
        if not (isinstance(reply, list) and len(reply) == 2 and all(type(x) is int for x in reply)
                and 0 <= reply[0] <= want and reply[1] >= 0 and (reply[0] > 0 or reply[1] > 0)):
            self.link.failed("garbage", f"rate-limit script answered {str(reply)[:60]}")
            self._fallback(key, lease, now)
            return
        granted, retry_ms = reply
        if granted:
            lease.add(granted, now + self.lease_time)
            self.tokens_leased += granted
        else:
            lease.denied_until = now + retry_ms / 1000.0
        waiters, lease.waiters = lease.waiters, []
        for i, w in enumerate(waiters):
            if lease.tokens > 0:
                lease.take()
                self._answer(w, self._count("fleet", RateDecision(True)))
            elif granted == want:
                # more requests joined the call than it asked tokens for, and the
                # bucket may hold more: ask again (each still waits at most timeout)
                lease.waiters = waiters[i:]
                lease.ask = max(lease.ask, min(self.lease_max, len(lease.waiters)))
                self._fetch(key, lease, now)
                return
            else:  # the bucket is empty: the rest wait for the next token
                wait = max(lease.denied_until - now, self.shared.interval)
                self._answer(w, self._count("fleet", RateDecision(False, wait)))

    def _failed(self, f: Failure, key: Any, lease: _Lease) -> None:
        lease.pending = False
        self._fallback(key, lease, self.clock.seconds())

    def _fallback(self, key: Any, lease: _Lease, now: float) -> None:
        """Redis did not answer usably: the waiting requests get the local decision."""
        waiters, lease.waiters = lease.waiters, []
        lease.clear()
        for w in waiters:
            self._answer(w, self._count("local", self.local.check(key, now)))

    def status(self) -> dict[str, Any]:
        return {
            "scope": "fleet",
            "keys": len(self._leases),
            "decisions_by_source": {s: {"allowed_total": self.decisions[s] - self.limited_by[s],
                                        "limited_total": self.limited_by[s]} for s in self.decisions},
            "redis_calls_total": self.redis_calls,
            "tokens_leased_total": self.tokens_leased,
            "tokens_dropped_total": self.tokens_dropped,
            "tokens_held": sum(lease.tokens for lease in self._leases.values()),
        }
