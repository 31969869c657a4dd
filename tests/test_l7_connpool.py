"""Backend connection pooling and request forwarding, deterministic: reuse,
the per-backend cap and its queue, idle expiry, max age and max requests,
draining, the keep-alive race, backpressure and outcome accounting."""
from __future__ import annotations

from lbtwist.config.model import ConnectionPoolConfig, RouteConfig
from support.l7 import MemHarness, listener_config, ok, split_responses

GET = b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n"


def harness(**cp):
    return MemHarness(connection_pool=ConnectionPoolConfig(**cp))


def conns(h):
    pool = h.runtime.pools["app"]
    return h.runtime.connection_pools.find(pool.backends()[0])


def test_idle_connection_is_reused_and_counted():
    h = harness()
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok(b"one"))
    for i in range(2, 6):
        b.clear()
        proto.dataReceived(GET % i)
        assert b.sent().startswith(b"GET /%d " % i)
        b.reply(ok(b"n"))
    assert h.pending_connects() == 0 and len(h.reactor.tcpClients) == 1
    assert conns(h).opened == 1 and conns(h).reused == 4
    assert [r.status for r in split_responses(t.value())] == [200] * 5


def test_cap_per_backend_queues_requests_in_order():
    h = harness(max_per_backend=2)
    clients = [h.client() for _ in range(3)]
    for i, (p, t) in enumerate(clients):
        p.dataReceived(GET % i)
    assert len(h.reactor.tcpClients) == 2  # the third waits for a free connection
    b0, b1 = h.accept(), h.accept()
    b0.clear()
    b0.reply(ok(b"zero"))  # frees b0: handed straight to the waiting request
    assert b0.sent().startswith(b"GET /2 ")
    b0.reply(ok(b"two"))
    b1.reply(ok(b"one"))
    assert [split_responses(t.value())[0].body for p, t in clients] == [b"zero", b"one", b"two"]
    assert len(h.reactor.tcpClients) == 2


def test_queue_wait_is_bounded_by_the_route_timeout():
    route = RouteConfig(match={"path_prefix": "/"}, pool="app", timeout=2.0)
    h = MemHarness(listener=listener_config(routes=[route]), connection_pool=ConnectionPoolConfig(max_per_backend=1))
    (p1, t1), (p2, t2) = h.client(), h.client()
    p1.dataReceived(GET % 1)
    p2.dataReceived(GET % 2)
    h.accept()
    h.advance(2.1)
    r = split_responses(t2.value())[0]
    assert r.status == 503 and b"no connection" in r.body
    assert conns(h).waiting == type(conns(h).waiting)()  # nothing left queued


def test_idle_connections_expire():
    h = harness(idle_timeout=4.0)
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok())
    h.advance(3.9)
    assert not b.transport.disconnecting
    h.advance(0.2)
    assert b.transport.disconnecting
    b.close()
    proto.dataReceived(GET % 2)
    assert h.pending_connects() == 1  # a new connection, not the expired one


def test_max_age_and_max_requests_retire_connections():
    h = harness(max_age=10.0)
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok())
    h.advance(10.5)  # older than max_age (idle timeout is 4s by default: expire first)
    proto.dataReceived(GET % 2)
    assert h.pending_connects() == 1

    h = harness(max_requests=2)
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok())
    proto.dataReceived(GET % 2)
    b.reply(ok())
    assert b.transport.disconnecting  # served its two requests
    b.close()
    proto.dataReceived(GET % 3)
    assert h.pending_connects() == 1


def test_draining_backend_loses_idle_and_busy_keepalives():
    h = MemHarness(pools={"app": ["10.0.0.1:80", "10.0.0.2:80"]})
    (p1, t1), (p2, t2) = h.client(), h.client()
    p1.dataReceived(GET % 1)
    b1 = h.accept()
    b1.reply(ok())  # b1 (10.0.0.1) idle now
    p2.dataReceived(GET % 2)
    b2 = h.accept()  # busy on 10.0.0.2
    pool = h.runtime.pools["app"]
    first, second = pool.backends()
    pool.set_draining(first, True, "deploy")
    assert b1.transport.disconnecting  # idle: closed at once
    pool.set_draining(second, True, "deploy")
    assert not b2.transport.disconnecting  # busy: finishes its request
    b2.reply(ok(b"done"))
    assert split_responses(t2.value())[0].body == b"done"
    assert b2.transport.disconnecting  # and is not kept


def test_keepalive_race_deterministic():
    h = harness()
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok())
    # backend closes the idle-looking connection just as the request is sent
    proto.dataReceived(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"GET /again HTTP/1.1\r\n" in b.sent()
    b.close()
    assert h.pending_connects() == 1  # re-sent on a fresh connection
    fresh = h.accept()
    assert fresh.sent().startswith(b"GET /again ")
    fresh.reply(ok(b"second try"))
    assert split_responses(t.value())[1].body == b"second try"
    # a fresh connection failing the same way is a real failure: no re-send
    proto.dataReceived(b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n")  # reuses `fresh`
    fresh.close()
    late = h.accept()
    late.close()  # the re-send's connection fails too
    r = split_responses(t.value())[2]
    assert r.status == 502


def test_keepalive_race_never_resends_post_or_partial_answers():
    h = harness()
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok())
    proto.dataReceived(b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
    b.close()
    assert h.pending_connects() == 0
    assert split_responses(t.value())[1].status == 502
    # GET answered partly then dropped: not the race, no re-send
    proto2, t2 = h.client()
    proto2.dataReceived(GET % 2)
    c = h.accept()
    c.reply(ok())
    proto2.dataReceived(GET % 3)
    c.reply(b"HTTP/1.1 200 OK\r\nContent-Le")
    c.close()
    assert h.pending_connects() == 0
    assert split_responses(t2.value())[1].status == 502


def test_unreusable_connections_are_closed():
    h = harness()
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
    assert b.transport.disconnecting
    b.close()
    proto.dataReceived(GET % 2)
    b2 = h.accept()
    b2.reply(ok() + b"HTTP/1.1 200 OK\r\n")  # bytes after the response: confused backend
    assert b2.transport.disconnecting
    b2.close()
    proto.dataReceived(GET % 3)
    b3 = h.accept()
    b3.reply(ok())
    b3.reply(b"unsolicited")  # talking while idle
    assert b3.transport.disconnecting
    assert [r.status for r in split_responses(t.value())] == [200, 200, 200]


def test_upload_backpressure_pauses_client_reads():
    h = harness()
    proto, t = h.client()
    proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
    b = h.accept()
    assert t.producerState == "producing"
    b.transport.producer.pauseProducing()  # the backend's socket buffer is full
    assert t.producerState == "paused"
    b.transport.producer.resumeProducing()
    assert t.producerState == "producing"


def test_request_body_buffered_until_connected_is_bounded():
    h = harness()
    proto, t = h.client()
    proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n")
    for _ in range(10):
        proto.dataReceived(b"b" * 65536)
    assert t.producerState == "paused"  # connect pending: reads stop after a bounded buffer
    b = h.accept()
    assert t.producerState == "producing"
    assert len(b.sent()) > 600000  # what was held is sent on connect


def test_outcomes_reported_to_pool():
    h = MemHarness(pools={"app": ["10.0.0.1:80"]})
    pool = h.runtime.pools["app"]
    seen = []
    pool.observe_outcomes(lambda backend, now, latency, outcome: seen.append(outcome))
    proto, t = h.client()
    proto.dataReceived(GET % 1)
    b = h.accept()
    b.reply(ok())
    proto.dataReceived(GET % 2)
    b.reply(ok(status=503))
    proto.dataReceived(GET % 3)
    b.reply(b"garbage\r\n\r\n")
    proto.dataReceived(GET % 4)
    b2 = h.accept()
    proto.connectionLost(None)  # client leaves mid-request
    assert seen == ["ok", "5xx", "gateway", "cancelled"]
    assert pool.backends()[0].active == 0 and pool.backends()[0].total == 4
    assert b2.transport.disconnecting


class _StrictClock:
    """A task.Clock whose callLater refuses a negative delay, as the real
    reactor does (ReactorBase.callLater asserts ``delay >= 0``)."""

    def __init__(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.delays = []

    def seconds(self):
        return self.clock.seconds()

    def callLater(self, delay, f, *a, **kw):
        assert delay >= 0, f"{delay} is not greater than or equal to 0 seconds"
        self.delays.append(delay)
        return self.clock.callLater(delay, f, *a, **kw)


class _SlowCloseConn:
    """An idle pooled connection whose close takes real time (5000 closes
    under load): the clock moves on while the sweeper closes it."""

    def __init__(self, clock, cost):
        from lbtwist.l7.connpool import BUSY

        self.clock, self.cost = clock, cost
        self.state = BUSY
        self.requests = 1
        self.created = clock.seconds()
        self.idle_since = 0.0
        self.read_paused = False
        self.closed_at = None

    def close(self):
        self.closed_at = self.clock.seconds()
        self.clock.clock.rightNow += self.cost  # time passes while closing


def test_sweeper_never_schedules_a_negative_delay_when_closing_takes_time():
    from lbtwist.l7.connpool import BackendConnections
    from lbtwist.pool import Backend

    clock = _StrictClock()
    bc = BackendConnections(Backend(address="10.0.0.1:80"), clock, ConnectionPoolConfig(idle_timeout=4.0), 1.0)
    old, young = _SlowCloseConn(clock, 1.5), _SlowCloseConn(clock, 0.0)
    bc.release(old, reusable=True)  # idle since 0
    clock.clock.advance(1.0)
    bc.release(young, reusable=True)  # idle since 1: due at 5
    clock.clock.advance(3.002)  # the sweep (due at 4.001) closes `old`, which takes 1.5 s: past young's expiry
    assert old.closed_at == 4.002
    assert all(d >= 0 for d in clock.delays)
    # the sweeper is still running: young is closed once due (late by at most
    # the time the previous sweep spent closing), not left open forever
    clock.clock.advance(1.0)
    assert young.closed_at is not None and 5.0 < young.closed_at <= 5.0 + 1.5 + 0.01
    assert bc.idle == []
