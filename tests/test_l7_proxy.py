"""The L7 proxy end to end on real 127.0.0.1 sockets: forwarding, keep-alive
reuse counted at the backend, pipelining, HTTP/1.0, forwarding headers,
error statuses, the keep-alive race, 100-continue, WebSocket tunnel."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from lbtwist.config.model import HeaderRewrite, RouteConfig
from lbtwist.l7.listener import http_listener
from support.l7 import (
    Origin,
    connect,
    listener_config,
    make_runtime,
    ok,
    raw_request,
    split_responses,
)

pytestmark = pytest.mark.integration


class Proxy:
    def __init__(self, pools: dict[str, list[str]], listener=None, **kw) -> None:
        self.listener = listener or listener_config()
        self.runtime = make_runtime(reactor, pools, self.listener, **kw)
        self.service = http_listener(self.listener, self.runtime)
        self.service.startService()
        self.port = self.service.address.port

    async def stop(self) -> None:
        await self.service.stopService(drain_timeout=1.0)
        if self.runtime.connection_pools is not None:
            self.runtime.connection_pools.close_idle()
        # let closes settle (bounded)
        await task.deferLater(reactor, 0.01, lambda: None)


def lbtwist_delayed_calls():
    return [c for c in reactor.getDelayedCalls() if "lbtwist" in repr(c)]


@pytest.fixture(autouse=True)
def no_leftover_timers():
    """Every test closes its connections; no lbtwist timer may outlive it."""
    yield
    left = lbtwist_delayed_calls()
    assert not left, left


@pytest_twisted.ensureDeferred
async def test_forwards_get_and_post_with_keepalive_reuse_at_backend():
    origin = Origin(lambda req, p: ok(b"%s %s body=%s" % (req.method, req.url, req.body))).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        c = await connect(reactor, proxy.port)
        for i in range(5):
            before = len(split_responses(c.data))
            if i % 2:
                c.transport.write(b"POST /p%d HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" % i)
            else:
                c.transport.write(b"GET /g%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            await c.wait(lambda d: len(split_responses(d)) > before, reactor)
        rs = split_responses(c.data)
        assert [r.status for r in rs] == [200] * 5
        assert rs[0].body == b"GET /g0 body="
        assert rs[1].body == b"POST /p1 body=hello"
        # five requests, one client connection, one backend connection
        assert len(origin.requests) == 5
        assert origin.connections == 1
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order():
    # The origin answers /slow late, so order must come from the proxy.
    pending = []

    def handler(req, p):
        if req.url == b"/slow":
            pending.append(p)
            reactor.callLater(0.05, lambda: p.transport.write(ok(b"slow")))
            return None
        return ok(b"fast " + req.url)

    origin = Origin(handler).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        data = (b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nxyz"
                b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n")
        rs, c = await raw_request(reactor, proxy.port, data, count=4)
        assert [r.body for r in rs] == [b"slow", b"fast /b", b"fast /c", b"fast /d"]
        assert [r.url for r in origin.requests] == [b"/slow", b"/b", b"/c", b"/d"]
        assert origin.requests[2].body == b"xyz"
        assert origin.connections == 1  # pipelined requests reuse the one backend connection
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_connection_close_and_http10():
    origin = Origin().listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        # HTTP/1.1 + Connection: close -> answered, then closed
        rs, c = await raw_request(reactor, proxy.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        await c.closed(reactor)
        assert rs[0].status == 200 and rs[0].header(b"connection") == b"close"
        # HTTP/1.0 without keep-alive: closed after the response, no Host needed
        rs, c = await raw_request(reactor, proxy.port, b"GET /y HTTP/1.0\r\n\r\n")
        await c.closed(reactor)
        assert rs[0].status == 200 and rs[0].body == b"ok /y"
        # HTTP/1.0 with keep-alive: stays open, says so
        c = await connect(reactor, proxy.port)
        c.transport.write(b"GET /z HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await c.wait(lambda d: len(split_responses(d)) == 1, reactor)
        c.transport.write(b"GET /z2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await c.wait(lambda d: len(split_responses(d)) == 2, reactor)
        rs = split_responses(c.data)
        assert rs[0].header(b"connection").lower() == b"keep-alive"
        assert not c.lost
        c.transport.loseConnection()
        # the backend always gets HTTP/1.1
        assert {r.version for r in origin.requests} == {"1.1"}
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_close_delimited_response_to_http11_and_http10_clients():
    def handler(req, p):
        p.transport.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil-close-body")
        p.transport.loseConnection()

    origin = Origin(handler).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        rs, c = await raw_request(reactor, proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert rs[0].body == b"until-close-body"
        assert rs[0].header(b"transfer-encoding") == b"chunked"  # re-framed for the 1.1 client
        c.transport.loseConnection()
        c = await connect(reactor, proxy.port)
        c.transport.write(b"GET / HTTP/1.0\r\n\r\n")
        data = await c.closed(reactor)
        assert data.endswith(b"\r\n\r\nuntil-close-body")
        assert b"transfer-encoding" not in data.lower()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_forwarding_headers_hop_by_hop_and_request_id():
    origin = Origin(lambda req, p: ok(b"x", headers=[(b"Connection", b"X-Secret-Hop"), (b"X-Secret-Hop", b"1"),
                                                     (b"Keep-Alive", b"timeout=5"), (b"X-Kept", b"yes")])).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        req = (b"GET /h HTTP/1.1\r\nHost: Example.com:8080\r\nConnection: keep-alive, X-Hop\r\nX-Hop: drop-me\r\n"
               b"Keep-Alive: 300\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Forwarded-For: 203.0.113.9\r\n"
               b"Via: 1.1 upstream\r\nX-End: kept\r\n\r\n")
        rs, c = await raw_request(reactor, proxy.port, req)
        seen = origin.requests[0]
        names = {k.lower() for k, _ in seen.headers}
        for hop in (b"connection", b"x-hop", b"keep-alive", b"te", b"proxy-connection"):
            assert hop not in names, hop
        assert seen.header(b"x-end") == b"kept"
        assert seen.header(b"host") == b"Example.com:8080"
        assert seen.header(b"x-forwarded-for") == b"203.0.113.9, 127.0.0.1"
        assert seen.header(b"x-forwarded-proto") == b"http"
        assert seen.header(b"x-forwarded-host") == b"Example.com:8080"
        assert seen.header(b"via") == b"1.1 upstream, 1.1 lbtwist"
        rid = seen.header(b"x-request-id")
        assert rid and len(rid) > 8
        r = rs[0]
        assert r.header(b"x-request-id") == rid  # echoed to the client
        assert r.header(b"x-secret-hop") is None and r.header(b"keep-alive") is None
        assert r.header(b"x-kept") == b"yes"
        # a request id sent by the client is passed through unchanged
        c.transport.write(b"GET /h2 HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-123\r\n\r\n")
        await c.wait(lambda d: len(split_responses(d)) == 2, reactor)
        assert origin.requests[1].header(b"x-request-id") == b"abc-123"
        assert [v for k, v in origin.requests[1].headers if k.lower() == b"x-request-id"] == [b"abc-123"]
        assert split_responses(c.data)[1].header(b"x-request-id") == b"abc-123"
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_rfc7239_forwarded_mode():
    origin = Origin().listen(reactor)
    proxy = Proxy({"app": [origin.address]}, listener=listener_config(forwarded="forwarded"))
    try:
        rs, c = await raw_request(reactor, proxy.port,
                                  b"GET / HTTP/1.1\r\nHost: shop.test\r\nForwarded: for=198.51.100.1\r\n\r\n")
        seen = origin.requests[0]
        assert seen.header(b"forwarded") == b'for=198.51.100.1, for=127.0.0.1;proto=http;host="shop.test"'
        assert seen.header(b"x-forwarded-for") is None
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_route_header_rewrites():
    origin = Origin(lambda req, p: ok(b"x", headers=[(b"Server", b"secret/1.0"), (b"X-Powered-By", b"php")])).listen(reactor)
    route = RouteConfig(
        match={"path_prefix": "/api/"}, pool="app",
        request_headers=HeaderRewrite(add={"X-Added": "1"}, set={"User-Agent": "lbtwist-test"}, remove=["X-Drop"]),
        response_headers=HeaderRewrite(remove=["Server", "X-Powered-By"], set={"Cache-Control": "no-cache"}),
    )
    proxy = Proxy({"app": [origin.address]}, listener=listener_config(routes=[route]))
    try:
        rs, c = await raw_request(reactor, proxy.port,
                                  b"GET /api/v HTTP/1.1\r\nHost: a\r\nUser-Agent: curl\r\nX-Drop: 1\r\n\r\n")
        seen = origin.requests[0]
        assert seen.header(b"x-added") == b"1"
        assert [v for k, v in seen.headers if k.lower() == b"user-agent"] == [b"lbtwist-test"]
        assert seen.header(b"x-drop") is None
        r = rs[0]
        assert r.header(b"server") is None and r.header(b"x-powered-by") is None
        assert r.header(b"cache-control") == b"no-cache"
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_error_statuses_name_their_cause():
    # 502: connection refused (a port nobody listens on)
    dead = Origin().listen(reactor)
    dead_addr = dead.address
    await dead.stop()
    garbage = Origin(lambda req, p: b"this is not http\r\n\r\n").listen(reactor)
    silent = Origin(lambda req, p: None).listen(reactor)
    proxy = Proxy({"dead": [dead_addr], "garbage": [garbage.address], "silent": [silent.address], "empty": []},
                  listener=listener_config(pool=None, request_timeout=0.3, routes=[
                      RouteConfig(match={"path_prefix": "/dead"}, pool="dead"),
                      RouteConfig(match={"path_prefix": "/garbage"}, pool="garbage"),
                      RouteConfig(match={"path_prefix": "/silent"}, pool="silent"),
                      RouteConfig(match={"path_prefix": "/empty"}, pool="empty"),
                  ]))
    try:
        async def get(path):
            rs, c = await raw_request(reactor, proxy.port, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
            c.transport.loseConnection()
            return rs[0]

        r = await get(b"/dead")
        assert r.status == 502 and dead_addr.encode() in r.body and b"refused" in r.body
        r = await get(b"/garbage")
        assert r.status == 502 and garbage.address.encode() in r.body
        r = await get(b"/silent")
        assert r.status == 504 and silent.address.encode() in r.body
        r = await get(b"/empty")
        assert r.status == 503 and b"no backend available" in r.body
        r = await get(b"/nowhere")
        assert r.status == 404 and b"no route" in r.body
    finally:
        await proxy.stop()
        await garbage.stop()
        await silent.stop()


@pytest_twisted.ensureDeferred
async def test_keepalive_race_resends_idempotent_once_on_fresh_connection():
    """The backend closes a kept-alive connection just as a request arrives:
    GET is re-sent on a fresh connection; POST gets 502 and is sent once."""
    state = {"n": 0}

    def handler(req, p):
        state["n"] += 1
        if req.header(b"x-drop"):
            p.transport.loseConnection()  # closes without answering
            return None
        return ok(b"served " + req.url)

    origin = Origin(handler).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        c = await connect(reactor, proxy.port)
        c.transport.write(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        await c.wait(lambda d: len(split_responses(d)) == 1, reactor)
        assert origin.connections == 1
        # GET on the reused connection: dropped there, re-sent on a fresh one
        drop_first = {"armed": True}

        def handler2(req, p):
            if drop_first["armed"]:
                drop_first["armed"] = False
                p.transport.loseConnection()
                return None
            return ok(b"served " + req.url)

        origin.handler = handler2
        c.transport.write(b"GET /idem HTTP/1.1\r\nHost: a\r\n\r\n")
        await c.wait(lambda d: len(split_responses(d)) == 2, reactor)
        r = split_responses(c.data)[1]
        assert r.status == 200 and r.body == b"served /idem"
        assert [x.url for x in origin.requests].count(b"/idem") == 2
        assert origin.connections == 2
        # POST on the (new, now reused) connection: dropped -> 502, never re-sent
        drop_first["armed"] = True
        c.transport.write(b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
        await c.wait(lambda d: len(split_responses(d)) == 3, reactor)
        r = split_responses(c.data)[2]
        assert r.status == 502
        assert [x.url for x in origin.requests].count(b"/pay") == 1
        # POST with an Idempotency-Key is re-sent (warm a connection first:
        # a failure on a fresh connection is not the race)
        c.transport.write(b"GET /warm2 HTTP/1.1\r\nHost: a\r\n\r\n")
        await c.wait(lambda d: len(split_responses(d)) == 4, reactor)
        drop_first["armed"] = True
        c.transport.write(b"POST /pay2 HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k1\r\nContent-Length: 2\r\n\r\n{}")
        await c.wait(lambda d: len(split_responses(d)) == 5, reactor)
        r = split_responses(c.data)[4]
        assert r.status == 200 and r.body == b"served /pay2"
        sent = [x for x in origin.requests if x.url == b"/pay2"]
        assert len(sent) == 2 and all(x.body == b"{}" for x in sent)
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_relayed_from_backend():
    def handler(req, p):
        return ok(b"len=%d" % len(req.body))

    origin = Origin(handler).listen(reactor)
    # the origin (httptools) does not send 100 itself: script it
    orig_data = origin.protocol.dataReceived

    proxy = Proxy({"app": [origin.address]})
    try:
        c = await connect(reactor, proxy.port)

        def on_data(self, data, _orig=orig_data):
            if b"expect: 100-continue" in data.lower() and not getattr(self, "_continued", False):
                self._continued = True
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            _orig(self, data)

        origin.protocol.dataReceived = on_data
        c.transport.write(b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        await c.wait(lambda d: b"100 Continue" in d, reactor)
        assert split_responses(c.data)[0].status == 100
        c.transport.write(b"abcd")
        await c.wait(lambda d: len(split_responses(d)) == 2, reactor)
        r = split_responses(c.data)[1]
        assert r.status == 200 and r.body == b"len=4"
        assert origin.requests[0].header(b"expect") == b"100-continue"
        c.transport.loseConnection()
    finally:
        origin.protocol.dataReceived = orig_data
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_tunnels_both_ways():
    def handler(req, p):
        assert req.header(b"upgrade") == b"websocket"
        p.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                          b"Sec-WebSocket-Accept: xyz\r\n\r\nserver-hello")

    def echo(p, data):
        p.transport.write(b"echo:" + data)

    origin = Origin(handler).listen(reactor)
    origin.on_upgrade = echo
    proxy = Proxy({"app": [origin.address]})
    try:
        c = await connect(reactor, proxy.port)
        c.transport.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                          b"Sec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await c.wait(lambda d: b"server-hello" in d, reactor)
        head, _, rest = c.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"upgrade: websocket" in head.lower() and b"connection: upgrade" in head.lower()
        assert rest == b"server-hello"
        c.transport.write(b"\x81\x05frame")
        await c.wait(lambda d: d.endswith(b"echo:\x81\x05frame"), reactor)
        big = bytes(range(256)) * 4096  # 1 MiB each way through the tunnel
        c.transport.write(big)
        echoed = lambda d: d.split(b"server-hello", 1)[1].replace(b"echo:", b"")  # noqa: E731
        await c.wait(lambda d: len(echoed(d)) >= 7 + len(big), reactor, timeout=10)
        assert echoed(c.data) == b"\x81\x05frame" + big
        c.transport.loseConnection()
        await task.deferLater(reactor, 0.05, lambda: None)
        assert not origin.live  # the backend side closed with the client
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_sticky_cookie_pins_and_repins():
    a = Origin(lambda req, p: ok(b"A")).listen(reactor)
    b = Origin(lambda req, p: ok(b"B")).listen(reactor)
    proxy = Proxy({"app": [a.address, b.address]}, listener=listener_config(sticky_cookie="lbsrv"))
    try:
        rs, c = await raw_request(reactor, proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        first = rs[0].body
        cookie = rs[0].header(b"set-cookie").split(b";")[0]
        assert cookie.startswith(b"lbsrv=")
        for i in range(4):
            c.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: other=1; %s\r\n\r\n" % cookie)
            await c.wait(lambda d, n=i + 2: len(split_responses(d)) == n, reactor)
        rs = split_responses(c.data)
        assert [r.body for r in rs] == [first] * 5  # round robin would alternate
        assert all(r.header(b"set-cookie") is None for r in rs[1:])
        # the pinned backend goes away (disabled): re-pinned, not an error
        pool = proxy.runtime.pools["app"]
        pinned = next(x for x in pool.backends() if (x.address == (a.address if first == b"A" else b.address)))
        pool.set_enabled(pinned, False, "test")
        c.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: %s\r\n\r\n" % cookie)
        await c.wait(lambda d: len(split_responses(d)) == 6, reactor)
        r = split_responses(c.data)[5]
        assert r.status == 200 and r.body != first
        assert r.header(b"set-cookie") is not None and r.header(b"set-cookie").split(b";")[0] != cookie
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_head_204_304_responses_have_no_body():
    def handler(req, p):
        if req.url == b"/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if req.url == b"/304":
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + (b"x" * 1000 if req.method != b"HEAD" else b"")

    origin = Origin(handler).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        c = await connect(reactor, proxy.port)
        c.transport.write(b"HEAD /big HTTP/1.1\r\nHost: a\r\n\r\n")
        await c.wait(lambda d: d.endswith(b"\r\n\r\n"), reactor)
        assert b"content-length: 1000" in c.data.lower()
        c.transport.write(b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\nGET /304 HTTP/1.1\r\nHost: a\r\n\r\nGET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        await c.wait(lambda d: d.endswith(b"x" * 1000), reactor)
        rest = c.data.split(b"\r\n\r\n", 1)[1]
        rs = split_responses(rest)
        assert [r.status for r in rs] == [204, 304, 200]
        assert rs[2].body == b"x" * 1000
        assert origin.connections == 1  # all on one kept-alive backend connection
        c.transport.loseConnection()
    finally:
        await proxy.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_drain_finishes_current_request_with_connection_close():
    pending = []

    def handler(req, p):
        pending.append(p)
        return None  # answer later

    origin = Origin(handler).listen(reactor)
    proxy = Proxy({"app": [origin.address]})
    try:
        busy = await connect(reactor, proxy.port)
        busy.transport.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        idle = await connect(reactor, proxy.port)
        idle.transport.write(b"GET /quick HTTP/1.1\r\nHost: a\r\n\r\n")
        await task.deferLater(reactor, 0.05, lambda: None)
        pending[1].transport.write(ok(b"quick"))
        await idle.wait(lambda d: len(split_responses(d)) == 1, reactor)
        pending.pop(1)
        d = proxy.service.stopService(drain_timeout=5.0)
        await idle.closed(reactor)  # an idle keep-alive closes at once
        assert not busy.lost
        pending[0].transport.write(ok(b"late"))
        await busy.closed(reactor)
        r = split_responses(busy.data)[0]
        assert r.body == b"late" and r.header(b"connection") == b"close"
        await d
    finally:
        await proxy.stop() if proxy.service.running else None
        if proxy.runtime.connection_pools:
            proxy.runtime.connection_pools.close_idle()
        await origin.stop()
