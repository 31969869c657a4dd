"""Draining on the data plane: a draining backend gets no new work; work in
flight finishes until drain_timeout, then is cut (L7 and L4)."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import protocol, reactor, task
from twisted.web import resource, server

from lbtwist.config import load_config
from lbtwist.health.drain import drain_backend
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService
from support.l7 import Echo, RawClient, connect


class _Hang(resource.Resource):
    """/hang never answers; anything else answers at once."""

    isLeaf = True

    def render(self, request):
        if request.path == b"/hang":
            return server.NOT_DONE_YET
        return b"ok"






async def _connect(port: int) -> RawClient:
    return await connect(reactor, port)


@pytest_twisted.ensureDeferred
async def test_drain_timeout_cuts_work_still_in_flight_l7_and_l4():
    site = server.Site(_Hang())
    site.noisy = False
    web_a = reactor.listenTCP(0, site, interface="127.0.0.1")
    web_b = reactor.listenTCP(0, site, interface="127.0.0.1")
    echo_f = protocol.Factory.forProtocol(Echo)
    echo = reactor.listenTCP(0, echo_f, interface="127.0.0.1")
    a, b, e = (p.getHost().port for p in (web_a, web_b, echo))
    text = f"""
listeners:
  - {{name: web, bind: "tcp:0:interface=127.0.0.1", mode: http, pool: web}}
  - {{name: tcp, bind: "tcp:0:interface=127.0.0.1", mode: tcp, pool: tcp}}
pools:
  - name: web
    algorithm: ordered_failover
    drain_timeout: 300ms
    backends: [{{address: "127.0.0.1:{a}"}}, {{address: "127.0.0.1:{b}"}}]
  - name: tcp
    drain_timeout: 300ms
    backends: [{{address: "127.0.0.1:{e}"}}]
"""
    registry = Registry.default()
    svc = LbtwistService(load_config(text, registry).config, reactor, registry)
    svc.startService()
    try:
        web = svc.listeners.getServiceNamed("web").address.port
        tcp = svc.listeners.getServiceNamed("tcp").address.port
        rt = svc.runtime
        # an HTTP request hanging on backend a (a POST: cut, it must not be
        # re-sent elsewhere), and a TCP relay in use
        hung = await _connect(web)
        hung.transport.write(b"POST /hang HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        relay = await _connect(tcp)
        relay.transport.write(b"ping")
        while rt.pools["web"].get(f"127.0.0.1:{a}").active == 0 or relay.data != b"ping":
            await task.deferLater(reactor, 0.01, lambda: None)

        started = reactor.seconds()
        web_pool, tcp_pool = rt.pools["web"], rt.pools["tcp"]
        d_web = drain_backend(web_pool, web_pool.get(f"127.0.0.1:{a}"), reactor, "test")
        d_tcp = drain_backend(tcp_pool, tcp_pool.get(f"127.0.0.1:{e}"), reactor, "test")

        # while draining: new HTTP work goes to b; the relay still works
        fresh = await _connect(web)
        fresh.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = await fresh.closed(reactor, 5)
        assert body.startswith(b"HTTP/1.1 200") and body.endswith(b"ok")
        relay.transport.write(b"pong")
        while relay.data != b"pingpong":
            await task.deferLater(reactor, 0.01, lambda: None)

        # then drain_timeout passes with both still in flight: both are cut
        assert await d_web.addTimeout(5, reactor) == "expired"
        assert await d_tcp.addTimeout(5, reactor) == "expired"
        await relay.closed(reactor, 5)
        while not hung.data and reactor.seconds() - started < 5:
            await task.deferLater(reactor, 0.01, lambda: None)
        elapsed = reactor.seconds() - started
        assert 0.3 <= elapsed < 2.0
        # the request cut on the backend gets a gateway error naming it, not a hang
        assert hung.data.startswith(b"HTTP/1.1 502"), hung.data
        assert f"127.0.0.1:{a}".encode() in hung.data
        hung.transport.loseConnection()
    finally:
        await svc.stopService()
        for p in (web_a, web_b, echo):
            await p.stopListening()


async def _admin_post(port: int, path: str) -> bytes:
    c = await _connect(port)
    c.transport.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    return await c.closed(reactor, 10)


@pytest_twisted.ensureDeferred
async def test_admin_api_drain_cuts_at_drain_timeout_l7_and_l4():
    """POST .../drain through the admin listener: a hung request and a TCP
    relay on the drained backends are cut at drain_timeout, not left running."""
    site = server.Site(_Hang())
    site.noisy = False
    web_a = reactor.listenTCP(0, site, interface="127.0.0.1")
    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    a, e = web_a.getHost().port, echo.getHost().port
    text = f"""
listeners:
  - {{name: web, bind: "tcp:0:interface=127.0.0.1", mode: http, pool: web}}
  - {{name: tcp, bind: "tcp:0:interface=127.0.0.1", mode: tcp, pool: tcp}}
admin: {{bind: "tcp:0:interface=127.0.0.1"}}
pools:
  - {{name: web, drain_timeout: 500ms, backends: [{{address: "127.0.0.1:{a}"}}]}}
  - {{name: tcp, drain_timeout: 500ms, backends: [{{address: "127.0.0.1:{e}"}}]}}
"""
    registry = Registry.default()
    svc = LbtwistService(load_config(text, registry).config, reactor, registry)
    svc.startService()
    try:
        web = svc.listeners.getServiceNamed("web").address.port
        tcp = svc.listeners.getServiceNamed("tcp").address.port
        admin = svc.getServiceNamed("admin").address.port
        rt = svc.runtime
        hung = await _connect(web)
        hung.transport.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        relay = await _connect(tcp)
        relay.transport.write(b"ping")
        while rt.pools["web"].get(f"127.0.0.1:{a}").active == 0 or relay.data != b"ping":
            await task.deferLater(reactor, 0.01, lambda: None)

        started = reactor.seconds()
        for pool, port in (("web", a), ("tcp", e)):
            answer = await _admin_post(admin, f"/api/pools/{pool}/backends/127.0.0.1:{port}/drain")
            assert answer.startswith(b"HTTP/1.1 200"), answer
        await relay.closed(reactor, 10)
        while not hung.data and reactor.seconds() - started < 10:
            await task.deferLater(reactor, 0.01, lambda: None)
        elapsed = reactor.seconds() - started
        assert hung.data.startswith(b"HTTP/1.1 502"), hung.data
        # cut at the 0.5 s drain_timeout (a loaded box may add some), not left hanging
        assert 0.5 <= elapsed < 5.0, elapsed
        hung.transport.loseConnection()
    finally:
        await svc.stopService()
        for p in (web_a, echo):
            await p.stopListening()
