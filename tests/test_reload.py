"""Hot reload: a bad file keeps the running config; a good one is applied as a
diff without dropping in-flight requests or established TCP relays."""
from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.request

import attrs
import pytest
import pytest_twisted
from twisted.internet import error, protocol, reactor as real_reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.web import resource, server

from lbtwist.config import load_config
from lbtwist.pool import Health
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService, ReloadError
from support.l7 import Echo, RawClient, connect
from support.procs import Proc, free_port, twistd_cmd


def _cfg(web: int, echo: int, extra_listener: str = "", backends: str = "", algorithm: str = "round_robin") -> str:
    lines = [
        "listeners:",
        "  - name: web",
        f'    bind: "tcp:{web}:interface=127.0.0.1"',
        "    mode: http",
        "    pool: web",
        "  - name: echo",
        f'    bind: "tcp:{echo}:interface=127.0.0.1"',
        "    mode: tcp",
        "    pool: echo",
        extra_listener,
        "pools:",
        "  - name: web",
        f"    algorithm: {algorithm}",
        "    backends:",
        backends,
        "  - name: echo",
        '    backends: [{address: "127.0.0.1:9"}]',
        "",
    ]
    return "\n".join(l for l in lines if l)


def _listener(name: str, port: int) -> str:
    return f'  - name: {name}\n    bind: "tcp:{port}:interface=127.0.0.1"\n    mode: http\n    pool: web'


def _backends(*pairs: tuple[str, int]) -> str:
    return "\n".join(f'      - {{address: "{a}", weight: {w}}}' for a, w in pairs)


def test_apply_diffs_pools_and_listeners_in_place():
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1), ("127.0.0.1:9002", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    pool = svc.runtime.pools["web"]
    b1 = pool.get("127.0.0.1:9001")
    b2 = pool.get("127.0.0.1:9002")
    old_balancer = pool.balancer
    extra = _listener("web2", 8003)
    b = load_config(
        _cfg(8001, 8002, extra_listener=extra, algorithm="least_connections",
             backends=_backends(("127.0.0.1:9002", 3), ("127.0.0.1:9003", 1))),
        reg,
    )
    b1.active = 1  # in flight: removal must drain, not cut
    d = svc.apply(b.config)
    assert d.called
    assert pool is svc.runtime.pools["web"]  # changed in place: state survives
    assert pool.get("127.0.0.1:9002") is b2 and b2.weight == 3
    b3 = pool.get("127.0.0.1:9003")
    assert b3 is not None and b3.health is Health.HEALTHY  # no active check: assumed healthy
    assert b1.draining and pool.get("127.0.0.1:9001") is b1  # draining until its work ends
    assert pool.balancer is not old_balancer
    assert {s.name for s in svc.listeners} == {"web", "echo", "web2"}
    assert svc.runtime.config is b.config
    ports = [p for p, *_ in reactor.tcpServers]
    assert ports.count(8003) == 1
    b1.active = 0
    pool.on_start(b1)
    pool.on_finish(b1, 0.01, True)  # last unit of work ends: drained, then removed
    assert pool.get("127.0.0.1:9001") is None
    svc.stopService()


def test_rebound_listener_releases_its_port_before_the_new_one_binds():
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    old_echo = next(s for s in svc.listeners if s.name == "echo")
    b = load_config(_cfg(8001, 8004, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc.apply(b.config)
    new_echo = next(s for s in svc.listeners if s.name == "echo")
    assert new_echo is not old_echo and old_echo.port is None
    assert new_echo.address.port == 8004
    svc.stopService()


def _get(port: int, path: str) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
        return r.status, json.loads(r.read())


def test_sighup_reload_keeps_inflight_request_and_tcp_stream(tmp_path):
    web, echo, web2, h1, h2, e1 = (free_port() for _ in range(6))
    demo = (
        "demo:\n"
        f'  http: ["tcp:{h1}:interface=127.0.0.1", "tcp:{h2}:interface=127.0.0.1"]\n'
        f'  tcp_echo: ["tcp:{e1}:interface=127.0.0.1"]\n'
    )

    def config(extra: str, web_backends: str) -> str:
        text = _cfg(web, echo, extra_listener=extra, backends=web_backends)
        return text.replace('"127.0.0.1:9"', f'"127.0.0.1:{e1}"') + "\n" + demo

    path = tmp_path / "lb.yaml"
    path.write_text(config("", _backends((f"127.0.0.1:{h1}", 1))))
    proc = Proc(twistd_cmd(path), cwd=tmp_path)
    try:
        proc.wait_for("listener echo on", timeout=30)
        proc.wait_for("listener web on", timeout=30)
        # a TCP relay and a slow HTTP request, both in flight across the reload
        stream = socket.create_connection(("127.0.0.1", echo), timeout=10)
        stream.sendall(b"before\n")
        assert stream.recv(100) == b"before\n"
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=_get(web, "/slow?delay=2")))
        t.start()
        proc.wait_for("delaying response", timeout=15)

        # a broken file is refused and the old config keeps serving
        path.write_text("listeners: [\n")
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for("reload failed, keeping the running config", timeout=15)

        extra = _listener("web2", web2)
        path.write_text(config(extra, _backends((f"127.0.0.1:{h2}", 1))))
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for("configuration applied", timeout=15)

        t.join(20)
        status, body = result["r"]
        assert status == 200 and str(h1) in body["backend"]  # finished on the removed backend
        stream.sendall(b"after\n")
        assert stream.recv(100) == b"after\n"
        stream.close()
        # new requests go to the new backend, through old and new listeners
        assert str(h2) in _get(web, "/")[1]["backend"]
        assert str(h2) in _get(web2, "/")[1]["backend"]
        assert proc.terminate(timeout=30) == 0, proc.output()
    finally:
        proc.kill()


def test_sigterm_drains_inflight_request_then_exits_zero(tmp_path):
    web, echo, h1, e1 = (free_port() for _ in range(4))
    text = _cfg(web, echo, backends=_backends((f"127.0.0.1:{h1}", 1))).replace(
        '"127.0.0.1:9"', f'"127.0.0.1:{e1}"')
    text += f'\ndemo: {{http: ["tcp:{h1}:interface=127.0.0.1"], tcp_echo: ["tcp:{e1}:interface=127.0.0.1"]}}\n'
    path = tmp_path / "lb.yaml"
    path.write_text(text)
    proc = Proc(twistd_cmd(path), cwd=tmp_path)
    try:
        proc.wait_for("listener web on", timeout=30)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=_get(web, "/slow?delay=1.5")))
        t.start()
        proc.wait_for("delaying response", timeout=15)
        proc.p.send_signal(signal.SIGTERM)
        proc.wait_for("SIGTERM received", timeout=10)
        # no new connections once it stops accepting
        proc.wait_for("stopping; draining listeners", timeout=10)
        t.join(20)
        assert result["r"][0] == 200  # the in-flight request finished
        assert proc.finish(timeout=30) == 0, proc.output()
    finally:
        proc.kill()


def test_reload_keeps_the_latency_rule_off_for_l4_pools():
    """A tcp listener's pool never gets the latency outlier rule, whether the
    reload changed the pool's health section or only started using the pool
    from a tcp listener."""
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    latency_on = lambda name: svc.health.pools[name].cfg.passive.latency.enabled
    assert not latency_on("echo") and latency_on("web")
    text = _cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1)))
    text = text.replace('    backends: [{address: "127.0.0.1:9"}]',
                        '    backends: [{address: "127.0.0.1:9"}]\n    health: {passive: {consecutive_5xx: 3}}')
    b = load_config(text, reg)
    assert b.config.pools[1].health.passive.consecutive_5xx == 3
    svc.apply(b.config)
    assert svc.health.pools["echo"].cfg.passive.consecutive_5xx == 3
    assert not latency_on("echo")
    # the web pool, unchanged, becomes the pool of a tcp listener too
    extra = '  - name: raw\n    bind: "tcp:8005:interface=127.0.0.1"\n    mode: tcp\n    pool: web'
    c = load_config(_cfg(8001, 8002, extra_listener=extra, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc.apply(c.config)
    assert not latency_on("web")
    svc.stopService()


def _limited(rate_burst: str = "{rate: 1, burst: 2}", retry_budget: str = "5") -> str:
    return f"""
listeners:
  - name: web
    bind: "tcp:8001:interface=127.0.0.1"
    mode: http
    pool: web
    routes:
      - match: {{path_prefix: /api}}
        pool: web
        rate_limit: {rate_burst}
        retry: {{budget_percent: {retry_budget}}}
pools:
  - name: web
    backends: [{{address: "127.0.0.1:9001"}}]
"""


def _route(svc, name="web"):
    router = svc.listeners.getServiceNamed("web").proxy.router
    routes = (*router.routes, router.default)
    return next(r.target.resilience for r in routes if r.name == name)


def test_reload_keeps_rate_limit_buckets_and_retry_budgets_of_unchanged_routes():
    """A reload of an unchanged file (or one that changes other things) must
    not lift limits: the route's buckets and budget history carry over. A
    route whose settings changed starts afresh."""
    reactor = MemoryReactorClock()
    reactor.advance(100)
    reg = Registry.default()
    svc = LbtwistService(load_config(_limited(), reg).config, reactor, reg)
    svc.startService()
    rr = _route(svc)
    now = reactor.seconds()
    assert rr.rate_limiter.check("10.0.0.1", now).allowed and rr.rate_limiter.check("10.0.0.1", now).allowed
    assert not rr.rate_limiter.check("10.0.0.1", now).allowed  # burst spent
    for _ in range(40):
        rr.budget.record_request(now)
    default_budget = _route(svc, "default").budget
    # the same file again (new, equal config objects), with another backend added
    text = _limited().replace('[{address: "127.0.0.1:9001"}]', '[{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]')
    svc.apply(load_config(text, reg).config)
    kept = _route(svc)
    assert kept is rr
    assert not kept.rate_limiter.check("10.0.0.1", now).allowed  # still limited
    assert kept.budget.requests_total == 40
    assert _route(svc, "default").budget is default_budget
    # the admin API's retry counters follow the running routes
    assert svc.runtime.resilience.routes["web"]["web"] is kept
    # the route's rate limit changed: new buckets
    svc.apply(load_config(_limited("{rate: 5, burst: 5}"), reg).config)
    fresh = _route(svc)
    assert fresh is not rr and fresh.rate_limiter.check("10.0.0.1", now).allowed
    assert svc.runtime.resilience.routes["web"]["web"] is fresh
    svc.stopService()


# -- bind first: real sockets ------------------------------------------------------------



class _Named(resource.Resource):
    """Answers every request with its name."""

    isLeaf = True

    def __init__(self, name: bytes):
        super().__init__()
        self.name = name

    def render(self, request):
        return self.name






async def _open(port: int) -> RawClient:
    return await connect(real_reactor, port)


async def _http(port: int, method: str = "GET", path: str = "/") -> bytes:
    c = await _open(port)
    c.transport.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n"
                      "Connection: close\r\n\r\n".encode())
    return await c.closed(real_reactor, 20)


async def _refused(port: int) -> bool:
    try:
        c = await _open(port)
    except error.ConnectionRefusedError:
        return True
    c.transport.loseConnection()
    return False


def _bind(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


def _live_config(listeners, backends: dict, admin: int) -> str:
    lines = ["listeners:"]
    for name, bind, mode, pool in listeners:
        lines.append(f'  - {{name: {name}, bind: "{bind}", mode: {mode}, pool: {pool}}}')
    lines.append("pools:")
    for pool, port in backends.items():
        lines.append(f'  - {{name: {pool}, drain_timeout: 1s, backends: [{{address: "127.0.0.1:{port}"}}]}}')
    lines.append(f'admin: {{bind: "{_bind(admin)}"}}')
    return "\n".join(lines) + "\n"


class _Origins:
    """Two HTTP backends answering "A" / "B" and a TCP echo, on ephemeral ports."""

    def __init__(self):
        self.ports = []
        for name in (b"A", b"B"):
            site = server.Site(_Named(name))
            site.noisy = False
            self.ports.append(real_reactor.listenTCP(0, site, interface="127.0.0.1"))
        self.ports.append(real_reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1"))
        self.a, self.b, self.echo = (p.getHost().port for p in self.ports)

    async def stop(self):
        for p in self.ports:
            await p.stopListening()


def _start(path, text: str) -> LbtwistService:
    path.write_text(text)
    reg = Registry.default()
    svc = LbtwistService(load_config(str(path), reg).config, real_reactor, reg, config_path=str(path))
    svc.privilegedStartService()
    svc.startService()
    return svc


@pytest_twisted.ensureDeferred
async def test_reload_that_cannot_bind_leaves_the_running_listeners_and_config(tmp_path):
    """A listener moved to a busy port, and a new listener on a busy port:
    the reload is refused (422), the old port keeps serving every request,
    nothing else was switched or left bound; once the port is free the same
    file applies."""
    origins = _Origins()
    blocker = real_reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
    busy = blocker.getHost().port
    web, extra, admin = free_port(), free_port(), free_port()
    path = tmp_path / "lb.yaml"
    svc = _start(path, _live_config([("web", _bind(web), "http", "app")], {"app": origins.a}, admin))
    try:
        assert (await _http(web)).endswith(b"\r\n\r\nA")
        running = svc.runtime.config
        port_before = svc.listeners.getServiceNamed("web").port
        # 1. web moves to the busy port; a new listener and another backend come too
        path.write_text(_live_config([("web", _bind(busy), "http", "app"), ("extra", _bind(extra), "http", "app")],
                                     {"app": origins.b}, admin))
        answer = await _http(admin, "POST", "/api/reload")
        assert answer.startswith(b"HTTP/1.1 422"), answer
        answers = [await _http(web) for _ in range(30)]
        assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"\r\n\r\nA") for a in answers)
        assert svc.runtime.config is running
        assert svc.listeners.getServiceNamed("web").port is port_before
        assert b'"reloaded":false' in answer and f"{busy}".encode() in answer and b"nothing was changed" in answer
        assert await _refused(extra)  # bound for the attempt, closed again
        config = await _http(admin, "GET", "/api/config")
        assert f'"bind":"{_bind(web)}"'.encode() in config and b'"extra"' not in config
        assert not svc.runtime.pools["app"].get(f"127.0.0.1:{origins.a}").draining
        assert svc.runtime.pools["app"].get(f"127.0.0.1:{origins.b}") is None
        # 2. the same through reload() (SIGHUP's path), with only a new listener on the busy port
        path.write_text(_live_config([("web", _bind(web), "http", "app"), ("extra", _bind(busy), "http", "app")],
                                     {"app": origins.a}, admin))
        with pytest.raises(ReloadError, match=f"listener extra: cannot bind '{_bind(busy)}'"):
            await svc.reload()
        assert svc.runtime.config is running and [s.name for s in svc.listeners] == ["web"]
        assert b'"extra"' not in await _http(admin, "GET", "/api/config")
        assert (await _http(web)).endswith(b"\r\n\r\nA")
        # 3. the port is free again: the move applies
        await blocker.stopListening()
        path.write_text(_live_config([("web", _bind(busy), "http", "app")], {"app": origins.b}, admin))
        assert (await _http(admin, "POST", "/api/reload")).startswith(b"HTTP/1.1 200")
        assert (await _http(busy)).endswith(b"\r\n\r\nB")
        assert await _refused(web)
    finally:
        await svc.stopService()
        await origins.stop()
        if blocker.connected:
            await blocker.stopListening()


@pytest_twisted.ensureDeferred
async def test_reload_hands_sockets_over_for_the_same_bind_text(tmp_path):
    """Two listeners swapping their binds, and a listener rebuilt on the same
    bind (http -> tcp): each new listener takes over the running socket
    (never closed), so the swap works and no connection is refused. A swap
    with other bind texts for the same ports is refused, naming the holder."""
    origins = _Origins()
    x, y, z, admin = free_port(), free_port(), free_port(), free_port()
    backends = {"pa": origins.a, "pb": origins.b, "echo": origins.echo}
    path = tmp_path / "lb.yaml"
    svc = _start(path, _live_config(
        [("a", _bind(x), "http", "pa"), ("b", _bind(y), "http", "pb"), ("c", _bind(z), "http", "pa")], backends, admin))
    try:
        assert (await _http(x)).endswith(b"A") and (await _http(y)).endswith(b"B") and (await _http(z)).endswith(b"A")
        sockets = {name: svc.listeners.getServiceNamed(name).port for name in ("a", "b", "c")}
        path.write_text(_live_config(
            [("a", _bind(y), "http", "pa"), ("b", _bind(x), "http", "pb"), ("c", _bind(z), "tcp", "echo")],
            backends, admin))
        await svc.reload()
        got = {name: svc.listeners.getServiceNamed(name) for name in ("a", "b", "c")}
        assert got["a"].port is sockets["b"] and got["b"].port is sockets["a"] and got["c"].port is sockets["c"]
        assert (await _http(x)).endswith(b"\r\n\r\nB") and (await _http(y)).endswith(b"\r\n\r\nA")
        relay = await _open(z)  # now a TCP relay to the echo backend
        relay.transport.write(b"ping")
        while relay.data != b"ping":
            await task.deferLater(real_reactor, 0.01, lambda: None)
        relay.transport.loseConnection()
        # the same ports, other texts: cannot be handed over, and each is held
        running = svc.runtime.config
        path.write_text(_live_config(
            [("a", f"tcp:port={x}:interface=127.0.0.1", "http", "pa"),
             ("b", f"tcp:port={y}:interface=127.0.0.1", "http", "pb"),
             ("c", _bind(z), "tcp", "echo")], backends, admin))
        with pytest.raises(ReloadError, match="of the running config holds port"):
            await svc.reload()
        assert svc.runtime.config is running
        assert (await _http(x)).endswith(b"\r\n\r\nB") and (await _http(y)).endswith(b"\r\n\r\nA")
    finally:
        await svc.stopService()
        await origins.stop()


def test_a_refused_reload_changes_no_pool_either():
    """A plugin that cannot be built (here an unknown algorithm on the second
    pool) refuses the reload before the first pool's backends are touched."""
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1), ("127.0.0.1:9002", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    web = svc.runtime.pools["web"]
    balancer = web.balancer
    b = load_config(_cfg(8001, 8004, extra_listener=_listener("web2", 8003),
                         backends=_backends(("127.0.0.1:9002", 5))), reg).config
    pools = [b.pools[0], attrs.evolve(b.pools[1], algorithm="no_such_algorithm")]
    with pytest.raises(ReloadError, match="unknown algorithm 'no_such_algorithm'"):
        svc.apply(attrs.evolve(b, pools=pools))
    assert svc.runtime.config is a.config
    assert [(x.address, x.weight, x.draining) for x in web.backends()] == [
        ("127.0.0.1:9001", 1, False), ("127.0.0.1:9002", 1, False)]
    assert web.balancer is balancer
    assert {s.name for s in svc.listeners} == {"web", "echo"}
    assert [p for p, *_ in reactor.tcpServers] == [8001, 8002]
    svc.stopService()


class _UDPEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class _UDPClient(protocol.DatagramProtocol):
    def __init__(self):
        self.got = []

    def datagramReceived(self, data, addr):
        self.got.append(data)


async def _udp_roundtrip(client: _UDPClient, port: int, payload: bytes) -> None:
    started = real_reactor.seconds()
    while payload not in client.got:
        assert real_reactor.seconds() - started < 20, client.got
        client.transport.write(payload, ("127.0.0.1", port))
        await task.deferLater(real_reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_udp_listener_renamed_on_the_same_bind_keeps_its_socket(tmp_path):
    echo = real_reactor.listenUDP(0, _UDPEcho(), interface="127.0.0.1")
    client_port = real_reactor.listenUDP(0, client := _UDPClient(), interface="127.0.0.1")
    blocker = real_reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
    u, admin = free_port(), free_port()
    bind = f"udp:{u}:interface=127.0.0.1"
    backends = {"dns": echo.getHost().port}
    path = tmp_path / "lb.yaml"
    svc = _start(path, _live_config([("u1", bind, "udp", "dns")], backends, admin))
    try:
        await _udp_roundtrip(client, u, b"one")
        sock = svc.listeners.getServiceNamed("u1").port
        # a new udp listener on a busy port: refused, u1 untouched
        busy = f"udp:{blocker.getHost().port}:interface=127.0.0.1"
        path.write_text(_live_config([("u1", bind, "udp", "dns"), ("u9", busy, "udp", "dns")], backends, admin))
        with pytest.raises(ReloadError, match="listener u9: cannot bind"):
            await svc.reload()
        assert svc.listeners.getServiceNamed("u1").port is sock
        await _udp_roundtrip(client, u, b"two")
        # renamed, same bind text: the socket is handed over
        path.write_text(_live_config([("u2", bind, "udp", "dns")], backends, admin))
        await svc.reload()
        assert [s.name for s in svc.listeners] == ["u2"]
        assert svc.listeners.getServiceNamed("u2").port is sock
        await _udp_roundtrip(client, u, b"three")
    finally:
        await svc.stopService()
        for p in (echo, client_port, blocker):
            await p.stopListening()


def _https_body(port: int, ca_file: str) -> bytes:
    import ssl

    ctx = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_turning_tls_on_keeps_the_listening_socket(tmp_path):
    """tls on a running http listener (same bind): the listener is rebuilt
    on the socket it had, which then speaks TLS."""
    from twisted.internet import threads

    from lbtwist.tls.testing import TestCA

    ca = TestCA()
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    cert, key = ca.issue("a.example.com").write(tmp_path, "a")
    origins = _Origins()
    web, admin = free_port(), free_port()
    path = tmp_path / "lb.yaml"
    plain = _live_config([("web", _bind(web), "http", "app")], {"app": origins.a}, admin)
    svc = _start(path, plain)
    try:
        assert (await _http(web)).endswith(b"\r\n\r\nA")
        sock = svc.listeners.getServiceNamed("web").port
        tls = plain.replace("mode: http,", f'mode: http, tls: {{certificates: [{{cert: "{cert}", key: "{key}"}}]}},')
        assert "tls:" in tls
        path.write_text(tls)
        await svc.reload()
        assert svc.listeners.getServiceNamed("web").port is sock
        body = await threads.deferToThread(_https_body, web, str(ca_file)).addTimeout(20, real_reactor)
        assert body.startswith(b"HTTP/1.1 200") and body.endswith(b"\r\n\r\nA")
    finally:
        await svc.stopService()
        await origins.stop()
