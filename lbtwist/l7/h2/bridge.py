"""The one place an HTTP/2 stream meets the L7 exchange machine.

L{StreamClient} is the machine's client side (L{lbtwist.l7.machine.ClientSide})
for one stream, beside the HTTP/1.1 connection in L{lbtwist.l7.client}: the
exchange's actions (send the head, data, the end with trailers, an error of
its own, flow control, reset) become HEADERS, DATA and RST_STREAM on the
stream, so each stream gets the same routing, retries, budgets, breakers,
limits, timeouts and access log as an HTTP/1.1 request.

gRPC: when lbtwist itself fails a call (``send_error``) it answers
trailers-only with the gRPC status for the cause (L{lbtwist.l7.h2.grpc});
``grpc-timeout`` bounds the whole call (DEADLINE_EXCEEDED when it passes).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from lbtwist.l7.errors import error_page, page_body_size
from lbtwist.l7.h2 import grpc
from lbtwist.l7.headers import HOP_BY_HOP, response_fields
from lbtwist.l7.machine import Exchange
from lbtwist.l7.parser import Request

if TYPE_CHECKING:
    from lbtwist.l7.h2.stream import Stream


class StreamClient:
    """The exchange's client side, for one stream (see the module docstring)."""

    #: Backend writes are never held for a parse in progress (hyper-h2
    #: validated the stream's request head whole before the exchange began).
    feeding = False
    tunnel = None

    def __init__(self, stream: "Stream", req: Request) -> None:
        conn = stream.conn
        self.stream = stream
        self.req = req
        self.ctx = conn.ctx
        self.client_ip = conn.client_ip
        self.client_ip_str = conn.client_ip_str
        self.client_addr = conn.client_addr
        self.tls = conn.tls
        self.closed = False
        self.max_body = 0
        self.exchange: Exchange | None = None
        self.grpc = grpc.is_grpc(req.header(b"content-type"))
        self._deadline: Any = None

    @property
    def draining(self) -> bool:
        return self.stream.conn.draining

    # -- from the stream -------------------------------------------------------------

    def start(self) -> None:
        req = self.req
        if self.grpc:
            t = grpc.parse_timeout(req.header(b"grpc-timeout"))
            if t is not None:
                self._deadline = self.ctx.clock.callLater(max(t, 0.0), self._deadline_passed)
        ex = self.exchange = Exchange(self, req)
        ex.start()
        if not ex.done:
            ex.flush()

    def body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.done:
            return
        limit = self.max_body
        if limit and self.stream.body_size > limit:
            ex.protocol_error(413, f"request body larger than {limit} bytes")
            return
        ex.body_data(data)
        if not ex.done:
            ex.flush()

    def end(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.done:
            ex.body_end()
            if not ex.done:
                ex.flush()

    def lost(self) -> None:
        """The client reset the stream or left: abandon the backend side."""
        self._cancel_deadline()
        if self.closed:
            return
        self.closed = True
        ex = self.exchange
        if ex is not None and not ex.done:
            ex.client_lost()

    def body_timeout(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.done:
            ex.protocol_error(408, "request body not received in time")

    def write_blocked(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.done:
            ex.client_write_blocked()

    def write_unblocked(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.done:
            ex.client_write_unblocked()

    # -- the machine's client side (ClientSide) -----------------------------------------------

    def tls_info(self) -> Any:
        return self.stream.conn.tls_info()

    def limit_body(self, max_body: int) -> None:
        self.max_body = max_body

    def send_interim(self, resp: Any) -> bool:
        if resp.status == 100:
            return False  # no 100-continue handshake to relay on HTTP/2
        self.stream.send_head([(b":status", b"%d" % resp.status),
                               *((n.lower(), v) for n, v in resp.headers if n.lower() not in HOP_BY_HOP)],
                              interim=True)
        return True

    def send_head(self, resp: Any, extra: tuple, content_length: int | None) -> None:
        ex: Exchange = self.exchange  # type: ignore[assignment]
        fields = response_fields(resp, ex.request_id, self.ctx.forwarding, ex.plan.response_rewriter, extra)  # type: ignore[union-attr]
        head = [(b":status", b"%d" % resp.status)]
        cl = content_length if content_length is not None else resp.content_length
        if cl is not None and resp.te is None:
            head.append((b"content-length", b"%d" % cl))
        rid = ex.request_id
        for n, v in fields:
            n = n.lower()
            if n in HOP_BY_HOP or n == b"content-length":
                continue  # a route rewrite may name them; HTTP/2 frames itself
            # A value unique to this response (the request id) is never indexed:
            # it would only churn the HPACK table every response has to search.
            head.append(NeverIndexedHeaderTuple(n, v) if v == rid else (n, v))
        self.stream.send_head(head, hold=True)

    def send_data(self, data: bytes) -> None:
        self.stream.send_data(data)

    def send_end(self, trailers: tuple) -> None:
        self.stream.send_end([(n.lower(), v) for n, v in trailers] if trailers else None)

    def send_error(self, status: int, cause: str, extra: tuple) -> int:
        """lbtwist answers itself: a gRPC call gets its gRPC status trailers-only."""
        extra = tuple((n.lower(), v) for n, v in extra)
        if self.grpc:
            self.stream.send_head(grpc.trailers_only(status, f"lbtwist: {status} {cause}", extra), end=True)
            return 0
        head_only = self.req.method == b"HEAD"
        page = error_page(status, cause, close=False, head_only=head_only)
        body = page[page.find(b"\r\n\r\n") + 4:]
        size = page_body_size(page)
        self.stream.send_head([(b":status", b"%d" % status), (b"content-type", b"text/plain; charset=utf-8"),
                               (b"content-length", b"%d" % (len(body) if not head_only else size)),
                               (b"cache-control", b"no-store"), *extra])
        if body:
            self.stream.send_data(body)
        self.stream.send_end()
        return size

    def flush(self) -> None:
        self.stream.flush_head()
        self.stream.conn.flush()

    def pause_reading(self, reason: str) -> None:
        self.stream.hold(reason)

    def resume_reading(self, reason: str) -> None:
        self.stream.release(reason)

    def reset(self) -> None:
        """The response cannot complete: reset this stream, not the connection."""
        self._cancel_deadline()
        self.closed = True
        self.stream.reset(ErrorCodes.INTERNAL_ERROR)

    def exchange_done(self, ex: Exchange, clean: bool) -> None:
        self._cancel_deadline()
        stream = self.stream
        stream.flush_head()
        stream.conn.flush()  # the machine's last event ends here, without a flush of its own
        if not stream.finished and not stream.end_pending:
            # Over without a complete response (cancelled, aborted).
            self.closed = True
            stream.reset(ErrorCodes.CANCEL if stream.head_sent else ErrorCodes.INTERNAL_ERROR)

    def start_tunnel(self, tunnel: Any) -> None:  # no Upgrade on HTTP/2 requests: never called
        tunnel.client_lost()
        self.reset()

    # -- gRPC deadline --------------------------------------------------------------------------

    def _deadline_passed(self) -> None:
        self._deadline = None
        ex = self.exchange
        if ex is None or ex.done or self.closed:
            return
        self.closed = True
        self.stream.flush_head()
        if not self.stream.head_sent:
            # Nothing answered yet: the call ends with DEADLINE_EXCEEDED, trailers-only.
            self.stream.send_head(grpc.trailers_only(504, "lbtwist: grpc-timeout passed"), end=True)
        else:
            self.stream.send_end([(b"grpc-status", b"%d" % grpc.DEADLINE_EXCEEDED),
                                  (b"grpc-message", grpc.encode_message("lbtwist: grpc-timeout passed"))])
        ex.client_lost()
        self.stream.conn.flush()

    def _cancel_deadline(self) -> None:
        d, self._deadline = self._deadline, None
        if d is not None and d.active():
            d.cancel()
