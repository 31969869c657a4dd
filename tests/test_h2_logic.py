"""HTTP/2 to clients on the in-memory harness: translation, flow control as
backpressure, the flood and attack defences, drain. Deterministic: a
MemoryReactorClock, StringTransports, a hyper-h2 client in the test."""
from __future__ import annotations

import attrs
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame,
                              SettingsFrame, WindowUpdateFrame)

from lbtwist.config.model import Http2Config
from lbtwist.l7.errors import ParseError
from lbtwist.l7.h2 import grpc
from lbtwist.l7.h2.connection import H2ServerProtocol
from lbtwist.l7.h2.flood import Allowance
from lbtwist.l7.h2.request import request_from_h2
from lbtwist.l7.h2.settings import problems
from lbtwist.l7.h2.stream import HIGH
from support.h2 import MemH2Client, get_headers, headers_frame_bytes
from support.l7 import MemHarness, listener_config


def harness(pools=None, **h2kw):
    lcfg = attrs.evolve(listener_config(h2=Http2Config(**h2kw)), http2=True)
    return MemHarness(pools or {"app": ["10.0.0.1:80", "10.0.0.2:80"]}, listener=lcfg)


def client(h, **kw):
    proto, t = h.client()
    c = MemH2Client(proto, t, **kw)
    return c


def inner(c):
    """The H2ServerProtocol behind the chooser."""
    p = c.proto.chosen
    assert isinstance(p, H2ServerProtocol)
    return p


# -- header translation (table) -------------------------------------------------------------

H = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1"), (b":authority", b"site.example:8443")]


@pytest.mark.parametrize("extra,end,check", [
    ((), True, lambda r: (r.method, r.target, r.host, r.has_body) == (b"GET", b"/a?b=1", b"site.example:8443", False)),
    (((b"cookie", b"a=1; b=2"),), True, lambda r: r.cookie == b"a=1; b=2" and (b"cookie", b"a=1; b=2") in r.headers),
    (((b"te", b"trailers"),), True, lambda r: all(n != b"te" for n, _ in r.all_headers)),
    ((), False, lambda r: r.has_body and r.chunked and r.te == b"chunked" and r.content_length is None),
    (((b"content-length", b"5"),), False, lambda r: r.has_body and not r.chunked and r.content_length == 5),
    (((b"x-forwarded-for", b"1.2.3.4"),), True, lambda r: r.x_forwarded_for == b"1.2.3.4" and all(n != b"x-forwarded-for" for n, _ in r.headers)),
    (((b"x-request-id", b"abc"),), True, lambda r: r.request_id == b"abc"),
])
def test_request_translation(extra, end, check):
    assert check(request_from_h2(H + list(extra), end))


@pytest.mark.parametrize("headers,status", [
    ([(b":method", b"CONNECT"), (b":authority", b"x:443")], 501),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a b"), (b":authority", b"x")], 400),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a#f"), (b":authority", b"x")], 400),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"a"), (b":authority", b"x")], 400),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"*"), (b":authority", b"x")], 400),
    ([(b":method", b"G(T"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")], 400),
    ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"bad host")], 400),
    ([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x"), (b"content-length", b"1x")], 400),
    ([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x"), (b"content-length", b"3")], 400),
])
def test_request_translation_refuses(headers, status):
    with pytest.raises(ParseError) as e:
        request_from_h2(headers, True)
    assert e.value.status == status


def test_grpc_helpers():
    assert grpc.parse_timeout(b"100m") == pytest.approx(0.1)
    assert grpc.parse_timeout(b"2S") == 2.0 and grpc.parse_timeout(b"1H") == 3600.0
    assert grpc.parse_timeout(b"123456789S") is None and grpc.parse_timeout(b"5x") is None
    assert grpc.is_grpc(b"application/grpc") and grpc.is_grpc(b"application/grpc+proto")
    assert not grpc.is_grpc(b"application/grpcx") and not grpc.is_grpc(None)
    t = dict(grpc.trailers_only(503, "no backend: pool a"))
    assert t[b":status"] == b"200" and t[b"grpc-status"] == b"14"
    assert t[b"grpc-message"] == b"no%20backend%3A%20pool%20a"
    assert grpc.status_for(504) == 4 and grpc.status_for(429) == 8


def test_allowance_refills():
    a = Allowance(3, 1.0)
    assert [a.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert a.take(1.5) and not a.take(1.5)


def test_limit_values_checked():
    bad = dict(problems(Http2Config(max_concurrent_streams=0, initial_window_size=100, max_resets=0,
                                    resets_per_second=0, max_age=-1)))
    assert set(bad) == {"max_concurrent_streams", "initial_window_size", "max_resets", "resets_per_second", "max_age"}
    assert "65535" in bad["initial_window_size"]
    assert not list(problems(Http2Config()))


# -- requests through the proxy ------------------------------------------------------------------

def test_get_over_h2c_reaches_http11_backend_and_answers():
    h = harness()
    c = client(h)
    sid = c.request("/x?y=1", headers=((b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"user-agent", b"t")))
    b = h.accept()
    sent = b.sent()
    assert sent.startswith(b"GET /x?y=1 HTTP/1.1\r\nhost: example.com\r\n")
    assert b"cookie: a=1; b=2\r\n" in sent and b"user-agent: t\r\n" in sent
    b.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\nx-b: 1\r\n\r\nhello")
    c.recv()
    r = c.replies[sid]
    assert r.status == 200 and r.body == b"hello" and r.ended
    names = [n for n, _ in r.headers]
    assert b"connection" not in names and (b"x-b", b"1") in r.headers and b"x-request-id" in names


def test_streams_of_one_connection_balance_across_backends():
    h = harness()
    c = client(h)
    s1 = c.request("/1")
    s3 = c.request("/3")
    b1, b2 = h.accept(), h.accept()
    assert {b1.address, b2.address} == {"10.0.0.1:80", "10.0.0.2:80"}
    b2.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nB")
    b1.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nA")
    c.recv()
    assert sorted([c.replies[s1].body, c.replies[s3].body]) == [b"A", b"B"]


def test_chunked_response_and_post_body_without_length():
    h = harness()
    c = client(h)
    sid = c.request("/up", method="POST", body=b"abc", end=False)
    b = h.accept()
    c.send_body(sid, b"def", end=True)
    head, _, body = b.sent().partition(b"\r\n\r\n")
    assert b"\r\ntransfer-encoding: chunked\r\n" in head
    # An empty DATA frame with END_STREAM is the end, never an empty (last) chunk of its own.
    assert body == b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
    b.reply(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    c.recv()
    r = c.replies[sid]
    assert r.status == 201 and r.body == b"ok" and r.ended
    assert b"transfer-encoding" not in [n for n, _ in r.headers]


def test_no_route_pool_error_page_and_bad_request_stay_on_their_stream():
    h = harness(pools={"app": []})
    c = client(h)
    s1 = c.request("/")
    s3 = c.request("/a b")
    r1, r3 = c.replies[s1], c.replies[s3]
    assert r1.status == 503 and b"no backend available" in r1.body
    assert r3.status == 400 and b"invalid :path" in r3.body
    assert c.terminated is None  # the connection serves on


# -- flow control is backpressure ------------------------------------------------------------------

def test_upload_window_stays_shut_while_the_backend_does_not_read():
    h = harness(initial_window_size=65535, connection_window_size=1 << 20)
    c = client(h)
    sid = c.request("/up", method="POST", body=b"", end=False)
    b = h.accept()
    b.transport.producer.pauseProducing()  # the backend's socket buffer is full
    sent = 0
    for _ in range(10):  # a client sending as fast as the windows allow
        sent += c.send_body(sid, b"x" * 200000, end=False)
    # lbtwist held the body back: the window never reopened past the first 64 KiB.
    assert sent <= 65535
    assert c.h2.local_flow_control_window(sid) == 0
    b.transport.producer.resumeProducing()
    c.recv()
    assert c.h2.local_flow_control_window(sid) > 0  # consumed: WINDOW_UPDATE came
    more = c.send_body(sid, b"y" * 1000, end=True)
    assert more == 1000


def test_download_pauses_the_backend_while_the_client_window_is_shut():
    h = harness()
    c = client(h, auto_window=False)
    sid = c.request("/big")
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 4000000\r\n\r\n")
    for _ in range(20):
        b.reply(b"z" * 16384)
    c.recv()
    assert len(c.replies[sid].body) == 65535  # the client's window
    assert b.transport.producerState == "paused"  # backend reads stopped
    s = inner(c).streams[sid]
    assert s.pending_size <= HIGH + 16384 * 20
    c.h2.acknowledge_received_data(65535, sid)
    c.h2.increment_flow_control_window(1 << 20)
    c.h2.increment_flow_control_window(1 << 20, stream_id=sid)
    c.send()
    assert b.transport.producerState == "producing"
    assert len(c.replies[sid].body) > 65535


# -- floods and attacks ------------------------------------------------------------------------------

def test_rapid_reset_in_one_read_generates_no_backend_work_and_ends_in_enhance_your_calm():
    h = harness(max_resets=50, resets_per_second=1.0)
    c = client(h)
    enc = Encoder()
    burst = b"".join(headers_frame_bytes(sid, get_headers(), encoder=enc) + RstStreamFrame(sid, error_code=8).serialize()
                     for sid in range(1, 401, 2))
    c.send_raw(burst)
    assert h.pending_connects() == 0  # no stream outlived its read: no backend was asked
    g = c.goaway()
    assert g is not None and g.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert c.t.disconnecting


def test_rapid_reset_across_reads_is_bounded_by_the_allowance():
    h = harness(max_resets=20, resets_per_second=1.0)
    c = client(h)
    enc = Encoder()
    for sid in range(1, 201, 2):
        if c.t.disconnecting:
            break
        c.send_raw(headers_frame_bytes(sid, get_headers(), encoder=enc))
        c.send_raw(RstStreamFrame(sid, error_code=8).serialize())
    assert c.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert h.pending_connects() <= 21  # each was cancelled; at most the allowance got that far


@pytest.mark.parametrize("frame", [
    lambda: SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 0}).serialize(),
    lambda: PingFrame(0, opaque_data=b"12345678").serialize(),
])
def test_settings_and_ping_floods_end_in_enhance_your_calm(frame):
    h = harness(max_control_frames=30, control_frames_per_second=1.0)
    c = client(h)
    c.send_raw(frame() * 200)
    assert c.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert c.t.disconnecting


@pytest.mark.parametrize("frames,refused", [(10, False), (200, True)])
def test_continuation_flood_is_refused_before_any_backend_work(frames, refused):
    h = harness()
    c = client(h)
    f = HeadersFrame(1)
    f.data = Encoder().encode(get_headers())[:3]
    data = [f.serialize()]
    for _ in range(frames):  # a header block that never ends (CVE-2024-27316)
        cf = ContinuationFrame(1)
        cf.data = b"\x00" * 100
        data.append(cf.serialize())
    c.send_raw(b"".join(data))
    if refused:
        assert c.goaway().error_code == ErrorCodes.PROTOCOL_ERROR and c.t.disconnecting
    else:
        assert c.goaway() is None
    assert h.pending_connects() == 0


@pytest.mark.parametrize("make", ["bomb", "big", "control"])
def test_hpack_bomb_and_oversized_header_list_end_the_connection(make):
    h = harness(max_header_list_size=16384)
    c = client(h)
    enc = Encoder()
    if make == "big":
        # 20 KB of headers in HEADERS + CONTINUATION (each frame within the frame size).
        block = enc.encode(get_headers() + [(b"x-big", b"v" * 20000)])
        f = HeadersFrame(1)
        f.data = block[:10000]
        f.flags.add("END_STREAM")
        cf = ContinuationFrame(1)
        cf.data = block[10000:]
        cf.flags.add("END_HEADERS")
        c.send_raw(f.serialize() + cf.serialize())
    else:
        # One 4 KB entry in the dynamic table, then referenced again, 1 byte each
        # (200 times: 800 KB decoded from 4 KB sent; once for the control).
        f = HeadersFrame(1)
        f.data = enc.encode(get_headers() + [(b"x-big", b"v" * 4000)]) + b"\xbe" * (200 if make == "bomb" else 1)
        f.flags.add("END_HEADERS")
        f.flags.add("END_STREAM")
        c.send_raw(f.serialize())
    if make == "control":
        assert c.goaway() is None and h.pending_connects() == 1
        return
    assert c.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM and c.t.disconnecting
    assert h.pending_connects() == 0


def test_stream_id_reuse_is_a_connection_error_and_reaches_the_backend_once():
    h = harness()
    c = client(h)
    enc = Encoder()
    c.send_raw(headers_frame_bytes(1, get_headers(), encoder=enc))
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    c.send_raw(headers_frame_bytes(1, get_headers(), encoder=enc))
    assert c.goaway() is not None and c.t.disconnecting
    assert h.pending_connects() == 0 and b.sent().count(b"GET / ") == 1


def test_data_past_the_window_is_a_flow_control_error():
    h = harness(initial_window_size=65535)
    c = client(h)
    c.send_raw(headers_frame_bytes(1, [(b":method", b"POST")] + get_headers()[1:], end_stream=False))
    c.send_raw(b"".join(DataFrame(1, data=b"x" * 16384).serialize() for _ in range(6)))
    g = c.goaway()
    assert g is not None and g.error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_more_streams_than_allowed_end_the_connection():
    h = harness(max_concurrent_streams=3)
    c = client(h)
    enc = Encoder()
    for sid in (1, 3, 5):
        c.send_raw(headers_frame_bytes(sid, get_headers(), encoder=enc))
    assert c.goaway() is None
    c.send_raw(headers_frame_bytes(7, get_headers(), encoder=enc))
    assert c.goaway() is not None


# -- drain and age ------------------------------------------------------------------------------------

def test_drain_sends_goaway_with_last_stream_lets_it_finish_and_refuses_newer():
    h = harness()
    c = client(h)
    s1 = c.request("/slow")
    b = h.accept()
    inner(c).drain()
    c.recv()
    g = c.goaway()
    assert g is not None and g.error_code == 0 and g.last_stream_id == s1
    assert not c.t.disconnecting
    enc = Encoder()
    c.send_raw(headers_frame_bytes(3, get_headers(), encoder=enc))
    assert any(isinstance(f, RstStreamFrame) and f.stream_id == 3 and f.error_code == ErrorCodes.REFUSED_STREAM
               for f in c.frames)
    assert h.pending_connects() == 0
    b.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    frames = c.frames
    c.recv()
    assert any(isinstance(f, DataFrame) and f.stream_id == 1 and f.data == b"ok" for f in frames)
    # the stream's end went out before the close
    assert any(f.stream_id == 1 and "END_STREAM" in f.flags for f in frames)
    assert c.t.disconnecting  # closed once the last stream ended


def test_max_age_drains_the_connection():
    h = harness(max_age=30.0)
    c = client(h)
    h.advance(29.0)
    c.recv()
    assert c.goaway() is None
    h.advance(2.0)
    c.recv()
    g = c.goaway()
    assert g is not None and g.error_code == 0 and c.t.disconnecting


# -- gRPC errors lbtwist answers itself ------------------------------------------------------------------

GRPC = ((b"content-type", b"application/grpc"), (b"te", b"trailers"))


def grpc_call(c, **kw):
    return c.request("/t.Echo/U", method="POST", body=b"\x00\x00\x00\x00\x02hi", headers=GRPC + kw.pop("headers", ()))


def test_grpc_no_backend_is_unavailable_trailers_only():
    h = harness(pools={"app": []})
    c = client(h)
    r = c.replies[grpc_call(c)]
    assert r.status == 200 and r.header(b"grpc-status") == b"14" and r.ended and r.body == b""
    assert b"no%20backend" in r.header(b"grpc-message")


def test_grpc_connect_failure_is_unavailable_and_timeout_deadline_exceeded():
    h = harness()
    c = client(h)
    sid = grpc_call(c)
    h.refuse()
    c.recv()
    assert c.replies[sid].header(b"grpc-status") == b"14"
    sid = grpc_call(c, headers=((b"grpc-timeout", b"200m"),))
    h.accept()
    h.advance(0.3)
    c.recv()
    r = c.replies[sid]
    assert r.header(b"grpc-status") == b"4" and r.ended


def test_http_errors_stay_http_for_non_grpc():
    h = harness(pools={"app": []})
    c = client(h)
    r = c.replies[c.request("/")]
    assert r.status == 503 and r.header(b"grpc-status") is None


# -- config -----------------------------------------------------------------------------------------

def _problems(text):
    import textwrap

    from lbtwist.config import load_config
    from lbtwist.config.problems import ConfigError
    from lbtwist.registry import Registry

    try:
        return [str(p) for p in load_config(textwrap.dedent(text), Registry.default(), source_name="t.yaml").warnings]
    except ConfigError as e:
        return [str(p) for p in e.problems]


def test_config_http2_keys_are_validated():
    ps = "\n".join(_problems("""
    listeners:
      - {name: l4, bind: "tcp:0", mode: tcp, pool: p, http2: true}
      - name: web
        bind: "tcp:1"
        mode: http
        pool: p
        http2: true
        http: {h2: {max_concurrent_streams: 0, max_header_list_size: 100, max_age: 0s}}
    pools:
      - {name: p, backends: [{address: "127.0.0.1:1"}]}
    """))
    assert "listeners[0].http2" in ps and "HTTP/2 needs mode: http" in ps
    assert "listeners[1].http.h2.max_concurrent_streams" in ps and "must be 1 to" in ps
    assert "listeners[1].http.h2.max_header_list_size" in ps
    assert "listeners[1].http.h2.max_age" in ps


def test_take_piece_cuts_the_first_chunk_to_the_window_and_keeps_the_rest_queued():
    from collections import deque

    from lbtwist.l7.h2.flow import take_piece

    pending = deque([b"abcdef", b"gh"])
    assert take_piece(pending, 4) == b"abcd"
    assert list(pending) == [b"ef", b"gh"]
    assert take_piece(pending, 16384) == b"ef"
    assert take_piece(pending, 2) == b"gh"
    assert not pending
