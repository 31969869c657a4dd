"""The exchange machine (lbtwist.l7.machine) driven without a reactor or a
socket: events in, and the actions it takes on a recording client side, a
recording backend connection and recording timers, compared as tables.

The context (routes, pools, retry state, breakers) is the real listener
factory on a MemoryReactorClock; only the IO sides are recordings, so every
decision below is the production one.
"""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from lbtwist.config.model import RetryConfig, RouteConfig
from lbtwist.l7 import machine as m
from lbtwist.l7.errors import ParseError
from lbtwist.l7.listener import HttpProxyFactory
from lbtwist.l7.parser import RequestParser, ResponseParser
from tests.support.l7 import listener_config, make_runtime


class Log(list):
    def add(self, *action: Any) -> None:
        self.append(action)


class Client:
    """A recording L{m.ClientSide}."""

    client_ip = b"192.0.2.7"
    client_ip_str = "192.0.2.7"
    client_addr = "192.0.2.7:40000"
    tls = False
    draining = False
    feeding = False

    def __init__(self, ctx: Any, log: Log) -> None:
        self.ctx = ctx
        self.log = log
        self.max_body = 0

    def tls_info(self) -> None:
        return None

    def limit_body(self, n: int) -> None:
        self.max_body = n

    def send_interim(self, resp: Any) -> bool:
        self.log.add("interim", resp.status)
        return True

    def send_head(self, resp: Any, extra: tuple, content_length: int | None) -> None:
        self.log.add("head", resp.status) if content_length is None else self.log.add("head", resp.status, content_length)

    def send_data(self, data: bytes) -> None:
        self.log.add("data", data)

    def send_end(self, trailers: tuple) -> None:
        self.log.add("end")

    def send_error(self, status: int, cause: str, extra: tuple) -> int:
        self.log.add("error", status)
        return len(cause)

    def flush(self) -> None:
        pass

    def pause_reading(self, reason: str) -> None:
        self.log.add("pause", reason)

    def resume_reading(self, reason: str) -> None:
        self.log.add("resume", reason)

    def reset(self) -> None:
        self.log.add("reset")

    def exchange_done(self, ex: Any, clean: bool) -> None:
        self.log.add("done", clean)

    def start_tunnel(self, tunnel: Any) -> None:
        self.log.add("tunnel")


class Conn:
    """A recording L{m.BackendSide}."""

    write_blocked = False
    received = False

    def __init__(self, log: Log, name: str, requests: int = 0) -> None:
        self.log = log
        self.name = name
        self.requests = requests
        self.kind: str | None = None

    def send_request(self, user, sink, head_request, body_timeout, head, response_timeout) -> None:
        self.log.add(self.name, "send", head.split(b" ")[0].decode())
        self.log.add(self.name, "timeout", "response")

    def start(self, user, sink, head_request, body_timeout) -> None:
        self.log.add(self.name, "start")

    def write(self, data: bytes) -> None:
        self.log.add(self.name, "write", data if len(data) < 20 else data.split(b" ")[0].decode())

    def finish(self, reusable: bool) -> None:
        self.log.add(self.name, "release", reusable)

    def abort(self) -> None:
        self.log.add(self.name, "discard")

    def set_timeout(self, delay: float, kind: str) -> None:
        self.kind = kind
        self.log.add(self.name, "timeout", kind)

    def clear_timeout(self) -> None:
        self.log.add(self.name, "clear-timeout")

    def timeout_kind(self) -> str | None:
        return self.kind

    def pause_reading(self) -> None:
        self.log.add(self.name, "pause")

    def resume_reading(self) -> None:
        self.log.add(self.name, "resume")

    def discard_rest(self) -> None:
        self.log.add(self.name, "discard-rest")

    def start_tunnel(self, tunnel: Any) -> None:
        self.log.add(self.name, "tunnel")

    def write_raw(self, data: bytes) -> None:
        self.log.add(self.name, "raw", data)


class Conns:
    """A backend's connection pool: hands out ``ready`` connections in
    order, queues when there are none."""

    limits = None
    #: The machine asks take_idle() only when there are idle ones; these
    #: hand theirs out through acquire().
    idle = ()

    def __init__(self, log: Log, ready: list[Conn]) -> None:
        self.log = log
        self.ready = ready
        self.queued: list[Any] = []

    def acquire(self, att: Any, fresh: bool = False) -> bool:
        if self.ready and not (fresh and self.ready[0].requests):
            att.connection_ready(self.ready.pop(0))
            return True
        self.queued.append(att)
        return False

    def cancel(self, att: Any) -> None:
        if att in self.queued:
            self.queued.remove(att)
            self.log.add("dequeued")

    def release(self, conn: Any, reusable: bool) -> None:
        self.log.add(conn.name, "pooled")


class Timers:
    def __init__(self, log: Log) -> None:
        self.log = log

    def start(self, kind: str, delay: float) -> None:
        self.log.add("timer", kind)

    def cancel(self, kind: str) -> None:
        self.log.add("cancel-timer", kind)


def request(raw: bytes):
    got = []

    class H:
        def on_request(self, req):
            got.append(req)

        def on_body(self, data):
            pass

        def on_end(self):
            pass

    RequestParser(H()).feed(raw)
    return got[0]


def response(raw: bytes, head_request: bool = False):
    got = []

    class H:
        def on_informational(self, resp):
            got.append(resp)

        def on_response(self, resp):
            got.append(resp)

        def on_body(self, data):
            pass

        def on_end(self):
            pass

    p = ResponseParser(H())
    p.expect(head_request)
    try:
        p.feed(raw)
    except ParseError:
        raise
    return got[0]


class Rig:
    """A listener context over backends a and b, each with its own recorded
    connections, and one exchange driven by events."""

    def __init__(self, raw: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", *, backends=("10.0.0.1:80", "10.0.0.2:80"),
                 ready: dict[str, list[int]] | None = None, routes=(), **http: Any) -> None:
        self.reactor = MemoryReactorClock()
        lcfg = listener_config(routes=list(routes), **http)
        rt = make_runtime(self.reactor, {"app": list(backends)}, lcfg)
        self.ctx = HttpProxyFactory(lcfg, rt)
        self.log = Log()
        self.conns = {}
        ready = ready if ready is not None else {"a": [0]}
        for name, b in zip("ab", rt.pools["app"].backends()):
            conns = [Conn(self.log, f"{name}{i}", reqs) for i, reqs in enumerate(ready.get(name, []))]
            self.conns[name] = self.ctx.connection_pools.by_backend[b] = Conns(self.log, conns)
        self.client = Client(self.ctx, self.log)
        self.ex = m.Exchange(self.client, request(raw))
        self.ex.timers = Timers(self.log)
        self.backends = rt.pools["app"].backends()

    def run(self, *events: Any) -> list[tuple]:
        for e in events:
            self.ex.handle(e)
        out = list(self.log)
        self.log.clear()
        return out

    def run_flow(self, name: str) -> list[tuple]:
        """A flow-control event (backend_write_blocked...), then the actions."""
        getattr(self.ex, name)()
        return self.run()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /p HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\n\r\n"
START = m.RequestHead()


def fail(rig: Rig, code: str, detail: str = "it broke") -> m.FailureEvent:
    return m.FailureEvent(rig.ex.attempt, code, detail)


# -- the tables ------------------------------------------------------------------------------

def test_a_get_on_a_pooled_connection():
    rig = Rig()
    assert rig.ex.state == m.ROUTING
    assert rig.run(START) == [("a0", "send", "GET"), ("a0", "timeout", "response")]
    assert rig.ex.state == m.AWAITING
    assert rig.run(m.ResponseHead(response(OK))) == [("head", 200)]
    assert rig.ex.state == m.RELAYING
    assert rig.run(m.ResponseData(b"ok"), m.ResponseEnd()) == [
        ("data", b"ok"), ("end",), ("a0", "release", True), ("done", True)]
    assert rig.ex.state == m.DONE and rig.ex.outcome == "ok"
    assert all(b.active == 0 for b in rig.backends)  # the pool heard of the attempt's end once


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),  # no route matches
])
def test_no_route_is_answered_by_the_machine(raw, status):
    rig = Rig(raw, routes=[RouteConfig(pool="app", match={"host": "elsewhere"})])
    rig.ctx.router.default = None
    rig.ctx.fixed_route = None
    assert rig.run(START) == [("error", status), ("done", True)]
    assert rig.ex.state == m.DONE and rig.ex.outcome == "rejected"


def test_queued_until_the_queue_timer_then_503():
    rig = Rig(backends=("10.0.0.1:80",), ready={})
    assert rig.run(START) == [("timer", "queue")]
    assert rig.ex.state == m.QUEUED
    assert rig.run(m.TimerFired("queue")) == [("dequeued",), ("error", 503), ("done", True)]
    assert rig.ex.outcome == "gateway" and rig.backends[0].active == 0


def test_a_connection_in_time_cancels_the_queue_timer():
    rig = Rig(backends=("10.0.0.1:80",), ready={})
    rig.run(START)
    att = rig.ex.attempt
    assert rig.run(m.ConnectionReady(att, Conn(rig.log, "late"))) == [
        ("cancel-timer", "queue"), ("late", "send", "GET"), ("late", "timeout", "response")]


def test_keepalive_race_resends_an_idempotent_request_once_on_a_fresh_connection():
    rig = Rig(ready={"a": [5, 0]})  # a0 was used before; a1 is fresh
    rig.run(START)
    assert rig.run(fail(rig, "closed")) == [("a1", "send", "GET"), ("a1", "timeout", "response")]
    assert rig.ex.tries == 1  # the same try, not a retry
    # a second close is not the race any more: a retry to the other backend
    assert rig.run(fail(rig, "closed")) == [("timer", "retry")]
    assert rig.ex.state == m.RETRY_WAIT


def test_keepalive_race_never_resends_a_non_idempotent_request():
    rig = Rig(POST, ready={"a": [5, 0]})
    rig.run(START)
    rig.run(m.BodyData(b"abcd"), m.BodyEnd())
    assert rig.run(fail(rig, "closed")) == [("error", 502), ("done", True)]
    assert rig.ex.tries == 1 and rig.ex.outcome == "gateway"


def test_connect_refused_retries_on_the_other_backend_after_the_backoff():
    rig = Rig(ready={"a": [], "b": [0]})
    assert rig.run(START) == [("timer", "queue")]
    assert rig.run(m.FailureEvent(rig.ex.attempt, "connect-refused", "refused")) == [
        ("cancel-timer", "queue"), ("timer", "retry")]
    assert rig.ex.state == m.RETRY_WAIT and rig.backends[0].active == 0
    assert rig.run(m.TimerFired("retry")) == [("b0", "send", "GET"), ("b0", "timeout", "response")]
    assert rig.ex.tries == 2 and rig.ex.backend is rig.backends[1]


def test_a_post_reset_after_it_was_sent_is_never_retried():
    rig = Rig(POST, ready={"a": [0], "b": [0]})
    assert rig.run(START) == [("a0", "start"), ("a0", "write", "POST"), ("resume", "body")]
    assert rig.ex.state == m.SENDING
    assert rig.run(m.BodyData(b"abcd"), m.BodyEnd()) == [("a0", "write", b"abcd"), ("a0", "timeout", "response")]
    assert rig.ex.state == m.AWAITING
    assert rig.run(fail(rig, "reset")) == [("error", 502), ("done", True)]


def test_body_held_while_queued_pauses_the_client_past_the_limit():
    rig = Rig(b"POST /p HTTP/1.1\r\nHost: x\r\ncontent-length: 300000\r\n\r\n", ready={})
    rig.run(START)
    chunk = b"x" * (m.BODY_PAUSE // 2)
    assert rig.run(m.BodyData(chunk), m.BodyData(chunk)) == []
    assert rig.run(m.BodyData(b"y")) == [("pause", "body")]


def test_mid_response_failure_resets_the_client_and_is_logged_as_a_gateway_failure():
    rig = Rig()
    rig.run(START, m.ResponseHead(response(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")), m.ResponseData(b"12345"))
    assert rig.run(fail(rig, "reset")) == [("reset",), ("done", False)]
    assert rig.ex.outcome == "gateway" and "mid-response" in rig.ex.error


def test_client_gone_discards_the_backend_connection():
    rig = Rig()
    rig.run(START, m.ResponseHead(response(OK)))
    assert rig.run(m.ClientGone()) == [("a0", "discard"), ("done", False)]
    assert rig.ex.outcome == "cancelled" and rig.backends[0].active == 0
    assert rig.run(m.ResponseData(b"ok")) == []  # nothing after DONE


def test_a_retried_status_is_withheld_and_tried_elsewhere():
    route = RouteConfig(pool="app", retry=RetryConfig(retry_on=[503]))
    rig = Rig(ready={"a": [0], "b": [0]}, routes=[route])
    rig.run(START)
    assert rig.run(m.ResponseHead(response(b"HTTP/1.1 503 No\r\ncontent-length: 0\r\n\r\n"))) == [
        ("a0", "discard-rest"), ("a0", "discard"), ("timer", "retry")]
    assert rig.run(m.TimerFired("retry"), m.ResponseHead(response(OK)), m.ResponseData(b"ok"), m.ResponseEnd()) == [
        ("b0", "send", "GET"), ("b0", "timeout", "response"), ("head", 200), ("data", b"ok"), ("end",),
        ("b0", "release", True), ("done", True)]
    assert rig.ex.tries == 2 and rig.ex.status == 200


def test_a_buffered_response_goes_out_whole_with_its_length():
    route = RouteConfig(pool="app", buffering="response")
    rig = Rig(routes=[route])
    rig.run(START)
    assert rig.run(m.ResponseHead(response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")),
                   m.ResponseData(b"ab"), m.ResponseData(b"cd")) == []
    assert rig.run(m.ResponseEnd()) == [("head", 200, 4), ("data", b"abcd"), ("end",), ("a0", "release", True),
                                        ("done", True)]


def test_buffered_request_waits_for_the_whole_body_and_answers_100_itself():
    route = RouteConfig(pool="app", buffering="request")
    raw = b"POST /p HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n"
    rig = Rig(raw, routes=[route])
    assert rig.run(START) == [("interim", 100)]
    assert rig.ex.state == m.AWAITING_BODY
    assert rig.run(m.BodyData(b"abcd")) == []
    assert rig.run(m.BodyEnd()) == [("a0", "start"), ("a0", "write", b"POST /p HTTP/1.1"[:4].decode()),
                                     ("a0", "timeout", "response")]


def test_interim_responses_are_relayed_and_count_as_response_bytes():
    rig = Rig()
    rig.run(START)
    assert rig.run(m.ResponseHead(response(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"))) == [("interim", 103)]
    assert rig.ex._interim


def test_backend_backpressure_pauses_the_client_and_bounds_the_stall():
    rig = Rig(POST)
    rig.run(START)
    assert rig.run_flow("backend_write_blocked") == [("pause", "backend"), ("a0", "timeout", "write")]
    assert rig.run_flow("backend_write_unblocked") == [("resume", "backend"), ("a0", "clear-timeout")]


def test_client_backpressure_pauses_the_backend_reads():
    rig = Rig()
    rig.run(START, m.ResponseHead(response(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")))
    assert rig.run_flow("client_write_blocked") == [("a0", "pause"), ("a0", "clear-timeout")]
    assert rig.run_flow("client_write_unblocked") == [("a0", "resume"), ("a0", "timeout", "body")]


def test_a_bad_body_is_never_forwarded_and_answered_400():
    rig = Rig(POST)
    rig.client.feeding = True  # the head and a bad chunk in one read: events without the end-of-read flush
    rig.ex.start()
    rig.ex.body_data(b"ab")
    rig.ex.protocol_error(400, "bad chunk")
    rig.ex.flush()
    assert rig.run() == [("a0", "start"), ("resume", "body"), ("a0", "discard"), ("error", 400), ("done", True)]
    assert rig.ex.req_out == () and not rig.ex.request_complete


def test_upgrade_hands_both_sides_to_a_tunnel():
    raw = b"GET /ws HTTP/1.1\r\nHost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    rig = Rig(raw)
    rig.run(START)
    assert rig.run(m.ResponseHead(response(b"HTTP/1.1 101 Switching\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"))) == [
        ("head", 101), ("a0", "tunnel"), ("tunnel",)]
    assert rig.ex.state == m.TUNNEL
    rig.ex.tunnel.on_close(rig.ex.tunnel)
    assert rig.run() == [("done", False)] and rig.backends[0].active == 0


def test_101_without_an_upgrade_request_is_a_bad_gateway():
    rig = Rig()
    rig.run(START)
    assert rig.run(m.ResponseHead(response(b"HTTP/1.1 101 Switching\r\nconnection: upgrade\r\nupgrade: x\r\n\r\n"))) == [
        ("a0", "discard"), ("error", 502), ("done", True)]


def test_every_state_is_named_and_events_reject_strangers():
    assert len(set(m.STATES)) == 10
    with pytest.raises(TypeError):
        Rig().ex.handle(object())


def test_a_response_too_large_to_buffer_is_dropped_with_the_rest_of_its_read(monkeypatch):
    monkeypatch.setattr(m, "MAX_BUFFERED_RESPONSE", 3)
    rig = Rig(routes=[RouteConfig(pool="app", buffering="response")])
    rig.run(START, m.ResponseHead(response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")))
    assert rig.run(m.ResponseData(b"12345")) == [("a0", "discard-rest"), ("a0", "discard"), ("error", 502),
                                                 ("done", True)]


def test_a_response_too_large_to_buffer_in_one_read_with_its_end_is_a_502(monkeypatch):
    """Through the real adapters: head, body and end in one backend read."""
    from tests.support.l7 import MemHarness

    monkeypatch.setattr(m, "MAX_BUFFERED_RESPONSE", 3)
    h = MemHarness(listener=listener_config(routes=[RouteConfig(pool="app", buffering="response")]))
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    b.reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n12345")
    assert t.value().startswith(b"HTTP/1.1 502 ") and b"too large to buffer" in t.value()
    assert b.transport.disconnecting or b.transport.disconnected


# -- a rate decision that comes later (the fleet limiter asking Redis) -------------------------

class HeldLimiter:
    """A rate limiter whose decisions come when the test gives them."""

    limited = 0

    def __init__(self) -> None:
        self.waiting: list[Any] = []

    def check_request(self, head: Any, now: float) -> Any:
        from twisted.internet import defer

        d = defer.Deferred()
        self.waiting.append(d)
        return d


def held_rig(raw: bytes = GET, buffering: str = "none", **kw: Any) -> tuple[Rig, HeldLimiter]:
    from lbtwist.config.model import RateLimitConfig

    rig = Rig(raw, routes=[RouteConfig(pool="app", buffering=buffering, rate_limit=RateLimitConfig(rate=100))], **kw)
    lim = HeldLimiter()
    rig.ctx.router.routes[0].target.resilience.rate_limiter = lim
    return rig, lim


def test_a_late_allow_forwards_then():
    from lbtwist.resilience.ratelimit import RateDecision

    rig, lim = held_rig()
    assert rig.run(START) == []
    assert rig.ex.state == m.RATE_WAIT and len(lim.waiting) == 1
    lim.waiting[0].callback(RateDecision(True))
    assert rig.run() == [("a0", "send", "GET"), ("a0", "timeout", "response")]
    assert rig.ex.state == m.AWAITING


def test_a_late_deny_is_a_429_with_retry_after_and_no_backend():
    from lbtwist.resilience.ratelimit import RateDecision

    rig, lim = held_rig()
    rig.run(START)
    lim.waiting[0].callback(RateDecision(False, 2.5))
    assert rig.run() == [("error", 429), ("done", True)]
    assert rig.ex.outcome == "rejected" and rig.backends[0].active == 0


def test_a_late_decision_for_a_client_gone_meanwhile_is_ignored():
    from lbtwist.resilience.ratelimit import RateDecision

    rig, lim = held_rig()
    rig.run(START)
    assert rig.run(m.ClientGone()) == [("done", False)]
    lim.waiting[0].callback(RateDecision(True))
    assert rig.run() == [] and rig.ex.state == m.DONE
    assert rig.run(m.RateDecided(RateDecision(True))) == []  # as an event too


def test_a_failed_decision_is_a_503_not_a_hang():
    rig, lim = held_rig()
    rig.run(START)
    lim.waiting[0].errback(RuntimeError("limiter broke"))
    assert rig.run() == [("error", 503), ("done", True)]
    assert rig.ex.outcome == "gateway"


def test_a_late_allow_with_the_buffered_body_complete_meanwhile_forwards_it_whole():
    from lbtwist.resilience.ratelimit import RateDecision

    rig, lim = held_rig(POST, buffering="request")
    assert rig.run(START, m.BodyData(b"abcd"), m.BodyEnd()) == []
    assert rig.ex.state == m.RATE_WAIT
    assert rig.run(m.RateDecided(RateDecision(True))) == [("a0", "start"), ("a0", "write", "POST"),
                                                         ("a0", "timeout", "response")]
    assert rig.ex.state == m.AWAITING


def test_a_late_allow_with_the_buffered_body_still_coming_resumes_the_paused_client():
    from lbtwist.resilience.ratelimit import RateDecision

    raw = b"POST /p HTTP/1.1\r\nHost: x\r\ncontent-length: 300000\r\n\r\n"
    rig, lim = held_rig(raw, buffering="request")
    rig.run(START)
    assert rig.run(m.BodyData(b"x" * (m.BODY_PAUSE + 1))) == [("pause", "body")]
    assert rig.run(m.RateDecided(RateDecision(True))) == [("resume", "body")]
    assert rig.ex.state == m.AWAITING_BODY
    assert rig.run(m.BodyData(b"y" * (300000 - m.BODY_PAUSE - 1)), m.BodyEnd())[0] == ("a0", "start")


def test_a_late_allow_without_buffering_sends_the_body_that_came_meanwhile():
    from lbtwist.resilience.ratelimit import RateDecision

    rig, lim = held_rig(POST)
    rig.run(START, m.BodyData(b"abcd"), m.BodyEnd())
    assert rig.run(m.RateDecided(RateDecision(True))) == [("a0", "start"), ("a0", "write", "POST"),
                                                         ("a0", "timeout", "response")]
