"""Which backend an L4 connection tries next, sans-IO.

A refused or timed-out connect is retried on another backend before the client
sees anything, but only a bounded number of times and never twice on the same
backend: a pool that is down must cost a client a few connect attempts, not an
unbounded loop, and one bad backend must not absorb every attempt.
"""
from __future__ import annotations

import attrs

from lbtwist.interfaces import IPoolState
from lbtwist.pool import Backend, PickContext


@attrs.define
class ConnectAttempts:
    """The attempts of one client connection. Feed it times; it answers with
    the next backend to try, or None when the budget or the pool is exhausted."""

    pool: IPoolState
    max_attempts: int
    #: Hash key for hashing algorithms (the client address at L4).
    key: bytes | None = None
    client: str | None = None
    tried: list[Backend] = attrs.Factory(list)

    def next(self, now: float) -> Backend | None:
        if len(self.tried) >= self.max_attempts:
            return None
        backend = self.pool.select(
            PickContext(now=now, key=self.key, exclude=self.tried, client=self.client)
        )
        if backend is None or backend in self.tried:
            return None
        self.tried.append(backend)
        return backend

    @property
    def count(self) -> int:
        return len(self.tried)
