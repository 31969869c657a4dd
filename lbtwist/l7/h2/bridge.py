"""The one place an HTTP/2 stream meets the L7 exchange.

L{StreamClient} gives an L{lbtwist.l7.exchange.Exchange} the client face it
knows from L{lbtwist.l7.client.HttpProxyProtocol} (write, pause/resume
reading, abort, exchange_done...), so each stream gets the same routing,
retries, budgets, breakers, limits, timeouts and access log as an HTTP/1.1
request. The exchange writes its response as HTTP/1.1 bytes; they are parsed
back here by lbtwist's own L{ResponseParser} into a head, DATA and an end
for the stream. When the exchange becomes protocol-neutral (a machine that
emits response events), only this module changes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from twisted.logger import Logger

from lbtwist.l7.errors import ParseError
from lbtwist.l7.exchange import Exchange
from lbtwist.l7.h2 import grpc
from lbtwist.l7.h2.request import response_headers
from lbtwist.l7.parser import Request, Response, ResponseParser

if TYPE_CHECKING:
    from lbtwist.l7.h2.stream import Stream

log = Logger(namespace="lbtwist.l7.h2")


class _BodyLimit:
    """What the exchange sets on ``client.parser``: the route's body cap."""

    __slots__ = ("max_body",)

    def __init__(self) -> None:
        self.max_body = 0


class StreamExchange(Exchange):
    """An exchange serving an HTTP/2 stream: its own answers (``reject``) are
    also told to the stream's client face, so a gRPC call gets a gRPC error."""

    def reject(self, status: int, cause: str, outcome: str = "rejected",
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if not self.done:
            self.client.own_answer(status, cause, extra)
        super().reject(status, cause, outcome, extra)


class StreamClient:
    """The exchange's client, for one stream (see the module docstring)."""

    #: Backend writes are never held for a parse in progress (a stream's
    #: request was validated whole by hyper-h2 before the exchange began).
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
        #: The exchange writes its response to ``client.transport`` too.
        self.transport = self
        self.parser = _BodyLimit()
        self.closed = False
        self.exchange: Exchange | None = None
        self._resp = ResponseParser(self, max_header_size=1 << 20, max_headers=1000)
        self._own: tuple[int, str, tuple] | None = None
        self._swallow = False
        self.grpc = grpc.is_grpc(req.header(b"content-type"))
        self._deadline: Any = None

    @property
    def draining(self) -> bool:
        return self.stream.conn.draining

    # -- from the stream -------------------------------------------------------------

    def start(self) -> None:
        req = self.req
        self._resp.expect(req.method == b"HEAD")
        if self.grpc:
            t = grpc.parse_timeout(req.header(b"grpc-timeout"))
            if t is not None:
                self._deadline = self.ctx.clock.callLater(max(t, 0.0), self._deadline_passed)
        ex = self.exchange = StreamExchange(self, req)
        ex.start()
        if not ex.done:
            ex.flush()

    def body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.done:
            return
        limit = self.parser.max_body
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

    # -- the client face the exchange uses -----------------------------------------------

    def own_answer(self, status: int, cause: str, extra: tuple) -> None:
        self._own = (status, cause, extra)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._resp.feed(data)
        except ParseError as e:  # cannot happen for the exchange's own serialisation
            log.error("h2 stream {sid}: unparsable response from the exchange: {e}", sid=self.stream.sid, e=e)
            self.abort()

    def pause_reading(self, reason: str) -> None:
        self.stream.hold(reason)

    def resume_reading(self, reason: str) -> None:
        self.stream.release(reason)

    def abort(self) -> None:
        """The exchange failed mid-response: reset this stream, not the connection."""
        self._cancel_deadline()
        self.closed = True
        ex = self.exchange
        if ex is not None and not ex.done:
            ex.abort()
        self.stream.reset(ErrorCodes.INTERNAL_ERROR)

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        self._cancel_deadline()
        if not self.stream.finished and not self.stream.end_pending:
            # Ended without a complete response (cancelled, aborted).
            self.closed = True
            self.stream.reset(ErrorCodes.INTERNAL_ERROR if not self.stream.head_sent else ErrorCodes.CANCEL)

    def start_tunnel(self, tunnel: Any) -> None:  # no Upgrade on HTTP/2 requests: never called
        tunnel.client_lost()
        self.abort()

    # -- the response, parsed back from the exchange's bytes ----------------------------------

    def on_informational(self, resp: Response) -> None:
        if resp.status != 100:
            self.stream.send_head(response_headers(resp), interim=True)

    def on_response(self, resp: Response) -> None:
        own = self._own
        if own is not None and self.grpc:
            status, cause, extra = own
            self._swallow = True
            rid = self.exchange.request_id if self.exchange is not None else b""
            fields = ((self.ctx.forwarding.request_id_header, rid),) if rid else ()
            self.stream.send_head(grpc.trailers_only(status, f"lbtwist: {status} {cause}", fields + _lower(extra)),
                                  end=True)
            return
        self.stream.send_head(response_headers(resp))

    def on_body(self, data: bytes) -> None:
        if not self._swallow:
            self.stream.send_data(data)

    def on_end(self) -> None:
        if self._swallow:
            return
        if not self.stream.finished:
            self.stream.send_end()

    # -- gRPC deadline --------------------------------------------------------------------------

    def _deadline_passed(self) -> None:
        self._deadline = None
        ex = self.exchange
        if ex is None or ex.done or self.closed:
            return
        self.closed = True
        if not self.stream.head_sent:
            # Nothing answered yet: the call ends with DEADLINE_EXCEEDED, trailers-only.
            self._own = (504, "grpc-timeout passed", ())
            self.stream.send_head(grpc.trailers_only(504, "lbtwist: grpc-timeout passed"), end=True)
            ex.client_lost()
            return
        # The response has started: end the call with DEADLINE_EXCEEDED trailers.
        self.stream.send_end([(b"grpc-status", b"%d" % grpc.DEADLINE_EXCEEDED),
                              (b"grpc-message", grpc.encode_message("lbtwist: grpc-timeout passed"))])
        ex.client_lost()

    def _cancel_deadline(self) -> None:
        d, self._deadline = self._deadline, None
        if d is not None and d.active():
            d.cancel()


def _lower(fields: tuple) -> tuple:
    return tuple((n.lower(), v) for n, v in fields)
