"""Which backend an L4 connection tries next, sans-IO.

A refused or timed-out connect is retried on another backend before the client
sees anything, but only a bounded number of times and never twice on the same
backend: a pool that is down must cost a client a few connect attempts, not an
unbounded loop, and one bad backend must not absorb every attempt.
"""
from __future__ import annotations

import functools
from typing import Any

import attrs

from lbtwist.interfaces import IPoolState
from lbtwist.pool import Backend, PickContext
from lbtwist.resilience.attempts import RequestRetryState
from lbtwist.resilience.budget import RetryBudget
from lbtwist.resilience.retry import Failure, RetryPolicy
from lbtwist.resilience.wiring import runtime_resilience


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
    #: lbtwist.resilience RequestRetryState (connect-only policy): the retry
    #: budget, breakers and Retry-After holds; None keeps only max_attempts.
    retry: Any = None

    def next(self, now: float) -> Backend | None:
        if len(self.tried) >= self.max_attempts:
            return None
        st = self.retry
        exclude = self.tried if st is None else st.pick_exclude(now)
        backend = self.pool.select(PickContext(now=now, key=self.key, exclude=exclude, client=self.client))
        if backend is None and st is not None and not self.tried and exclude:
            # every backend is held out by a breaker: like panic mode, try one anyway
            backend = self.pool.select(PickContext(now=now, key=self.key, exclude=(), client=self.client))
        if backend is None or backend in self.tried:
            return None
        if st is not None:
            if self.tried and not st.may_retry(Failure.CONNECT_FAILURE).retry:
                return None  # the budget (or the breaker's view) says no more tries
            st.on_attempt_start(backend)
        self.tried.append(backend)
        return backend

    def failed(self, backend: Backend) -> None:
        """The connect to ``backend`` failed (refused, timed out)."""
        if self.retry is not None:
            self.retry.on_attempt_finish(backend, "gateway")

    def connected(self, backend: Backend) -> None:
        if self.retry is not None:
            self.retry.on_attempt_finish(backend, "ok")

    def finish(self) -> None:
        """The client connection is over (idempotent)."""
        if self.retry is not None:
            self.retry.finish()

    @property
    def count(self) -> int:
        return len(self.tried)


@functools.lru_cache(maxsize=16)
def _connect_policy(attempts: int) -> RetryPolicy:
    return RetryPolicy.connect_only(max(1, attempts))


def connect_retry(factory: Any, pcfg: Any) -> RequestRetryState | None:
    """The resilience planner for one L4 client connection: connect retries
    spend the pool's retry budget (else one budget per listener) and skip
    backends whose breaker is open. None when the runtime has no pool configs."""
    runtime = factory.runtime
    if getattr(runtime, "pool_configs", None) is None:
        return None
    pres = runtime_resilience(runtime).pool(pcfg.name)
    budget = pres.budget if pres is not None and pres.budget is not None else None
    if budget is None:
        budget = factory.__dict__.get("_retry_budget")
        if budget is None:
            budget = factory._retry_budget = RetryBudget(name=f"listener:{getattr(factory.cfg, 'name', '')}")
    return RequestRetryState(
        _connect_policy(pcfg.connect_attempts), budget, None if pres is None else pres.breakers, None,
        factory.reactor, method=None,
    )
