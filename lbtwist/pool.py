"""Pools and backends: the balancer's beliefs about its servers, sans-IO.

Every change of state goes through a L{Pool} method, which logs it once with a
reason, bumps the pool's version (so the candidate tuple handed to balancers is
rebuilt only when something changed) and tells subscribers (metrics, admin).
"""
from __future__ import annotations

import enum
import random
from typing import Callable, Iterable, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from lbtwist.interfaces import IBalancer, IPoolState

log = Logger(namespace="lbtwist.pool")


class Health(enum.Enum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


def join_address(host: str, port: int | None) -> str:
    """(host, port) -> ``"127.0.0.1:9001"`` / ``"[::1]:9001"`` (the inverse of
    L{split_address}); ``host`` alone when ``port`` is None."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9001"`` / ``"[::1]:9001"`` -> (host, port). Raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"backend address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f"backend address {address!r}: port out of range")
    return host, p


@attrs.define(eq=False)
class Backend:
    """One server of a pool. Identity is the object; ``address`` names it."""

    address: str
    weight: float = 1.0
    name: str | None = None
    host: str = attrs.field(init=False)
    port: int = attrs.field(init=False)
    health: Health = Health.HEALTHY
    enabled: bool = True
    draining: bool = False
    #: Until when (pool clock) passive detection keeps it out; None when not ejected.
    ejected_until: float | None = None
    #: When the backend (re)joined; slow start ramps from here.
    joined_at: float = float("-inf")
    #: Outstanding work (connections for L4, requests for L7).
    active: int = 0
    #: Work ever started on it.
    total: int = 0
    #: Seconds over which the weight ramps after joining (set from the pool's slow_start).
    slow_start: float = 0.0
    #: Why the last state change happened, and when (pool clock): for the admin API.
    reason: str = ""
    changed_at: float | None = None

    def __attrs_post_init__(self) -> None:
        self.host, self.port = split_address(self.address)

    def usable(self, now: float) -> bool:
        """May new work go here, health permitting?"""
        return (
            self.enabled
            and not self.draining
            and (self.ejected_until is None or self.ejected_until <= now)
        )

    def ramp(self, now: float) -> float:
        """Slow-start factor: 0.1 -> 1.0 over ``slow_start`` seconds since joining."""
        if self.slow_start <= 0:
            return 1.0
        age = now - self.joined_at
        if age >= self.slow_start:
            return 1.0
        return max(0.1, age / self.slow_start)

    def effective_weight(self, now: float) -> float:
        """The weight algorithms should use: configured weight times the slow-start ramp."""
        return self.weight * self.ramp(now)

    def state(self, now: float) -> str:
        """One word for the admin API and metrics, most restrictive first:
        disabled, draining, ejected, unknown, unhealthy, slow_start, healthy."""
        if not self.enabled:
            return "disabled"
        if self.draining:
            return "draining"
        if self.ejected_until is not None and self.ejected_until > now:
            return "ejected"
        if self.health is not Health.HEALTHY:
            return self.health.value
        if self.ramp(now) < 1.0:
            return "slow_start"
        return "healthy"

    def __repr__(self) -> str:
        return f"<Backend {self.address} {self.health.value}>"


@attrs.define
class PickContext:
    """What a balancer may know about the work it places."""

    now: float
    #: Hash key (source address, header or cookie value) for hashing algorithms.
    key: bytes | None = None
    #: Backends already tried for this work (retries and failover avoid them).
    exclude: Sequence[Backend] | frozenset = ()
    client: str | None = None


StateListener = Callable[["Pool", Backend, str, str], None]
#: ``observer(backend, now, latency, outcome)``; outcome is one of OUTCOMES.
OutcomeObserver = Callable[[Backend, float, float, str], None]

#: How a unit of work ended, as the data plane reports it to L{Pool.on_finish}.
#: "ok": success (any status < 500 for L7); "5xx": the backend answered 5xx;
#: "gateway": connect failure, reset, timeout or a garbage/unverifiable answer;
#: "cancelled": the client went away first (says nothing about the backend).
OUTCOMES = ("ok", "5xx", "gateway", "cancelled")

#: Seconds a worker's reported latency estimate stays valid (L{Pool.remote_estimate}).
REMOTE_ESTIMATE_TTL = 2.0

#: The largest backend weight, in the config and through the admin API alike.
MAX_WEIGHT = 1_000_000.0


@implementer(IPoolState)
class Pool:
    """A named set of backends plus the algorithm that chooses among them."""

    def __init__(
        self,
        name: str,
        backends: Iterable[Backend],
        balancer: IBalancer,
        clock: IReactorTime,
        *,
        slow_start: float = 0.0,
        panic_threshold: float = 50.0,
        rng: random.Random | None = None,
        drain_timeout: float = 30.0,
        log_changes: bool = True,
    ) -> None:
        self.name = name
        #: False in a worker process: its state changes are the master's
        #: decisions, which the master logs once for the fleet
        self.log_changes = log_changes
        self.balancer = balancer
        self.clock = clock
        self.slow_start = slow_start
        self.panic_threshold = panic_threshold
        #: How long in-flight work on a draining backend may run (see L{drain_expired}).
        self.drain_timeout = drain_timeout
        self.rng = rng or random.Random()
        self._backends: list[Backend] = list(backends)
        for b in self._backends:
            b.slow_start = slow_start
        self._by_address = {b.address: b for b in self._backends}
        self.version = 0
        self._cached_version = -1
        self._candidates: tuple[Backend, ...] = ()
        self.panic = False
        self._ejected: list[Backend] = []
        self._listeners: list[StateListener] = []
        self._outcome_observers: list[OutcomeObserver] = []
        #: backend -> {source: (estimate, when)}: worker processes' latency
        #: estimates, reported to the master (lbtwist.workers.fleetview)
        self._remote_estimates: dict[Backend, dict[str, tuple[float, float]]] = {}

    # -- reading -------------------------------------------------------------

    def backends(self) -> tuple[Backend, ...]:
        return tuple(self._backends)

    def get(self, address: str) -> Backend | None:
        return self._by_address.get(address)

    def candidates(self, now: float) -> tuple[Backend, ...]:
        """Backends new work may go to. Falls back to every enabled,
        non-draining backend when too few are healthy (panic mode). Backends
        still 'unknown' (no probe yet) are never candidates and do not count
        toward the healthy share, so adding new backends cannot cause panic."""
        if self._cached_version != self.version or self._expiry_passed(now):
            self._rebuild(now)
        return self._candidates

    def _expiry_passed(self, now: float) -> bool:
        if not self._ejected:  # the common case, checked on every pick: no generator
            return False
        return any(
            b.ejected_until is not None and b.ejected_until <= now for b in self._ejected
        )

    def _rebuild(self, now: float) -> None:
        live = [
            b for b in self._backends
            if b.enabled and not b.draining and b.health is not Health.UNKNOWN
        ]
        good = [b for b in live if b.usable(now) and b.health is Health.HEALTHY]
        panic = bool(live) and (len(good) * 100.0 / len(live)) < self.panic_threshold
        if panic != self.panic:
            self.panic = panic
            if not self.log_changes:
                pass  # a worker: the master logs the fleet's panic
            elif panic:
                log.warn(
                    "pool {pool}: panic mode, only {good} of {total} backends usable; "
                    "routing across all of them",
                    pool=self.name, good=len(good), total=len(live),
                )
            else:
                log.info("pool {pool}: left panic mode", pool=self.name)
            self._notify(None, "panic" if panic else "normal", "healthy share changed")
        self._candidates = tuple(live if panic else good)
        # only ejections still running: an expired one must not force a rebuild per pick
        self._ejected = [
            b for b in self._backends if b.ejected_until is not None and b.ejected_until > now
        ]
        self._cached_version = self.version

    def select(self, ctx: PickContext) -> Backend | None:
        now = ctx.now
        # candidates(), inlined: this runs for every request
        if self._cached_version != self.version or (self._ejected and self._expiry_passed(now)):
            self._rebuild(now)
        cands = self._candidates
        if not cands:
            return None
        return self._balancer.pick(cands, ctx)

    # -- accounting ----------------------------------------------------------

    @property
    def balancer(self) -> IBalancer:
        return self._balancer

    @balancer.setter
    def balancer(self, balancer: IBalancer) -> None:
        self._balancer = balancer
        #: Algorithms that declare ``wants_outcomes = False`` (NoFeedback) are
        #: not told of starts and finishes: two calls saved per request.
        self._feedback = getattr(balancer, "wants_outcomes", True)

    def on_start(self, backend: Backend, now: float | None = None) -> None:
        backend.active += 1
        backend.total += 1
        if self._feedback:
            self._balancer.on_start(backend, self.clock.seconds() if now is None else now)

    def on_finish(self, backend: Backend, latency: float, ok: bool, outcome: str | None = None,
                  now: float | None = None) -> None:
        """Work on ``backend`` ended. ``outcome`` refines ``ok`` for passive
        health checking and metrics (see L{OUTCOMES}); defaults from ``ok``.
        ``now``: the caller's clock reading, if it has one."""
        backend.active -= 1
        if now is None:
            now = self.clock.seconds()
        if self._feedback:
            self._balancer.on_finish(backend, now, latency, ok)
        if backend.draining and backend.active <= 0:
            self._notify(backend, "drained", "no work left in flight")
        if self._outcome_observers:
            if outcome is None:
                outcome = "ok" if ok else "gateway"
            for obs in self._outcome_observers:
                obs(backend, now, latency, outcome)

    def latency_estimate(self, backend: Backend, now: float) -> float | None:
        """The balancing algorithm's own latency estimate for ``backend`` in
        seconds (peak EWMA for ``p2c`` and ``peak_ewma``), or None when the
        algorithm keeps none or has not measured the backend yet. Passive
        detection reads it for a backend the algorithm has stopped choosing."""
        remote = self._remote_estimates.get(backend) if self._remote_estimates else None
        if remote:
            fresh = [e for e, at in remote.values() if now - at <= REMOTE_ESTIMATE_TTL]
            if fresh:
                return min(fresh)  # slow only if every worker that measured it sees it slow
        estimate = getattr(self._balancer, "latency_estimate", None)
        return estimate(backend, now) if estimate is not None else None

    def remote_estimate(self, backend: Backend, source: str, estimate: float, now: float) -> None:
        """A worker process's balancer estimate for ``backend`` (the master's
        own balancer sees no traffic): L{latency_estimate} answers with the
        lowest estimate reported in the last L{REMOTE_ESTIMATE_TTL} seconds."""
        if self._by_address.get(backend.address) is not backend:
            return
        got = self._remote_estimates.setdefault(backend, {})
        got[source] = (estimate, now)
        for k in [k for k, (_, at) in got.items() if now - at > REMOTE_ESTIMATE_TTL]:
            del got[k]

    def observe_outcomes(self, observer: OutcomeObserver) -> None:
        """Passive health checks and metrics watch live traffic through this."""
        self._outcome_observers.append(observer)

    def report_outcome(self, backend: Backend, now: float, latency: float, outcome: str) -> None:
        """Tell the outcome observers (passive health, live view) of work that
        ended elsewhere: a worker process's traffic, fed to the master's pool
        by lbtwist.workers.fleetview. Counts and the balancer are untouched
        (they are this process's own)."""
        for obs in self._outcome_observers:
            obs(backend, now, latency, outcome)

    def unobserve_outcomes(self, observer: OutcomeObserver) -> None:
        if observer in self._outcome_observers:
            self._outcome_observers.remove(observer)

    # -- changing state ------------------------------------------------------

    def subscribe(self, listener: StateListener) -> None:
        """``listener(pool, backend_or_None, state, reason)`` on every change."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: StateListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, backend: Backend | None, state: str, reason: str) -> None:
        for listener in list(self._listeners):
            listener(self, backend, state, reason)

    def _changed(self, backend: Backend, state: str, reason: str) -> None:
        self.version += 1
        backend.reason = f"{state}: {reason}"
        backend.changed_at = self.clock.seconds()
        if self.log_changes:
            log.info(
                "pool {pool} backend {backend}: {state} ({reason})",
                pool=self.name, backend=backend.address, state=state, reason=reason,
            )
        self._notify(backend, state, reason)
        # evaluate panic now, so entering/leaving it is logged when it happens
        # rather than at the next request
        self.candidates(self.clock.seconds())

    def set_health(self, backend: Backend, health: Health, reason: str) -> None:
        if backend.health is health:
            return
        was = backend.health
        backend.health = health
        if health is Health.HEALTHY and was is not Health.HEALTHY:
            backend.joined_at = self.clock.seconds()
        self._changed(backend, health.value, reason)

    def eject(self, backend: Backend, until: float, reason: str) -> None:
        backend.ejected_until = until
        self._changed(backend, "ejected", reason)

    def unject(self, backend: Backend, reason: str) -> None:
        if backend.ejected_until is None:
            return
        backend.ejected_until = None
        backend.joined_at = self.clock.seconds()
        self._changed(backend, "returned", reason)

    def set_draining(self, backend: Backend, draining: bool, reason: str) -> None:
        """Draining: no new work. Subscribers on the data plane react to the
        "draining" notification by closing idle keep-alive connections to the
        backend and not reusing busy ones; "drained" follows when its last
        in-flight unit finishes, or "drain-expired" (L{drain_expired}) when
        ``drain_timeout`` ran out, telling them to abort what is left."""
        if backend.draining == draining:
            return
        backend.draining = draining
        if not draining:
            backend.joined_at = self.clock.seconds()
        self._changed(backend, "draining" if draining else "undrained", reason)
        if draining and backend.active <= 0:
            self._notify(backend, "drained", "no work in flight")

    def drain_expired(self, backend: Backend) -> None:
        """``drain_timeout`` passed with work still in flight: subscribers
        abort the work left on ``backend``."""
        if not backend.draining:
            return
        n = backend.active
        log.warn(
            "pool {pool} backend {backend}: drain timeout ({t:g}s), closing {n} in flight",
            pool=self.name, backend=backend.address, t=self.drain_timeout, n=n,
        )
        self._notify(backend, "drain-expired", f"drain_timeout {self.drain_timeout:g}s passed with {n} in flight")

    def set_enabled(self, backend: Backend, enabled: bool, reason: str) -> None:
        if backend.enabled == enabled:
            return
        backend.enabled = enabled
        if enabled:
            backend.joined_at = self.clock.seconds()
        self._changed(backend, "enabled" if enabled else "disabled", reason)

    def set_weight(self, backend: Backend, weight: float, reason: str) -> None:
        if weight < 0:
            raise ValueError("weight must be >= 0")
        backend.weight = weight
        self._changed(backend, f"weight={weight:.15g}", reason)  # exact, never 1e+06

    def add_backend(self, backend: Backend, reason: str = "added") -> None:
        if backend.address in self._by_address:
            raise ValueError(f"pool {self.name}: duplicate backend {backend.address}")
        backend.slow_start = self.slow_start
        self._backends.append(backend)
        self._by_address[backend.address] = backend
        self._changed(backend, "added", reason)

    def remove_backend(self, backend: Backend, reason: str = "removed") -> None:
        self._backends.remove(backend)
        del self._by_address[backend.address]
        self._remote_estimates.pop(backend, None)
        self._changed(backend, "removed", reason)
