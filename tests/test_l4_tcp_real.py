"""The TCP relay on real sockets (127.0.0.1, ephemeral ports): relaying,
refused-connect failover, half-close, the connection cap and drain."""
from __future__ import annotations

import random
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from lbtwist.balancers.round_robin import RoundRobin
from lbtwist.config.model import Config, ListenerConfig, PoolConfig
from lbtwist.l4.tcp import tcp_listener
from lbtwist.pool import Backend, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime

TIMEOUT = 5


@implementer(IHalfCloseableProtocol)
class NamedBackend(protocol.Protocol):
    """Answers each chunk with ``name:chunk``; on the client's FIN sends
    ``name:eof`` and closes (a request/response over a half-closed stream)."""

    def dataReceived(self, data):
        self.transport.write(self.factory.name + b":" + data)

    def readConnectionLost(self):
        self.factory.eofs += 1
        self.transport.write(self.factory.name + b":eof")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def backend_factory(name: bytes):
    f = protocol.Factory.forProtocol(NamedBackend)
    f.name = name
    f.eofs = 0
    return f


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    def __init__(self):
        self.received = b""
        self.waiters: list[tuple[int, defer.Deferred]] = []
        self.closed = defer.Deferred()
        self.eof = False

    def dataReceived(self, data):
        self.received += data
        for n, d in list(self.waiters):
            if len(self.received) >= n:
                self.waiters.remove((n, d))
                d.callback(self.received)

    def wait_for(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        if len(self.received) >= n:
            d.callback(self.received)
        else:
            self.waiters.append((n, d))
        return d.addTimeout(TIMEOUT, reactor)

    def readConnectionLost(self):
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(reason.value)


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening: connects are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Relay:
    def __init__(self, addresses, **listener):
        self.pool = Pool("p", [Backend(address=a) for a in addresses], RoundRobin(random.Random(0)), reactor)
        self.outcomes = []
        self.pool.observe_outcomes(lambda b, now, lat, o: self.outcomes.append((b.address, o)))
        pcfg = PoolConfig(name="p", connect_timeout=2.0, connect_attempts=3, drain_timeout=5.0)
        lcfg = ListenerConfig(name="t", bind="tcp:0:interface=127.0.0.1", pool="p", **listener)
        rt = Runtime(reactor=reactor, registry=Registry(), config=Config())
        rt.pools["p"] = self.pool
        rt.pool_configs["p"] = pcfg
        self.service = tcp_listener(lcfg, rt)
        self.service.privilegedStartService()
        self.service.startService()
        self.port = self.service.address.port

    async def connect(self) -> Client:
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=TIMEOUT)
        return await ep.connect(protocol.Factory.forProtocol(Client)).addTimeout(TIMEOUT, reactor)

    async def stop(self, drain_timeout=1.0):
        if self.service.running:
            await self.service.stopService(drain_timeout).addTimeout(TIMEOUT, reactor)


@pytest.fixture
def servers():
    ports = []

    def start(name: bytes) -> tuple[str, object]:
        p = reactor.listenTCP(0, backend_factory(name), interface="127.0.0.1")
        ports.append(p)
        return f"127.0.0.1:{p.getHost().port}", p.factory

    yield start
    for p in ports:
        p.stopListening()


def pause(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


async def until(cond, timeout=TIMEOUT):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await pause(0.01)
    raise AssertionError("condition not met in time")


@pytest_twisted.ensureDeferred
async def test_relays_both_ways_and_balances(servers):
    a, _ = servers(b"A")
    b, _ = servers(b"B")
    relay = Relay([a, b])
    try:
        c1 = await relay.connect()
        c2 = await relay.connect()
        c1.transport.write(b"one")
        c2.transport.write(b"two")
        assert await c1.wait_for(5) == b"A:one"
        assert await c2.wait_for(5) == b"B:two"
        assert relay.service.relay.active == 2
        c1.transport.loseConnection()
        c2.transport.loseConnection()
        await until(lambda: relay.service.relay.active == 0)
        # The clients closed without waiting for the backends' last words
        # ("A:eof"), so each session ends "ok" or "cancelled", never "gateway".
        assert sorted(addr for addr, _ in relay.outcomes) == sorted([a, b])
        assert all(o in ("ok", "cancelled") for _, o in relay.outcomes)
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_refused_connect_fails_over_to_a_live_backend(servers):
    dead = f"127.0.0.1:{closed_port()}"
    live, _ = servers(b"L")
    relay = Relay([dead, live])
    try:
        c = await relay.connect()
        c.transport.write(b"hi")
        # The client never notices the refused attempt.
        assert await c.wait_for(4) == b"L:hi"
        assert relay.outcomes == [(dead, "gateway")]
        c.transport.loseConnection()
        await until(lambda: relay.service.relay.active == 0)
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_all_backends_refusing_closes_the_client(servers):
    relay = Relay([f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"])
    try:
        c = await relay.connect()
        await c.closed.addTimeout(TIMEOUT, reactor)
        assert c.received == b""
        assert [o for _, o in relay.outcomes] == ["gateway", "gateway"]
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_half_close_reaches_the_backend_and_the_answer_comes_back(servers):
    a, fa = servers(b"A")
    relay = Relay([a])
    try:
        c = await relay.connect()
        c.transport.write(b"req")
        await c.wait_for(5)
        c.transport.loseWriteConnection()  # FIN from the client only
        # The backend sees EOF, answers, closes; the client gets it all then EOF.
        await c.closed.addTimeout(TIMEOUT, reactor)
        assert c.received == b"A:reqA:eof"
        assert c.eof and fa.eofs == 1
        await until(lambda: relay.service.relay.active == 0)
        assert relay.outcomes == [(a, "ok")]
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_connection_cap_refuses_extra_clients(servers):
    a, _ = servers(b"A")
    relay = Relay([a], max_connections=1)
    try:
        c1 = await relay.connect()
        c1.transport.write(b"x")
        await c1.wait_for(3)
        c2 = await relay.connect()
        reason = await c2.closed.addTimeout(TIMEOUT, reactor)
        assert c2.received == b"" and reason is not None
        assert relay.service.relay.refused == 1
        # The admitted connection is unaffected.
        c1.transport.write(b"y")
        assert await c1.wait_for(6) == b"A:xA:y"
        c1.transport.loseConnection()
        await until(lambda: relay.service.relay.active == 0)
        c3 = await relay.connect()
        c3.transport.write(b"z")
        assert await c3.wait_for(3) == b"A:z"
        c3.transport.loseConnection()
        await until(lambda: relay.service.relay.active == 0)
    finally:
        await relay.stop()


@pytest_twisted.ensureDeferred
async def test_stop_drains_then_aborts_what_is_left(servers):
    a, _ = servers(b"A")
    relay = Relay([a])
    c = await relay.connect()
    c.transport.write(b"x")
    await c.wait_for(3)
    stopped = relay.service.stopService(0.2)
    # Not accepting any more, but the live connection still relays.
    c.transport.write(b"y")
    assert await c.wait_for(6) == b"A:xA:y"
    await stopped.addTimeout(TIMEOUT, reactor)
    await c.closed.addTimeout(TIMEOUT, reactor)
    assert relay.service.connections == set()
