"""HTTP/2 test kit: a hyper-h2 client on the in-memory harness (deterministic),
raw frames built with hyperframe/hpack for the attacks hyper-h2 refuses to
send, and a frame splitter for what the proxy wrote (independent of the
client's state machine)."""
from __future__ import annotations

from typing import Any

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError
from hpack import Encoder
from hyperframe.frame import Frame, GoAwayFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def split_frames(data: bytes) -> list[Any]:
    """Every whole frame in ``data`` (a server's output: no preface)."""
    out = []
    while len(data) >= 9:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        if len(data) < 9 + length:
            break
        f.parse_body(memoryview(data[9:9 + length]))
        out.append(f)
        data = data[9 + length:]
    return out


def goaways(frames: list[Any]) -> list[GoAwayFrame]:
    return [f for f in frames if isinstance(f, GoAwayFrame)]


class Reply:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational: list[list[tuple[bytes, bytes]]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.ended = False
        self.reset: int | None = None

    @property
    def status(self) -> int:
        for k, v in self.headers:
            if k == b":status":
                return int(v)
        return 0

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers + self.trailers:
            if k == name:
                return v
        return None


class MemH2Client:
    """A hyper-h2 client talking to a protocol over a StringTransport pair.
    ``auto_window``: acknowledge received DATA (open our windows) as it comes."""

    def __init__(self, proto: Any, transport: Any, *, auto_window: bool = True, settings: dict | None = None) -> None:
        self.proto = proto
        self.t = transport
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if settings:
            self.h2.local_settings.update(settings)
        self.h2.initiate_connection()
        self.auto_window = auto_window
        self.replies: dict[int, Reply] = {}
        self.frames: list[Any] = []
        self.terminated: Any = None
        self.send()

    # -- out -------------------------------------------------------------------------

    def send(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.proto.dataReceived(data)
        self.recv()

    def send_raw(self, data: bytes) -> None:
        """Bytes the client state machine does not know about (attacks)."""
        self.proto.dataReceived(data)
        self.recv(feed_client=False)

    def request(self, path: str = "/", method: str = "GET", body: bytes | None = None,
                headers: tuple = (), authority: str = "example.com", end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        hs = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
              (b":authority", authority.encode()), *headers]
        self.replies[sid] = Reply()
        self.h2.send_headers(sid, hs, end_stream=body is None and end)
        if body is not None:
            self.send_body(sid, body, end=end)
        else:
            self.send()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> int:
        """As much of ``body`` as the windows allow; returns bytes sent."""
        sent = 0
        while sent < len(body):
            n = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(body) - sent)
            if n <= 0:
                break
            self.h2.send_data(sid, body[sent:sent + n])
            sent += n
        if end and sent == len(body):
            self.h2.end_stream(sid)
        self.send()
        return sent

    # -- in ----------------------------------------------------------------------------

    def recv(self, feed_client: bool = True) -> None:
        out = self.t.value()
        self.t.clear()
        if not out:
            return
        self.frames += split_frames(out)
        if not feed_client or self.terminated is not None:
            return
        try:
            events = self.h2.receive_data(out)
        except ProtocolError:
            return
        for e in events:
            r = self.replies.setdefault(getattr(e, "stream_id", 0) or 0, Reply())
            if isinstance(e, ev.ResponseReceived):
                r.headers = list(e.headers)
            elif isinstance(e, ev.InformationalResponseReceived):
                r.informational.append(list(e.headers))
            elif isinstance(e, ev.TrailersReceived):
                r.trailers = list(e.headers)
            elif isinstance(e, ev.DataReceived):
                r.body += e.data
                if self.auto_window:
                    self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, ev.StreamEnded):
                r.ended = True
            elif isinstance(e, ev.StreamReset):
                r.reset = e.error_code
            elif isinstance(e, ev.ConnectionTerminated):
                self.terminated = e
        data = self.h2.data_to_send()
        if data:  # our ACKs and window updates
            self.proto.dataReceived(data)
            self.recv()

    def goaway(self) -> GoAwayFrame | None:
        g = goaways(self.frames)
        return g[-1] if g else None


def headers_frame_bytes(sid: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = True,
                        end_headers: bool = True, encoder: Encoder | None = None) -> bytes:
    from hyperframe.frame import HeadersFrame

    f = HeadersFrame(sid)
    f.data = (encoder or Encoder()).encode(headers)
    if end_stream:
        f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def get_headers(path: bytes = b"/", authority: bytes = b"example.com") -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"), (b":authority", authority)]


# -- real sockets -------------------------------------------------------------------------------

from twisted.internet import defer, protocol  # noqa: E402


class H2SocketClient(protocol.Protocol):
    """A hyper-h2 client on a real connection (h2c prior knowledge); replies
    collected per stream, waits bounded by events."""

    def __init__(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.replies: dict[int, Reply] = {}
        #: Everything received (hyper-h2's client stops reading at a GOAWAY; the frames do not).
        self.raw = b""
        self.terminated: Any = None
        self.lost = False
        self._waiters: list[tuple[Any, defer.Deferred]] = []

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    def request(self, path: str = "/", method: str = "GET", body: bytes | None = None, headers: tuple = (),
                authority: str = "example.com") -> int:
        sid = self.h2.get_next_available_stream_id()
        self.replies[sid] = Reply()
        self.h2.send_headers(sid, [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                                   (b":authority", authority.encode()), *headers], end_stream=body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    @property
    def frames(self) -> list[Any]:
        return split_frames(self.raw)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            events = []
        for e in events:
            r = self.replies.setdefault(getattr(e, "stream_id", 0) or 0, Reply())
            if isinstance(e, ev.ResponseReceived):
                r.headers = list(e.headers)
            elif isinstance(e, ev.TrailersReceived):
                r.trailers = list(e.headers)
            elif isinstance(e, ev.DataReceived):
                r.body += e.data
                self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, ev.StreamEnded):
                r.ended = True
            elif isinstance(e, ev.StreamReset):
                r.reset = e.error_code
            elif isinstance(e, ev.ConnectionTerminated):
                self.terminated = e
        self.flush()
        self._check()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self._check()

    def _check(self) -> None:
        for w in list(self._waiters):
            pred, d = w
            if self.lost or pred(self):
                self._waiters.remove(w)
                d.callback(self)

    def wait(self, pred: Any, reactor: Any, timeout: float = 10.0) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if pred(self) or self.lost:
            d.callback(self)
            return d
        self._waiters.append((pred, d))
        return d.addTimeout(timeout, reactor)


async def h2_connect(reactor: Any, port: int) -> H2SocketClient:
    cc = protocol.ClientCreator(reactor, H2SocketClient)
    return await cc.connectTCP("127.0.0.1", port, timeout=5).addTimeout(5, reactor)
