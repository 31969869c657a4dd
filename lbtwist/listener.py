"""The part every listener shares: bind through an endpoint description, track
live connections, stop accepting then drain on stop."""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

log = Logger(namespace="lbtwist.listener")


class ListenerService(Service):
    """Listens on ``bind`` with ``factory``. Subclasses/factories register each
    connection with L{track} / L{untrack}; connections provide ``drain()``
    (finish current work, then close) and ``abort()``."""

    def __init__(self, name: str, bind: str, factory: Any, reactor: Any) -> None:
        self.setName(name)
        self.bind = bind
        self.factory = factory
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.connections: set[Any] = set()
        self._drained: defer.Deferred | None = None
        #: lbtwist.tls ServerTLS when the listener terminates TLS (its ticket
        #: keys rotate while the service runs).
        self.tls: Any = None

    # bound in privilegedStartService so a port < 1024 can bind before dropping privileges
    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind_port()

    def listen(self) -> IListeningPort:
        """Bind synchronously; CannotListenError propagates so twistd exits non-zero."""
        ep = endpoints.serverFromString(self.reactor, self.bind)
        d = ep.listen(self.factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise RuntimeError(f"listener {self.name}: endpoint {self.bind!r} did not bind synchronously")
        if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    #: Which listening sockets this service can take over from another
    #: (L{adopt_port}): stream sockets (tcp, http) here, datagram for udp.
    port_kind = "stream"

    def bind_port(self) -> None:
        """Bind now, unless bound already. A reload binds every new port this
        way before it changes anything (CannotListenError propagates)."""
        if self.port is None:
            self.port = self.listen()

    def hand_over_port(self) -> IListeningPort | None:
        """Give up the listening socket without closing it (L{adopt_port});
        established connections stay with this service."""
        port, self.port = self.port, None
        return port

    def adopt_port(self, other: Any) -> None:
        """Accept on ``other``'s listening socket from now on: a reload that
        rebuilds a listener but keeps its bind text neither closes nor
        reopens the port, so no connection is refused in between."""
        port = other.hand_over_port()
        if port is None:
            self.bind_port()
            return
        # the port tells its factory when it starts/stops; keep that balanced
        self.factory.doStart()
        port.factory = self.factory
        other.factory.doStop()
        self.port = port

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.port = self.listen()
        if self.tls is not None:
            self.tls.start()
        log.info("listener {name} on {bind} ({address})", name=self.name, bind=self.bind, address=self.address)

    def track(self, conn: Any) -> None:
        self.connections.add(conn)

    def untrack(self, conn: Any) -> None:
        self.connections.discard(conn)
        if self._drained is not None and not self.connections:
            d, self._drained = self._drained, None
            d.callback(None)

    @property
    def address(self) -> Any:
        return self.port.getHost() if self.port is not None else None

    def stopService(self, drain_timeout: float = 30.0) -> defer.Deferred:
        """Stop accepting, ask every connection to drain, abort what is left
        after ``drain_timeout``."""
        super().stopService()
        if self.tls is not None:
            self.tls.stop()
        d = self.stop_accepting()
        d.addCallback(lambda _: self.drain(drain_timeout))
        return d

    def stop_accepting(self) -> defer.Deferred:
        """Close the listening socket; fires once the port is released (so a
        replacement may bind it). Established connections live on."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def drain(self, timeout: float) -> defer.Deferred:
        if not self.connections:
            return defer.succeed(None)
        for conn in list(self.connections):
            conn.drain()
        self._drained = defer.Deferred()
        timer = self.reactor.callLater(timeout, self._abort_rest)
        def done(r):
            if timer.active():
                timer.cancel()
            return r
        return self._drained.addBoth(done)

    def _abort_rest(self) -> None:
        if self.connections:
            log.warn("listener {name}: drain timeout, aborting {n} connections", name=self.name, n=len(self.connections))
        for conn in list(self.connections):
            conn.abort()
        if self._drained is not None and self.connections:
            # aborts untrack asynchronously; don't wait for them
            d, self._drained = self._drained, None
            d.callback(None)
