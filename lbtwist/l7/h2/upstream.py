"""HTTP/2 to backends (``pools[].protocol: h2``): h2c on plain pools, ALPN
``h2`` over TLS. One multiplexed connection carries many requests at once,
each on its own stream, up to a per-connection stream cap (the lower of
``connection_pool.max_streams`` and the backend's SETTINGS); connections
retire at ``max_age`` / ``max_requests`` (a GOAWAY from the backend retires
one too), so new backends get work and no client's traffic stays pinned:
every request is balanced on its own, then put on a connection to the
backend chosen.

L{UpstreamStream} is what an attempt holds: the exchange's backend side
(``send_request``, ``write``, ``finish``, ``abort``, timeouts, read
pausing). The exchange writes an HTTP/1.1 request (head, then the body,
chunked when its length is unknown); lbtwist's own L{RequestParser} reads it
back into a head and body pieces for the stream. Response events go to the
exchange as parsed L{Response} objects, trailers included (gRPC's
``grpc-status``)."""
from __future__ import annotations

from collections import deque
from typing import Any

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from twisted.internet import error as terror
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lbtwist.l7.errors import ParseError, reason_phrase
from lbtwist.l7.headers import HOP_BY_HOP
from lbtwist.l7.parser import Request, RequestParser, Response
from lbtwist.l7.h2.flow import take_piece
from lbtwist.l7.timers import Deadline
from lbtwist.resilience.limits import Limit

log = Logger(namespace="lbtwist.l7.h2.upstream")

#: Request body bytes waiting for the backend's window above which the client is paused.
HIGH = 128 * 1024
LOW = 32 * 1024
#: Receive window lbtwist gives each backend stream (and the connection).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20

#: Request fields an HTTP/2 request must not carry (RFC 9113 8.2.2; ``host`` becomes ``:authority``).
_DROP = HOP_BY_HOP | {b"host"}


def h2_request_headers(req: Request, scheme: bytes) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block for a request parsed from the exchange's head."""
    out = [(b":method", req.method), (b":scheme", scheme), (b":authority", req.host or b""),
           (b":path", req.target)]
    grpc = False
    for name, value in req.all_headers:
        n = name.lower()
        if n in _DROP:
            continue
        if n == b"content-type" and value[:16].lower() == b"application/grpc":
            grpc = True
        out.append((n, value))
    if grpc:
        out.append((b"te", b"trailers"))  # gRPC servers require it (the only te HTTP/2 allows)
    return out


def response_from_h2(headers: list[tuple[bytes, bytes]], head_request: bool, ended: bool) -> Response:
    """A L{Response} as the HTTP/1.1 parser makes one, from an HTTP/2 header block."""
    resp = Response()
    fields: list[tuple[bytes, bytes]] = []
    special: list[tuple[bytes, bytes]] = []
    resp.headers = fields
    resp.special_fields = special
    status = 0
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif name[:1] == b":" or name in HOP_BY_HOP:
            continue
        elif name == b"content-length":
            special.append((name, value))
            if value.isdigit():
                resp.content_length = int(value)
        else:
            fields.append((name, value))
            if name == b"x-request-id" and resp.request_id is None:
                resp.request_id = value
    resp.status = status
    resp.reason = reason_phrase(status)
    if head_request or status in (204, 304) or status < 200:
        resp.no_body = True
    elif ended and resp.content_length is None:
        resp.content_length = 0  # a complete answer without a body
    return resp


class _Discard:
    def on_informational(self, resp: Any) -> None:
        pass

    def on_response(self, resp: Any) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        pass

    def on_end(self, trailers: tuple = ()) -> None:
        pass

    done = False

    def flush(self) -> None:
        pass


_DISCARD = _Discard()


class UpstreamStream:
    """One request on an L{H2Upstream} (see the module docstring)."""

    write_blocked = False
    received = False
    user: Any = None
    sink: Any = None
    sid = 0

    def __init__(self, conn: "H2Upstream") -> None:
        self.conn = conn
        #: Requests the connection had carried before this one (the exchange's keep-alive race check).
        self.requests = conn.requests
        self.head_request = False
        self.body_timeout = 60.0
        self._parser = RequestParser(self, max_request_line=1 << 16, max_header_size=1 << 20, max_headers=10000)
        self._parser.max_body = 0
        self.pending: deque[bytes] = deque()
        self.pending_size = 0
        self.end_pending = False
        self.request_ended = False
        self.finished = False
        self.read_paused = False
        self.unacked = 0
        self.trailers: tuple = ()
        self.deadline = Deadline(conn.owner.clock, self._timeout)

    def __repr__(self) -> str:
        return f"<UpstreamStream {self.conn.owner.backend.address} sid={self.sid}>"

    # -- the backend side an attempt holds ------------------------------------------

    def start(self, user: Any, sink: Any, head_request: bool, body_timeout: float) -> None:
        self.user = user
        self.sink = sink
        self.head_request = head_request
        self.body_timeout = body_timeout
        self.deadline.clear()

    def send_request(self, user: Any, sink: Any, head_request: bool, body_timeout: float, head: bytes,
                     response_timeout: float) -> None:
        self.start(user, sink, head_request, body_timeout)
        self.write(head)
        self.deadline.set(response_timeout, "response")

    def write(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            self._parser.feed(data)
        except ParseError as e:  # the exchange's own serialisation: a bug, not the client's
            log.error("h2 backend stream: unparsable request from the exchange: {e}", e=e)
            self._fail("garbage", f"request not sendable over HTTP/2: {e.reason}")

    def start_tunnel(self, tunnel: Any) -> None:
        tunnel.backend_lost()
        self.abort()

    def discard_rest(self) -> None:
        self.sink = _DISCARD

    def finish(self, reusable: bool) -> None:
        """The exchange is done with this stream (its response ended). Whether
        the connection may be reused does not depend on one stream: a request
        body still being sent is stopped with RST_STREAM."""
        self._close_stream()

    def abort(self) -> None:
        """The request was abandoned: reset the stream (the connection stays)."""
        self._close_stream()

    def _close_stream(self) -> None:
        self.user = None
        self.sink = None
        self.deadline.cancel()
        self.pending.clear()
        self.pending_size = 0
        if not (self.finished and self.request_ended):
            self.conn.reset_stream(self, ErrorCodes.CANCEL)
        self.finished = True
        self.conn.stream_done(self, True)

    cut = abort

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            n, self.unacked = self.unacked, 0
            if n:
                self.conn.acknowledge(n, self.sid)

    def set_timeout(self, delay: float, kind: str) -> None:
        self.deadline.set(delay, kind)

    def clear_timeout(self) -> None:
        self.deadline.clear()

    def timeout_kind(self) -> str | None:
        return self.deadline.kind

    # -- the request, parsed back from the exchange's HTTP/1.1 bytes ---------------------------

    def on_request(self, req: Request) -> None:
        self.conn.open_stream(self, h2_request_headers(req, self.conn.scheme), end=not req.has_body)
        if not req.has_body:
            self.request_ended = True

    def on_body(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        self.pump()

    def on_end(self) -> None:
        if self.request_ended:
            return
        self.end_pending = True
        self.pump()

    def pump(self) -> None:
        if self.finished or not self.sid:
            return
        conn = self.conn
        h2c = conn.h2
        pending = self.pending
        try:
            while pending:
                window = h2c.local_flow_control_window(self.sid)
                if window <= 0:
                    break
                piece = take_piece(pending, min(window, h2c.max_outbound_frame_size))
                self.pending_size -= len(piece)
                h2c.send_data(self.sid, piece, end_stream=not pending and self.end_pending)
            if not pending and self.end_pending and not self.request_ended:
                if h2c.local_flow_control_window(self.sid) >= 0:
                    try:
                        h2c.end_stream(self.sid)
                    except ProtocolError:
                        pass  # already ended with the last DATA
                self.request_ended = True
        except ProtocolError as e:
            conn.flush()
            self._fail("reset", f"backend stream closed: {e}")
            return
        conn.flush()
        user = self.user
        if self.pending_size > HIGH and not self.write_blocked:
            self.write_blocked = True
            if user is not None:
                user.backend_write_blocked()
        elif self.write_blocked and self.pending_size <= LOW:
            self.write_blocked = False
            if user is not None:
                user.backend_write_unblocked()

    # -- the response, from the connection ----------------------------------------------------

    def response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.received = True
        sink = self.sink
        if sink is None:
            return
        resp = response_from_h2(headers, self.head_request, ended)
        if resp.status < 200:
            sink.on_informational(resp)
            return
        self.deadline.set(self.body_timeout, "body")
        sink.on_response(resp)

    def data(self, data: bytes, flow_len: int) -> None:
        self.received = True
        sink = self.sink
        if self.read_paused:
            self.unacked += flow_len
        else:
            self.conn.acknowledge(flow_len, self.sid)
        if sink is not None and data:
            self.deadline.set(self.body_timeout, "body")
            sink.on_body(data)

    def ended(self) -> None:
        self.finished = True
        self.deadline.cancel()
        sink = self.sink
        if sink is not None:
            sink.on_end(self.trailers)

    def failed(self, code: str, detail: str) -> None:
        """The stream or its connection failed."""
        if self.finished and self.user is None:
            return
        self.finished = True
        self.deadline.cancel()
        user = self.user
        self.user = None
        self.sink = None
        if user is not None:
            user.backend_failed(self, code, detail)

    def _fail(self, code: str, detail: str) -> None:
        user = self.user
        self.abort()
        if user is not None:
            user.backend_failed(self, code, detail)

    def _timeout(self, kind: str) -> None:
        if self.user is None:
            return
        if kind == "response":
            self._fail("timeout", "no response in time")
        elif kind == "write":
            self._fail("timeout", "backend stopped reading the request body")
        else:
            self._fail("timeout", "response body stalled")


@implementer(IPushProducer)
class _Flow:
    __slots__ = ("conn",)

    def __init__(self, conn: "H2Upstream") -> None:
        self.conn = conn

    def pauseProducing(self) -> None:
        self.conn.transport_blocked = True

    def resumeProducing(self) -> None:
        self.conn.transport_blocked = False
        self.conn.pump_all()

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class H2Upstream(Protocol):
    """One HTTP/2 connection to a backend, carrying many streams."""

    def __init__(self, owner: "H2BackendConnections") -> None:
        self.owner = owner
        self.h2: H2Connection = None  # type: ignore[assignment]
        self.streams: dict[int, UpstreamStream] = {}
        self.ready = False
        self.closed = False
        #: No new streams (GOAWAY received, retired by age or request count).
        self.retired = False
        self.requests = 0
        self.created = owner.clock.seconds()
        self.transport_blocked = False
        self.handshaking = owner.tls is not None
        self.scheme = b"https" if owner.tls is not None else b"http"
        #: Attempts waiting for this connection to come up.
        self.pending: list[Any] = []
        self.limit_slot: Any = None
        #: Closes the connection once it carried no stream for idle_timeout.
        self.idle = Deadline(owner.clock, self._idle)

    @property
    def capacity(self) -> int:
        cap = self.owner.max_streams
        if self.ready:
            cap = min(cap, self.h2.remote_settings.max_concurrent_streams)
        return cap

    def usable(self, now: float) -> bool:
        return (not self.closed and not self.retired and now - self.created < self.owner.max_age
                and self.requests < self.owner.max_requests)

    # -- Twisted -------------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self.handshaking:
            self._start()

    def handshakeCompleted(self) -> None:
        self.handshaking = False
        proto = getattr(self.transport, "negotiatedProtocol", None)
        if proto != b"h2":
            self.owner.connect_failed(self, "connect-failed", f"backend did not negotiate h2 by ALPN (got {proto!r})")
            self.closed = True
            self.transport.abortConnection()
            return
        self._start()

    def _start(self) -> None:
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:
            pass
        conn = self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings.update({SettingCodes.ENABLE_PUSH: 0, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - conn.inbound_flow_control_window)
        self.transport.registerProducer(_Flow(self), True)
        self.flush()
        self.ready = True
        self.owner.connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.closed or self.h2 is None:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self.flush()
            self._lost("garbage", f"HTTP/2 protocol error from backend: {e}")
            self.transport.abortConnection()
            return
        sinks = []
        for e in events:
            t = type(e)
            s = self.streams.get(getattr(e, "stream_id", 0) or 0)
            if t is ev.ResponseReceived or t is ev.InformationalResponseReceived:
                if s is not None:
                    s.response(e.headers, e.stream_ended is not None)
            elif t is ev.DataReceived:
                if s is not None:
                    s.data(e.data, e.flow_controlled_length)
                else:
                    self.acknowledge(e.flow_controlled_length, 0)
            elif t is ev.TrailersReceived:
                if s is not None:
                    s.trailers = tuple((n, v) for n, v in e.headers if n[:1] != b":")
            elif t is ev.StreamEnded:
                if s is not None:
                    s.ended()
            elif t is ev.StreamReset:
                if s is not None:
                    self.streams.pop(s.sid, None)
                    if e.error_code == ErrorCodes.REFUSED_STREAM:
                        # Never processed (RFC 9113 8.7): as safe to send elsewhere as a refused connect.
                        s.failed("connect-refused", "backend refused the stream (REFUSED_STREAM)")
                    else:
                        s.failed("reset", f"backend reset the stream (error code {e.error_code})")
            elif t is ev.WindowUpdated or t is ev.RemoteSettingsChanged:
                self.pump_all()
            elif t is ev.ConnectionTerminated:
                self.retired = True
                last = e.last_stream_id if e.last_stream_id is not None else 0
                for sid, st in list(self.streams.items()):
                    if sid > last:  # never processed: safe to send elsewhere
                        del self.streams[sid]
                        st.failed("connect-refused", "backend sent GOAWAY before this stream (not processed)")
            if s is not None and s.sink is not None and s.sink not in sinks:
                sinks.append(s.sink)
        self.flush()
        for sink in sinks:
            if not sink.done:
                sink.flush()
        if self.retired and not self.streams:
            self.close()

    def connectionLost(self, reason: Failure = terror.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.handshaking:
            self.handshaking = False
            self.closed = True
            self.owner.connect_failed(self, "connect-failed", f"TLS handshake failed: {reason.getErrorMessage()}")
            return
        code = "closed" if reason.check(terror.ConnectionDone) else "reset"
        self._lost(code, "backend closed the connection" if code == "closed" else "connection reset by backend")

    def _lost(self, code: str, detail: str) -> None:
        self.idle.cancel()
        if self.closed:
            return
        self.closed = True
        self.owner.lost(self)
        streams, self.streams = self.streams, {}
        for s in streams.values():
            s.failed(code, detail)

    # -- streams ------------------------------------------------------------------------

    def new_stream(self) -> UpstreamStream:
        self.idle.clear()
        self.requests += 1
        s = UpstreamStream(self)
        s.requests = self.requests - 1
        return s

    def open_stream(self, s: UpstreamStream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        sid = self.h2.get_next_available_stream_id()
        s.sid = sid
        self.streams[sid] = s
        try:
            self.h2.send_headers(sid, headers, end_stream=end)
        except ProtocolError as e:
            self.streams.pop(sid, None)
            s.failed("reset", f"cannot open a stream: {e}")
            return
        self.flush()

    def reset_stream(self, s: UpstreamStream, code: int) -> None:
        if self.streams.pop(s.sid, None) is None or self.closed:
            return
        try:
            self.h2.reset_stream(s.sid, code)
        except ProtocolError:
            pass
        self.flush()

    def stream_done(self, s: UpstreamStream, reusable: bool) -> None:
        self.streams.pop(s.sid, None)
        if not reusable:
            self.retired = True
        self.owner.stream_done(self)
        if not self.streams:
            if self.retired:
                self.close()
            elif not self.closed:
                self.idle.set(self.owner.idle_timeout, "idle")

    def _idle(self, kind: str) -> None:
        if not self.streams and not self.closed:
            self.close()

    def acknowledge(self, n: int, sid: int) -> None:
        if self.closed or not n:
            return
        try:
            self.h2.acknowledge_received_data(n, sid if sid else 1)
        except (ProtocolError, ValueError):
            pass
        self.flush()

    def pump_all(self) -> None:
        for s in list(self.streams.values()):
            if s.pending or s.end_pending:
                s.pump()

    def flush(self) -> None:
        if self.h2 is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.idle.cancel()
        try:
            self.h2.close_connection()
        except ProtocolError:
            pass
        self.flush()
        self.closed = True
        self.owner.lost(self)
        self.transport.loseConnection()

    def abort_all(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class _Connect(ClientFactory):
    noisy = False

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> H2Upstream:
        return self.conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        conn = self.conn
        conn.closed = True
        if reason.check(terror.TimeoutError):
            code, detail = "connect-timeout", "connect timed out"
        elif reason.check(terror.ConnectionRefusedError):
            code, detail = "connect-refused", "connection refused"
        else:
            code, detail = "connect-failed", f"connect failed: {reason.getErrorMessage()}"
        conn.owner.connect_failed(conn, code, detail)


class H2BackendConnections:
    """The multiplexed HTTP/2 connections to one backend; the same face as
    L{lbtwist.l7.connpool.BackendConnections} towards attempts and pools."""

    def __init__(self, backend: Any, reactor: Any, cfg: Any, connect_timeout: float) -> None:
        self.backend = backend
        self.reactor = reactor
        self.clock = reactor
        self.configure(cfg, connect_timeout)
        self.conns: list[H2Upstream] = []
        self.waiting: deque[Any] = deque()
        self.opened = 0
        self.reused = 0
        self.pools: Any = None
        self.pool_name: str | None = None
        self.tls: Any = None
        self.limits: Any = None

    def configure(self, cfg: Any, connect_timeout: float) -> None:
        self.max_open = max(1, cfg.max_per_backend)
        self.max_streams = max(1, cfg.max_streams)
        self.idle_timeout = cfg.idle_timeout
        self.max_age = cfg.max_age
        self.max_requests = max(1, cfg.max_requests)
        self.connect_timeout = connect_timeout

    @property
    def open(self) -> int:
        return len(self.conns)

    @property
    def live(self) -> set:
        return {c for c in self.conns if c.ready}

    @property
    def idle(self) -> list:
        """Connections that can take another stream now (the exchange asks
        L{take_idle} when there are some)."""
        return [c for c in self.conns if c.ready and not c.retired and not c.closed and len(c.streams) < c.capacity]

    def take_idle(self, now: float) -> UpstreamStream | None:
        """A new stream on a connection with room, or None (then L{acquire})."""
        for c in reversed(self.conns):
            if c.ready and c.usable(now) and len(c.streams) < c.capacity:
                if c.requests:
                    self.reused += 1
                return c.new_stream()
        return None

    def __repr__(self) -> str:
        return f"<H2BackendConnections {self.backend.address} conns={len(self.conns)} waiting={len(self.waiting)}>"

    def acquire(self, attempt: Any, fresh: bool = False) -> bool:
        now = self.clock.seconds()
        for c in reversed(self.conns):
            if not c.usable(now):
                continue
            if not c.ready:
                if len(c.pending) < self.max_streams:
                    c.pending.append(attempt)
                    return True
                continue
            if fresh and c.requests:
                continue
            if len(c.streams) < c.capacity:
                self.reused += 1 if c.requests else 0
                attempt.connection_ready(c.new_stream())
                return True
        if len(self.conns) >= self.max_open:
            self.waiting.append(attempt)
            return False
        slot = None
        if self.limits is not None:
            slot = self.limits.try_acquire(Limit.CONNECTIONS)
            if slot is None:
                self.waiting.append(attempt)
                return False
        self._connect(attempt, slot)
        return True

    def _connect(self, attempt: Any, slot: Any = None) -> None:
        b = self.backend
        pools = self.pools
        lookup = pools.tls_lookup if pools is not None else None
        self.tls = btls = lookup(self.pool_name) if lookup is not None and self.pool_name else None
        conn = H2Upstream(self)
        conn.limit_slot = slot
        conn.pending.append(attempt)
        self.conns.append(conn)
        self.opened += 1
        factory: Any = _Connect(conn)
        if btls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(btls.creator_for(b.host, key=b.address), True, factory,
                                          clock=self.reactor)
        self.reactor.connectTCP(b.host, b.port, factory, timeout=self.connect_timeout)

    def cancel(self, attempt: Any) -> None:
        try:
            self.waiting.remove(attempt)
        except ValueError:
            pass
        for c in self.conns:
            if attempt in c.pending:
                c.pending.remove(attempt)

    # -- from connections ------------------------------------------------------------------

    def connected(self, conn: H2Upstream) -> None:
        pending, conn.pending = conn.pending, []
        for att in pending:
            if att.cancelled:
                continue
            if len(conn.streams) < conn.capacity:
                att.connection_ready(conn.new_stream())
            else:
                self.waiting.appendleft(att)

    def connect_failed(self, conn: H2Upstream, code: str, detail: str) -> None:
        self._forget(conn)
        pending, conn.pending = conn.pending, []
        for att in pending:
            if not att.cancelled:
                att.connect_failed(code, detail)
        self._serve_waiting()

    def lost(self, conn: H2Upstream) -> None:
        self._forget(conn)
        self._serve_waiting()

    def _forget(self, conn: H2Upstream) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            return
        slot, conn.limit_slot = conn.limit_slot, None
        if slot is not None:
            slot.release()

    def stream_done(self, conn: H2Upstream) -> None:
        b = self.backend
        if not b.enabled or b.draining:
            conn.retired = True
        self._serve_waiting()

    def release(self, conn: Any, reusable: bool) -> None:
        """An attempt gives back a stream it will not use (its body outgrew the replay copy)."""
        if isinstance(conn, UpstreamStream):
            conn.abort()

    def _serve_waiting(self) -> None:
        waiting = self.waiting
        while waiting:
            att = waiting.popleft()
            if att.cancelled:
                continue
            if not self.acquire(att):
                # acquire() put it back at the end: restore its place and stop.
                waiting.pop()
                waiting.appendleft(att)
                return

    # -- management ---------------------------------------------------------------------------

    def close_idle(self) -> int:
        n = 0
        for c in list(self.conns):
            if c.ready and not c.streams:
                c.close()
                n += 1
        return n

    def abort_all(self) -> int:
        conns = list(self.conns)
        for c in conns:
            c.abort_all()
        return len(conns)

    def retire_all(self) -> None:
        for c in list(self.conns):
            c.retired = True
            if c.ready and not c.streams:
                c.close()
