"""One HTTP/2 stream: its request body delivered as the backend side takes
it, and its response sent within the client's flow-control windows.

Flow control is the backpressure in both directions:
  - upload: DATA is acknowledged (WINDOW_UPDATE) only while the exchange is
    not holding the client back (``hold``); while it is, the client's window
    stays shut, so a slow backend never makes lbtwist hold more than one
    window of a stream's body;
  - download: DATA goes out in pieces of at most ``min(max frame size,
    window)``; what does not fit waits here, and past ``HIGH`` bytes the
    exchange is told to stop reading the backend until the client opens its
    window again (or the TCP send buffer drains).
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from lbtwist.l7.h2.flow import take_piece
from lbtwist.l7.timers import Deadline

if TYPE_CHECKING:
    from lbtwist.l7.h2.connection import H2ServerProtocol

#: Response bytes waiting for the client's window above which the backend is paused, and below which it resumes.
HIGH = 128 * 1024
LOW = 32 * 1024


class Stream:
    def __init__(self, conn: "H2ServerProtocol", sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.req: Any = None
        #: The client-facing adapter of the exchange (L{lbtwist.l7.h2.bridge}).
        self.bridge: Any = None
        self.early: list[bytes] = []
        self.request_ended = False
        self.held: set[str] = set()
        #: Received bytes not yet acknowledged (their window stays shut).
        self.unacked = 0
        self.body_size = 0
        self.pending: deque[bytes] = deque()
        self.pending_size = 0
        self.end_pending = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.head_sent = False
        #: A response head not yet sent (see L{send_head}'s ``hold``).
        self.held_head: list[tuple[bytes, bytes]] | None = None
        self.response_ended = False
        #: Nothing more is sent on this stream (response ended or stream reset).
        self.finished = False
        self.blocked = False
        self.deadline = Deadline(conn.ctx.clock, self._timeout, conn.ctx.timers)

    def __repr__(self) -> str:
        return f"<h2 Stream {self.sid}>"

    # -- request side (from the connection) ---------------------------------------

    def start(self, bridge: Any) -> None:
        """Hand the request to its exchange, with any DATA that came with it."""
        self.bridge = bridge
        bridge.start()
        early, self.early = self.early, []
        for data in early:
            if self.finished:
                break
            bridge.body(data)
        if self.request_ended and not self.finished:
            bridge.end()
        elif not self.request_ended and not self.finished and not self.held:
            self.deadline.set(self.conn.ctx.http.body_timeout, "body")
        self._ack_held()

    def data(self, data: bytes, flow_len: int) -> None:
        if not data:  # padding only, or an empty DATA carrying END_STREAM: no body bytes
            self.unacked += flow_len
            if self.bridge is not None and not self.held:
                self._ack_held()
            return
        self.body_size += len(data)
        bridge = self.bridge
        if self.finished:
            self.unacked += flow_len
            self._ack_held()
            return
        if bridge is None:  # arrived in the read that opened the stream
            self.early.append(data)
            self.unacked += flow_len
            return
        if not self.held:
            self.deadline.set(self.conn.ctx.http.body_timeout, "body")
        bridge.body(data)
        self.unacked += flow_len
        if not self.held:
            self._ack_held()

    def end(self) -> None:
        self.request_ended = True
        if self.deadline.kind == "body":
            self.deadline.clear()
        if self.bridge is not None and not self.finished:
            self.bridge.end()

    def hold(self, reason: str) -> None:
        """Stop acknowledging this stream's DATA (its window shuts)."""
        self.held.add(reason)
        if self.deadline.kind == "body":
            self.deadline.clear()  # not the client's fault while held back

    def release(self, reason: str) -> None:
        held = self.held
        if reason not in held:
            return
        held.discard(reason)
        if not held:
            self._ack_held()
            if not self.request_ended and not self.finished and self.bridge is not None:
                self.deadline.set(self.conn.ctx.http.body_timeout, "body")

    def _ack_held(self) -> None:
        n = self.unacked
        if n:
            self.unacked = 0
            self.conn.acknowledge(n, self.sid)

    # -- response side (from the bridge) ---------------------------------------------

    def send_head(self, headers: list[tuple[bytes, bytes]], end: bool = False, interim: bool = False,
                  hold: bool = False) -> None:
        """``hold``: keep the head until the first DATA, the end or a flush,
        so a response without a body leaves as one HEADERS frame with
        END_STREAM (what gRPC's trailers-only responses must be)."""
        if self.finished:
            return
        if hold:
            self.held_head = headers
            return
        conn = self.conn
        try:
            conn.h2.send_headers(self.sid, headers, end_stream=end)
        except ProtocolError:  # reset meanwhile (StreamClosedError...)
            self.lost()
            return
        if not interim:
            self.head_sent = True
        if end:
            self._response_done()
        # Written by the connection's flush at the end of the event (one send for head, data and end).

    def flush_head(self) -> None:
        head, self.held_head = self.held_head, None
        if head is not None:
            self.send_head(head)

    def send_data(self, data: bytes) -> None:
        if self.finished or not data:
            return
        if self.held_head is not None:
            self.flush_head()
        self.pending.append(data)
        self.pending_size += len(data)
        self.pump()

    def send_end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        if self.finished:
            return
        head = self.held_head
        if head is not None:
            self.held_head = None
            if not self.pending and trailers is None:
                self.send_head(head, end=True)
                return
            self.send_head(head)
        self.end_pending = True
        self.trailers = trailers
        self.pump()

    def pump(self) -> None:
        """Send what the windows allow."""
        if self.finished:
            return
        conn = self.conn
        h2 = conn.h2
        pending = self.pending
        sid = self.sid
        try:
            while pending and not conn.transport_blocked:
                window = h2.local_flow_control_window(sid)
                if window <= 0:
                    break
                piece = take_piece(pending, min(window, h2.max_outbound_frame_size))
                self.pending_size -= len(piece)
                last = not pending and self.end_pending and self.trailers is None
                h2.send_data(sid, piece, end_stream=last)
                if last:
                    self._response_done()
                    return
            if not pending and self.end_pending:
                if self.trailers is not None:
                    h2.send_headers(sid, self.trailers, end_stream=True)
                else:
                    h2.end_stream(sid)
                self._response_done()
                return
        except ProtocolError:
            self.lost()
            conn.flush()
            return
        if self.pending_size > HIGH or (pending and conn.transport_blocked):
            if not self.blocked:
                self.blocked = True
                self.deadline.set(conn.ctx.http.body_timeout, "write")
                if self.bridge is not None:
                    self.bridge.write_blocked()
        elif self.blocked and self.pending_size <= LOW and not conn.transport_blocked:
            self.blocked = False
            if self.deadline.kind == "write":
                self.deadline.clear()
            if self.bridge is not None:
                self.bridge.write_unblocked()

    def _response_done(self) -> None:
        self.response_ended = True
        self.finished = True
        self.pending.clear()
        self.pending_size = 0
        self.deadline.cancel()
        if not self.request_ended:
            # The answer is complete before the body: stop the upload (RFC 9113 8.1).
            try:
                self.conn.h2.reset_stream(self.sid, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
        self._ack_held()
        self.conn.stream_done(self)

    def reset(self, code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        """End the stream from our side (the exchange gave up on it)."""
        if self.finished:
            return
        self.finished = True
        self.deadline.cancel()
        self.pending.clear()
        self.pending_size = 0
        try:
            self.conn.h2.reset_stream(self.sid, code)
        except ProtocolError:
            pass
        self._ack_held()
        self.conn.flush()
        self.conn.stream_done(self)

    def lost(self) -> None:
        """The client reset the stream or the connection went away."""
        was_finished = self.finished
        self.finished = True
        self.deadline.cancel()
        self.pending.clear()
        self.pending_size = 0
        bridge = self.bridge
        if bridge is not None:
            bridge.lost()
        if not was_finished:
            self.conn.stream_done(self)

    def _timeout(self, kind: str) -> None:
        if self.finished:
            return
        if kind == "body" and self.bridge is not None and not self.head_sent:
            self.bridge.body_timeout()
        else:
            self.bridge.lost() if self.bridge is not None else None
            self.reset(ErrorCodes.CANCEL)
