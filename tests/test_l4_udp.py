"""UDP relay: the flow table (sans-IO), the bind parser, and the relay on real
127.0.0.1 sockets with a hand-driven clock for idle expiry."""
from __future__ import annotations

import random
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol

from lbtwist.balancers.round_robin import RoundRobin
from lbtwist.config.model import Config, ListenerConfig, ProxyProtocolConfig
from lbtwist.l4.flows import Flow, FlowTable
from lbtwist.l4.udp import _Upstream, parse_udp_bind, udp_listener
from lbtwist.pool import Backend, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime

TIMEOUT = 5


# -- flow table ----------------------------------------------------------------


def flow(client, t, backend=None):
    return Flow(client=client, backend=backend or Backend(address="10.0.0.1:53"), created=t, last_seen=t)


def test_flow_table_expires_least_recently_active_first():
    table = FlowTable(idle_timeout=10, max_flows=10)
    a, b, c = flow(("1.1.1.1", 1), 0), flow(("2.2.2.2", 2), 1), flow(("3.3.3.3", 3), 2)
    for f in (a, b, c):
        table.add(f)
    assert table.next_expiry() == 10
    assert table.touch(("1.1.1.1", 1), 5) is a  # a is now the most recent
    table.activity(b, 6)  # a reply keeps b alive too
    assert table.next_expiry() == 12  # c, idle since 2
    assert table.expire(11.9) == []
    assert table.expire(12) == [c]
    assert table.expire(16) == [a, b]
    assert len(table) == 0 and table.next_expiry() is None
    assert table.touch(("1.1.1.1", 1), 20) is None


def test_flow_table_cap_and_removal():
    table = FlowTable(idle_timeout=1, max_flows=2)
    a, b = flow(("1.1.1.1", 1), 0), flow(("2.2.2.2", 2), 0)
    table.add(a)
    table.add(b)
    assert table.full
    with pytest.raises(OverflowError):
        table.add(flow(("3.3.3.3", 3), 0))
    with pytest.raises(ValueError):
        table.add(flow(("1.1.1.1", 1), 0))
    assert table.remove(("1.1.1.1", 1)) is a and not table.full
    # discard() only removes the flow it is given, not a newer one of the same client.
    newer = flow(("1.1.1.1", 1), 3)
    table.add(newer)
    assert table.discard(a) is False and len(table) == 2
    assert table.discard(newer) is True
    # Activity on a removed flow does not resurrect it.
    table.activity(a, 5)
    assert len(table) == 1


@pytest.mark.parametrize(
    "bind,expected",
    [
        ("udp:5353", (5353, "")),
        ("udp:0:interface=127.0.0.1", (0, "127.0.0.1")),
        ("udp:port=53:interface=\\:\\:1", (53, "::1")),
    ],
)
def test_parse_udp_bind(bind, expected):
    assert parse_udp_bind(bind) == expected


@pytest.mark.parametrize("bind", ["tcp:53", "udp:", "udp:99999", "udp:53:backlog=5", "udp:interface=1.2.3.4"])
def test_parse_udp_bind_rejects(bind):
    with pytest.raises(ValueError):
        parse_udp_bind(bind)


# -- the relay on real sockets ----------------------------------------------------------


class Echo(DatagramProtocol):
    """A backend that answers every datagram with ``name:datagram``."""

    def __init__(self, name: bytes):
        self.name = name
        self.sources = set()

    def datagramReceived(self, data, addr):
        self.sources.add(addr)
        self.transport.write(self.name + b":" + data, addr)


class Client(DatagramProtocol):
    def __init__(self):
        self.got: list[bytes] = []
        self.waiter: defer.Deferred | None = None

    def datagramReceived(self, data, addr):
        self.got.append(data)
        if self.waiter is not None:
            d, self.waiter = self.waiter, None
            d.callback(data)

    def ask(self, data: bytes, to) -> defer.Deferred:
        self.waiter = defer.Deferred()
        self.transport.write(data, to)
        return self.waiter.addTimeout(TIMEOUT, reactor)


class ClockedReactor:
    """The real reactor's sockets with a hand-driven clock, so idle expiry is
    deterministic while datagrams really travel."""

    def __init__(self, clock: task.Clock):
        self.listenUDP = reactor.listenUDP
        self.addReader = reactor.addReader
        self.removeReader = reactor.removeReader
        self.callLater = clock.callLater
        self.seconds = clock.seconds


@pytest.fixture
def udp():
    ports = []

    def listen(proto):
        p = reactor.listenUDP(0, proto, interface="127.0.0.1", maxPacketSize=65535)
        ports.append(p)
        return p

    yield listen
    for p in ports:
        if p.connected:
            p.stopListening()


def make_relay(addresses, clock, idle=30.0, **kw):
    pool = Pool("u", [Backend(address=a) for a in addresses], RoundRobin(random.Random(0)), clock)
    outcomes = []
    pool.observe_outcomes(lambda b, now, lat, o: outcomes.append((b.address, o)))
    rt = Runtime(reactor=ClockedReactor(clock), registry=Registry(), config=Config())
    rt.pools["u"] = pool
    records = []
    rt.traffic.subscribe(records.append)
    cfg = ListenerConfig(name="u", bind="udp:0:interface=127.0.0.1", mode="udp", pool="u", idle_timeout=idle, **kw)
    svc = udp_listener(cfg, rt)
    svc.privilegedStartService()
    svc.startService()
    return svc, pool, outcomes, records


@pytest_twisted.ensureDeferred
async def test_flows_keep_their_backend_and_replies_reach_their_client(udp):
    clock = task.Clock()
    ea, eb = Echo(b"A"), Echo(b"B")
    pa, pb = udp(ea), udp(eb)
    addrs = [f"127.0.0.1:{p.getHost().port}" for p in (pa, pb)]
    svc, pool, outcomes, records = make_relay(addrs, clock, idle=30.0)
    to = ("127.0.0.1", svc.address.port)
    c1, c2 = Client(), Client()
    udp(c1), udp(c2)
    try:
        for i in range(3):
            assert await c1.ask(b"one%d" % i, to) == b"A:one%d" % i
            assert await c2.ask(b"two%d" % i, to) == b"B:two%d" % i
        # Each client only ever heard its own answers.
        assert c1.got == [b"A:one0", b"A:one1", b"A:one2"]
        assert c2.got == [b"B:two0", b"B:two1", b"B:two2"]
        # One upstream socket per flow: each backend saw exactly one source.
        assert len(ea.sources) == 1 and len(eb.sources) == 1
        assert len(svc.relay.flows) == 2 and [b.active for b in pool.backends()] == [1, 1]
        # Datagrams bigger than Twisted's default 8 KiB read size pass intact.
        big = bytes(range(256)) * 80
        assert await c1.ask(big, to) == b"A:" + big
    finally:
        await defer.maybeDeferred(svc.stopService).addTimeout(TIMEOUT, reactor)
    assert sorted(outcomes) == sorted([(addrs[0], "ok"), (addrs[1], "ok")])
    # Every flow's socket was closed and unregistered.
    assert not any(isinstance(r, _Upstream) for r in reactor.getReaders())
    assert {r.bytes_in for r in records} == {len(b"two0") * 3, len(b"one0") * 3 + 20480}


@pytest_twisted.ensureDeferred
async def test_idle_flow_expires_and_the_next_datagram_picks_again(udp):
    clock = task.Clock()
    ea, eb = Echo(b"A"), Echo(b"B")
    addrs = [f"127.0.0.1:{udp(e).getHost().port}" for e in (ea, eb)]
    svc, pool, outcomes, records = make_relay(addrs, clock, idle=10.0)
    to = ("127.0.0.1", svc.address.port)
    c = Client()
    udp(c)
    try:
        assert await c.ask(b"x", to) == b"A:x"
        clock.advance(9)
        assert await c.ask(b"y", to) == b"A:y"  # activity keeps the flow
        clock.advance(9)
        assert len(svc.relay.flows) == 1
        clock.advance(1)
        assert len(svc.relay.flows) == 0
        assert outcomes == [(addrs[0], "ok")]
        assert records[0].duration == 19 and records[0].bytes_out == len(b"A:xA:y")
        # A new flow: round robin moves on to B.
        assert await c.ask(b"z", to) == b"B:z"
        assert clock.getDelayedCalls() != []  # its expiry is scheduled
    finally:
        await defer.maybeDeferred(svc.stopService).addTimeout(TIMEOUT, reactor)
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_unreachable_backend_ends_the_flow_as_gateway_failure(udp):
    clock = task.Clock()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    svc, pool, outcomes, records = make_relay([dead], clock)
    to = ("127.0.0.1", svc.address.port)
    c = Client()
    udp(c)
    try:
        c.transport.write(b"hello?", to)
        for _ in range(200):
            if outcomes:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert outcomes == [(dead, "gateway")]
        assert len(svc.relay.flows) == 0 and c.got == []
        assert records[0].error == "port unreachable"
        assert not any(isinstance(r, _Upstream) for r in reactor.getReaders())
    finally:
        await defer.maybeDeferred(svc.stopService).addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_flow_cap_drops_new_clients(udp):
    clock = task.Clock()
    e = Echo(b"A")
    addr = f"127.0.0.1:{udp(e).getHost().port}"
    svc, pool, outcomes, records = make_relay([addr], clock, max_connections=1)
    to = ("127.0.0.1", svc.address.port)
    c1, c2 = Client(), Client()
    udp(c1), udp(c2)
    try:
        assert await c1.ask(b"1", to) == b"A:1"
        c2.transport.write(b"2", to)
        # c1's second datagram is answered; by then c2's (sent earlier) was dropped.
        assert await c1.ask(b"3", to) == b"A:3"
        assert c2.got == [] and svc.relay.dropped == 1
    finally:
        await defer.maybeDeferred(svc.stopService).addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_reconfigure_and_stop_accepting(udp):
    clock = task.Clock()
    e = Echo(b"A")
    addr = f"127.0.0.1:{udp(e).getHost().port}"
    svc, pool, outcomes, records = make_relay([addr], clock, idle=30.0)
    port = svc.address.port
    to = ("127.0.0.1", port)
    c = Client()
    udp(c)
    assert await c.ask(b"1", to) == b"A:1"
    # A shorter idle timeout applies to the live flow at once.
    svc.reconfigure(ListenerConfig(name="u", bind=svc.cfg.bind, mode="udp", pool="u", idle_timeout=5.0))
    clock.advance(5)
    assert len(svc.relay.flows) == 0 and outcomes == [(addr, "ok")]
    assert await c.ask(b"2", to) == b"A:2"
    # Releasing the socket ends the flows and frees the port for a successor.
    await svc.stop_accepting().addTimeout(TIMEOUT, reactor)
    assert len(svc.relay.flows) == 0 and outcomes == [(addr, "ok"), (addr, "ok")]
    again = reactor.listenUDP(port, DatagramProtocol(), interface="127.0.0.1")
    await defer.maybeDeferred(again.stopListening)
    await defer.maybeDeferred(svc.stopService).addTimeout(TIMEOUT, reactor)
    assert clock.getDelayedCalls() == []


def test_udp_rejects_proxy_protocol():
    rt = Runtime(reactor=reactor, registry=Registry(), config=Config())
    cfg = ListenerConfig(name="u", bind="udp:0", mode="udp", pool="u", proxy_protocol=ProxyProtocolConfig(send="v2"))
    with pytest.raises(ValueError, match="proxy_protocol"):
        udp_listener(cfg, rt)
