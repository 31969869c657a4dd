"""Consistent hashing: ``ring_hash`` (virtual nodes on a ring) and ``maglev``
(Google's lookup table). The key is ``ctx.key``: the client address, a header
or a cookie value, extracted by the listener.

Both give the same mapping in every process and after every restart: keys
and backends are hashed with BLAKE2b (never Python's per-process ``hash()``)
and a backend is identified by its ``name`` if set, else its address, so
balancer replicas agree and a cache tier keeps its hit rate. Removing one of N
backends moves only about 1/N of the keys.

Shared rules:
  - weights (configured, not the slow-start ramp: a ramp would reshuffle keys
    for the whole ramp period) set each backend's share of the ring/table;
  - a key whose backend is excluded (a retry) walks to the next distinct
    eligible backend, the same one in every process;
  - without a key (``ctx.key is None``) the pick is uniformly random;
  - tables are cached per candidate tuple (the pool hands out the same tuple
    until membership, health or weights change) plus a few recent member sets,
    so a flapping backend does not rebuild a 65537-slot table on every flap;
  - bounded loads (``balance_factor`` c, "Consistent Hashing with Bounded
    Loads", Mirrokni, Thorup, Zadimoghaddam; HAProxy's
    ``hash-balance-factor``): a backend already carrying its capacity
    ``ceil(c * (in_flight + 1) * weight / total_weight)`` passes the key on
    to the next candidate of the same walk a retry takes. Without pressure
    every key keeps its backend;
  - slow start: a backend still ramping (``Backend.ramp`` below 1) admits
    only the keys whose own fixed fraction (a second hash of the key) is
    below the ramp; the others go to their next candidate. The ramp only
    grows, so a key that moved to the new backend stays there.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import NoFeedback, eligible
from lbtwist.balancers.options import check_known, integer, number
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext

DEFAULT_VNODES = 160
MAX_VNODES = 10_000
DEFAULT_TABLE_SIZE = 65537
MAX_TABLE_SIZE = 5_000_011
_RECENT_TABLES = 4
#: ``balance_factor`` bounds: 1.0 is the strictest (no backend above the mean);
#: HAProxy and Envoy take the same range (as a percentage).
MIN_BALANCE_FACTOR = 1.0
MAX_BALANCE_FACTOR = 100.0
_TWO64 = float(1 << 64)


def stable_hash(data: bytes) -> int:
    """64-bit hash identical in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def identity(backend: Backend) -> bytes:
    """What a backend is hashed as: its name if given, so a backend that moves
    to a new address can keep its keys, else its address."""
    return (backend.name or backend.address).encode("utf-8")


class _TableCache:
    """The current table for a candidate tuple, plus a few recent member sets."""

    def __init__(self, build: Callable[[list[Backend]], Any]) -> None:
        self._build = build
        self._candidates: Sequence[Backend] | None = None
        self._current: tuple[list[Backend], Any] = ([], None)
        self._recent: OrderedDict[Hashable, tuple[list[Backend], Any]] = OrderedDict()

    def get(self, candidates: Sequence[Backend]) -> tuple[list[Backend], Any]:
        """(eligible backends, table built from them) for ``candidates``."""
        if candidates is self._candidates:
            return self._current
        members = [b for b in candidates if b.weight > 0]
        key = tuple((b, b.weight) for b in members)
        entry = self._recent.get(key)
        if entry is None:
            entry = (members, self._build(members) if members else None)
            self._recent[key] = entry
            if len(self._recent) > _RECENT_TABLES:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(key)
        self._candidates = candidates
        self._current = entry
        return entry


class _HashBalancer(NoFeedback):
    def __init__(self, rng: random.Random, balance_factor: float | None = None) -> None:
        self._rng = rng
        self._tables = _TableCache(self._build)
        #: None: no load bound (every key keeps its backend whatever the load).
        self.balance_factor = balance_factor

    def _build(self, members: list[Backend]) -> Any:
        raise NotImplementedError

    def _first(self, table: Any, h: int) -> Backend:
        """The key's own backend (no exclusions, no pressure)."""
        raise NotImplementedError

    def _walk(self, table: Any, h: int) -> Iterator[Backend]:
        """Every entry in the order the key tries them: its own backend first,
        then the next candidates (repeats allowed), the same in every process."""
        raise NotImplementedError

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        members, table = self._tables.get(candidates)
        if not members:
            return None
        exclude = ctx.exclude
        if ctx.key is None:
            pool = eligible(members, ctx) if exclude else members
            return self._rng.choice(pool) if pool else None
        if exclude and all(b in exclude for b in members):
            return None
        h = stable_hash(ctx.key)
        if not exclude and self.balance_factor is None:
            b = self._first(table, h)
            if b.slow_start <= 0 or b.ramp(ctx.now) >= 1.0:
                return b  # the common case: one lookup
        found = self._search(members, table, h, ctx)
        if found is None:  # no slot left for any non-excluded backend (tiny tables)
            pool = eligible(members, ctx)
            return self._rng.choice(pool) if pool else None
        return found

    def _search(self, members: list[Backend], table: Any, h: int, ctx: PickContext) -> Backend | None:
        """Walk the key's candidates: skip excluded ones, ramping ones that do
        not admit this key yet, and ones at their load bound. When every
        backend is passed over for ramp or load, the first one not excluded
        takes the key (a bound must never turn work away)."""
        exclude = ctx.exclude
        now = ctx.now
        fraction = -1.0  # this key's fixed place in every slow-start ramp, computed on demand
        capacity: Callable[[Backend], float] | None = None
        if self.balance_factor is not None:
            total_w = sum(b.weight for b in members)
            scale = self.balance_factor * (sum(b.active for b in members) + 1) / total_w
            capacity = lambda b: math.ceil(scale * b.weight)  # noqa: E731
        fallback: Backend | None = None
        seen: set[int] = set()
        limit = len(members) - (sum(1 for b in members if b in exclude) if exclude else 0)
        for b in self._walk(table, h):
            if (exclude and b in exclude) or id(b) in seen:
                continue
            seen.add(id(b))
            if fallback is None:
                fallback = b
            admitted = True
            if b.slow_start > 0:
                ramp = b.ramp(now)
                if ramp < 1.0:
                    if fraction < 0.0:
                        fraction = stable_hash(b"ramp:" + ctx.key) / _TWO64  # type: ignore[operator]
                    admitted = fraction < ramp
            if admitted and (capacity is None or b.active + 1 <= capacity(b)):
                return b
            if len(seen) == limit:
                break  # every backend that may take it was passed over
        return fallback


@implementer(IBalancer)
class RingHash(_HashBalancer):
    """Each backend owns ``vnodes * weight`` points on a 64-bit ring; a key goes
    to the first point clockwise from its hash. Removing a backend hands only
    its own arcs to the neighbours: no other key moves."""

    def __init__(self, rng: random.Random, vnodes: int = DEFAULT_VNODES,
                 balance_factor: float | None = None) -> None:
        super().__init__(rng, balance_factor)
        self.vnodes = vnodes

    def _build(self, members: list[Backend]) -> tuple[list[int], list[Backend]]:
        points: list[tuple[int, bytes, Backend]] = []
        for b in members:
            ident = identity(b)
            for i in range(max(1, round(self.vnodes * b.weight))):
                # The identity breaks (astronomically rare) hash ties the same way everywhere.
                points.append((stable_hash(ident + b"#%d" % i), ident, b))
        points.sort(key=lambda p: (p[0], p[1]))
        return [p[0] for p in points], [p[2] for p in points]

    def _first(self, table: tuple[list[int], list[Backend]], h: int) -> Backend:
        hashes, owners = table
        i = bisect.bisect_left(hashes, h)
        return owners[i if i < len(hashes) else 0]

    def _walk(self, table: tuple[list[int], list[Backend]], h: int) -> Iterator[Backend]:
        hashes, owners = table
        n = len(hashes)
        i = bisect.bisect_left(hashes, h)
        for step in range(n):
            yield owners[(i + step) % n]


@implementer(IBalancer)
class Maglev(_HashBalancer):
    """A lookup table of ``table_size`` (prime) slots filled by each backend's
    own permutation of the slots, in turns proportional to weight (Maglev,
    NSDI 2016; weighting as Envoy does). O(1) lookups and near-perfectly even
    shares; removing a backend moves its keys plus a small extra fraction.
    Keep ``table_size`` at least 100 times the number of backends."""

    def __init__(self, rng: random.Random, table_size: int = DEFAULT_TABLE_SIZE,
                 balance_factor: float | None = None) -> None:
        super().__init__(rng, balance_factor)
        self.table_size = table_size

    def _build(self, members: list[Backend]) -> list[Backend]:
        m = self.table_size
        # Order by identity so the table does not depend on config order.
        order = sorted(members, key=identity)
        n = len(order)
        offsets = []
        skips = []
        for b in order:
            ident = identity(b)
            offsets.append(stable_hash(b"offset:" + ident) % m)
            skips.append(stable_hash(b"skip:" + ident) % (m - 1) + 1)
        top = max(b.weight for b in order)
        shares = [b.weight / top for b in order]
        slot_of = offsets[:]  # the next candidate slot in each backend's permutation
        taken = [0] * n
        table: list[int] = [-1] * m
        filled = 0
        turn = 0
        while filled < m:
            for i in range(n):
                # A backend with half the top weight takes a slot every other turn.
                if shares[i] * turn < taken[i]:
                    continue
                c = slot_of[i]
                skip = skips[i]
                while table[c] >= 0:
                    c += skip
                    if c >= m:
                        c -= m
                table[c] = i
                c += skip
                slot_of[i] = c - m if c >= m else c
                taken[i] += 1
                filled += 1
                if filled == m:
                    break
            turn += 1
        return [order[i] for i in table]

    def _first(self, table: list[Backend], h: int) -> Backend:
        return table[h % len(table)]

    def _walk(self, table: list[Backend], h: int) -> Iterator[Backend]:
        # Neighbouring slots belong to unrelated permutations, so probing
        # forward spreads a passed-over backend's keys over the others.
        m = len(table)
        i = h % m
        for step in range(m):
            yield table[(i + step) % m]


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _balance_factor(algorithm: str, options: dict[str, Any]) -> float | None:
    value = options.get("balance_factor")
    if value is None:
        return None
    return number(algorithm, "balance_factor", value, minimum=MIN_BALANCE_FACTOR, maximum=MAX_BALANCE_FACTOR)


def make_ring_hash(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> RingHash:
    check_known("ring_hash", options, ("vnodes", "balance_factor"))
    vnodes = integer("ring_hash", "vnodes", options.get("vnodes", DEFAULT_VNODES), maximum=MAX_VNODES)
    return RingHash(rng, vnodes, _balance_factor("ring_hash", options))


def make_maglev(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> Maglev:
    check_known("maglev", options, ("table_size", "balance_factor"))
    size = integer("maglev", "table_size", options.get("table_size", DEFAULT_TABLE_SIZE),
                   minimum=3, maximum=MAX_TABLE_SIZE)
    if not _is_prime(size):
        raise ValueError(f"maglev: table_size must be a prime number (e.g. 65537), not {size}")
    return Maglev(rng, size, _balance_factor("maglev", options))
