"""Route options and smaller contracts of the L7 proxy, deterministic:
buffering modes, hash keys handed to balancers, 100-continue answered early,
interim responses, connection limits, traffic records, custom request-id
header, drain and abort."""
from __future__ import annotations

from zope.interface import implementer

from lbtwist.config.model import ListenerConfig, RouteConfig
from lbtwist.interfaces import IBalancer
from support.l7 import MemHarness, listener_config, ok, split_responses


@implementer(IBalancer)
class KeyRecorder:
    """Records the PickContext of every pick; picks the first candidate."""

    def __init__(self) -> None:
        self.keys = []

    def pick(self, candidates, ctx):
        self.keys.append(ctx.key)
        return candidates[0] if candidates else None

    def on_start(self, backend, now):
        pass

    def on_finish(self, backend, now, latency, ok):
        pass


def test_buffering_request_waits_for_the_whole_body_and_answers_100_continue():
    route = RouteConfig(match={"path_prefix": "/"}, pool="app", buffering="request")
    h = MemHarness(listener=listener_config(routes=[route]))
    proto, t = h.client()
    proto.dataReceived(b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\n")
    assert t.value() == b"HTTP/1.1 100 Continue\r\n\r\n"  # answered by lbtwist
    assert h.pending_connects() == 0  # no backend chosen before the body is in
    proto.dataReceived(b"abc")
    assert h.pending_connects() == 0
    proto.dataReceived(b"def")
    b = h.accept()
    sent = b.sent()
    assert sent.endswith(b"\r\n\r\nabcdef") and b"expect:" not in sent.lower()
    b.reply(ok(b"stored"))
    assert split_responses(t.value())[-1].body == b"stored"


def test_buffering_response_sends_one_content_length_answer():
    route = RouteConfig(match={"path_prefix": "/"}, pool="app", buffering="response")
    h = MemHarness(listener=listener_config(routes=[route]))
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert t.value() == b""  # nothing until the whole response is in
    b.reply(b"6\r\n world\r\n0\r\n\r\n")
    r = split_responses(t.value())[0]
    assert r.body == b"hello world"
    assert r.header(b"content-length") == b"11" and r.header(b"transfer-encoding") is None


def test_hash_key_from_header_cookie_and_source():
    routes = [
        RouteConfig(match={"path_prefix": "/h"}, pool="app", hash_key="header:X-User"),
        RouteConfig(match={"path_prefix": "/c"}, pool="app", hash_key="cookie:sid"),
        RouteConfig(match={"path_prefix": "/s"}, pool="app"),
    ]
    rec = KeyRecorder()
    h = MemHarness(listener=listener_config(routes=routes), balancer=lambda: rec)
    proto, t = h.client(peer="198.51.100.4")
    proto.dataReceived(b"GET /h HTTP/1.1\r\nHost: a\r\nX-User: alice\r\n\r\n")
    b = h.accept()
    b.reply(ok())
    proto.dataReceived(b"GET /c HTTP/1.1\r\nHost: a\r\nCookie: x=1; sid=\"s-42\"\r\n\r\n")
    b.reply(ok())
    proto.dataReceived(b"GET /s HTTP/1.1\r\nHost: a\r\n\r\n")
    b.reply(ok())
    assert rec.keys == [b"alice", b"s-42", b"198.51.100.4"]


def test_expect_continue_answered_early_by_backend_closes_after_response():
    h = MemHarness()
    proto, t = h.client()
    proto.dataReceived(b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
    b = h.accept()
    assert b"expect: 100-continue" in b.sent()
    b.reply(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
    r = split_responses(t.value())[0]
    assert r.status == 401 and r.body == b"nope"
    # the body was never sent: the backend connection is not reused, and the
    # client connection is not kept (its unsent body would be taken as a request)
    assert b.transport.disconnecting
    proto.dataReceived(b"x" * 1000)  # discarded while lingering
    assert h.pending_connects() == 0
    h.advance(2.1)
    assert t.disconnecting


def test_interim_103_is_relayed_to_http11_clients():
    h = MemHarness()
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    b.reply(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + ok(b"page"))
    rs = split_responses(t.value())
    assert [r.status for r in rs] == [103, 200]
    assert rs[0].header(b"link") == b"</a.css>; rel=preload"


def test_max_connections_refuses_with_503():
    h = MemHarness(listener=ListenerConfig(name="web", bind="tcp:0", mode="http", pool="app", max_connections=2))
    (p1, t1), (p2, t2) = h.client(), h.client()
    p3, t3 = h.client()
    assert t3.value().startswith(b"HTTP/1.1 503 ") and t3.disconnecting
    assert not t1.disconnecting and not t2.disconnecting
    p1.connectionLost(None)
    p4, t4 = h.client()
    assert t4.value() == b""  # a slot freed up


def test_traffic_record_per_request():
    h = MemHarness()
    records = []
    h.runtime.traffic.subscribe(records.append)
    proto, t = h.client(peer="203.0.113.8")
    proto.dataReceived(b"POST /p?x=1 HTTP/1.1\r\nHost: a\r\nX-Request-Id: r-1\r\nContent-Length: 3\r\n\r\nabc")
    b = h.accept()
    b.reply(ok(b"12345", status=201))
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    assert len(records) == 2
    r = records[0]
    assert (r.kind, r.listener, r.client, r.pool, r.backend, r.method, r.path, r.status) == (
        "http", "web", "203.0.113.8:40000", "app", "10.0.0.1:80", "POST", "/p", 201)
    assert (r.bytes_in, r.bytes_out, r.tries, r.request_id, r.outcome) == (3, 5, 1, "r-1", "ok")
    assert records[1].status == 400 and records[1].outcome == "rejected"


def test_a_backend_failing_mid_response_is_logged_as_a_gateway_failure():
    h = MemHarness()
    records = []
    h.runtime.traffic.subscribe(records.append)
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
    b.close(clean=False)
    assert t.value().endswith(b"12345") and t.disconnected
    [r] = records
    assert (r.status, r.outcome, r.bytes_out) == (200, "gateway", 5)
    assert "mid-response" in r.error


def test_custom_request_id_header():
    h = MemHarness(listener=listener_config(request_id_header="X-Correlation-Id"))
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    sent = b.sent().lower()
    assert b"x-correlation-id: " in sent and b"x-request-id" not in sent
    b.clear()
    b.reply(ok())
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nX-Correlation-Id: mine\r\n\r\n")
    assert b.sent().lower().count(b"x-correlation-id") == 1 and b"mine" in b.sent()


def test_drain_closes_idle_and_marks_the_busy_response_close():
    h = MemHarness()
    (idle, ti), (busy, tb) = h.client(), h.client()
    busy.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    idle.drain()
    busy.drain()
    assert ti.disconnecting and not tb.disconnecting
    b.reply(ok(b"done"))
    r = split_responses(tb.value())[0]
    assert r.body == b"done" and r.header(b"connection") == b"close"
    assert tb.disconnecting


def test_abort_drops_client_and_backend():
    h = MemHarness()
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    proto.abort()
    assert t.disconnecting and b.transport.disconnecting
    assert h.runtime.pools["app"].backends()[0].active == 0
