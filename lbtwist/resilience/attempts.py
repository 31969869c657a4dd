# -*- test-case-name: tests.test_resilience_attempts -*-
"""The attempt planner: one L{RequestRetryState} per client request (L7) or
client connection (L4), which the data plane drives as a thin loop::

    state = route.start_request(pool_res, clock, rng, method=m, headers=h)  # counts the request
    refused = state.admit()                                   # max_requests
    if refused: reply 503 + overflow_headers(refused); state.finish(); return
    while True:
        now = clock.seconds()
        backend = pool.select(PickContext(now, exclude=state.pick_exclude(now), ...))
        if backend is None: fail with the last error (or 503); break
        state.on_attempt_start(backend); pool.on_start(backend)
        ... send (replaying the ReplayBuffer), timeout state.try_timeout() ...
        state.on_attempt_finish(backend, outcome, status, retry_after)   # before may_retry
        pool.on_finish(backend, latency, ok, outcome)
        if success: forward; break
        d = state.may_retry(failure, status, response_started, body_replayable)
        if not d.retry: fail with this error (or forward the withheld response); break
        wait d.delay (clock.callLater), then loop
    state.finish()                                            # always, exactly once or more

It decides; it never does I/O and never schedules anything itself.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Iterable, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from lbtwist.resilience.breaker import BreakerSet, BreakerState
from lbtwist.resilience.budget import RetryBudget
from lbtwist.resilience.limits import Limit, PoolLimits, Slot
from lbtwist.resilience.retry import (
    IDEMPOTENT_METHODS,
    IDEMPOTENT_METHODS_BYTES,
    Failure,
    RetryPolicy,
    parse_retry_after,
)


@attrs.frozen
class RetryDecision:
    retry: bool
    #: Seconds to wait before the next try (0 when not retrying).
    delay: float = 0.0
    #: Why: "retry" or the rule that said no (see REASONS).
    reason: str = "retry"


#: Every reason L{RequestRetryState.may_retry} can give, for metrics labels.
REASONS = (
    "retry",
    "response-started",
    "not-retryable",
    "non-idempotent",
    "body-not-replayable",
    "attempts-exhausted",
    "deadline",
    "retry-limit",
    "budget-exhausted",
)


#: Methods that are idempotent under any policy (RFC 9110 9.2.2), as str or as
#: the parsers hand them over (bytes): one set lookup instead of a decode per request.
_IDEMPOTENT = IDEMPOTENT_METHODS | IDEMPOTENT_METHODS_BYTES
_REQUESTS = Limit.REQUESTS
_CLOSED = BreakerState.CLOSED
#: Shared jitter source for states built without one (never seeded: not a test path).
_RNG = random.Random()


class RetryStats:
    """Counters of retry decisions, by reason; one per route (for metrics)."""

    __slots__ = ("decisions",)

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()

    def count(self, reason: str) -> None:
        self.decisions[reason] += 1


class RequestRetryState:
    """Decides, for one request, whether and when to try again, and where not to.

    Creating it records the request against the retry ``budgets`` (route, and
    pool-wide if any): that is what earns retry credit. Tries are sequential
    (one in flight at a time), which is what the data plane does.

    One of these is built per request, so its per-request path is kept to a
    handful of calls: attributes default at class level, the ``max_requests``
    unit is a counter (not a L{Slot} object), and the set of backends tried
    is built only when a retry asks for it.
    """

    stats: RetryStats | None = None
    budgets: tuple[RetryBudget, ...] = ()
    breakers: BreakerSet | None = None
    limits: PoolLimits | None = None
    #: The limit that refused the request when admitted at creation (see
    #: L{lbtwist.resilience.build.RouteResilience.start_request}).
    refused: Limit | None = None
    deadline: float | None = None
    method: str | bytes | None = None
    eligible = True
    #: Tries started so far.
    attempts = 0
    #: Retries granted so far.
    retries = 0
    #: Backends tried, in order (a list once the first try started).
    tried: "list[object] | tuple" = ()
    #: Breaker generation of the try in flight (see L{BreakerSet.on_start}).
    _gen: int | None = None
    #: This request holds one unit of the pool's ``max_requests``.
    _holds_request = False
    _retry_slot: Slot | None = None
    #: The retry slot belongs to a try that has started (so that try's end frees it).
    _retry_slot_bound = False
    finished = False

    def __init__(
        self,
        policy: RetryPolicy,
        budgets: Sequence[RetryBudget] | RetryBudget = (),
        breakers: BreakerSet | None = None,
        limits: PoolLimits | None = None,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
        *,
        method: str | bytes | None = None,
        headers: Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]] = (),
        timeout: float | None = None,
        stats: RetryStats | None = None,
        now: float | None = None,
    ) -> None:
        if clock is None:
            raise TypeError("RequestRetryState needs a clock (IReactorTime)")
        self.policy = policy
        if type(budgets) is tuple:
            self.budgets = budgets
        elif isinstance(budgets, RetryBudget):
            self.budgets = (budgets,)
        else:
            self.budgets = tuple(budgets)
        if breakers is not None:
            self.breakers = breakers
        if limits is not None:
            self.limits = limits
        self.clock = clock
        self.rng = rng or _RNG
        if stats is not None:
            self.stats = stats
        if method is not None:
            self.method = method
            if method not in _IDEMPOTENT:
                self.eligible = policy.eligible(method) or policy.has_key(headers)
        if now is None:
            now = clock.seconds()
        self.started = now
        if timeout is not None:
            #: Absolute time the whole request must be answered by (route timeout).
            self.deadline = now + timeout
        for budget in self.budgets:
            budget.record_request(now)

    # -- admission ---------------------------------------------------------------

    def admit(self) -> Limit | None:
        """Take a ``max_requests`` unit for the whole request. Returns the limit
        that refused (answer 503 naming it), or None when admitted."""
        limits = self.limits
        if limits is None or self._holds_request:
            return None
        in_use = limits._in_use  # PoolLimits.try_acquire() without a Slot: once per request
        if in_use[_REQUESTS] >= limits._max[_REQUESTS]:
            limits.refused[_REQUESTS] += 1
            return _REQUESTS
        in_use[_REQUESTS] += 1
        self._holds_request = True
        return None

    # -- picking -----------------------------------------------------------------

    @property
    def exclude(self) -> frozenset:
        """Backends already tried: a retry goes elsewhere."""
        return frozenset(self.tried)

    def pick_exclude(self, now: float | None = None) -> "frozenset | list | tuple":
        """What to put in L{lbtwist.pool.PickContext.exclude}: backends tried,
        plus those whose breaker is open (or held by Retry-After)."""
        breakers = self.breakers
        if breakers is None or not breakers.watching:
            return self.tried
        blocked = breakers.blocked(self.clock.seconds() if now is None else now)
        return blocked.union(self.tried) if blocked else self.tried

    def try_timeout(self, now: float | None = None) -> float | None:
        """Timeout for the next try: the per-try timeout cut to what is left of
        the route timeout. None when neither applies; <= 0 when the deadline passed."""
        per_try = self.policy.per_try_timeout
        if self.deadline is None:
            return per_try
        left = self.deadline - (self.clock.seconds() if now is None else now)
        return left if per_try is None else min(per_try, left)

    # -- attempt lifecycle --------------------------------------------------------

    def on_attempt_start(self, backend: object, now: float | None = None) -> None:
        """A try is being sent to ``backend``."""
        self.attempts += 1
        if self._retry_slot is not None:
            self._retry_slot_bound = True
        tried = self.tried
        if not tried:
            self.tried = [backend]
        elif backend not in tried:
            tried.append(backend)  # type: ignore[union-attr]
        breakers = self.breakers
        if breakers is not None:
            b = breakers._breakers.get(backend)
            if b is not None and b.state is _CLOSED:  # BreakerSet.on_start's common case, inlined
                self._gen = b.generation
            else:
                self._gen = breakers.on_start(backend, self.clock.seconds() if now is None else now)

    def on_attempt_finish(
        self, backend: object, outcome: str, status: int | None = None,
        retry_after: str | bytes | None = None, now: float | None = None,
    ) -> None:
        """The try on ``backend`` ended. ``outcome`` as in L{lbtwist.pool.OUTCOMES}
        ("ok", "5xx", "gateway", "cancelled"); ``retry_after`` is the raw
        ``Retry-After`` header of a 503, which holds the backend out that long."""
        breakers = self.breakers
        if breakers is not None:
            gen, self._gen = self._gen, None
            b = breakers._breakers.get(backend)
            if outcome == "ok" and b is not None and b.state is _CLOSED and gen == b.generation:
                b.failures = 0  # BreakerSet.on_finish's common case, inlined
            else:
                if now is None:
                    now = self.clock.seconds()
                breakers.on_finish(backend, now, outcome, status, gen)
            if status == 503 and retry_after is not None:
                seconds = parse_retry_after(retry_after, now)
                if seconds:
                    breakers.hold(backend, now, seconds)
        if self._retry_slot is not None and self._retry_slot_bound:
            self._retry_slot.release()
            self._retry_slot = None
            self._retry_slot_bound = False

    # -- the decision -----------------------------------------------------------------

    def _no(self, reason: str) -> RetryDecision:
        if self.stats is not None:
            self.stats.count(reason)
        return RetryDecision(False, 0.0, reason)

    def may_retry(
        self,
        failure: Failure | str,
        status: int | None = None,
        response_started: bool = False,
        body_replayable: bool = True,
    ) -> RetryDecision:
        """May the request be tried again after this failure? A yes spends
        retry budget and takes a ``max_retries`` slot until the retry ends,
        so ask only when you will act on the answer.

        ``response_started``: some response byte already reached the client.
        ``body_replayable``: every request body byte sent so far is still held
        (L{lbtwist.resilience.retry.ReplayBuffer.replayable})."""
        failure = Failure(failure)
        policy = self.policy
        if self._retry_slot is not None and not self._retry_slot_bound:
            # a retry granted earlier was never started: give its slot back
            self._retry_slot.release()
            self._retry_slot = None
        if response_started:
            return self._no("response-started")
        if not policy.retryable(failure, status):
            return self._no("not-retryable")
        if not self.eligible and not (
            failure is Failure.CONNECT_FAILURE and policy.connect_failure_any_method
        ):
            return self._no("non-idempotent")
        if not body_replayable:
            return self._no("body-not-replayable")
        if self.attempts >= policy.max_attempts:
            return self._no("attempts-exhausted")
        now = self.clock.seconds()
        delay = policy.backoff.delay(self.retries + 1, self.rng)
        if self.deadline is not None and now + delay >= self.deadline:
            return self._no("deadline")
        limits = self.limits
        if limits is not None and not limits.available(Limit.RETRIES):
            limits.refused[Limit.RETRIES] += 1
            return self._no("retry-limit")
        for budget in self.budgets:
            if not budget.can_retry(now):
                budget.exhausted += 1
                return self._no("budget-exhausted")
        for budget in self.budgets:
            budget.record_retry(now)
        if limits is not None:
            if self._retry_slot is not None:
                self._retry_slot.release()
            self._retry_slot = limits.try_acquire(Limit.RETRIES)
            self._retry_slot_bound = False
        self.retries += 1
        if self.stats is not None:
            self.stats.count("retry")
        return RetryDecision(True, delay, "retry")

    def finish(self) -> None:
        """The request is over, however it ended: release its slots. Idempotent."""
        if self.finished:
            return
        self.finished = True
        if self._retry_slot is not None:
            self._retry_slot.release()
            self._retry_slot = None
        if self._holds_request:
            self._holds_request = False
            self.limits._in_use[_REQUESTS] -= 1  # type: ignore[union-attr]  # what Slot.release() does
