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
        #: Connections open or being opened.
        self.open = 0
        self.waiting: deque[Any] = deque()
        #: Connections ever opened, and requests served on reused ones (metrics, tests).
        self.opened = 0
        self.reused = 0
        self.pools: ConnectionPools | None = None

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
        if not fresh:
            idle = self.idle
            if idle:
                now = self.clock.seconds()
                while idle:
                    conn = idle.pop()
                    if conn.state == IDLE and now - conn.created < self.max_age:
                        conn.state = BUSY
                        self.reused += 1
                        attempt.connection_ready(conn)
                        return True
                    conn.close()
        if self.open >= self.max_open:
            self.waiting.append(attempt)
            return False
        self._connect(attempt)
        return True

    def cancel(self, attempt: Any) -> None:
        """``attempt`` no longer wants a connection (client left, timed out)."""
        try:
            self.waiting.remove(attempt)
        except ValueError:
            pass

    def _connect(self, attempt: Any) -> None:
        self.open += 1
        self.opened += 1
        conn = BackendConnection(self)
        conn.pending = attempt
        b = self.backend
        self.reactor.connectTCP(b.host, b.port, ConnectFactory(conn), timeout=self.connect_timeout)

    # -- events from connections --------------------------------------------------------

    def connected(self, conn: BackendConnection) -> None:
        attempt, conn.pending = conn.pending, None
        if attempt is None or attempt.cancelled:
            self._hand_over(conn)
            return
        conn.state = BUSY
        attempt.connection_ready(conn)

    def connect_failed(self, conn: BackendConnection, code: str, detail: str) -> None:
        self.open -= 1
        attempt, conn.pending = conn.pending, None
        if attempt is not None and not attempt.cancelled:
            attempt.connect_failed(code, detail)
        self._serve_waiting()

    def release(self, conn: BackendConnection, reusable: bool) -> None:
        """A response ended on ``conn``; keep it if it may serve another."""
        b = self.backend
        if (
            reusable
            and conn.requests < self.max_requests
            and self.clock.seconds() - conn.created < self.max_age
            and b.enabled
            and not b.draining
        ):
            self._hand_over(conn)
        else:
            conn.close()

    def lost(self, conn: BackendConnection, was: int) -> None:
        """An established connection closed (any reason)."""
        self.open -= 1
        if was == IDLE:
            try:
                self.idle.remove(conn)
            except ValueError:
                pass
        self._serve_waiting()

    def expire(self, conn: BackendConnection) -> None:
        """An idle connection reached idle_timeout."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        conn.close()

    # -- management ----------------------------------------------------------------------

    def close_idle(self) -> int:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        return len(idle)

    def retire_all(self) -> None:
        """Close idle connections now and busy ones when their response ends."""
        self.close_idle()
        # Busy connections check the backend state (or retire) on release.

    def _hand_over(self, conn: BackendConnection) -> None:
        waiting = self.waiting
        while waiting:
            attempt = waiting.popleft()
            if attempt.cancelled:
                continue
            conn.state = BUSY
            self.reused += 1
            attempt.connection_ready(conn)
            return
        conn.go_idle(self.idle_timeout)
        self.idle.append(conn)

    def _serve_waiting(self) -> None:
        waiting = self.waiting
        while waiting and self.open < self.max_open:
            attempt = waiting.popleft()
            if not attempt.cancelled:
                self._connect(attempt)


class ConnectionPools:
    """Every backend's connections, keyed by the Backend object."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        #: Apply fastio's eager write to backend connections.
        self.eager = True
        self._by_backend: dict[Backend, BackendConnections] = {}
        self._watched: set[int] = set()

    def get(self, pool: Pool, backend: Backend, cfg: ConnectionPoolConfig, connect_timeout: float) -> BackendConnections:
        bc = self._by_backend.get(backend)
        if bc is None:
            bc = self._by_backend[backend] = BackendConnections(backend, self.reactor, cfg, connect_timeout)
            bc.pools = self
            if id(pool) not in self._watched:
                self._watched.add(id(pool))
                pool.subscribe(self._pool_changed)
        return bc

    def find(self, backend: Backend) -> BackendConnections | None:
        return self._by_backend.get(backend)

    def all(self) -> list[BackendConnections]:
        return list(self._by_backend.values())

    def close_idle(self, backend: Backend | None = None) -> int:
        """Close idle keep-alives (of one backend, or all). Returns how many."""
        if backend is not None:
            bc = self._by_backend.get(backend)
            return bc.close_idle() if bc is not None else 0
        return sum(bc.close_idle() for bc in self._by_backend.values())

    def _pool_changed(self, pool: Pool, backend: Backend | None, state: str, reason: str) -> None:
        if backend is None or state not in _CLOSE_IDLE_ON:
            return
        bc = self._by_backend.get(backend)
        if bc is None:
            return
        n = bc.close_idle()
        if state == "removed":
            del self._by_backend[backend]
        if n:
            log.debug("pool {pool} backend {backend}: closed {n} idle connections ({state})",
                      pool=pool.name, backend=backend.address, n=n, state=state)


__all__ = ["BackendConnections", "ConnectionPools", "BUSY", "CLOSED", "CONNECTING", "IDLE"]
