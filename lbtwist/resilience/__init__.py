"""Resilience, sans-IO: retries that can never multiply load beyond a known
bound (policy, budget, jittered backoff), per-backend circuit breakers,
per-pool limits and per-route rate limits. Plain objects fed events and
times; the L4/L7 data planes are thin adapters around them.

Modules: L{retry} (policy, backoff, replay buffer), L{budget}, L{breaker},
L{limits}, L{ratelimit}, L{attempts} (the per-request planner the data plane
drives) and L{build} (objects made once from config).
"""
from lbtwist.resilience.attempts import REASONS, RequestRetryState, RetryDecision, RetryStats
from lbtwist.resilience.breaker import BreakerSet, BreakerSettings, BreakerState, CircuitBreaker
from lbtwist.resilience.budget import RetryBudget
from lbtwist.resilience.build import PoolResilience, RouteResilience
from lbtwist.resilience.limits import LIMIT_HEADER, Limit, LimitSettings, PoolLimits, Slot, overflow_headers
from lbtwist.resilience.ratelimit import RateDecision, RateLimiter
from lbtwist.resilience.retry import (
    IDEMPOTENT_METHODS,
    Backoff,
    Failure,
    ReplayBuffer,
    RetryPolicy,
    parse_retry_after,
)

__all__ = [
    "Backoff", "BreakerSet", "BreakerSettings", "BreakerState", "CircuitBreaker", "Failure",
    "IDEMPOTENT_METHODS", "LIMIT_HEADER", "Limit", "LimitSettings", "PoolLimits", "PoolResilience",
    "REASONS", "RateDecision", "RateLimiter", "ReplayBuffer", "RequestRetryState", "RetryBudget",
    "RetryDecision", "RetryPolicy", "RetryStats", "RouteResilience", "Slot", "overflow_headers",
    "parse_retry_after",
]
