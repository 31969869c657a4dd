"""One keep-alive connection to a backend: a thin Twisted adapter around the
sans-IO L{ResponseParser}, and the backend side of the exchange machine
(L{lbtwist.l7.machine.BackendSide}). It serves one request at a time for
whoever holds it (an L{lbtwist.l7.machine.Attempt}): it carries out the
machine's actions (write, set or clear a timeout, pause, release, discard)
and turns what the backend does into the machine's events (the parser's
response events go to the exchange directly; failures and flow control to
the attempt). The connection pool decides whether it is reused.

Failures are named so the client gets the right status and the keep-alive
race can be told apart: "closed"/"reset" with ``received`` False means the
backend dropped the connection before sending a single byte of the answer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error as terror
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lbtwist import fastio
from lbtwist.l7.errors import ParseError
from lbtwist.l7.parser import BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, Response, ResponseParser
from lbtwist.l7.timers import Deadline

if TYPE_CHECKING:
    from lbtwist.l7.connpool import BackendConnections

CONNECTING, IDLE, BUSY, TUNNEL, CLOSED = range(5)

#: Parser states in which a response body is in progress.
_IN_BODY = frozenset((BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE))


@implementer(IPushProducer)
class _WriteFlow:
    """Registered on the connection's own transport: tells the user when the
    request body outruns the backend (so the client's reads pause)."""

    __slots__ = ("conn",)

    def __init__(self, conn: "BackendConnection") -> None:
        self.conn = conn

    def pauseProducing(self) -> None:
        conn = self.conn
        conn.write_blocked = True
        if conn.user is not None:
            conn.user.backend_write_blocked()

    def resumeProducing(self) -> None:
        conn = self.conn
        conn.write_blocked = False
        if conn.user is not None:
            conn.user.backend_write_unblocked()

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class BackendConnection(Protocol):
    """A pooled HTTP/1.1 connection to one backend."""

    #: Set (by the pool) on a TLS connection until its handshake has
    #: completed and the certificate verified: only then is it "connected".
    handshaking = False
    handshake_timed_out = False

    def __init__(self, owner: "BackendConnections") -> None:
        self.owner = owner
        clock = owner.clock
        self.clock = clock
        self.created = clock.seconds()
        self.state = CONNECTING
        #: Requests sent on this connection so far.
        self.requests = 0
        #: The Attempt using the connection (None while idle).
        self.user: Any = None
        #: The Attempt waiting for this connection to be established.
        self.pending: Any = None
        self.parser = ResponseParser(self)
        #: Any byte received since the current request was sent.
        self.received = False
        self.write_blocked = False
        self.read_paused = False
        #: Close instead of reusing when released (drained/removed backend).
        self.retire = False
        self.deadline = Deadline(clock, self._timeout)
        self.tunnel: Any = None
        #: Receives the parser's events while a request is in progress.
        self.sink: Any = None
        self.body_timeout = 60.0
        self.idle_since = 0.0
        self._in_feed = False
        #: finish() called while parsing: release once the rest of the read is judged.
        self._release: bool | None = None

    def __repr__(self) -> str:
        return f"<BackendConnection {self.owner.backend.address} state={self.state} requests={self.requests}>"

    # -- Twisted ---------------------------------------------------------------

    def connectionMade(self) -> None:
        t = self.transport
        pools = self.owner.pools
        if pools is None or pools.eager:
            fastio.accelerate(t)
        try:
            t.setTcpNoDelay(True)
        except Exception:  # not a TCP transport (tests)
            pass
        t.registerProducer(_WriteFlow(self), True)
        if self.handshaking:
            self.deadline.set(self.owner.connect_timeout, "handshake")
            return
        self.owner.connected(self)

    def handshakeCompleted(self) -> None:  # IHandshakeListener (TLS backends)
        if self.handshaking:
            self.handshaking = False
            self.deadline.cancel()
            self.owner.connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.state == TUNNEL:
            self.tunnel.from_backend(data)
            return
        user = self.user
        if user is None:
            # Bytes on an idle connection: the backend is confused (or talks
            # first); never hand such a connection to a request.
            self.abort()
            return
        sink = self.sink
        self.received = True
        self._in_feed = True
        parser = self.parser
        try:
            parser.feed(data)
        except ParseError as e:
            self._in_feed = False
            self._release = None
            self._fail("garbage", e.reason)
            return
        self._in_feed = False
        release = self._release
        if release is not None:
            # Bytes after the end of the response mean a confused backend:
            # such a connection is never reused.
            self._release = None
            if self.state == BUSY:
                self.owner.release(self, release and not self.retire and not parser.held)
        elif self.state == TUNNEL:
            rest = parser.take_buffer()
            if rest:
                self.tunnel.from_backend(rest)
        elif parser.state in _IN_BODY and self.user is not None and not self.read_paused:
            # A response is in progress beyond this read: bound the next stall
            # (once per read, not per parser event).
            self.deadline.set(self.body_timeout, "body")
        if not sink.done:
            sink.flush()  # the end of an event: what it queued for the client goes out

    def connectionLost(self, reason: Failure = terror.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.handshaking:
            # TLS never came up (e.g. the certificate did not verify): a connect failure.
            self.handshaking = False
            self.deadline.cancel()
            if self.handshake_timed_out:
                reason = Failure(terror.TimeoutError("TLS handshake timed out"))
            self.connect_failed(reason)
            return
        was = self.state
        self.state = CLOSED
        self.deadline.cancel()
        self.owner.lost(self, was)
        if was == TUNNEL:
            if self.tunnel is not None:
                self.tunnel.backend_lost()
            return
        user = self.user
        if user is None:
            return
        sink = self.sink
        if self.parser.eof():  # a close-delimited body just ended
            sink.flush()
            return
        self.user = None
        code = "closed" if reason.check(terror.ConnectionDone) else "reset"
        user.backend_failed(self, code, "backend closed the connection" if code == "closed" else "connection reset by backend")

    # -- used by the pool --------------------------------------------------------

    def connect_failed(self, reason: Failure) -> None:
        self.state = CLOSED
        if reason.check(terror.TimeoutError):
            code, detail = "connect-timeout", "connect timed out"
        elif reason.check(terror.ConnectionRefusedError):
            code, detail = "connect-refused", "connection refused"
        elif self.owner.tls is not None:
            code, detail = "connect-failed", f"TLS handshake failed: {reason.getErrorMessage()}"
        else:
            code, detail = "connect-failed", f"connect failed: {reason.getErrorMessage()}"
        self.owner.connect_failed(self, code, detail)

    # -- used by the request ---------------------------------------------------------

    def start(self, user: Any, sink: Any, head_request: bool, body_timeout: float) -> None:
        """``user`` (an Attempt) sends a request now; its response is parsed
        next and its events (``on_response``, ``on_body``, ``on_end``...) go
        straight to ``sink`` (the exchange relaying it). ``body_timeout``
        bounds a stall in the middle of the response body."""
        self.body_timeout = body_timeout
        self.state = BUSY
        self.user = user
        self.sink = sink
        self.requests += 1
        self.received = False
        self.deadline.clear()  # the response timeout starts once the request is written
        parser = self.parser
        parser.handler = sink
        parser.expect(head_request)

    def send_request(self, user: Any, sink: Any, head_request: bool, body_timeout: float, head: bytes,
                     response_timeout: float) -> None:
        """L{start}, write the whole request ``head`` (a request without a
        body) and start the response timeout, in one call."""
        self.body_timeout = body_timeout
        self.state = BUSY
        self.user = user
        self.sink = sink
        self.requests += 1
        self.received = False
        parser = self.parser
        parser.handler = sink
        parser.expect(head_request)
        self.transport.write(head)
        self.deadline.set(response_timeout, "response")

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def start_tunnel(self, tunnel: Any) -> None:
        """101: from now on the bytes go to ``tunnel``, both ways."""
        self.state = TUNNEL
        self.deadline.clear()
        self.tunnel = tunnel
        self.user = tunnel

    def discard_rest(self) -> None:
        """Parse the rest of the response into nothing (it was withheld for a retry)."""
        self.parser.handler = _DISCARD

    def finish(self, reusable: bool) -> None:
        """The user is done with the connection: pool it or close it."""
        self.user = None
        self.sink = None
        self.parser.handler = self
        self.deadline.clear()
        if self.state == BUSY:
            if self._in_feed:
                self._release = reusable
            else:
                self.owner.release(self, reusable and not self.retire and self.parser.buffered() == 0)

    def pause_reading(self) -> None:
        if not self.read_paused and self.state != CLOSED:
            self.read_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.read_paused and self.state != CLOSED:
            self.read_paused = False
            self.transport.resumeProducing()

    def set_timeout(self, delay: float, kind: str) -> None:
        self.deadline.set(delay, kind)

    def clear_timeout(self) -> None:
        self.deadline.clear()

    def timeout_kind(self) -> str | None:
        """The kind of the last timeout set (response, write, body)."""
        return self.deadline.kind

    def close(self) -> None:
        """Close gracefully (an idle or retired connection)."""
        if self.state == CLOSED or self.transport is None:
            return
        self.deadline.cancel()
        t = self.transport
        _unregister(t)
        t.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (a request was abandoned mid-way)."""
        self.user = None
        if self.state == CLOSED or self.transport is None:
            return
        self.deadline.cancel()
        _unregister(self.transport)
        self.transport.abortConnection()

    def cut(self) -> None:
        """Drop the connection at once but let the request on it find out
        (as a reset): the backend's drain_timeout ran out."""
        if self.state == CLOSED or self.transport is None:
            return
        self.transport.abortConnection()

    # -- parser callbacks while no request holds the connection -------------------------
    # (while one does, the parser reports to the request's sink directly)

    def on_informational(self, resp: Response) -> None:
        raise ParseError(502, "unsolicited response")

    on_response = on_informational

    def on_body(self, data: bytes) -> None:
        raise ParseError(502, "unsolicited response")

    def on_end(self) -> None:
        raise ParseError(502, "unsolicited response")

    # -- internals --------------------------------------------------------------------

    def _timeout(self, kind: str) -> None:
        if kind == "handshake":
            if self.handshaking and self.transport is not None:
                self.handshake_timed_out = True
                self.transport.abortConnection()  # connectionLost reports it
            return
        if self.state != BUSY:
            return
        if kind == "response":
            self._fail("timeout", "no response in time")
        elif kind == "write":
            self._fail("timeout", "backend stopped reading the request body")
        else:  # "body": the backend stalled mid-response
            self._fail("timeout", "response body stalled")

    def _fail(self, code: str, detail: str) -> None:
        user = self.user
        self.abort()
        if user is not None:
            user.backend_failed(self, code, detail)


class ConnectFactory(ClientFactory):
    """Connects exactly one L{BackendConnection}."""

    noisy = False

    def __init__(self, conn: BackendConnection) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return self.conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.conn.connect_failed(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass


def _unregister(transport: Any) -> None:
    """Unregister our flow producer if it is still registered (closing paths
    may run twice)."""
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()


class _Discard:
    """Parser sink for the rest of a response dropped for a retry."""

    def on_informational(self, resp: Response) -> None:
        pass

    def on_response(self, resp: Response) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass


_DISCARD = _Discard()
