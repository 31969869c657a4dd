"""The admin listener in a real balancer (in-process service tree, real
sockets on 127.0.0.1): real TCP traffic through the L4 relay shows up per
backend in the JSON and in /metrics, the token is enforced, and a drain
through the API really moves new connections away."""
from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, endpoints, protocol, reactor, task

from lbtwist.admin import admin_service
from lbtwist.config import load_config
from lbtwist.config.model import AdminConfig
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime
from lbtwist.service import LbtwistService

TOKEN = "t0ken-for-the-admin-api-tests"
DEADLINE = 10.0


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class OneShot(protocol.Protocol):
    """Sends a line, waits for its echo, closes, fires when the connection is gone."""

    def __init__(self):
        self.done = defer.Deferred()
        self.got = b""

    def connectionMade(self):
        self.transport.write(b"ping\n")

    def dataReceived(self, data):
        self.got += data
        if self.got.endswith(b"\n"):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.got)


async def echo_round_trip(port: int) -> bytes:
    p = OneShot()
    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await endpoints.connectProtocol(ep, p).addTimeout(DEADLINE, reactor)
    return await p.done.addTimeout(DEADLINE, reactor)


async def until(check, what: str, timeout: float = DEADLINE):
    """Re-run async ``check`` every 50 ms until it returns a truthy value."""
    waited = 0.0
    while True:
        value = await check()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


@pytest.fixture
def echo_servers():
    ports = []
    for _ in range(2):
        ports.append(reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1"))
    yield [p.getHost().port for p in ports]
    for p in ports:
        p.stopListening()


@pytest_twisted.ensureDeferred
async def test_real_traffic_per_backend_token_and_drain(echo_servers):
    p1, p2 = echo_servers
    text = f"""
listeners:
  - name: echo
    bind: "tcp:0:interface=127.0.0.1"
    mode: tcp
    pool: echo
pools:
  - name: echo
    algorithm: round_robin
    backends:
      - address: "127.0.0.1:{p1}"
      - address: "127.0.0.1:{p2}"
admin:
  bind: "tcp:0:interface=127.0.0.1"
  token: "{TOKEN}"
"""
    registry = Registry.default(entry_points=False)
    svc = LbtwistService(load_config(text, registry).config, reactor, registry)
    svc.startService()
    try:
        admin = svc.getServiceNamed("admin")
        relay_port = svc.listeners.getServiceNamed("echo").address.port
        base = f"http://127.0.0.1:{admin.address.port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}

        async def get_json(path):
            r = await treq.get(base + path, headers=auth).addTimeout(DEADLINE, reactor)
            assert r.code == 200, await r.text()
            return json.loads(await r.content())

        for _ in range(10):
            assert await echo_round_trip(relay_port) == b"ping\n"

        async def ten_logged():
            body = await get_json("/api/pools?history=0")
            return body if body["listeners"][0]["finished"].get("tcp") == 10 else None

        body = await until(ten_logged, "10 finished tcp connections in /api/pools")
        backends = body["pools"][0]["backends"]
        assert sorted(b["total"] for b in backends) == [5, 5]  # round robin, per backend
        assert all(b["outcomes"].get("ok") == 5 for b in backends)
        assert body["listeners"][0]["bytes_in"] == 50 and body["listeners"][0]["bytes_out"] == 50

        r = await treq.get(base + "/metrics", headers=auth).addTimeout(DEADLINE, reactor)
        metrics = await r.text()
        assert 'lbtwist_listener_finished_total{kind="tcp",listener="echo"} 10.0' in metrics
        assert f'lbtwist_backend_tries_total{{backend="127.0.0.1:{p1}",outcome="ok",pool="echo"}} 5.0' in metrics
        assert "process_resident_memory_bytes" in metrics
        # per listener: connections open now and accepted so far, from the listener itself
        assert 'lbtwist_listener_connections_active{listener="echo"} 0.0' in metrics
        assert 'lbtwist_listener_connections_accepted_total{listener="echo"} 10.0' in metrics

        # no token, wrong token: 401 and nothing changes
        r = await treq.post(base + f"/api/pools/echo/backends/127.0.0.1:{p1}/drain").addTimeout(DEADLINE, reactor)
        assert r.code == 401
        r = await treq.get(base + "/api/pools", headers={"Authorization": "Bearer nope"}).addTimeout(DEADLINE, reactor)
        assert r.code == 401
        assert not svc.runtime.pools["echo"].get(f"127.0.0.1:{p1}").draining

        # drain p1 through the API: the next connections all go to p2
        r = await treq.post(base + f"/api/pools/echo/backends/127.0.0.1:{p1}/drain", headers=auth).addTimeout(DEADLINE, reactor)
        assert r.code == 200 and json.loads(await r.content())["state"] == "draining"
        for _ in range(4):
            assert await echo_round_trip(relay_port) == b"ping\n"

        async def drained():
            body = await get_json(f"/api/pools/echo/backends/127.0.0.1:{p2}?history=0")
            return body if body["total"] == 9 else None

        await until(drained, "4 more connections on the remaining backend")
        b1 = await get_json(f"/api/pools/echo/backends/127.0.0.1:{p1}?history=0")
        assert b1["total"] == 5 and b1["in_rotation"] is False
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_closes_keep_alive_connections():
    """A reload rebuilds the admin service: the dashboard's persistent
    connection must not stay on the old one (it would show a frozen picture)."""
    from lbtwist.config.model import Config

    rt = Runtime(reactor=reactor, registry=Registry(), config=Config())
    svc = admin_service(AdminConfig(bind="tcp:0:interface=127.0.0.1"), rt)
    svc.startService()
    port = svc.address.port
    closed = defer.Deferred()
    got = []

    class Client(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"GET /api/pools HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

        def dataReceived(self, data):
            got.append(data)

        def connectionLost(self, reason):
            closed.callback(None)

    ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    client = await endpoints.connectProtocol(ep, Client()).addTimeout(DEADLINE, reactor)
    await until(lambda: defer.succeed(b"".join(got).count(b"\r\n\r\n") >= 1 and b'"pools"' in b"".join(got)),
                "the first response")
    assert len(svc.connections) == 1  # kept alive, tracked
    await svc.stopService()
    await closed.addTimeout(DEADLINE, reactor)
    assert not svc.connections and client.transport.connected == 0


@pytest_twisted.ensureDeferred
async def test_reload_takes_a_new_token_without_rebinding(tmp_path):
    from lbtwist.config.model import Config

    old_file, new_file = tmp_path / "old.token", tmp_path / "new.token"
    old_file.write_text("old-token-0123456789\n")
    new_file.write_text("new-token-0123456789\n")
    cfg = Config(admin=AdminConfig(bind="tcp:0:interface=127.0.0.1", token_file=str(old_file)))
    rt = Runtime(reactor=reactor, registry=Registry(), config=cfg)
    svc = admin_service(cfg.admin, rt)
    svc.startService()
    try:
        url = f"http://127.0.0.1:{svc.address.port}/api/pools"

        async def code(token):
            r = await treq.get(url, headers={"Authorization": f"Bearer {token}"}, persistent=False).addTimeout(DEADLINE, reactor)
            await r.content()
            return r.code

        assert await code("old-token-0123456789") == 200
        # what the service tree's reload does: swap the runtime's config
        rt.config = Config(admin=AdminConfig(bind="tcp:0:interface=127.0.0.1", token_file=str(new_file)))
        svc.follow_admin_config()  # runs every second while the service runs
        assert await code("old-token-0123456789") == 401
        assert await code("new-token-0123456789") == 200
        # an unreadable token file keeps the current token rather than opening up
        rt.config = Config(admin=AdminConfig(bind="tcp:0:interface=127.0.0.1", token_file=str(tmp_path / "gone")))
        svc.follow_admin_config()
        assert await code("new-token-0123456789") == 200
    finally:
        await svc.stopService()


def test_admin_service_refuses_a_non_loopback_bind_without_token():
    rt = Runtime(reactor=reactor, registry=Registry(), config=None)
    with pytest.raises(ValueError, match="admin.bind"):
        admin_service(AdminConfig(bind="tcp:0:interface=0.0.0.0"), rt)  # never started: nothing binds
