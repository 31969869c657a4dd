"""The part every listener shares: bind through an endpoint description, track
live connections, stop accepting then drain on stop."""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

log = Logger(namespace="lbtwist.listener")

#: Listen queue when the kernel's limit cannot be read (Linux's own default since 5.4).
FALLBACK_BACKLOG = 4096
_SOMAXCONN = "/proc/sys/net/core/somaxconn"
#: Endpoint types whose description takes ``backlog=``.
_BACKLOG_KINDS = ("tcp", "tcp6", "ssl", "unix")
#: Connections one accept pass takes at most (Twisted's own count adapts down
#: to what the previous pass found, and climbs back 20 a pass: after a quiet
#: spell a connection burst waited many loop passes in the listen queue).
ACCEPT_BATCH = 16


def default_backlog(path: str = _SOMAXCONN) -> int:
    """The kernel's ``net.core.somaxconn`` (listen() silently caps any backlog
    there), else L{FALLBACK_BACKLOG}."""
    try:
        with open(path) as f:
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return FALLBACK_BACKLOG
    return value if value > 0 else FALLBACK_BACKLOG


def with_backlog(bind: str, backlog: int | None) -> str:
    """``bind`` with ``:backlog=N`` appended (``backlog`` None: L{default_backlog}),
    unless the description sets its own or its endpoint type takes none."""
    from lbtwist.config.binds import split_description

    kind, args, kwargs = split_description(bind)
    if kind.isdigit() and not args:  # the bare "8080" form is tcp
        kind = "tcp"
    if kind not in _BACKLOG_KINDS or "backlog" in kwargs:
        return bind
    return f"{bind}:backlog={backlog if backlog is not None else default_backlog()}"


def accept_in_batches(port: Any, batch: int = ACCEPT_BATCH) -> bool:
    """Make a listening TCP port accept up to ``batch`` queued connections per
    readable event (all that are queued, bounded so a flood cannot starve
    established connections of a loop pass). False when ``port`` is not
    Twisted's TCP port (then it keeps its own policy)."""
    from twisted.internet import tcp

    cls = type(port)
    if not isinstance(port, tcp.Port):
        return False
    if not getattr(cls, "_lbtwist_batched", False):
        cls = _batched_class(cls)
        port.__class__ = cls
    port._accept_batch = batch
    return True


def _close_fd(result: Any, fd: int) -> Any:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
    return result


def socket_family(fd: int) -> int:
    import socket

    s = socket.socket(fileno=fd)
    try:
        return s.family
    finally:
        s.detach()


def adopt_stream(reactor: Any, fd: int, factory: Any, backlog: int) -> IListeningPort:
    """Accept on an inherited bound socket, listening from now on (Twisted
    dup()s ``fd``; the caller's copy stays open, so a later listener can
    adopt it again). A socket already listening (a replaced worker's) keeps
    its queue: listen() again only sets the backlog."""
    import socket

    s = socket.socket(fileno=fd)
    try:
        s.listen(backlog)
    finally:
        s.detach()
    port = reactor.adoptStreamPort(fd, socket_family(fd), factory)
    accept_in_batches(port)
    return port


class PerClientLimit:
    """Open connections per client address, capped (``max_connections_per_client``;
    0: no cap, nothing counted). A dict lookup per accept and per close."""

    __slots__ = ("cap", "counts")

    def __init__(self, cap: int = 0) -> None:
        self.cap = cap
        self.counts: dict[str, int] = {}

    def admit(self, host: str) -> bool:
        """Count one more connection from ``host``; False (not counted) at the cap."""
        if not self.cap:
            return True
        n = self.counts.get(host, 0)
        if n >= self.cap:
            return False
        self.counts[host] = n + 1
        return True

    def release(self, host: str) -> None:
        n = self.counts.get(host)
        if n is None:
            return
        if n <= 1:
            del self.counts[host]
        else:
            self.counts[host] = n - 1

    def open_from(self, host: str) -> int:
        return self.counts.get(host, 0)


class RefusalLog:
    """One warning per ``interval`` for a kind of refusal, with how many
    happened since the last (a flood must not cost a log line per connection)."""

    __slots__ = ("_clock", "interval", "_last", "_since")

    def __init__(self, clock: Any, interval: float = 10.0) -> None:
        self._clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, what: str, detail: str) -> None:
        """Count a refusal of kind ``what``; logs when the interval has passed."""
        now = self._clock.seconds()
        n = self._since.get(what, 0) + 1
        if now - self._last.get(what, float("-inf")) >= self.interval:
            log.warn("{what}: {n} in the last {interval:g}s (latest: {detail})",
                     what=what, n=n, interval=self.interval, detail=detail)
            self._last[what] = now
            n = 0
        self._since[what] = n


_batched: dict[type, type] = {}


class _FixedAccepts:
    """``numberAccepts`` as ``_accept_batch`` whatever ``doRead`` stores: its
    adaptive count is the only thing replaced; the accept loop itself (EAGAIN,
    EMFILE handling) stays Twisted's."""

    _lbtwist_batched = True
    _accept_batch = ACCEPT_BATCH

    @property
    def numberAccepts(self) -> int:
        return self._accept_batch

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass


def _batched_class(cls: type) -> type:
    out = _batched.get(cls)
    if out is None:
        out = type(f"Batched{cls.__name__}", (_FixedAccepts, cls), {})
        _batched[cls] = out
    return out


class ListenerService(Service):
    """Listens on ``bind`` with ``factory``. Subclasses/factories register each
    connection with L{track} / L{untrack}; connections provide ``drain()``
    (finish current work, then close) and ``abort()``."""

    def __init__(self, name: str, bind: str, factory: Any, reactor: Any, backlog: int | None = None) -> None:
        self.setName(name)
        self.bind = bind
        #: Listen queue length (None: L{default_backlog}).
        self.backlog = backlog
        self.factory = factory
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.connections: set[Any] = set()
        self._drained: defer.Deferred | None = None
        #: lbtwist.tls ServerTLS when the listener terminates TLS (its ticket
        #: keys rotate while the service runs).
        self.tls: Any = None
        #: a listening socket opened by the master (worker processes): used
        #: instead of binding (L{inherit_socket})
        self._inherited: int | None = None

    def inherit_socket(self, fd: int) -> None:
        """Listen on ``fd`` (a bound, listening, non-blocking socket the
        master passed down) instead of binding ``bind``."""
        self._inherited = fd

    # bound in privilegedStartService so a port < 1024 can bind before dropping privileges
    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind_port()

    def listen(self) -> IListeningPort:
        """Bind synchronously; CannotListenError propagates so twistd exits non-zero."""
        if self._inherited is not None:
            return adopt_stream(self.reactor, self._inherited, self.factory,
                                self.backlog if self.backlog is not None else default_backlog())
        from twisted.internet import endpoints  # pyOpenSSL: not in a worker, which adopts its sockets

        ep = endpoints.serverFromString(self.reactor, with_backlog(self.bind, self.backlog))
        d = ep.listen(self.factory)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            raise RuntimeError(f"listener {self.name}: endpoint {self.bind!r} did not bind synchronously")
        if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
            result[0].raiseException()
        accept_in_batches(result[0])
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
        d = defer.maybeDeferred(port.stopListening)
        if self._inherited is not None:  # this process's last copy: new connections go to the other workers
            fd, self._inherited = self._inherited, None
            d.addBoth(_close_fd, fd)
        return d

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
