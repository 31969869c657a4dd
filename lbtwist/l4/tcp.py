"""The L4 TCP relay: one backend connection per client connection, bytes both
ways with backpressure, half-close, bounded failover on connect, idle timeout,
a per-listener connection cap, and the PROXY protocol on either side.

Backpressure is Twisted's producer/consumer: each transport is registered as
the streaming producer of the other, so when one side's write buffer passes
its threshold the other side stops reading (and the kernel's TCP window then
slows the sender). Nothing is buffered without bound.

The protocols here are thin adapters: which backend to try next lives in
L{lbtwist.l4.failover}, header parsing in L{lbtwist.l4.proxy_protocol}.
"""
from __future__ import annotations

import time
from typing import Any

from twisted.internet import error, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lbtwist import fastio
from lbtwist.config.model import ListenerConfig, PoolConfig
from lbtwist.config.names import parse_hash_key
from lbtwist.l4.failover import ConnectAttempts, connect_retry
from lbtwist.l4.proxy_protocol import ProxyHeaderParser, ProxyProtocolError, encode
from lbtwist.listener import ListenerService, PerClientLimit
from lbtwist.pool import Backend, join_address
from lbtwist.traffic import TrafficRecord

log = Logger(namespace="lbtwist.l4.tcp")

#: Idle timeout when the listener sets none: long, but not forever.
DEFAULT_IDLE_TIMEOUT = 3600.0
#: Bytes read from a client before its backend is connected, beyond which
#: the client is paused until then.
PENDING_LIMIT = 64 * 1024
#: Log at most one "refused: at max_connections" line per this many seconds.
REFUSAL_LOG_INTERVAL = 10.0


def _unregister(consumer: Any) -> None:
    """Drop a consumer's producer when the producing side has finished, so a
    later close is not held back waiting to resume it."""
    if getattr(consumer, "producer", None) is not None:
        consumer.unregisterProducer()


class RelayFactory(protocol.ServerFactory):
    """Per-listener state shared by its connections: settings resolved once
    from the config, counters, and the listener service that tracks them."""

    noisy = False

    def __init__(self, cfg: ListenerConfig, runtime: Any, service: ListenerService | None = None) -> None:
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.service = service
        #: Open connections per client address (max_connections_per_client).
        self.clients = PerClientLimit()
        self.configure(cfg)
        #: Speed levers (see L{lbtwist.fastio}); switchable to measure them.
        self.eager = True
        self.read_size: int | None = fastio.L4_READ_SIZE
        #: Live client connections (refused ones are not counted).
        self.active = 0
        self.total = 0
        self.refused = 0
        self.failed = 0
        self._refusal_logged_at = float("-inf")
        self._refused_since_log = 0

    def configure(self, cfg: ListenerConfig) -> None:
        """Take (new) settings; connections opened from now on use them (a
        reload keeps the socket and the live connections)."""
        if cfg.pool is None and cfg.tls_passthrough is None:
            raise ValueError(f"listener {cfg.name}: mode tcp needs a pool")
        if parse_hash_key(cfg.hash_key)[0] != "source":  # as the validator reads it
            raise ValueError(
                f"listener {cfg.name}: hash_key {cfg.hash_key!r} is not available at L4 (use 'source')"
            )
        self.cfg = cfg
        self.pool_name = cfg.pool
        self.max_connections = cfg.max_connections
        self.clients.cap = cfg.max_connections_per_client
        self.idle_timeout = cfg.idle_timeout if cfg.idle_timeout is not None else DEFAULT_IDLE_TIMEOUT
        pp = cfg.proxy_protocol
        self.accept_proxy = pp.accept
        self.send_proxy = None if pp.send == "none" else pp.send
        self.header_timeout = pp.header_timeout

    def pool_config(self, pool_name: str | None = None) -> PoolConfig:
        name = pool_name if pool_name is not None else self.pool_name
        cfg = self.runtime.pool_configs.get(name)
        return cfg if cfg is not None else PoolConfig(name=name or "")

    def buildProtocol(self, addr: Any) -> "Frontend | None":
        """A relay, or None (Twisted closes the socket at once) for a client
        at max_connections_per_client: nothing is built for it."""
        clients = self.clients
        if clients.cap and clients.open_from(getattr(addr, "host", "")) >= clients.cap:
            self.note_refusal(self.reactor.seconds(), per_client=True)
            return None
        p = Frontend(self)
        return p

    def build_for_pool(self, pool_name: str, addr: Any) -> "Frontend":
        """A connection relayed to ``pool_name`` instead of the listener's
        pool (SNI passthrough); limits stay per listener."""
        p = Frontend(self)
        p.pool_name = pool_name
        return p

    def note_refusal(self, now: float, per_client: bool = False) -> None:
        self.refused += 1
        self._refused_since_log += 1
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            cap = (f"max_connections_per_client={self.clients.cap}" if per_client
                   else f"max_connections={self.max_connections}")
            log.warn(
                "listener {listener}: at {cap}, refused {n} connection(s)",
                listener=self.cfg.name, cap=cap, n=self._refused_since_log,
            )
            self._refusal_logged_at = now
            self._refused_since_log = 0


class _BackendConnector(protocol.ClientFactory):
    """One connect attempt. Late callbacks of an attempt that already timed out
    are ignored by the frontend (it compares attempt objects)."""

    noisy = False

    def __init__(self, frontend: "Frontend", backend: Backend, tls: bool = False) -> None:
        self.frontend = frontend
        self.backend = backend
        #: TLS to the backend: "connected" means handshake done (and verified).
        self.tls = tls
        self.side: BackendSide | None = None

    def buildProtocol(self, addr: Any) -> "BackendSide":
        self.side = BackendSide(self.frontend, self)
        return self.side

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.frontend._connect_failed(self, reason)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class BackendSide(protocol.Protocol):
    """The backend leg: hands bytes to the client transport."""

    def __init__(self, frontend: "Frontend", attempt: _BackendConnector) -> None:
        self.frontend = frontend
        self.attempt = attempt
        self.peer: Any = None  # the client transport, once relaying
        self.handshaking = attempt.tls

    def connectionMade(self) -> None:
        if not self.handshaking:
            self.frontend._backend_connected(self)

    def handshakeCompleted(self) -> None:
        if self.handshaking:
            self.handshaking = False
            self.frontend._backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        fe = self.frontend
        fe.bytes_out += len(data)
        fe.last_activity = fe.seconds()
        self.peer.write(data)

    def readConnectionLost(self) -> None:
        self.frontend._backend_read_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.handshaking:
            # TLS never came up (refused or unverified certificate): a connect failure.
            self.handshaking = False
            self.frontend._connect_failed(self.attempt, reason)
            return
        self.frontend._backend_lost(self, reason)


@implementer(IHalfCloseableProtocol)
class Frontend(protocol.Protocol):
    """The client leg, and the owner of one relayed connection's lifecycle:
    (header) -> connecting -> relaying -> closed."""

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.seconds = factory.reactor.seconds
        #: The pool relayed to (the listener's, or the one SNI passthrough chose).
        self.pool_name: str | None = factory.pool_name
        self.peer: Any = None  # the backend transport, once relaying
        self.backend_side: BackendSide | None = None
        self.backend: Backend | None = None
        self.attempts: ConnectAttempts | None = None
        self.attempt: _BackendConnector | None = None
        self.connector: Any = None
        self.client: tuple[str, int] | None = None
        #: The peer address counted against max_connections_per_client.
        self.counted_host: str | None = None
        self.dest: tuple[str, int] | None = None
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.paused = False
        self.parser: ProxyHeaderParser | None = None
        self.refused = False
        self.closed = False
        self.client_gone = False
        self.client_eof = False
        self.backend_eof = False
        self.backend_gone = False
        self.aborting_backend = False
        self.outcome: str | None = None
        self.error: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.wall_start = 0.0
        self.connected_at = 0.0
        self.last_activity = 0.0
        self.pool: Any = None
        self.connect_timeout = 0.0
        self.attempt_started = 0.0
        self._timer: Any = None  # header, connect or idle timer (one at a time)

    # -- client connection -----------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        now = self.seconds()
        if f.active >= f.max_connections:
            self.refused = True
            f.note_refusal(now)
            self.transport.loseConnection()
            traffic = getattr(f.runtime, "traffic", None)
            if traffic is not None and traffic.subscribers:
                peer = self.transport.getPeer()
                traffic.publish(
                    TrafficRecord(
                        kind="tcp", listener=f.cfg.name, start=time.time(), duration=0.0,
                        client=f"{peer.host}:{peer.port}", pool=self.pool_name,
                        outcome="rejected", error=f"at max_connections={f.max_connections}",
                    )
                )
            return
        peer = self.transport.getPeer()
        if not f.clients.admit(peer.host):
            self.refused = True
            f.note_refusal(now, per_client=True)
            self.transport.loseConnection()
            return
        self.counted_host = peer.host
        f.active += 1
        f.total += 1
        if f.service is not None:
            f.service.track(self)
        self.started = self.last_activity = now
        self.wall_start = time.time()
        self.client = (peer.host, peer.port)
        if f.accept_proxy:
            self.parser = ProxyHeaderParser()
            self._timer = f.reactor.callLater(f.header_timeout, self._header_timed_out)
            return
        # The client keeps being read while the backend connect is under way
        # (its first bytes then go out the moment the backend is up), up to
        # PENDING_LIMIT; beyond that it is paused and the kernel holds the rest.
        self._start_connecting()

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            self.bytes_in += len(data)
            self.last_activity = self.seconds()
            peer.write(data)
            return
        self.bytes_in += len(data)
        if self.parser is None:
            self._hold(data)
            return
        try:
            header = self.parser.feed(data)
        except ProxyProtocolError as e:
            self._reject(f"bad PROXY header: {e}")
            return
        if header is None:
            return
        self._cancel_timer()
        if header.source is not None:
            self.client = header.source
            self.dest = header.dest
        rest, self.parser = self.parser.rest, None
        if rest:
            self._hold(rest)
        self._start_connecting()

    def _hold(self, data: bytes) -> None:
        """Keep bytes read before the backend is connected; pause the client
        once PENDING_LIMIT is reached so a connect that takes long cannot make
        the relay buffer without bound."""
        self.pending.append(data)
        self.pending_len += len(data)
        if self.pending_len >= PENDING_LIMIT and not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self.client_eof:
            return
        self.client_eof = True
        if self.peer is None:
            if self.parser is not None:
                self._reject("client closed before its PROXY header")
            # Else still connecting: the half-close is forwarded once connected.
            return
        # Nothing more will come from the client: stop it being the backend's producer.
        _unregister(self.peer)
        self.peer.loseWriteConnection()
        self._maybe_both_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.refused:
            return
        self.client_gone = True
        self._cancel_timer()
        clean = isinstance(reason.value, error.ConnectionDone)
        if not clean and self.outcome is None:
            self.outcome = "cancelled"
            self.error = self.error or f"client: {reason.getErrorMessage()}"
        if self.peer is not None and not self.backend_gone:
            if clean:
                _unregister(self.peer)
                self.peer.loseConnection()
            else:
                self._abort_backend()
        elif self.attempt is not None:
            # Still connecting: give up the attempt.
            attempt, self.attempt = self.attempt, None
            self._stop_connector()
            if attempt.side is not None and attempt.side.transport is not None:
                attempt.side.transport.abortConnection()  # mid TLS handshake
            self._report_failure(attempt.backend, "cancelled")
        self._maybe_finish()

    # -- listener drain contract ----------------------------------------------

    def drain(self) -> None:
        """L4 cannot end a connection cleanly on its own: let the relay finish."""

    def abort(self) -> None:
        self.outcome = self.outcome or "cancelled"
        self.error = self.error or "aborted (drain timeout)"
        self._abort_all()

    # -- connecting -------------------------------------------------------------

    def _start_connecting(self) -> None:
        f = self.factory
        pool = f.runtime.pools.get(self.pool_name)
        if pool is None:
            self._give_up(f"pool {self.pool_name!r} does not exist")
            return
        pcfg = f.pool_config(self.pool_name)
        self.pool = pool
        self.connect_timeout = pcfg.connect_timeout
        host = self.client[0] if self.client else None
        self.attempts = ConnectAttempts(
            pool=pool,
            max_attempts=max(1, pcfg.connect_attempts),
            key=host.encode() if host else None,
            client=host,
            retry=connect_retry(f, pcfg),
        )
        self._connect_next()

    def _connect_next(self) -> None:
        now = self.seconds()
        backend = self.attempts.next(now)
        if backend is None:
            n = self.attempts.count
            self._give_up(
                "no usable backend" if n == 0 else f"connect failed on {n} backend(s)"
            )
            return
        tls_state = getattr(self.factory.runtime, "tls", None)
        btls = tls_state.backend_tls(self.pool_name) if tls_state is not None else None
        attempt = _BackendConnector(self, backend, tls=btls is not None)
        self.attempt = attempt
        self.attempt_started = now
        r = self.factory.reactor
        self._timer = r.callLater(self.connect_timeout, self._connect_timed_out, attempt)
        target: Any = attempt
        if btls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            target = TLSMemoryBIOFactory(btls.creator_for(backend.host, key=backend.address), True, attempt, clock=r)
        # No Twisted timeout (one timer less per connection): ours above decides.
        self.connector = r.connectTCP(backend.host, backend.port, target, timeout=None)

    def _connect_timed_out(self, attempt: _BackendConnector) -> None:
        self._timer = None
        if attempt is not self.attempt:
            return
        self.attempt = None
        self._stop_connector()
        side = attempt.side
        if side is not None and side.handshaking and side.transport is not None:
            side.transport.abortConnection()  # TCP up, TLS handshake too slow
        self._attempt_failed(attempt.backend, f"connect timeout ({self.connect_timeout:g}s)")

    def _connect_failed(self, attempt: _BackendConnector, reason: Failure) -> None:
        if attempt is not self.attempt:
            return
        self.attempt = None
        self._cancel_timer()
        self._attempt_failed(attempt.backend, reason.getErrorMessage())

    def _attempt_failed(self, backend: Backend, why: str) -> None:
        self._report_failure(backend, "gateway")
        self.attempts.failed(backend)
        log.info(
            "listener {listener}: connect to {backend} failed: {why}",
            listener=self.factory.cfg.name, backend=backend.address, why=why,
        )
        self.error = f"{backend.address}: {why}"
        if self.client_gone:
            self._maybe_finish()
            return
        self._connect_next()

    def _report_failure(self, backend: Backend, outcome: str) -> None:
        """A connect that never became a connection still counts as work that
        failed on ``backend``, so passive health sees L4 connect failures."""
        self.pool.on_start(backend)
        self.pool.on_finish(backend, self.seconds() - self.attempt_started, False, outcome)

    def _stop_connector(self) -> None:
        c, self.connector = self.connector, None
        if c is not None:
            try:
                c.stopConnecting()
            except error.NotConnectingError:
                pass

    def _give_up(self, why: str) -> None:
        self.factory.failed += 1
        self.outcome = "gateway"
        if self.error is None or not self.attempts or self.attempts.count == 0:
            self.error = why
        else:
            self.error = f"{why}; last: {self.error}"
        log.warn(
            "listener {listener}: closing client {client}: {why}",
            listener=self.factory.cfg.name, client=self._client_str(), why=self.error,
        )
        self.pending = []
        self.transport.loseConnection()

    def _backend_connected(self, side: BackendSide) -> None:
        if side.attempt is not self.attempt or self.client_gone:
            # A connect that completed after we gave up on it.
            side.transport.abortConnection()
            return
        self._cancel_timer()
        self.attempt = None
        self.connector = None
        backend = side.attempt.backend
        self.backend = backend
        self.backend_side = side
        self.attempts.connected(backend)
        self.connected_at = self.last_activity = self.seconds()
        self.pool.on_start(backend)
        f = self.factory
        bt = side.transport
        ct = self.transport
        fastio.accelerate(bt, eager=f.eager, read_size=f.read_size)
        fastio.accelerate(ct, eager=f.eager, read_size=f.read_size)
        self.peer = bt
        side.peer = ct
        ct.registerProducer(bt, True)
        bt.registerProducer(ct, True)
        if f.send_proxy is not None:
            if self.dest is None:
                host = ct.getHost()
                self.dest = (host.host, host.port)
            self.pending.insert(0, encode(f.send_proxy, self.client, self.dest))
        if self.pending:
            bt.write(b"".join(self.pending))
            self.pending = []
        if self.client_eof:
            _unregister(bt)
            bt.loseWriteConnection()
        elif self.paused:
            self.paused = False
            ct.resumeProducing()
        self._timer = f.reactor.callLater(f.idle_timeout, self._idle_check)

    # -- relaying ---------------------------------------------------------------

    def _backend_read_eof(self) -> None:
        if self.backend_eof:
            return
        self.backend_eof = True
        if not self.client_gone:
            _unregister(self.transport)
            self.transport.loseWriteConnection()
        self._maybe_both_eof()

    def _maybe_both_eof(self) -> None:
        if self.client_eof and self.backend_eof:
            # Both directions finished: close both once their buffers flush.
            if not self.client_gone:
                self.transport.loseConnection()
            if not self.backend_gone:
                self.peer.loseConnection()

    def _backend_lost(self, side: BackendSide, reason: Failure) -> None:
        if side is not self.backend_side:
            return
        self.backend_gone = True
        if not isinstance(reason.value, error.ConnectionDone) and not self.aborting_backend:
            if self.outcome is None:
                self.outcome = "gateway"
                self.error = f"backend {self.backend.address}: {reason.getErrorMessage()}"
            if not self.client_gone:
                # Pass the reset on: a clean close would make a cut-off stream look complete.
                self.transport.abortConnection()
        elif not self.client_gone:
            _unregister(self.transport)
            self.transport.loseConnection()
        self._maybe_finish()

    def _idle_check(self) -> None:
        self._timer = None
        if self.closed:
            return
        idle = self.factory.idle_timeout
        due = self.last_activity + idle
        now = self.seconds()
        if now < due:
            self._timer = self.factory.reactor.callLater(due - now, self._idle_check)
            return
        self.outcome = self.outcome or "cancelled"
        self.error = f"idle for {idle:g}s"
        log.info(
            "listener {listener}: closing idle connection from {client}",
            listener=self.factory.cfg.name, client=self._client_str(),
        )
        self._abort_all()

    def _header_timed_out(self) -> None:
        self._timer = None
        self._reject(f"no PROXY header within {self.factory.header_timeout:g}s")

    def _reject(self, why: str) -> None:
        """Close a client that failed the PROXY handshake; no backend was involved."""
        self._cancel_timer()
        self.parser = None
        self.outcome = "rejected"
        self.error = why
        log.info(
            "listener {listener}: closing client {client}: {why}",
            listener=self.factory.cfg.name, client=self._client_str(), why=why,
        )
        self.transport.abortConnection()

    # -- closing ------------------------------------------------------------------

    def _abort_backend(self) -> None:
        if self.peer is not None and not self.backend_gone:
            self.aborting_backend = True
            self.peer.abortConnection()

    def _abort_all(self) -> None:
        self._abort_backend()
        if self.attempt is not None:
            self.attempt = None
            self._stop_connector()
        if not self.client_gone:
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        t, self._timer = self._timer, None
        if t is not None and t.active():
            t.cancel()

    def _maybe_finish(self) -> None:
        if self.closed or not self.client_gone:
            return
        if self.backend_side is not None and not self.backend_gone:
            return
        if self.attempt is not None:
            return
        self.closed = True
        self._cancel_timer()
        if self.attempts is not None:
            self.attempts.finish()
        f = self.factory
        f.active -= 1
        if self.counted_host is not None:
            f.clients.release(self.counted_host)
        if f.service is not None:
            f.service.untrack(self)
        now = self.seconds()
        outcome = self.outcome or "ok"
        if self.backend is not None:
            self.pool.on_finish(self.backend, now - self.connected_at, outcome == "ok" or outcome == "cancelled", outcome)
        traffic = getattr(f.runtime, "traffic", None)
        if traffic is not None and traffic.subscribers:
            traffic.publish(
                TrafficRecord(
                    kind="tcp",
                    listener=f.cfg.name,
                    start=self.wall_start,
                    duration=now - self.started,
                    client=self._client_str(),
                    pool=self.pool_name,
                    backend=self.backend.address if self.backend else (
                        self.attempts.tried[-1].address if self.attempts and self.attempts.tried else None
                    ),
                    bytes_in=self.bytes_in,
                    bytes_out=self.bytes_out,
                    tries=self.attempts.count if self.attempts else 0,
                    outcome=outcome,
                    error=self.error,
                )
            )

    def _client_str(self) -> str:
        if self.client is None:
            return "?"
        return join_address(*self.client)


class TCPListenerService(ListenerService):
    """A ListenerService whose drain waits as long as its pool's drain_timeout."""

    def __init__(self, cfg: ListenerConfig, runtime: Any) -> None:
        self.relay = RelayFactory(cfg, runtime)
        super().__init__(cfg.name, cfg.bind, self.relay, runtime.reactor, backlog=cfg.backlog)
        self.relay.service = self

    def prepare_reconfigure(self, cfg: ListenerConfig) -> Any:
        """Check ``cfg`` (ValueError names what is wrong) without changing
        the running listener; the callable returned applies it."""
        RelayFactory(cfg, self.relay.runtime)  # configure() checks before it sets anything
        return lambda: self.reconfigure(cfg)

    def reconfigure(self, cfg: ListenerConfig) -> None:
        """Hot reload with the same bind: new settings for new connections."""
        self.relay.configure(cfg)

    def cut_backend(self, backend: Backend) -> int:
        """The backend's drain_timeout passed: abort relays still using it."""
        cut = [c for c in list(self.connections) if getattr(c, "backend", None) is backend]
        for conn in cut:
            conn.error = conn.error or f"backend {backend.address}: drain timeout"
            conn.abort()
        return len(cut)

    def stopService(self, drain_timeout: float | None = None) -> Any:
        if drain_timeout is None:
            drain_timeout = self.relay.pool_config().drain_timeout
        return super().stopService(drain_timeout)


def tcp_listener(cfg: ListenerConfig, runtime: Any) -> TCPListenerService:
    """The service for a ``mode: tcp`` listener (the lead's service tree calls this)."""
    return TCPListenerService(cfg, runtime)
