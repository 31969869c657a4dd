"""Keep-alive connections to backends, shared by every http listener of a
runtime (``runtime.connection_pools``).

Per backend: idle connections are reused newest first (so surplus ones age
out), the number of open connections is capped (requests over the cap wait in
order), idle connections close after ``idle_timeout`` (keep it below the
backend's own keep-alive timeout, or requests race the backend's close), and
connections retire after ``max_age`` or ``max_requests`` so load spreads to
backends that joined later. A backend that starts draining, is disabled,
removed, ejected or marked unhealthy loses its idle connections at once and
its busy ones close when their response ends.
"""
from __future__ import annotations

from collections import deque
from typing import Any

from twisted.logger import Logger

from lbtwist.config.model import ConnectionPoolConfig
from lbtwist.l7.backend import BUSY, CLOSED, CONNECTING, IDLE, BackendConnection, ConnectFactory
from lbtwist.pool import Backend, Pool
from lbtwist.resilience.limits import Limit

log = Logger(namespace="lbtwist.l7.connpool")

#: Pool state changes after which a backend's idle connections are closed.
_CLOSE_IDLE_ON = frozenset(("draining", "disabled", "removed", "ejected", "unhealthy"))


class BackendConnections:
    """The connections to one backend."""

    def __init__(self, backend: Backend, reactor: Any, cfg: ConnectionPoolConfig, connect_timeout: float) -> None:
        self.backend = backend
        self.reactor = reactor
        self.clock = reactor
        self.configure(cfg, connect_timeout)
        self.idle: list[BackendConnection] = []
        #: Established connections (idle or busy), so a drain that expires can cut them.
        self.live: set[BackendConnection] = set()
        #: Connections open or being opened.
        self.open = 0
        self.waiting: deque[Any] = deque()
        #: Connections ever opened, and requests served on reused ones (metrics, tests).
        self.opened = 0
        self.reused = 0
        self.pools: ConnectionPools | None = None
        self._sweeper: Any = None
        #: The pool's name (its BackendTLS is looked up by it at each connect).
        self.pool_name: str | None = None
        #: lbtwist.tls BackendTLS of the latest connect, None for plain TCP.
        self.tls: Any = None
        #: The pool's lbtwist.resilience PoolLimits (max_connections across the
        #: pool's backends, max_pending waiters), or None for no pool-wide cap.
        self.limits: Any = None

    def configure(self, cfg: ConnectionPoolConfig, connect_timeout: float) -> None:
        self.max_open = max(1, cfg.max_per_backend)
        self.idle_timeout = cfg.idle_timeout
        self.max_age = cfg.max_age
        self.max_requests = max(1, cfg.max_requests)
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"<BackendConnections {self.backend.address} open={self.open} idle={len(self.idle)} waiting={len(self.waiting)}>"

    # -- getting a connection ---------------------------------------------------

    def acquire(self, attempt: Any, fresh: bool = False) -> bool:
        """Give ``attempt`` a connection: ``attempt.connection_ready(conn)`` now
        (idle reuse) or later, or ``attempt.connect_failed(code, detail)``.
        ``fresh`` skips idle connections (the keep-alive race re-send).
        Returns False when the attempt was queued behind the cap."""
        if not fresh and self.idle:
            conn = self.take_idle(attempt.started)
            if conn is not None:
                attempt.connection_ready(conn)
                return True
        limits = self.limits
        if self.open >= self.max_open:
            return self._queue(attempt)
        if limits is not None:
            slot = limits.try_acquire(Limit.CONNECTIONS)
            if slot is None:
                return self._queue(attempt)
            self._connect(attempt, slot)
            return True
        self._connect(attempt)
        return True

    def take_idle(self, now: float) -> BackendConnection | None:
        """The newest idle connection still fit to reuse (marked busy), or
        None; stale ones met on the way are closed. The exchange asks this
        first, so the common request gets its connection without a callback."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if (conn.state == IDLE and now - conn.created < self.max_age
                    and now - conn.idle_since < self.idle_timeout):
                conn.state = BUSY
                self.reused += 1
                return conn
            conn.close()
        return None

    def _queue(self, attempt: Any) -> bool:
        """Wait for a connection, within the pool's max_pending: over it the
        attempt fails at once (``max_pending``) instead of queueing unbounded."""
        limits = self.limits
        if limits is not None:
            slot = limits.try_acquire(Limit.PENDING)
            if slot is None:
                attempt.connect_failed("max_pending", f"pool {self.pool_name}: {limits.in_use(Limit.PENDING)} requests already wait for a connection")
                return True
            attempt.pending_slot = slot
        self.waiting.append(attempt)
        return False

    @staticmethod
    def _dequeued(attempt: Any) -> None:
        slot = getattr(attempt, "pending_slot", None)
        if slot is not None:
            attempt.pending_slot = None
            slot.release()

    def cancel(self, attempt: Any) -> None:
        """``attempt`` no longer wants a connection (client left, timed out)."""
        try:
            self.waiting.remove(attempt)
        except ValueError:
            pass
        self._dequeued(attempt)

    def _connect(self, attempt: Any, slot: Any = None) -> None:
        self.open += 1
        self.opened += 1
        conn = BackendConnection(self)
        conn.pending = attempt
        if slot is not None:
            conn.limit_slot = slot  # released when the connection closes
        b = self.backend
        pools = self.pools
        lookup = pools.tls_lookup if pools is not None else None
        self.tls = btls = lookup(self.pool_name) if lookup is not None and self.pool_name else None
        factory: Any = ConnectFactory(conn)
        if btls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            conn.handshaking = True
            factory = TLSMemoryBIOFactory(btls.creator_for(b.host, key=b.address), True, factory, clock=self.reactor)
        self.reactor.connectTCP(b.host, b.port, factory, timeout=self.connect_timeout)

    # -- events from connections --------------------------------------------------------

    def connected(self, conn: BackendConnection) -> None:
        self.live.add(conn)
        attempt, conn.pending = conn.pending, None
        if attempt is None or attempt.cancelled:
            self._hand_over(conn, self.clock.seconds())
            return
        conn.state = BUSY
        attempt.connection_ready(conn)

    def connect_failed(self, conn: BackendConnection, code: str, detail: str) -> None:
        self.open -= 1
        _release_slot(conn)
        attempt, conn.pending = conn.pending, None
        if attempt is not None and not attempt.cancelled:
            attempt.connect_failed(code, detail)
        self._serve_waiting()

    def release(self, conn: BackendConnection, reusable: bool) -> None:
        """A response ended on ``conn``; keep it if it may serve another."""
        b = self.backend
        now = self.clock.seconds()
        if (
            reusable
            and conn.requests < self.max_requests
            and now - conn.created < self.max_age
            and b.enabled
            and not b.draining
        ):
            self._hand_over(conn, now)
        else:
            conn.close()

    def lost(self, conn: BackendConnection, was: int) -> None:
        """An established connection closed (any reason)."""
        self.live.discard(conn)
        self.open -= 1
        _release_slot(conn)
        if was == IDLE:
            try:
                self.idle.remove(conn)
            except ValueError:
                pass
            if not self.idle and self._sweeper is not None:
                sweeper, self._sweeper = self._sweeper, None
                if sweeper.active():
                    sweeper.cancel()
        self._serve_waiting()

    def _sweep(self) -> None:
        """Close idle connections past idle_timeout. One timer per backend
        instead of one per release: releases only stamp ``idle_since``."""
        self._sweeper = None
        idle = self.idle
        if not idle:
            return
        # One reading of the clock: closing many connections takes time, and a
        # second reading after it could put the next sweep in the past (a
        # negative delay, which the reactor refuses: the sweeper would stop).
        now = self.clock.seconds()
        cutoff = now - self.idle_timeout
        keep = [c for c in idle if c.idle_since > cutoff]
        if len(keep) != len(idle):
            self.idle = keep
            for c in idle:
                if c.idle_since <= cutoff:
                    c.close()
        if keep and self._sweeper is None:
            oldest = min(c.idle_since for c in keep)
            self._sweeper = self.clock.callLater(max(0.0, oldest - cutoff) + 0.001, self._sweep)

    # -- management ----------------------------------------------------------------------

    def close_idle(self) -> int:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.active():
            sweeper.cancel()
        return len(idle)

    def abort_all(self) -> int:
        """Cut every connection, busy ones included: the backend's
        drain_timeout passed with work still in flight."""
        live = list(self.live)
        for conn in live:
            conn.cut()
        return len(live)

    def retire_all(self) -> None:
        """Close idle connections now and busy ones when their response ends."""
        self.close_idle()
        # Busy connections check the backend state (or retire) on release.

    def _hand_over(self, conn: BackendConnection, now: float) -> None:
        waiting = self.waiting
        while waiting:
            attempt = waiting.popleft()
            self._dequeued(attempt)
            if attempt.cancelled:
                continue
            conn.state = BUSY
            self.reused += 1
            attempt.connection_ready(conn)
            return
        conn.state = IDLE
        conn.idle_since = now
        if conn.read_paused:
            conn.resume_reading()  # an idle connection must notice the backend closing
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.clock.callLater(self.idle_timeout + 0.001, self._sweep)

    def _serve_waiting(self) -> None:
        waiting = self.waiting
        limits = self.limits
        while waiting and self.open < self.max_open:
            slot = None
            if limits is not None:
                if not limits.available(Limit.CONNECTIONS):
                    return  # the pool is at max_connections: keep waiting
                slot = limits.try_acquire(Limit.CONNECTIONS)
            attempt = waiting.popleft()
            self._dequeued(attempt)
            if not attempt.cancelled:
                self._connect(attempt, slot)
            elif slot is not None:
                slot.release()


def _release_slot(conn: BackendConnection) -> None:
    slot = getattr(conn, "limit_slot", None)
    if slot is not None:
        conn.limit_slot = None
        slot.release()


class ConnectionPools:
    """Every backend's connections, keyed by the Backend object."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        #: Apply fastio's eager write to backend connections.
        self.eager = True
        #: Backend -> its connections (the exchange reads it directly, once per request;
        #: L{for_backend} when absent).
        self.by_backend: dict[Backend, BackendConnections] = {}
        self._watched: set[int] = set()
        #: pool name -> lbtwist.tls BackendTLS or None (set by the listener wiring).
        self.tls_lookup: Any = None

    def get(self, pool: Pool, backend: Backend, cfg: ConnectionPoolConfig, connect_timeout: float) -> BackendConnections:
        bc = self.by_backend.get(backend)
        if bc is None:
            bc = self.by_backend[backend] = BackendConnections(backend, self.reactor, cfg, connect_timeout)
            bc.pools = self
            bc.pool_name = pool.name
            if id(pool) not in self._watched:
                self._watched.add(id(pool))
                pool.subscribe(self._pool_changed)
        return bc

    def for_backend(self, pool: Pool, backend: Backend, pcfg: Any, default: ConnectionPoolConfig) -> BackendConnections:
        """``backend``'s connections, made on first use from its pool's config
        ``pcfg`` (a PoolConfig, or None: ``default`` and a 3 s connect timeout)."""
        bc = self.by_backend.get(backend)
        if bc is not None:
            return bc
        if pcfg is not None:
            return self.get(pool, backend, pcfg.connection_pool, pcfg.connect_timeout)
        return self.get(pool, backend, default, 3.0)

    def find(self, backend: Backend) -> BackendConnections | None:
        return self.by_backend.get(backend)

    def all(self) -> list[BackendConnections]:
        return list(self.by_backend.values())

    def close_idle(self, backend: Backend | None = None) -> int:
        """Close idle keep-alives (of one backend, or all). Returns how many."""
        if backend is not None:
            bc = self.by_backend.get(backend)
            return bc.close_idle() if bc is not None else 0
        return sum(bc.close_idle() for bc in self.by_backend.values())

    def _pool_changed(self, pool: Pool, backend: Backend | None, state: str, reason: str) -> None:
        if backend is None:
            return
        if state == "drain-expired":
            bc = self.by_backend.get(backend)
            if bc is not None:
                n = bc.abort_all()
                log.warn("pool {pool} backend {backend}: {reason}; cut {n} connections",
                         pool=pool.name, backend=backend.address, reason=reason, n=n)
            return
        if state not in _CLOSE_IDLE_ON:
            return
        bc = self.by_backend.get(backend)
        if bc is None:
            return
        n = bc.close_idle()
        if state == "removed":
            del self.by_backend[backend]
        if n:
            log.debug("pool {pool} backend {backend}: closed {n} idle connections ({state})",
                      pool=pool.name, backend=backend.address, n=n, state=state)


__all__ = ["BackendConnections", "ConnectionPools", "BUSY", "CLOSED", "CONNECTING", "IDLE"]
