"""Client- and backend-side timeouts of the L7 proxy, deterministic: a
MemoryReactorClock and StringTransports, time moved by hand."""
from __future__ import annotations

from lbtwist.config.model import RouteConfig
from support.l7 import MemHarness, listener_config, ok, split_responses

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_slowloris_header_block_gets_408_after_header_timeout():
    h = MemHarness(listener=listener_config(header_timeout=10.0))
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(9):  # a byte a second does not extend the deadline
        h.advance(1.0)
        proto.dataReceived(b"X")
    assert t.value() == b""
    h.advance(1.01)
    assert t.value().startswith(b"HTTP/1.1 408 ")
    assert t.disconnecting
    assert h.pending_connects() == 0  # nothing went to a backend


def test_idle_new_connection_closes_silently():
    h = MemHarness(listener=listener_config(header_timeout=5.0))
    proto, t = h.client()
    h.advance(5.1)
    assert t.value() == b"" and t.disconnecting


def test_keepalive_idle_timeout_closes_between_requests():
    h = MemHarness(listener=listener_config(keepalive_timeout=7.0))
    proto, t = h.client()
    proto.dataReceived(GET)
    b = h.accept()
    b.reply(ok(b"hi"))
    assert split_responses(t.value())[0].body == b"hi"
    h.advance(6.9)
    assert not t.disconnecting
    h.advance(0.2)
    assert t.disconnecting


def test_request_body_stall_gets_408():
    h = MemHarness(listener=listener_config(body_timeout=3.0))
    proto, t = h.client()
    proto.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    b = h.accept()
    assert b.sent().endswith(b"\r\n\r\nabc")
    h.advance(2.0)
    proto.dataReceived(b"de")  # activity pushes the idle deadline
    h.advance(2.5)
    assert t.value() == b""
    h.advance(0.6)
    assert t.value().startswith(b"HTTP/1.1 408 ")
    assert b.transport.disconnecting or b.proto.state == 4  # the half-sent request is abandoned


def test_response_timeout_gives_504_naming_backend():
    route = RouteConfig(match={"path_prefix": "/"}, pool="app", timeout=2.0)
    h = MemHarness(listener=listener_config(routes=[route]))
    proto, t = h.client()
    proto.dataReceived(GET)
    b = h.accept()
    h.advance(1.9)
    assert t.value() == b""
    h.advance(0.2)
    r = split_responses(t.value())[0]
    assert r.status == 504 and b"10.0.0.1:80" in r.body
    pool = h.runtime.pools["app"]
    assert pool.backends()[0].active == 0  # on_finish was reported


def test_response_timeout_starts_after_the_body_is_sent():
    """A long upload is not cut by the response timeout (it times waiting for the answer)."""
    route = RouteConfig(match={"path_prefix": "/"}, pool="app", timeout=2.0)
    h = MemHarness(listener=listener_config(routes=[route], body_timeout=5.0))
    proto, t = h.client()
    proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n")
    b = h.accept()
    for piece in (b"a", b"b", b"c"):
        h.advance(1.5)
        proto.dataReceived(piece)
    assert t.value() == b""
    proto.dataReceived(b"d")
    h.advance(1.9)
    assert t.value() == b""
    h.advance(0.2)
    assert split_responses(t.value())[0].status == 504


def test_connect_timeout_is_504_and_refused_is_502():
    h = MemHarness()
    proto, t = h.client()
    proto.dataReceived(GET)
    from twisted.internet import error

    h.refuse(error.TimeoutError())
    r = split_responses(t.value())[0]
    assert r.status == 504 and b"connect timed out" in r.body
    t.clear()
    proto.dataReceived(GET)
    h.refuse()
    r = split_responses(t.value())[0]
    assert r.status == 502 and b"refused" in r.body
    # the connect timeout handed to the reactor is the pool's
    assert h.reactor.tcpClients[0][3] == 3.0


def test_stalled_response_body_aborts_client():
    h = MemHarness(listener=listener_config(body_timeout=4.0))
    proto, t = h.client()
    proto.dataReceived(GET)
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    assert t.value().endswith(b"partial")
    h.advance(4.1)
    assert b.transport.disconnecting
    assert t.disconnecting  # the client sees a truncated response, not a lie


def test_client_not_reading_is_dropped_and_backend_paused():
    h = MemHarness(listener=listener_config(body_timeout=5.0))
    proto, t = h.client()
    proto.dataReceived(GET)
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    # the client transport reports a full buffer: the backend must stop being read
    t.producer.pauseProducing()
    assert b.transport.producerState == "paused"
    h.advance(3.0)
    assert not t.disconnecting  # a paused backend is not "stalled"
    t.producer.resumeProducing()
    assert b.transport.producerState == "producing"
    t.producer.pauseProducing()
    h.advance(5.1)
    assert t.disconnecting  # write stall: the client stopped reading


def test_timers_do_not_leak():
    h = MemHarness()
    proto, t = h.client()
    proto.dataReceived(GET)
    b = h.accept()
    b.reply(ok())
    proto.connectionLost(None)
    b.close()
    h.advance(0)
    live = [c for c in h.reactor.getDelayedCalls() if c.active()]
    # only the idle-connection expiry of a closed backend could remain; it must be gone
    assert live == []
