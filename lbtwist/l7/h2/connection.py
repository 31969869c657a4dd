"""An HTTP/2 client connection on hyper-h2 (server side).

Per read: hyper-h2 turns bytes into events; requests whose stream is still
open once the whole read is handled become exchanges (so HEADERS followed by
RST_STREAM in one read never reaches a backend). Each stream is one
exchange; different streams may go to different backends.

Defences, beside what hyper-h2 enforces itself (CONTINUATION beyond 64
frames, HPACK blocks decoding past SETTINGS_MAX_HEADER_LIST_SIZE, streams
beyond SETTINGS_MAX_CONCURRENT_STREAMS, DATA past the window, stream id
reuse; each a GOAWAY it queues): rapid reset (CVE-2023-44487) and
SETTINGS/PING floods spend a per-connection L{Allowance}; spent, the client
gets GOAWAY ENHANCE_YOUR_CALM and the connection closes.

A drain (reload, SIGTERM, ``max_age``) sends GOAWAY NO_ERROR with the last
stream id handed to an exchange, written here rather than through hyper-h2
(whose GOAWAY would forbid the in-flight responses), lets those streams
finish, refuses newer ones (REFUSED_STREAM: the client retries them
elsewhere) and closes when the last one ended.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from lbtwist import fastio
from lbtwist.l7.errors import ParseError, error_page
from lbtwist.l7.h2 import settings as h2settings
from lbtwist.l7.h2.bridge import StreamClient
from lbtwist.l7.h2.flood import Allowance
from lbtwist.l7.h2.request import request_from_h2
from lbtwist.l7.h2.stream import Stream
from lbtwist.l7.timers import Deadline
from lbtwist.pool import join_address

if TYPE_CHECKING:
    from lbtwist.l7.listener import HttpProxyFactory

log = Logger(namespace="lbtwist.l7.h2")


@implementer(IPushProducer)
class _Flow:
    """The client's TCP (or TLS) send buffer filling up pauses every stream."""

    __slots__ = ("proto",)

    def __init__(self, proto: "H2ServerProtocol") -> None:
        self.proto = proto

    def pauseProducing(self) -> None:
        self.proto.transport_blocked = True

    def resumeProducing(self) -> None:
        self.proto.transport_unblocked()

    def stopProducing(self) -> None:
        pass


class H2ServerProtocol(Protocol):
    def __init__(self, ctx: "HttpProxyFactory") -> None:
        self.ctx = ctx
        self.h2: H2Connection = None  # type: ignore[assignment]
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self.draining = False
        self.goaway_sent = False
        #: Highest stream id given to an exchange (a drain's GOAWAY names it).
        self.last_stream = 0
        self.transport_blocked = False
        self.client_ip = b""
        self.client_ip_str = ""
        self.client_addr = ""
        self.tls = False
        self.requests = 0
        #: Streams the client reset, over the connection's life (admin/tests).
        self.remote_resets = 0
        self.deadline: Deadline | None = None
        self._age: Any = None
        self.calm_reason: str | None = None

    # -- Twisted -------------------------------------------------------------------

    def connectionMade(self) -> None:
        ctx = self.ctx
        t = self.transport
        peer = t.getPeer()
        self.client_ip_str = getattr(peer, "host", "") or ""
        self.client_ip = self.client_ip_str.encode("ascii", "replace")
        self.client_addr = join_address(self.client_ip_str, getattr(peer, "port", None))
        self.tls = ISSLTransport.providedBy(t)
        if ctx.track(self) is not None:
            self.closed = True
            t.loseConnection()  # an h2 client cannot read the HTTP/1.1 refusal page
            return
        if ctx.eager:
            fastio.accelerate(t)  # write responses at once, not on the next writable event
        try:
            t.setTcpNoDelay(True)
        except Exception:  # not TCP (tests, TLS wrappers without it)
            pass
        cfg = ctx.http.h2
        # Inbound blocks are validated (RFC 9113 8.2); outbound ones are built
        # here from parsed, checked fields, lower-cased, hop-by-hop dropped.
        conn = self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None,
                                                      validate_inbound_headers=True,
                                                      normalize_inbound_headers=True,
                                                      validate_outbound_headers=False,
                                                      normalize_outbound_headers=False))
        conn.local_settings = Settings(client=False, initial_values=h2settings.local_settings(cfg))
        conn.decoder.max_header_list_size = cfg.max_header_list_size
        conn.initiate_connection()
        extra = cfg.connection_window_size - conn.inbound_flow_control_window
        if extra > 0:
            conn.increment_flow_control_window(extra)
        self.resets = Allowance(cfg.max_resets, cfg.resets_per_second)
        self.controls = Allowance(cfg.max_control_frames, cfg.control_frames_per_second)
        t.registerProducer(_Flow(self), True)
        self.deadline = Deadline(ctx.clock, self._timeout, ctx.timers)
        self.deadline.set(ctx.http.keepalive_timeout, "idle")
        if cfg.max_age is not None:
            self._age = ctx.clock.callLater(cfg.max_age, self.drain)
        self.flush()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            # hyper-h2 queued the GOAWAY (PROTOCOL_ERROR, ENHANCE_YOUR_CALM for
            # an HPACK bomb, FLOW_CONTROL_ERROR...): send it and close.
            self._note(f"protocol error: {e}")
            self.flush()
            self.close()
            return
        starts: list[Stream] = []
        now = self.ctx.clock.seconds()
        streams = self.streams
        for e in events:
            t = type(e)
            if t is ev.RequestReceived:
                self._request(e, starts)
            elif t is ev.DataReceived:
                s = streams.get(e.stream_id)
                if s is not None:
                    s.data(e.data, e.flow_controlled_length)
                else:
                    self.acknowledge(e.flow_controlled_length, e.stream_id)
            elif t is ev.StreamEnded:
                s = streams.get(e.stream_id)
                if s is not None:
                    s.end()
            elif t is ev.StreamReset:
                if e.remote_reset:
                    self.remote_resets += 1
                    if not self.resets.take(now):
                        self.calm(f"rapid reset: more than {self.resets.burst} streams reset")
                        return
                s = streams.get(e.stream_id)
                if s is not None:
                    s.lost()
            elif t is ev.WindowUpdated:
                if e.stream_id == 0:
                    self.pump_all()
                else:
                    s = streams.get(e.stream_id)
                    if s is not None:
                        s.pump()
            elif t is ev.RemoteSettingsChanged or t is ev.PingReceived:
                if not self.controls.take(now):
                    self.calm(f"control frame flood: more than {self.controls.burst} SETTINGS/PING")
                    return
                if t is ev.RemoteSettingsChanged:
                    self.pump_all()  # the initial window may have grown
            elif t is ev.ConnectionTerminated:
                # The client's GOAWAY: hyper-h2 sends nothing more after it.
                self.flush()
                self.close()
                return
            if self.closed:
                return
        for s in starts:
            if not s.finished:
                s.start(StreamClient(s, s.req))
        self.flush()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self.deadline is not None:
            self.deadline.cancel()
        age, self._age = self._age, None
        if age is not None and age.active():
            age.cancel()
        self.ctx.untrack(self)
        for s in list(self.streams.values()):
            s.lost()
        self.streams.clear()

    # -- streams -----------------------------------------------------------------------

    def _request(self, e: Any, starts: list[Stream]) -> None:
        sid = e.stream_id
        if self.goaway_sent and sid > self.last_stream:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        s = Stream(self, sid)
        self.streams[sid] = s
        self.requests += 1
        if self.deadline is not None and self.deadline.kind == "idle":
            self.deadline.clear()
        ended = e.stream_ended is not None
        s.request_ended = ended
        try:
            s.req = request_from_h2(e.headers, ended)
        except ParseError as err:
            self._refuse(s, err)
            return
        self.last_stream = max(self.last_stream, sid)
        starts.append(s)

    def _refuse(self, s: Stream, err: ParseError) -> None:
        """A request that cannot be forwarded: its status and reason, from here."""
        self.ctx.note_rejection(err.status, err.reason, self.client_ip_str)
        page = error_page(err.status, err.reason, close=False)
        body = page[page.find(b"\r\n\r\n") + 4:]
        s.send_head([(b":status", b"%d" % err.status), (b"content-type", b"text/plain; charset=utf-8"),
                     (b"content-length", b"%d" % len(body))])
        s.send_data(body)
        s.send_end()

    def stream_done(self, s: Stream) -> None:
        if self.streams.get(s.sid) is s:
            del self.streams[s.sid]
        if self.closed:
            return
        if not self.streams:
            if self.goaway_sent:
                self.close()
            elif self.deadline is not None:
                self.deadline.set(self.ctx.http.keepalive_timeout, "idle")

    def acknowledge(self, n: int, sid: int) -> None:
        """Open the windows again for ``n`` consumed bytes of stream ``sid``."""
        if self.closed or not n:
            return
        try:
            self.h2.acknowledge_received_data(n, sid)
        except ProtocolError:  # the stream closed meanwhile: the connection window still counts
            try:
                self.h2.acknowledge_received_data(n, 0)
            except ProtocolError:
                pass
        self.flush()

    def pump_all(self) -> None:
        for s in list(self.streams.values()):
            if s.pending or s.end_pending or s.blocked:
                s.pump()

    def transport_unblocked(self) -> None:
        self.transport_blocked = False
        self.pump_all()
        self.flush()

    # -- output and closing ---------------------------------------------------------------

    def flush(self) -> None:
        if self.h2 is None:
            return
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def calm(self, reason: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and close: the client is flooding."""
        if self.closed:
            return
        self.calm_reason = reason
        self._note(reason)
        log.warn("h2 client {client}: {reason}; GOAWAY ENHANCE_YOUR_CALM", client=self.client_addr, reason=reason)
        try:
            self.h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self.last_stream)
        except ProtocolError:
            pass
        self.flush()
        self.abort_streams()
        self.close()

    def abort_streams(self) -> None:
        for s in list(self.streams.values()):
            s.lost()
        self.streams.clear()

    def drain(self) -> None:
        """GOAWAY with the last stream handed to an exchange; those finish,
        then the connection closes (listener drain, reload, ``max_age``)."""
        if self.closed:
            return
        self.draining = True
        if not self.goaway_sent:
            self.goaway_sent = True
            self.flush()
            self.transport.write(GoAwayFrame(0, last_stream_id=self.last_stream,
                                             error_code=ErrorCodes.NO_ERROR).serialize())
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.flush()  # what hyper-h2 still holds (the last END_STREAM, a GOAWAY)
        self.closed = True
        if self.deadline is not None:
            self.deadline.cancel()
        t = self.transport
        if getattr(t, "producer", None) is not None:
            t.unregisterProducer()
        t.loseConnection()

    def abort(self) -> None:
        self.abort_streams()
        self.closed = True
        t = self.transport
        if t is not None and not getattr(t, "disconnected", False):
            if getattr(t, "producer", None) is not None:
                t.unregisterProducer()
            t.abortConnection()

    def _timeout(self, kind: str) -> None:
        if kind == "idle" and not self.streams and not self.closed:
            self.drain()

    def tls_info(self) -> Any:
        """Version, cipher, SNI and resumption of this TLS connection (None on plain TCP)."""
        if not self.tls or self.transport is None:
            return None
        from lbtwist.tls.server import tls_info

        return tls_info(self.transport)

    def _note(self, what: str) -> None:
        self.ctx.refusals.note(f"listener {self.ctx.name}: h2 {what}", self.client_ip_str)
