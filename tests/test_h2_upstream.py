"""HTTP/2 to backends (``pools[].protocol: h2``) on the in-memory harness:
multiplexing within a stream cap, per-request balancing, trailers relayed to
an HTTP/2 client (gRPC status), a backend's RST_STREAM and GOAWAY, max_age
and idle close. The backend is a hyper-h2 server in the test."""
from __future__ import annotations

import attrs
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
import h2.events as ev

from lbtwist.config.model import ConnectionPoolConfig, Http2Config
from lbtwist.l7.h2.upstream import H2BackendConnections, h2_request_headers, response_from_h2
from lbtwist.l7.parser import Request
from support.h2 import MemH2Client
from support.l7 import MemHarness, listener_config, split_responses


class H2Backend:
    """A hyper-h2 server behind one in-memory backend connection."""

    def __init__(self, mem) -> None:
        self.mem = mem
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        self.requests: dict[int, dict] = {}
        self.mem.reply(self.h2.data_to_send())
        self.pump()

    def pump(self) -> None:
        data = self.mem.sent()
        self.mem.clear()
        if data:
            for e in self.h2.receive_data(data):
                if isinstance(e, ev.RequestReceived):
                    self.requests[e.stream_id] = {"headers": dict(e.headers), "body": b"", "ended": False}
                elif isinstance(e, ev.DataReceived):
                    self.requests[e.stream_id]["body"] += e.data
                    self.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, ev.StreamEnded):
                    self.requests[e.stream_id]["ended"] = True
                elif isinstance(e, ev.StreamReset):
                    self.requests.setdefault(e.stream_id, {})["reset"] = e.error_code
        out = self.h2.data_to_send()
        if out:
            self.mem.reply(out)

    def respond(self, sid: int, body: bytes = b"ok", status: int = 200, trailers=None, headers=()) -> None:
        self.h2.send_headers(sid, [(b":status", b"%d" % status), *headers])
        self.h2.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            self.h2.send_headers(sid, trailers, end_stream=True)
        self.mem.reply(self.h2.data_to_send())
        self.pump()


def harness(backends=("10.0.0.1:80",), h2_client=False, **cp):
    lcfg = listener_config(h2=Http2Config())
    if h2_client:
        lcfg = attrs.evolve(lcfg, http2=True)
    h = MemHarness({"app": list(backends)}, listener=lcfg, connection_pool=ConnectionPoolConfig(**cp))
    rt = h.runtime
    rt.pool_configs["app"] = attrs.evolve(rt.pool_configs["app"], protocol="h2")
    return h


def http1(h, path="/"):
    proto, t = h.client()
    proto.dataReceived(b"GET %s HTTP/1.1\r\nHost: site\r\n\r\n" % path.encode())
    return t


def test_translation_of_the_request_head_and_response():
    req = Request()
    req.method, req.target, req.host = b"POST", b"/t.Echo/U", b"svc:50051"
    req.headers = [(b"Content-Type", b"application/grpc"), (b"x-a", b"1")]
    req.special_fields = [(b"host", b"svc:50051"), (b"transfer-encoding", b"chunked")]
    hs = h2_request_headers(req, b"http")
    assert hs[:4] == [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:50051"), (b":path", b"/t.Echo/U")]
    assert (b"content-type", b"application/grpc") in hs and (b"te", b"trailers") in hs
    assert all(n not in (b"host", b"transfer-encoding") for n, _ in hs)
    r = response_from_h2([(b":status", b"204"), (b"x-b", b"2"), (b"content-length", b"0")], False, True)
    assert r.status == 204 and r.no_body and r.headers == [(b"x-b", b"2")] and r.content_length == 0


def test_requests_share_one_connection_up_to_the_stream_cap():
    h = harness(max_streams=2, max_per_backend=4)
    clients = [http1(h, f"/{i}") for i in range(3)]
    assert h.pending_connects() == 2  # two streams on the first, the third opened a second connection
    b1, b2 = H2Backend(h.accept()), H2Backend(h.accept())
    assert sorted(r["headers"][b":path"] for r in b1.requests.values()) == [b"/0", b"/1"]
    assert [r["headers"][b":path"] for r in b2.requests.values()] == [b"/2"]
    for b in (b1, b2):
        for sid in list(b.requests):
            b.respond(sid, b"hi" + b.requests[sid]["headers"][b":path"])
    bodies = sorted(split_responses(t.value())[0].body for t in clients)
    assert bodies == [b"hi/0", b"hi/1", b"hi/2"]
    assert all(isinstance(bc, H2BackendConnections) for bc in h.factory.connection_pools.by_backend.values())
    # A later request reuses a connection: no new connect.
    t = http1(h, "/again")
    assert h.pending_connects() == 0
    b1.pump()
    b2.pump()
    b = b1 if any(r["headers"][b":path"] == b"/again" for r in b1.requests.values()) else b2
    sid = next(s for s, r in b.requests.items() if r["headers"][b":path"] == b"/again")
    b.respond(sid, b"again")
    assert split_responses(t.value())[0].body == b"again"


def test_each_request_is_balanced_across_backends():
    h = harness(backends=("10.0.0.1:80", "10.0.0.2:80"))
    proto, t = h.client()
    proto.dataReceived(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n")
    b1 = H2Backend(h.accept())
    b1.respond(1, b"A")
    proto.dataReceived(b"GET /b HTTP/1.1\r\nHost: s\r\n\r\n")
    b2 = H2Backend(h.accept())  # the same client connection, the other backend
    b2.respond(1, b"B")
    assert [r.body for r in split_responses(t.value())] == [b"A", b"B"]
    assert {b1.mem.address, b2.mem.address} == {"10.0.0.1:80", "10.0.0.2:80"}


def test_trailers_reach_an_h2_client_and_a_chunked_upload_arrives_whole():
    h = harness(h2_client=True)
    proto, t = h.client()
    c = MemH2Client(proto, t)
    sid = c.request("/t.Echo/U", method="POST", body=b"\x00\x00\x00\x00\x02hi",
                    headers=((b"content-type", b"application/grpc"), (b"te", b"trailers")))
    b = H2Backend(h.accept())
    req = b.requests[1]
    assert req["body"] == b"\x00\x00\x00\x00\x02hi" and req["ended"]
    assert req["headers"][b"te"] == b"trailers" and req["headers"][b":authority"] == b"example.com"
    b.respond(1, b"\x00\x00\x00\x00\x02yo", headers=((b"content-type", b"application/grpc"),),
              trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"fine")])
    c.recv()
    r = c.replies[sid]
    assert r.status == 200 and r.body == b"\x00\x00\x00\x00\x02yo" and r.ended
    assert dict(r.trailers) == {b"grpc-status": b"0", b"grpc-message": b"fine"}


def test_backend_reset_and_goaway():
    h = harness()
    t = http1(h, "/x")
    b = H2Backend(h.accept())
    b.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
    b.mem.reply(b.h2.data_to_send())
    assert split_responses(t.value())[0].status == 502
    # GOAWAY: the connection takes no new streams; the next request opens another.
    b.h2.close_connection(last_stream_id=1)
    b.mem.reply(b.h2.data_to_send())
    http1(h, "/y")
    assert h.pending_connects() == 1


def test_max_age_and_idle_close():
    h = harness(max_age=10.0, idle_timeout=4.0)
    t = http1(h, "/1")
    b = H2Backend(h.accept())
    b.respond(1, b"1")
    h.advance(3.0)
    http1(h, "/2")
    assert h.pending_connects() == 0  # reused while young
    b.pump()
    b.respond(3, b"2")
    h.advance(8.0)  # idle past idle_timeout: closed
    assert b.mem.transport.disconnecting
    http1(h, "/3")
    assert h.pending_connects() == 1
    assert split_responses(t.value())[0].body == b"1"


def test_a_trailers_only_answer_stays_one_headers_frame():
    """gRPC's trailers-only response (HEADERS with END_STREAM, grpc-status in
    it) must reach the client as one HEADERS frame, not headers then an
    empty DATA: a gRPC client reads the status only from the last HEADERS."""
    from hyperframe.frame import DataFrame, HeadersFrame

    h = harness(h2_client=True)
    proto, t = h.client()
    c = MemH2Client(proto, t)
    sid = c.request("/t.Echo/NF", method="POST", body=b"\x00\x00\x00\x00\x00",
                    headers=((b"content-type", b"application/grpc"),))
    b = H2Backend(h.accept())
    b.h2.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                          (b"grpc-status", b"5"), (b"grpc-message", b"nope")], end_stream=True)
    b.mem.reply(b.h2.data_to_send())
    c.recv()
    frames = [f for f in c.frames if getattr(f, "stream_id", 0) == sid and isinstance(f, (HeadersFrame, DataFrame))]
    assert len(frames) == 1 and isinstance(frames[0], HeadersFrame) and "END_STREAM" in frames[0].flags
    assert c.replies[sid].header(b"grpc-status") == b"5"


def test_a_stream_the_backend_never_processed_is_retried_elsewhere_even_for_post():
    """GOAWAY below the stream's id (or REFUSED_STREAM) means the backend
    never acted on it (RFC 9113 8.7): like a refused connect, a POST (a gRPC
    call) may go to another backend where the route retries connect failures
    of any method; UNAVAILABLE only when none is left."""
    from lbtwist.config.model import RetryConfig, RouteConfig

    lcfg = listener_config(pool=None, routes=[RouteConfig(pool="app", retry=RetryConfig(max_attempts=2, connect_failure_any_method=True))])
    h = MemHarness({"app": ["10.0.0.1:80", "10.0.0.2:80"]}, listener=lcfg)
    h.runtime.pool_configs["app"] = attrs.evolve(h.runtime.pool_configs["app"], protocol="h2")
    from lbtwist.l7.listener import HttpProxyFactory

    h.factory = HttpProxyFactory(lcfg, h.runtime)
    proto, t = h.client()
    proto.dataReceived(b"POST /call HTTP/1.1\r\nHost: s\r\ncontent-length: 2\r\n\r\nhi")
    b1 = H2Backend(h.accept())
    assert b1.requests[1]["body"] == b"hi"
    b1.h2.close_connection(last_stream_id=0)
    b1.mem.reply(b1.h2.data_to_send())
    h.advance(1.0)  # the retry backoff
    b2 = H2Backend(h.accept())
    assert b2.requests[1]["body"] == b"hi" and b2.mem.address != b1.mem.address
    b2.respond(1, b"done")
    assert split_responses(t.value())[0].body == b"done"
