# -*- test-case-name: tests.test_resilience_breaker -*-
"""Per-backend circuit breakers, sans-IO.

closed --N consecutive failures--> open --open_for elapses--> half-open
half-open --``half_open_requests`` trial successes--> closed
half-open --any trial failure--> open (for another ``open_for``)

An open breaker takes its backend out of picking, giving it room to recover
instead of piling on. Results of work started before the last transition are
ignored (they describe the backend as it was), so a slow request from before
the cooldown cannot re-open a breaker that trials are about to close.

A backend's ``Retry-After`` on 503 is honoured here too, as a *hold*: the
backend is skipped until then without changing the breaker's state.
"""
from __future__ import annotations

import enum
from typing import Callable, Iterable

import attrs
from twisted.logger import Logger

from lbtwist.config.model import CircuitBreakerConfig

log = Logger(namespace="lbtwist.resilience.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


_CLOSED = BreakerState.CLOSED

#: ``listener(backend, old_state, new_state, reason)`` on every transition.
TransitionListener = Callable[[object, BreakerState, BreakerState, str], None]


#: The config model's defaults are the only ones (``pools[].circuit_breaker``).
_DEFAULTS = CircuitBreakerConfig()


@attrs.frozen
class BreakerSettings:
    #: Consecutive failures that open the breaker; 0 disables it.
    consecutive_failures: int = _DEFAULTS.consecutive_failures
    #: Seconds an opened breaker keeps its backend out before trials.
    open_for: float = _DEFAULTS.open_for
    #: Trial requests let through when half-open; all must succeed to close.
    half_open_requests: int = _DEFAULTS.half_open_requests
    #: Statuses that count as failures (gateway errors always do).
    failure_statuses: frozenset[int] = frozenset(_DEFAULTS.failure_statuses)
    #: Longest ``Retry-After`` honoured, in seconds; 0 ignores Retry-After.
    max_retry_after: float = _DEFAULTS.max_retry_after

    def __attrs_post_init__(self) -> None:
        if self.consecutive_failures < 0:
            raise ValueError("circuit_breaker: consecutive_failures must be >= 0 (0 disables)")
        if self.open_for <= 0:
            raise ValueError("circuit_breaker: open_for must be > 0")
        if self.half_open_requests < 1:
            raise ValueError("circuit_breaker: half_open_requests must be >= 1")
        if self.max_retry_after < 0:
            raise ValueError("circuit_breaker: max_retry_after must be >= 0")

    @classmethod
    def from_config(cls, cfg) -> "BreakerSettings":
        return cls(
            consecutive_failures=cfg.consecutive_failures,
            open_for=cfg.open_for,
            half_open_requests=cfg.half_open_requests,
            failure_statuses=frozenset(int(s) for s in cfg.failure_statuses),
            max_retry_after=cfg.max_retry_after,
        )

    def is_failure(self, outcome: str, status: int | None) -> bool | None:
        """True/False for a failure/success, None when the outcome says nothing
        about the backend (the client cancelled). ``outcome`` as in
        L{lbtwist.pool.OUTCOMES}."""
        if outcome == "cancelled":
            return None
        if outcome == "gateway":
            return True
        if status is not None:
            return status in self.failure_statuses
        return outcome == "5xx"


class CircuitBreaker:
    """The breaker of one backend."""

    __slots__ = (
        "settings", "state", "failures", "opened_at", "generation",
        "trials_started", "trial_successes", "held_until", "opened_total", "tripped",
    )

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        #: Bumped on every transition; work started earlier is not evidence.
        self.generation = 0
        self.trials_started = 0
        self.trial_successes = 0
        #: Retry-After hold (pool clock seconds); skipped until then.
        self.held_until = float("-inf")
        self.opened_total = 0
        #: The last open came from elsewhere (L{BreakerSet.trip}), not this one's own traffic.
        self.tripped = False

    def _advance(self, now: float) -> tuple[BreakerState, BreakerState, str] | None:
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.settings.open_for:
            return self._go(BreakerState.HALF_OPEN, "cooldown over, trying")
        return None

    def _go(self, new: BreakerState, reason: str) -> tuple[BreakerState, BreakerState, str]:
        old, self.state = self.state, new
        self.generation += 1
        self.failures = 0
        self.trials_started = 0
        self.trial_successes = 0
        return (old, new, reason)

    def allows(self, now: float) -> bool:
        """May new work be sent to this backend now? A pure read, apart from
        noticing that the cooldown is over (open -> half-open)."""
        if now < self.held_until:
            return False
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            if now < self.opened_at + self.settings.open_for:
                return False
            self._advance(now)
        return self.trials_started < self.settings.half_open_requests

    def on_start(self, now: float) -> int:
        """Work was sent; returns the generation to hand back to L{on_finish}."""
        self._advance(now)
        if self.state is BreakerState.HALF_OPEN:
            self.trials_started += 1
        return self.generation

    def on_finish(
        self, now: float, failed: bool | None, generation: int
    ) -> tuple[BreakerState, BreakerState, str] | None:
        """Work started in ``generation`` ended; ``failed`` None means cancelled.
        Returns the transition it caused, if any."""
        if generation != self.generation:
            return None
        state = self.state
        if state is BreakerState.CLOSED:
            if failed is None:
                return None
            if not failed:
                self.failures = 0
                return None
            self.failures += 1
            n = self.settings.consecutive_failures
            if n and self.failures >= n:
                return self._open(now, f"{self.failures} consecutive failures")
            return None
        if state is BreakerState.HALF_OPEN:
            if failed is None:
                self.trials_started = max(0, self.trials_started - 1)
                return None
            if failed:
                return self._open(now, "trial request failed")
            self.trial_successes += 1
            if self.trial_successes >= self.settings.half_open_requests:
                return self._go(BreakerState.CLOSED, f"{self.trial_successes} trial requests succeeded")
        return None

    def _open(self, now: float, reason: str) -> tuple[BreakerState, BreakerState, str]:
        self.opened_at = now
        self.opened_total += 1
        self.tripped = False
        return self._go(BreakerState.OPEN, reason)

    def hold(self, until: float) -> None:
        if until > self.held_until:
            self.held_until = until


class BreakerSet:
    """The breakers of one pool's backends, created on first use.

    The data plane calls, per attempt: L{allows} (or L{blocked}) at pick time,
    L{on_start} when the attempt is sent, L{on_finish} when it ends.
    """

    def __init__(self, settings: BreakerSettings = BreakerSettings(), name: str = "") -> None:
        self.settings = settings
        self.name = name
        self._breakers: dict[object, CircuitBreaker] = {}
        #: Backends whose breaker is not plainly closed-and-unheld: the only
        #: ones L{blocked} has to look at. Empty means L{blocked} is empty, which
        #: the data plane checks before calling it per request.
        self.watching: set[object] = set()
        self._listeners: list[TransitionListener] = []
        #: Times a breaker opened, pool-wide (a counter for metrics).
        self.opened_total = 0
        #: Retry-After holds applied.
        self.holds_total = 0

    @property
    def enabled(self) -> bool:
        return self.settings.consecutive_failures > 0

    def breaker(self, backend: object) -> CircuitBreaker:
        b = self._breakers.get(backend)
        if b is None:
            b = self._breakers[backend] = CircuitBreaker(self.settings)
        return b

    def state(self, backend: object, now: float) -> BreakerState:
        b = self._breakers.get(backend)
        if b is None:
            return BreakerState.CLOSED
        b.allows(now)  # notice an elapsed cooldown
        return b.state

    def subscribe(self, listener: TransitionListener) -> None:
        self._listeners.append(listener)

    def _transition(self, backend: object, t: tuple[BreakerState, BreakerState, str] | None) -> None:
        if t is None:
            return
        old, new, reason = t
        if new is BreakerState.OPEN:
            self.opened_total += 1
            self.watching.add(backend)
            log.warn(
                "pool {pool} backend {backend}: circuit breaker opened ({reason})",
                pool=self.name, backend=getattr(backend, "address", backend), reason=reason,
            )
        elif new is BreakerState.CLOSED:
            log.info(
                "pool {pool} backend {backend}: circuit breaker closed ({reason})",
                pool=self.name, backend=getattr(backend, "address", backend), reason=reason,
            )
        for listener in list(self._listeners):
            listener(backend, old, new, reason)

    # -- pick time -------------------------------------------------------------

    def allows(self, backend: object, now: float) -> bool:
        """May new work go to ``backend``? Use as a filter before or after picking."""
        b = self._breakers.get(backend)
        if b is None:
            return True
        before = b.state
        ok = b.allows(now)
        if b.state is not before:
            self._transition(backend, (before, b.state, "cooldown over, trying"))
        return ok

    def blocked(self, now: float) -> frozenset:
        """Backends new work must not go to now (open, half-open with its trials
        taken, or held by Retry-After): add them to L{lbtwist.pool.PickContext.exclude}."""
        if not self.watching:
            return frozenset()
        out = []
        for backend in list(self.watching):
            b = self._breakers[backend]
            if not self.allows(backend, now):
                out.append(backend)
            elif b.state is BreakerState.CLOSED and now >= b.held_until:
                self.watching.discard(backend)
        return frozenset(out)

    # -- attempt lifecycle ------------------------------------------------------

    def on_start(self, backend: object, now: float) -> int:
        """An attempt was sent to ``backend``; keep the returned generation."""
        b = self._breakers.get(backend)
        if b is None:
            b = self._breakers[backend] = CircuitBreaker(self.settings)
        if b.state is _CLOSED:  # the common case: nothing to advance or count
            return b.generation
        before = b.state
        gen = b.on_start(now)
        if b.state is not before:
            self._transition(backend, (before, b.state, "cooldown over, trying"))
        return gen

    def on_finish(
        self, backend: object, now: float, outcome: str, status: int | None = None,
        generation: int | None = None,
    ) -> None:
        """The attempt ended. ``outcome`` as in L{lbtwist.pool.OUTCOMES};
        ``generation`` from L{on_start} (None: assume the current one)."""
        b = self._breakers.get(backend)
        if b is None:
            b = self._breakers[backend] = CircuitBreaker(self.settings)
        if outcome == "ok" and b.state is _CLOSED and (generation is None or generation == b.generation):
            b.failures = 0  # the common case, kept cheap
            return
        failed = self.settings.is_failure(outcome, status)
        gen = b.generation if generation is None else generation
        t = b.on_finish(now, failed, gen)
        if t is not None and t[1] is not BreakerState.CLOSED:
            self.watching.add(backend)
        self._transition(backend, t)

    def hold(self, backend: object, now: float, seconds: float) -> float:
        """Honour a backend's ``Retry-After``: skip it for ``seconds``, capped
        at ``max_retry_after``. Returns the hold applied (0 when ignored)."""
        seconds = min(seconds, self.settings.max_retry_after)
        if seconds <= 0:
            return 0.0
        self.breaker(backend).hold(now + seconds)
        self.watching.add(backend)
        self.holds_total += 1
        return seconds

    # -- fleet (lbtwist.workers.fleetview) ---------------------------------------

    def last_opened(self, backend: object) -> tuple[float, bool] | None:
        """(when the breaker of ``backend`` last opened, whether that open came
        from L{trip} rather than its own traffic), or None if it never opened."""
        b = self._breakers.get(backend)
        if b is None or b.opened_total == 0:
            return None
        return b.opened_at, b.tripped

    def trip(self, backend: object, opened_at: float, now: float, reason: str) -> bool:
        """Open the breaker of ``backend`` as of ``opened_at`` because another
        process saw the failures (the master's fleet view, or a worker's report
        to the master). Nothing happens when this breaker already opened at
        about that time or later (within min(1 s, open_for / 2): the same
        open, travelled back), or when that open is already over at ``now``.
        Not counted in L{opened_total} (the process that saw it counts it).
        True if it opened."""
        s = self.settings
        if opened_at + s.open_for <= now:
            return False
        b = self.breaker(backend)
        if b.opened_total and b.opened_at >= opened_at - min(1.0, s.open_for / 2):
            return False
        t = b._open(opened_at, reason)
        b.tripped = True
        self.watching.add(backend)
        log.warn(
            "pool {pool} backend {backend}: circuit breaker opened ({reason})",
            pool=self.name, backend=getattr(backend, "address", backend), reason=reason,
        )
        for listener in list(self._listeners):
            listener(backend, t[0], t[1], reason)
        return True

    def forget(self, backends: Iterable[object]) -> None:
        """Drop the state of removed backends."""
        for backend in backends:
            self._breakers.pop(backend, None)
            self.watching.discard(backend)
