"""The client side of ``mode: http``: one protocol instance per client
connection, a thin adapter between the sans-IO L{RequestParser} and the
sans-IO exchange machine (L{lbtwist.l7.machine.Exchange}). Parser events
become exchange events; the exchange's client actions (L{ClientSide}:
``send_head``, ``send_data``, ``send_end``, ``send_error``...) become
HTTP/1.1 bytes here: the response framing towards this client (length,
chunked or close-delimited, L{client_framing}) and whether the connection
stays open are decided here, not in the exchange.

It answers requests strictly in order (a pipelined request is parsed only
after the previous response ended), owns the client-side timeouts (header
block, body reads, keep-alive idle, stalled writes), turns parse errors into
400/413/414/431 and a close, and implements the listener contract: ``drain()``
finishes the current request then closes (its response says
``Connection: close``), ``abort()`` drops the connection.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from lbtwist import fastio
from lbtwist.l7.chunked import LAST_CHUNK
from lbtwist.l7.errors import ParseError, error_page, page_body_size
from lbtwist.l7.headers import (
    FRAME_CHUNKED, FRAME_CLOSE, FRAME_LENGTH, FRAME_NONE, client_framing, client_response_head, interim_head,
)
from lbtwist.l7.machine import Exchange
from lbtwist.l7.parser import DONE, HEAD, Request, RequestParser
from lbtwist.l7.timers import Deadline
from lbtwist.pool import join_address
from lbtwist.traffic import TrafficRecord

if TYPE_CHECKING:
    from lbtwist.l7.listener import HttpProxyFactory
    from lbtwist.l7.tunnel import Tunnel

log = Logger(namespace="lbtwist.l7.client")

#: Pipelined bytes held while a request is in progress before reads pause.
PIPELINE_PAUSE = 64 * 1024
#: How long unread request bytes are drained after an early response before
#: closing (closing with unread data sends a reset that can destroy the response).
LINGER = 2.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@implementer(IPushProducer)
class _WriteFlow:
    """Registered on the client transport: its buffer filling up means the
    client reads slower than the backend sends."""

    __slots__ = ("proto",)

    def __init__(self, proto: "HttpProxyProtocol") -> None:
        self.proto = proto

    def pauseProducing(self) -> None:
        self.proto._write_blocked()

    def resumeProducing(self) -> None:
        self.proto._write_unblocked()

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class HttpProxyProtocol(Protocol):
    def __init__(self, ctx: "HttpProxyFactory") -> None:
        self.ctx = ctx
        self.exchange: Exchange | None = None
        self.tunnel: Tunnel | None = None
        self.parser: RequestParser | None = None
        self.draining = False
        self.closed = False
        self.write_blocked = False
        #: True while a client read is being parsed (backend writes are held).
        self.feeding = False
        self.lingering = False
        self.half_closed = False
        self.requests = 0
        #: Counted by the listener (L{HttpProxyFactory.track}); uncounted once.
        self.tracked = False
        self.client_ip = b""
        self.client_ip_str = ""
        #: ``host:port`` of the client, as the access log shows it.
        self.client_addr = ""
        self.tls = False
        self._paused: set[str] = set()
        self._head_started = False
        #: Clock time the first bytes of an incomplete request head arrived.
        self._head_at = 0.0
        self.deadline: Deadline | None = None
        self._wdeadline: Deadline | None = None
        #: Client-bound bytes of the current event, written once (L{flush}),
        #: so a response head and its first body bytes leave in one send.
        self.out: list[bytes] = []
        #: How the current response body is framed, and whether the
        #: connection stays open after it (decided with its head).
        self.framing = FRAME_NONE
        self.keep_alive = False

    # -- Twisted ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        ctx = self.ctx
        t = self.transport
        peer = t.getPeer()
        self.client_ip_str = getattr(peer, "host", "") or ""
        self.client_ip = self.client_ip_str.encode("ascii", "replace")
        self.client_addr = join_address(self.client_ip_str, getattr(peer, "port", None))
        self.tls = ISSLTransport.providedBy(t)
        refusal = ctx.track(self)
        if refusal is not None:
            self.closed = True
            t.write(refusal)
            t.loseConnection()
            return
        if ctx.eager:
            fastio.accelerate(t)
        try:
            t.setTcpNoDelay(True)
        except Exception:  # not TCP (tests, TLS wrappers without it)
            pass
        t.registerProducer(_WriteFlow(self), True)
        http = ctx.http
        self.parser = RequestParser(
            self, max_request_line=http.max_request_line, max_header_size=http.max_header_size,
            max_headers=http.max_headers,
        )
        self.deadline = Deadline(ctx.clock, self._timeout, ctx.timers)
        self.deadline.set(http.header_timeout, "idle-header")

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_client(data)
            return
        if self.lingering or self.closed:
            return
        parser = self.parser
        self.feeding = True
        try:
            parser.feed(data)  # type: ignore[union-attr]
        except ParseError as e:
            self.feeding = False
            self._parse_error(e)
            return
        self.feeding = False
        ex = self.exchange
        if ex is not None:
            if ex.req_out or self.out:
                ex.flush()
            if parser.held and parser.state == DONE and parser.buffered() > PIPELINE_PAUSE:  # type: ignore[union-attr]
                self.pause_reading("pipeline")
        elif not self._head_started and parser.held and parser.state == HEAD:  # type: ignore[union-attr]
            # A request head began but is incomplete: it must be complete in
            # time (set once, so a slowloris trickle does not push it back).
            self._head_started = True
            self._head_at = self.ctx.clock.seconds()
            self.deadline.set(self.ctx.http.header_timeout, "header")  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        """The client half-closed: finish a fully received request, then close."""
        self.half_closed = True
        ex = self.exchange
        if self.tunnel is not None:
            self.tunnel.client_lost()
            return
        if ex is not None and ex.request_complete:
            return  # exchange_done closes
        self.abort() if ex is not None else self.close()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self._wdeadline is not None:
            self._wdeadline.cancel()
        self.ctx.untrack(self)
        self.closed = True
        if self.parser is not None:
            self.parser.stop()
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            if not tunnel.closed:
                tunnel.client_lost()
            return
        ex = self.exchange
        if ex is not None:
            self.out = []  # nowhere to send it
            ex.client_lost()

    # -- parser callbacks --------------------------------------------------------------

    def on_request(self, req: Request) -> None:
        self._head_started = False
        self.requests += 1
        if req.has_body:
            self.deadline.set(self.ctx.http.body_timeout, "body")  # type: ignore[union-attr]
        else:
            self.deadline.clear()  # type: ignore[union-attr]
        ex = Exchange(self, req)
        self.exchange = ex
        ex.start()

    def on_body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            if not self._paused:
                self.deadline.set(self.ctx.http.body_timeout, "body")  # type: ignore[union-attr]
            ex.body_data(data)

    def on_end(self) -> None:
        ex = self.exchange
        if ex is not None and ex.body is not None:
            self.deadline.clear()  # type: ignore[union-attr]
            ex.body_end()

    # -- the exchange's actions (lbtwist.l7.machine.ClientSide) ------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def tls_info(self) -> Any:
        """Version, cipher, SNI and resumption of this TLS connection (None on plain TCP)."""
        if not self.tls or self.transport is None:
            return None
        from lbtwist.tls.server import tls_info

        return tls_info(self.transport)

    def limit_body(self, max_body: int) -> None:
        self.parser.max_body = max_body  # type: ignore[union-attr]

    def send_interim(self, resp: Any) -> bool:
        """A 1xx: 100 Continue as is, others to HTTP/1.1 clients only."""
        if resp.status == 100:
            self.out.append(_CONTINUE)
            return True
        if self.exchange.req.version == b"1.1":  # type: ignore[union-attr]
            self.out.append(interim_head(resp))
            return True
        return False

    def send_head(self, resp: Any, extra: tuple, content_length: int | None) -> None:
        ex: Exchange = self.exchange  # type: ignore[assignment]
        version = ex.req.version
        framing = client_framing(resp, version)
        keep = ex.req.keep_alive and framing != FRAME_CLOSE and not self.draining
        self.keep_alive = keep
        if resp.status == 101:
            framing, keep = FRAME_NONE, True
        self.out.append(client_response_head(resp, framing, keep, version, ex.request_id, self.ctx.forwarding,
                                             ex.plan.response_rewriter, extra, content_length))  # type: ignore[union-attr]
        self.framing = FRAME_LENGTH if content_length is not None else framing

    def send_data(self, data: bytes) -> None:
        if self.framing == FRAME_CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def send_end(self, trailers: tuple) -> None:
        out = self.out
        if self.framing == FRAME_CHUNKED:
            out.append(LAST_CHUNK)
        if out:
            self.out = []
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def send_error(self, status: int, cause: str, extra: tuple) -> int:
        ex: Exchange = self.exchange  # type: ignore[assignment]
        req = ex.req
        keep = self.keep_alive = req.keep_alive and ex.request_complete and not self.draining
        page = error_page(status, cause, close=not keep, head_only=req.method == b"HEAD", extra=extra)
        self.out.append(page)
        self.flush()
        return page_body_size(page)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def reset(self) -> None:
        """The response cannot complete: drop the connection (the exchange ends itself)."""
        if self.transport is not None and not getattr(self.transport, "disconnected", False):
            self.closed = True
            _unregister(self.transport)
            self.transport.abortConnection()

    def exchange_done(self, ex: Exchange, clean: bool) -> None:
        if self.exchange is ex:
            self.exchange = None
        keep_alive = clean and self.keep_alive
        self.framing = FRAME_NONE
        if self.closed:
            return
        if self.tunnel is not None or ex.tunnel is not None:
            self.close()
            return
        if not ex.request_complete:
            self._linger()
            return
        if not keep_alive or self.draining or self.half_closed:
            self.close()
            return
        if ex.ended:
            self.deadline.set_at(ex.ended + self.ctx.http.keepalive_timeout, "keepalive")  # type: ignore[union-attr]
        else:
            self.deadline.set(self.ctx.http.keepalive_timeout, "keepalive")  # type: ignore[union-attr]
        parser = self.parser
        if parser.held:  # type: ignore[union-attr]
            # Pipelined requests: continue from the reactor, after the backend
            # connection that served this one is back in its pool.
            self.ctx.clock.callLater(0, self._next_request)
        else:
            parser.next()  # type: ignore[union-attr]
            if self._paused:
                self.resume_reading("pipeline")

    def _next_request(self) -> None:
        if self.closed or self.exchange is not None:
            return
        self.resume_reading("pipeline")
        self.feeding = True
        try:
            self.parser.next()  # type: ignore[union-attr]
        except ParseError as e:
            self.feeding = False
            self._parse_error(e)
            return
        self.feeding = False
        if self.exchange is not None:
            self.exchange.flush()

    def start_tunnel(self, tunnel: "Tunnel") -> None:
        self.tunnel = tunnel
        self.deadline.cancel()  # type: ignore[union-attr]
        self._paused.discard("pipeline")
        rest = self.parser.take_buffer()  # type: ignore[union-attr]
        self.resume_reading("body")
        if rest:
            tunnel.from_client(rest)

    # -- flow control -------------------------------------------------------------------------

    def pause_reading(self, reason: str) -> None:
        paused = self._paused
        if reason in paused or self.closed:
            return
        if not paused:
            self.transport.pauseProducing()
            d = self.deadline
            if d is not None and d.kind == "body":
                d.clear()  # not the client's fault while we hold it back
        paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        paused = self._paused
        if reason not in paused:
            return
        paused.discard(reason)
        if not paused and not self.closed:
            self.transport.resumeProducing()
            ex = self.exchange
            if ex is not None and not ex.request_complete and self.deadline is not None:
                self.deadline.set(self.ctx.http.body_timeout, "body")

    def _write_blocked(self) -> None:
        self.write_blocked = True
        if self._wdeadline is None:
            self._wdeadline = Deadline(self.ctx.clock, self._timeout, self.ctx.timers)
        self._wdeadline.set(self.ctx.http.body_timeout, "write")
        target = self.tunnel or self.exchange
        if target is not None:
            target.client_write_blocked()

    def _write_unblocked(self) -> None:
        self.write_blocked = False
        if self._wdeadline is not None:
            self._wdeadline.clear()
        target = self.tunnel or self.exchange
        if target is not None:
            target.client_write_unblocked()

    # -- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Close after what was written has been sent."""
        if self.closed:
            return
        self.closed = True
        if self.parser is not None:
            self.parser.stop()
        if self.deadline is not None:
            self.deadline.cancel()
        t = self.transport
        _unregister(t)
        if self._paused:
            self._paused.clear()
        t.loseConnection()

    def abort(self) -> None:
        """Drop the connection now."""
        ex = self.exchange
        if ex is not None:
            ex.abort()
        self.reset()

    def drain(self) -> None:
        """Finish the current request (its response says Connection: close),
        then close; close now if idle."""
        self.draining = True
        if self.tunnel is not None:
            return  # a tunnel ends when either side closes, or at the drain timeout
        if self.exchange is None and not self._head_started:
            self.close()

    def _linger(self) -> None:
        """An answer went out before the request body was read: stop
        forwarding, send our FIN, discard what the client still sends for a
        moment, then close (a plain close with unread input resets the
        connection and can destroy the answer in flight)."""
        self.lingering = True
        if self.parser is not None:
            self.parser.stop()
        self._paused.clear()
        t = self.transport
        _unregister(t)
        try:
            t.resumeProducing()
            t.loseWriteConnection()
        except Exception:
            self.close()
            return
        self.deadline.set(LINGER, "linger")  # type: ignore[union-attr]

    def _timeout(self, kind: str) -> None:
        if self.closed:
            return
        if kind == "header":
            self._reject(408, "request header not received in time")
        elif kind == "body":
            ex = self.exchange
            if ex is not None and ex.response is None:
                ex.protocol_error(408, "request body not received in time")
            else:
                self.abort()
        elif kind == "write":
            log.info("client {client}: not reading the response; closing", client=self.client_ip_str)
            self.abort()
        elif kind == "linger":
            self.abort()
        else:  # keepalive / idle-header: an idle connection, nothing to answer
            if self.exchange is None:
                self.close()

    def _parse_error(self, e: ParseError) -> None:
        if self.parser is not None:
            self.parser.stop()
        ex = self.exchange
        if ex is not None:
            ex.protocol_error(e.status, e.reason)
            if not self.closed:
                self.close()
            return
        self._reject(e.status, e.reason)

    def _reject(self, status: int, reason: str) -> None:
        """Answer an error outside any exchange (bad request head, header timeout) and close."""
        ctx = self.ctx
        page = error_page(status, reason, extra=ctx.forwarding.response_fields)
        ctx.note_rejection(status, reason, self.client_ip_str)
        hub = ctx.runtime.traffic
        if hub.subscribers:
            # The request began when its head started arriving: in an earlier
            # read if it spanned several, else in this one.
            now = ctx.clock.seconds()
            took = now - self._head_at if self._head_started else 0.0
            hub.publish(TrafficRecord(kind="http", listener=ctx.name, start=time.time() - took, duration=took,
                                      client=self.client_addr, status=status, bytes_out=page_body_size(page),
                                      outcome="rejected", error=reason))
        self.write(page)
        self._linger()


def _unregister(transport: Any) -> None:
    """Unregister our flow producer if it is still registered (closing paths
    may run twice)."""
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()
