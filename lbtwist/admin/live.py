"""Live figures fed from the data plane: subscribes to each pool's outcomes and
state changes and to the runtime's traffic records, and keeps a L{Meter} per
backend, pool and listener. The admin API and /metrics both read from here, so
the JSON and Prometheus always agree.

Keyed by names (pool name, backend address), not objects, so the figures
survive a reload that rebuilds the Pool objects; L{Live.sync} attaches to new
pools and forgets backends that are gone.
"""
from __future__ import annotations

from typing import Any

from lbtwist.admin.window import ERROR_OUTCOMES, Meter
from lbtwist.pool import Backend, Pool
from lbtwist.traffic import TrafficRecord


class BackendLive:
    """What is counted about one backend beyond what L{Backend} holds."""

    __slots__ = ("meter", "outcomes", "responses", "ejections", "state_changes")

    def __init__(self) -> None:
        #: Every try sent to it (a retried request counts on each backend it hit).
        self.meter = Meter()
        #: outcome -> count (lbtwist.pool.OUTCOMES).
        self.outcomes: dict[str, int] = {}
        #: status class ("2xx"...) -> responses it served to clients (last try of a request).
        self.responses: dict[str, int] = {}
        self.ejections = 0
        #: state word -> times it entered that state (a sawtooth means flapping).
        self.state_changes: dict[str, int] = {}


class PoolLive:
    __slots__ = ("meter", "retries", "responses")

    def __init__(self) -> None:
        #: Client-visible requests/connections routed to the pool (one per record).
        self.meter = Meter()
        #: Backend attempts beyond the first, summed over records.
        self.retries = 0
        self.responses: dict[str, int] = {}


class ListenerLive:
    __slots__ = ("meter", "bytes_in", "bytes_out", "responses", "rejected", "by_kind")

    def __init__(self) -> None:
        self.meter = Meter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.responses: dict[str, int] = {}
        #: Refused by lbtwist itself (limits, no backend): outcome "rejected".
        self.rejected = 0
        #: kind ("http" requests, "tcp" connections, "udp" flows) -> records.
        self.by_kind: dict[str, int] = {}


#: status // 100 -> status class
_CLASSES = (None, "1xx", "2xx", "3xx", "4xx", "5xx")


class Live:
    """Attaches to a runtime's pools and traffic hub. ``clock`` provides
    ``seconds()`` (the reactor, or a task.Clock in tests)."""

    def __init__(self, runtime: Any, clock: Any) -> None:
        self.runtime = runtime
        self.clock = clock
        self.backends: dict[tuple[str, str], BackendLive] = {}
        self.pools: dict[str, PoolLive] = {}
        self.listeners: dict[str, ListenerLive] = {}
        #: id(pool) -> (pool, outcome observer, state listener)
        self._attached: dict[int, tuple[Pool, Any, Any]] = {}
        self._on_traffic = None

    # -- wiring ---------------------------------------------------------------

    def attach(self) -> None:
        if self._on_traffic is None:
            self._on_traffic = self.record
            self.runtime.traffic.subscribe(self._on_traffic)
        self.sync()

    def detach(self) -> None:
        if self._on_traffic is not None:
            try:
                self.runtime.traffic.unsubscribe(self._on_traffic)
            except ValueError:
                pass
            self._on_traffic = None
        for pool, obs, lst in self._attached.values():
            _call(pool, "unobserve_outcomes", obs)
            _call(pool, "unsubscribe", lst)
        self._attached.clear()

    def sync(self) -> None:
        """Follow the runtime: attach to pools added or rebuilt since the last
        call, detach from replaced ones, drop figures of removed backends."""
        current = {id(p): p for p in self.runtime.pools.values()}
        for key in [k for k in self._attached if k not in current]:
            pool, obs, lst = self._attached.pop(key)
            _call(pool, "unobserve_outcomes", obs)
            _call(pool, "unsubscribe", lst)
        for key, pool in current.items():
            if key not in self._attached:
                obs = self._outcome_observer(pool.name)
                lst = self._state_listener
                pool.observe_outcomes(obs)
                pool.subscribe(lst)
                self._attached[key] = (pool, obs, lst)
        live_keys = {
            (p.name, b.address) for p in self.runtime.pools.values() for b in p.backends()
        }
        for key in [k for k in self.backends if k not in live_keys]:
            del self.backends[key]
        for name in [n for n in self.pools if n not in self.runtime.pools]:
            del self.pools[name]

    # -- feeds ----------------------------------------------------------------

    def backend(self, pool: str, address: str) -> BackendLive:
        key = (pool, address)
        b = self.backends.get(key)
        if b is None:
            b = self.backends[key] = BackendLive()
        return b

    def pool(self, name: str) -> PoolLive:
        p = self.pools.get(name)
        if p is None:
            p = self.pools[name] = PoolLive()
        return p

    def listener(self, name: str) -> ListenerLive:
        x = self.listeners.get(name)
        if x is None:
            x = self.listeners[name] = ListenerLive()
        return x

    def _outcome_observer(self, pool_name: str):
        backends = self.backends

        def observe(backend: Backend, now: float, latency: float, outcome: str) -> None:
            b = backends.get((pool_name, backend.address))
            if b is None:
                b = self.backend(pool_name, backend.address)
            b.outcomes[outcome] = b.outcomes.get(outcome, 0) + 1
            # a client that left first tells nothing about the backend's speed
            b.meter.observe(now, None if outcome == "cancelled" else latency, outcome in ERROR_OUTCOMES)

        return observe

    def _state_listener(self, pool: Pool, backend: Backend | None, state: str, reason: str) -> None:
        if backend is None:
            return
        b = self.backend(pool.name, backend.address)
        word = state.split("=", 1)[0]  # "weight=2" -> "weight"
        b.state_changes[word] = b.state_changes.get(word, 0) + 1
        if state == "ejected":
            b.ejections += 1

    def record(self, rec: TrafficRecord) -> None:
        """A finished request or connection (subscribed to runtime.traffic).
        Runs once per request: kept to dictionary lookups and additions."""
        now = self.clock.seconds()
        status = rec.status
        cls = _CLASSES[status // 100] if status is not None and 100 <= status < 600 else None
        error = rec.outcome in ERROR_OUTCOMES or (status is not None and status >= 500)
        lst = self.listeners.get(rec.listener) or self.listener(rec.listener)
        lst.meter.observe(now, rec.duration, error)
        lst.bytes_in += rec.bytes_in
        lst.bytes_out += rec.bytes_out
        lst.by_kind[rec.kind] = lst.by_kind.get(rec.kind, 0) + 1
        if rec.outcome == "rejected":
            lst.rejected += 1
        if cls:
            lst.responses[cls] = lst.responses.get(cls, 0) + 1
        if rec.pool is not None:
            p = self.pools.get(rec.pool) or self.pool(rec.pool)
            p.meter.observe(now, rec.duration, error)
            if rec.tries > 1:
                p.retries += rec.tries - 1
            if cls:
                p.responses[cls] = p.responses.get(cls, 0) + 1
                if rec.backend is not None:
                    b = self.backends.get((rec.pool, rec.backend)) or self.backend(rec.pool, rec.backend)
                    b.responses[cls] = b.responses.get(cls, 0) + 1


def _call(obj: Any, name: str, arg: Any) -> None:
    fn = getattr(obj, name, None)
    if fn is not None:
        fn(arg)
