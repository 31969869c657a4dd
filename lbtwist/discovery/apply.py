"""The glue between a pool's discovery sources and the pool: merges what the
sources accepted with the pool's static ``backends``, applies SRV priority,
and hands the result to the service's backend diff (the same one a reload
uses: added backends go through health checks and slow start, removed ones
drain, unchanged ones keep their state)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from twisted.logger import Logger

from lbtwist.config.model import BackendConfig
from lbtwist.discovery.base import Endpoint, Source, SourceTracker, select_priority
from lbtwist.pool import Backend, Health, Pool

log = Logger(namespace="lbtwist.discovery")

#: ``sync(pool_name, wanted, reason)``: the service's backend diff.
Sync = Callable[[str, Mapping[str, BackendConfig], str], Any]


class PoolDiscovery:
    """Every source of one pool."""

    def __init__(self, pool: Pool, static: Iterable[BackendConfig], sources: list[Source],
                 clock: Any, sync: Sync, *, max_shrink: float | list[float]) -> None:
        self.pool = pool
        self.static = list(static)
        self.clock = clock
        self._sync = sync
        self._applying = False
        self._last_weights: dict[str, float] = {}
        self._carried: list[Endpoint] = []
        self.sources = sources
        shrinks = max_shrink if isinstance(max_shrink, list) else [max_shrink] * len(sources)
        self.trackers = [
            SourceTracker(pool.name, s.kind, s.target, clock, self._changed, max_shrink=m)
            for s, m in zip(sources, shrinks)
        ]

    def start(self) -> None:
        self.pool.subscribe(self._on_pool)
        for s, t in zip(self.sources, self.trackers):
            s.start(t)

    def stop(self) -> None:
        self.pool.unsubscribe(self._on_pool)
        for s in self.sources:
            s.stop()

    def set_static(self, static: Iterable[BackendConfig]) -> None:
        """A reload changed the pool's static backends (the reload applies them itself)."""
        self.static = list(static)

    def seed(self, endpoints: Iterable[Endpoint]) -> None:
        """Sources replaced by a reload: the old ones' backends stay until
        every new source has answered once (a reload must not empty a pool)."""
        self._carried = list(endpoints)

    def endpoints(self) -> list[Endpoint]:
        out: list[Endpoint] = []
        if self._carried:
            if all(t.accepted is not None for t in self.trackers):
                self._carried = []
            else:
                out.extend(self._carried)
        for t in self.trackers:
            if t.accepted is not None:
                out.extend(t.accepted)
        return out

    def wanted(self) -> dict[str, BackendConfig]:
        """Static backends (they win on a duplicate address) plus discovered
        ones, weighted after SRV priority."""
        wanted = {b.address: b for b in self.static}
        eps = [e for e in self.endpoints() if e.address not in wanted]
        weights = select_priority(eps, self._in_rotation)
        for e in eps:
            wanted.setdefault(e.address, BackendConfig(address=e.address, weight=weights[e.address], name=e.name))
        return wanted

    def _in_rotation(self, address: str) -> bool:
        b = self.pool.get(address)
        return b is not None and b.health is Health.HEALTHY and b.usable(self.clock.seconds())

    def _changed(self) -> None:
        self._apply("changed by discovery")

    def _apply(self, reason: str) -> None:
        if self._applying:
            return
        self._applying = True
        try:
            wanted = self.wanted()
            self._last_weights = {a: b.weight for a, b in wanted.items()}
            self._sync(self.pool.name, wanted, reason)
        finally:
            self._applying = False

    def _on_pool(self, pool: Pool, backend: Backend | None, state: str, reason: str) -> None:
        """Health changes can move SRV priority to another group."""
        if self._applying or backend is None or state.startswith("weight="):
            return
        wanted = self.wanted()
        if {a: b.weight for a, b in wanted.items()} != self._last_weights:
            self._apply(f"SRV priority: {backend.address} {state}")

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        return {"sources": [t.status(now) for t in self.trackers]}
