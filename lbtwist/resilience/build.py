# -*- test-case-name: tests.test_resilience_attempts -*-
"""Resilience objects built once from config: one L{PoolResilience} per pool,
one L{RouteResilience} per route (and per listener's default route). The data
plane holds these and calls them directly; nothing here is looked up per request."""
from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from lbtwist.resilience.attempts import RequestRetryState, RetryStats
from lbtwist.resilience.breaker import BreakerSet, BreakerSettings
from lbtwist.resilience.budget import RetryBudget
from lbtwist.resilience.limits import LimitSettings, PoolLimits
from lbtwist.resilience.ratelimit import RateLimiter
from lbtwist.resilience.retry import RetryPolicy


@attrs.define(eq=False)
class PoolResilience:
    """A pool's breakers, limits and optional pool-wide retry budget."""

    breakers: BreakerSet
    limits: PoolLimits
    budget: RetryBudget | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "PoolResilience":
        """From a L{lbtwist.config.model.PoolConfig}."""
        rb = cfg.retry_budget
        return cls(
            breakers=BreakerSet(BreakerSettings.from_config(cfg.circuit_breaker), name=cfg.name),
            limits=PoolLimits(LimitSettings.from_config(cfg.limits), name=cfg.name),
            budget=None if rb is None else RetryBudget(
                rb.budget_percent, rb.min_retries_per_second, rb.window, name=f"pool:{cfg.name}"
            ),
        )


def settings_of(route: Any | None, default_timeout: float | None) -> tuple:
    """The settings a route's resilience depends on: the whole route block
    (a route whose match or pool changed is another route) and the
    listener's default timeout."""
    return (route, default_timeout)


@attrs.define(eq=False)
class RouteResilience:
    """A route's retry policy, its own retry budget, rate limiter and counters."""

    policy: RetryPolicy
    budget: RetryBudget
    #: A L{RateLimiter}, or a L{lbtwist.fleet.ratelimit.FleetRateLimiter} (scope: fleet).
    rate_limiter: Any = None
    #: Whole-request timeout in seconds (route's, else the listener's default).
    timeout: float | None = None
    stats: RetryStats = attrs.Factory(RetryStats)
    name: str = ""
    #: What it was built from (L{settings_of}): a reload keeps this object,
    #: with its budget history and rate-limit buckets, while they are equal.
    settings: Any = None

    @classmethod
    def from_config(
        cls, route: Any | None, default_timeout: float | None = None, name: str = "",
        *, fleet: Any = None, listener: str = "",
    ) -> "RouteResilience":
        """From a L{lbtwist.config.model.RouteConfig}; None builds the defaults
        (for a listener's default pool, which has no route block). ``fleet``
        (L{lbtwist.fleet.service.FleetService}): what a ``scope: fleet`` rate
        limit keeps its buckets in (without it the limit is local)."""
        if route is None:
            from lbtwist.config.model import RetryConfig

            retry, rate_limit, timeout = RetryConfig(), None, None
        else:
            retry, rate_limit, timeout = route.retry, route.rate_limit, route.timeout
        limiter: Any = None if rate_limit is None else RateLimiter.from_config(rate_limit, name=name)
        if limiter is not None and rate_limit.scope == "fleet" and fleet is not None:
            limiter = fleet.rate_limiter(limiter, listener, name, rate_limit)
        return cls(
            settings=settings_of(route, default_timeout),
            policy=RetryPolicy.from_config(retry),
            budget=RetryBudget(
                retry.budget_percent, retry.min_retries_per_second, retry.budget_window,
                name=f"route:{name}",
            ),
            rate_limiter=limiter,
            timeout=default_timeout if timeout is None else timeout,
            name=name,
        )

    def start_request(
        self,
        pool: PoolResilience | None,
        clock: IReactorTime,
        rng: random.Random,
        *,
        method: str | bytes | None,
        headers: Any = (),
        now: float | None = None,
        admit: bool = False,
    ) -> RequestRetryState:
        """The planner for one request; counts it against the route budget and
        the pool-wide budget. ``headers``: (lower-case name, value) pairs.
        ``admit``: also take the ``max_requests`` unit now; the state's
        ``refused`` is then the limit that said no (None when admitted)."""
        budgets = (self.budget,) if pool is None or pool.budget is None else (self.budget, pool.budget)
        st = RequestRetryState(
            self.policy, budgets, None if pool is None else pool.breakers, None if pool is None else pool.limits,
            clock, rng, method=method, headers=headers, timeout=self.timeout, stats=self.stats, now=now,
        )
        if admit:
            st.refused = st.admit()
        return st
