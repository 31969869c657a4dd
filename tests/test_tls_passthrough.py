"""SNI passthrough: the ClientHello picks the pool, the backend terminates.
Routing logic in memory; the whole path on the real reactor (127.0.0.1)."""
from __future__ import annotations

import socket
import ssl
import types

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from lbtwist.config.model import CertificateConfig, ListenerTLSConfig
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.passthrough import PassthroughStats, SNIRouter, passthrough_factory
from lbtwist.tls.peek import ClientHelloPeekFactory
from lbtwist.tls.server import tls_info, wrap_server_factory
from lbtwist.tls.sni import NameTable, check_name_pattern
from lbtwist.tls.testing import TestCA

WAIT = 10.0


# -- name tables and the router (sans-IO) -------------------------------------------------------


def test_name_table_exact_wildcard_default():
    t: NameTable[str] = NameTable("dflt")
    assert t.add("api.example.com", "api")
    assert t.add("*.example.com", "wild")
    assert t.add("Example.COM.", "apex")
    assert not t.add("*.EXAMPLE.com", "again")  # already mapped: first wins
    assert t.lookup("api.example.com") == "api"
    assert t.lookup("www.example.com") == "wild"
    assert t.lookup("example.com") == "apex"
    assert t.lookup("a.b.example.com") == "dflt"  # a wildcard covers one label only
    assert t.lookup("other.org") == "dflt" and t.lookup(None) == "dflt" and t.lookup("") == "dflt"
    assert dict(t.patterns()) == {"api.example.com": "api", "example.com": "apex", "*.example.com": "wild"}


@pytest.mark.parametrize("bad", ["", "a.*.test", "*a.test", "**.test", "a..test", "ünï.test"])
def test_bad_name_patterns(bad):
    with pytest.raises(ValueError):
        check_name_pattern(bad)


def test_router_from_routes():
    r = SNIRouter.from_routes({"a.test": "pa", "*.b.test": "pb"}, default=None)
    assert r.route("a.test") == "pa" and r.route("x.b.test") == "pb"
    assert r.route("c.test") is None and r.route(None) is None
    with pytest.raises(ValueError, match="routed twice"):
        SNIRouter.from_routes({"a.test": "p1", "A.test.": "p2"}, None)


# -- the peek adapter (in memory) -------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.events = []

    def connectionMade(self):
        self.events.append("made")

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.events.append("read-eof")

    def writeConnectionLost(self):
        self.events.append("write-eof")

    def connectionLost(self, reason):
        self.events.append("lost")


def _hello_bytes(sni: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_peeker_hands_over_buffered_bytes_then_forwards():
    clock = task.Clock()
    seen = []
    inner = Recorder()

    def build(pool, addr, hello):
        seen.append((pool, addr.port, hello.server_name))
        return inner

    stats = PassthroughStats()
    f = passthrough_factory(SNIRouter.from_routes({"a.test": "pa"}, "pd"), build, clock, timeout=5, stats=stats)
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    t = StringTransport()
    p.makeConnection(t)
    hello = _hello_bytes("a.test")
    p.dataReceived(hello[:7])
    assert inner.events == []  # nothing decided yet
    p.dataReceived(hello[7:] + b"early")
    assert seen == [("pa", 5555, "a.test")]
    assert inner.events == ["made"] and inner.transport is t
    assert inner.data == hello + b"early"  # every byte, in order, once
    p.dataReceived(b"more")
    assert inner.data.endswith(b"earlymore")
    assert IHalfCloseableProtocol.providedBy(p)
    p.readConnectionLost()
    p.connectionLost(None)
    assert inner.events == ["made", "read-eof", "lost"]
    assert stats.routed == {"pa": 1} and clock.getDelayedCalls() == []


def test_peeker_refusals_and_timeout():
    clock = task.Clock()
    stats = PassthroughStats()
    f = passthrough_factory(SNIRouter.from_routes({"a.test": "pa"}, None), lambda *a: Recorder(), clock,
                            timeout=5, stats=stats)
    cases = [(b"GET / HTTP/1.0\r\n\r\n", "not_tls"), (_hello_bytes("nowhere.test"), "unrouted")]
    for data, _ in cases:
        p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        t = StringTransport()
        p.makeConnection(t)
        p.dataReceived(data)
        assert t.disconnecting
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"\x16\x03\x01")
    clock.advance(5)
    assert t.disconnecting
    assert (stats.not_tls, stats.unrouted, stats.timeouts, stats.routed) == (1, 1, 1, {})


def test_peek_factory_follows_wrapped_start_stop():
    events = []

    class F(protocol.Factory):
        def startFactory(self):
            events.append("start")

        def stopFactory(self):
            events.append("stop")

    f = ClientHelloPeekFactory(lambda h, a: None, task.Clock(), wrapped=F())
    f.doStart()
    f.doStop()
    assert events == ["start", "stop"]


# -- the whole path, real sockets ------------------------------------------------------------------


class Backend(Protocol):
    def dataReceived(self, data):
        info = tls_info(self.transport)
        self.transport.write(f"{self.factory.label} sni={info.server_name} ".encode() + data)


class _Upstream(Protocol):
    def __init__(self, front):
        self.front = front

    def connectionMade(self):
        self.front.upstream_ready(self)

    def dataReceived(self, data):
        self.front.transport.write(data)

    def connectionLost(self, reason):
        self.front.transport.loseConnection()


class TinyRelay(Protocol):
    """A stand-in for the L4 relay: connect to the pool's one backend, send
    everything received so far first, then relay both ways."""

    def __init__(self, address):
        self.address = address
        self.pending = []
        self.up = None

    def connectionMade(self):
        f = protocol.ClientFactory.forProtocol(lambda: _Upstream(self))
        reactor.connectTCP(*self.address, f, timeout=5)

    def upstream_ready(self, up):
        self.up = up
        for d in self.pending:
            up.transport.write(d)
        self.pending = []

    def dataReceived(self, data):
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.transport.write(data)

    def connectionLost(self, reason):
        if self.up is not None:
            self.up.transport.loseConnection()


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest_twisted.async_yield_fixture
async def setup(ca, tmp_path):
    ports, backends = [], {}
    for label, names in [("A", ("a.test", "*.a.test")), ("B", ("b.test",))]:
        cert, key = ca.issue(*names).write(tmp_path, label)
        st = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)]), task.Clock())
        app = Factory.forProtocol(Backend)
        app.label = label
        port = reactor.listenTCP(0, wrap_server_factory(app, st, reactor), interface="127.0.0.1")
        ports.append(port)
        backends["pool-" + label.lower()] = ("127.0.0.1", port.getHost().port)
    router = SNIRouter.from_routes({"a.test": "pool-a", "*.a.test": "pool-a", "b.test": "pool-b"}, "pool-b")
    stats = PassthroughStats()
    front = passthrough_factory(router, lambda pool, addr, hello: TinyRelay(backends[pool]), reactor,
                                timeout=5, stats=stats)
    lport = reactor.listenTCP(0, front, interface="127.0.0.1")
    ports.append(lport)
    yield types.SimpleNamespace(addr=("127.0.0.1", lport.getHost().port), stats=stats,
                                cafile=ca.write_ca(tmp_path / "ca.pem"))
    for p in ports:
        await p.stopListening()


def _tls_request(addr, cafile, sni, verify_name):
    ctx = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(addr, timeout=5)
    with ctx.wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(b"hi")
        reply = s.recv(4096)
        cn = dict(x[0] for x in s.getpeercert()["subject"])["commonName"]
    return reply, cn


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_passthrough_routes_by_sni_to_backends_that_terminate(setup):
    cases = [("a.test", b"A sni=a.test hi", "a.test"),
             ("www.a.test", b"A sni=www.a.test hi", "a.test"),
             ("b.test", b"B sni=b.test hi", "b.test")]
    for sni, want, cn in cases:
        reply, got_cn = await threads.deferToThread(_tls_request, setup.addr, setup.cafile, sni, sni).addTimeout(
            WAIT, reactor)
        assert reply == want and got_cn == cn, sni
    # an unrouted name goes to the default pool, whose backend then refuses the name match
    with pytest.raises(ssl.SSLCertVerificationError):
        await threads.deferToThread(_tls_request, setup.addr, setup.cafile, "c.test", "c.test").addTimeout(
            WAIT, reactor)
    assert setup.stats.routed == {"pool-a": 2, "pool-b": 2}


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_plain_text_to_passthrough_port_is_closed(setup):
    def plain():
        with socket.create_connection(setup.addr, timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""

    assert await threads.deferToThread(plain).addTimeout(WAIT, reactor) == b""
    assert setup.stats.not_tls == 1


def test_router_for_listener_defaults_to_listener_pool():
    from lbtwist.config.model import ListenerConfig, TLSPassthroughConfig

    from lbtwist.tls.passthrough import router_for_listener

    cfg = ListenerConfig(name="s", bind="tcp:0", mode="tcp", pool="main",
                         tls_passthrough=TLSPassthroughConfig(routes={"a.test": "pa"}))
    r = router_for_listener(cfg)
    assert r.route("a.test") == "pa" and r.route("z.test") == "main" and r.route(None) == "main"
    cfg2 = ListenerConfig(name="s", bind="tcp:0", mode="tcp", pool="main",
                          tls_passthrough=TLSPassthroughConfig(routes={}, default="other"))
    assert router_for_listener(cfg2).route("z.test") == "other"


def test_peeker_fed_one_byte_at_a_time():
    clock = task.Clock()
    inner = Recorder()
    f = passthrough_factory(SNIRouter.from_routes({}, "only"), lambda *a: inner, clock, timeout=5)
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    t = StringTransport()
    p.makeConnection(t)
    hello = _hello_bytes("slow.test")
    for i in range(len(hello)):
        p.dataReceived(hello[i:i + 1])
    assert inner.events == ["made"] and inner.data == hello
    assert p.result.server_name == "slow.test" and not t.disconnecting
