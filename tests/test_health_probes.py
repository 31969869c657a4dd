"""The built-in probe kinds, in memory: tcp on MemoryReactorClock, http on
treq's StubTreq (real Agent parsing over iosim)."""
from __future__ import annotations

import pytest
from treq.testing import StubTreq
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

import lbtwist.health.builtin as builtin
from lbtwist.config.model import ActiveHealthConfig
from lbtwist.health import ProbeResult
from lbtwist.health.probes import HttpProbe, TcpProbe, http_factory, parse_statuses, tcp_factory
from lbtwist.interfaces import IHealthProbe
from lbtwist.pool import Backend
from lbtwist.registry import Registry


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "probe did not finish"
    return out[0]


class TestTcp:
    def test_connect_passes_and_closes(self):
        reactor = MemoryReactorClock()
        probe = TcpProbe(reactor, 2.0)
        verifyObject(IHealthProbe, probe)
        d = probe.probe(Backend("127.0.0.1:9001"))
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        assert (host, port, timeout) == ("127.0.0.1", 9001, 2.0)
        reactor.advance(0.003)
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        proto.makeConnection(transport)
        r = result_of(d)
        assert r.ok and r.reason == "connected" and r.latency == pytest.approx(0.003)
        assert transport.disconnecting  # the probe does not hold the connection

    def test_refused(self):
        reactor = MemoryReactorClock()
        d = TcpProbe(reactor, 2.0).probe(Backend("127.0.0.1:9001"))
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        assert result_of(d) == ProbeResult(False, "connection refused")

    def test_timeout_stops_connecting(self):
        reactor = MemoryReactorClock()
        d = TcpProbe(reactor, 2.0).probe(Backend("127.0.0.1:9001"))
        reactor.advance(1.9)
        assert not d.called
        reactor.advance(0.1)
        assert result_of(d) == ProbeResult(False, "timed out after 2s")
        assert reactor.connectors[0].stoppedConnecting

    def test_ipv6_literal(self):
        reactor = MemoryReactorClock()
        TcpProbe(reactor, 1.0).probe(Backend("[::1]:9001"))
        assert reactor.tcpClients[0][:2] == ("::1", 9001)


class Health(Resource):
    """/healthz answers with a settable status/body; /slow never answers."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.status = 200
        self.body = b"ok"
        self.seen = []

    def render(self, request):
        self.seen.append((request.method, request.uri, request.getHeader(b"host"),
                          request.getHeader(b"user-agent")))
        if request.uri == b"/slow":
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return self.body


def http_probe(resource, clock=None, **kw):
    stub = StubTreq(resource)
    clock = clock or task.Clock()
    return HttpProbe(clock, 2.0, http_client=stub, **kw), stub, clock


class TestHttp:
    def test_pass_with_path_method_and_host(self):
        res = Health()
        probe, stub, _ = http_probe(res, path="/healthz?deep=1", method="head", host="app.internal")
        d = probe.probe(Backend("127.0.0.1:9001"))
        stub.flush()
        r = result_of(d)
        assert r.ok and r.reason == "status 200"
        assert res.seen == [(b"HEAD", b"/healthz?deep=1", b"app.internal", b"lbtwist-health")]

    def test_default_host_is_the_backend_address(self):
        res = Health()
        probe, stub, _ = http_probe(res)
        d = probe.probe(Backend("127.0.0.1:9001"))
        stub.flush()
        assert result_of(d).ok
        assert res.seen[0][2] == b"127.0.0.1:9001"

    def test_unexpected_status_fails(self):
        res = Health()
        res.status = 503
        probe, stub, _ = http_probe(res)
        d = probe.probe(Backend("127.0.0.1:9001"))
        stub.flush()
        r = result_of(d)
        assert (r.ok, r.reason) == (False, "status 503 (expected 200-399)")

    def test_expected_statuses_and_no_redirect_following(self):
        res = Health()
        res.status = 301
        probe, stub, _ = http_probe(res, expected_statuses="200")
        d = probe.probe(Backend("127.0.0.1:9001"))
        stub.flush()
        assert result_of(d).reason == "status 301 (expected 200)"
        assert len(res.seen) == 1

    def test_body_match(self):
        res = Health()
        res.body = b'{"db": "down"}'
        probe, stub, _ = http_probe(res, body_match=r'"db":\s*"up"')
        d = probe.probe(Backend("127.0.0.1:9001"))
        stub.flush()
        r = result_of(d)
        assert not r.ok and "body does not match" in r.reason
        res.body = b'{"db": "up"}'
        d = probe.probe(Backend("127.0.0.1:9001"))
        stub.flush()
        assert result_of(d).ok

    def test_timeout(self):
        res = Health()
        probe, stub, clock = http_probe(res, path="/slow")
        d = probe.probe(Backend("127.0.0.1:9001"))
        seen = []
        d.addBoth(seen.append)
        stub.flush()
        clock.advance(1.9)
        stub.flush()
        assert seen == []
        clock.advance(0.1)
        stub.flush()
        assert seen == [ProbeResult(False, "timed out after 2s")]


class TestHttpConnects:
    def test_ip_literal_connects_directly_without_the_resolver(self):
        """Agent's default endpoint resolves IP literals in a thread and waits
        0.3 s before reporting a refused connect; probes must not."""
        reactor = MemoryReactorClock()
        probe = HttpProbe(reactor, 2.0, path="/healthz")
        d = probe.probe(Backend("127.0.0.1:9001"))
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        assert (host, port, timeout) == ("127.0.0.1", 9001, 2.0)
        factory.clientConnectionFailed(reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        assert result_of(d) == ProbeResult(False, "connection refused")

    def test_ipv6_literal(self):
        reactor = MemoryReactorClock()
        HttpProbe(reactor, 2.0).probe(Backend("[::1]:9001"))
        host, port, factory, _, _ = reactor.tcpClients[0]
        assert (host, port) == ("::1", 9001)
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        sent = transport.value()
        assert sent.startswith(b"GET /healthz HTTP/1.1\r\n")
        assert b"Host: [::1]:9001\r\n" in sent
        assert sent.count(b"Connection: close\r\n") == 1  # a fresh connection per probe


class TestOptions:
    def test_statuses(self):
        ok = parse_statuses("200-299, 404")
        assert [ok(c) for c in (199, 200, 250, 299, 300, 404)] == [False, True, True, True, False, True]
        for bad in ("", "abc", "300-200", "99", "200-700"):
            with pytest.raises(ValueError, match="expected_statuses"):
                parse_statuses(bad)

    def test_factories_reject_bad_options(self):
        clock = task.Clock()
        with pytest.raises(ValueError, match="unknown option.*'pth'"):
            http_factory({"timeout": 1.0, "pth": "/x"}, reactor=clock)
        with pytest.raises(ValueError, match="bad regular expression"):
            http_factory({"timeout": 1.0, "body_match": "("}, reactor=clock)
        with pytest.raises(ValueError, match="path must start"):
            http_factory({"timeout": 1.0, "path": "healthz"}, reactor=clock)
        with pytest.raises(ValueError, match="timeout"):
            tcp_factory({"timeout": 0}, reactor=clock)
        with pytest.raises(ValueError, match="unknown option"):
            tcp_factory({"timeout": 1.0, "path": "/"}, reactor=clock)

    def test_make_probe_from_config(self):
        reg = Registry()
        reg.register(builtin, "lbtwist.health.builtin")
        reg.collect()
        reactor = MemoryReactorClock()
        probe = builtin.make_probe(reg, ActiveHealthConfig(kind="http", path="/ready", timeout=0.5,
                                                          expected_statuses="204"), reactor=reactor)
        assert isinstance(probe, HttpProbe)
        assert (probe.path, probe.timeout, probe.expected) == ("/ready", 0.5, "204")
        assert isinstance(builtin.make_probe(reg, ActiveHealthConfig(kind="tcp"), reactor=reactor), TcpProbe)
        with pytest.raises(KeyError, match="unknown health probe kind 'htp' \\(did you mean 'http'\\?\\)"):
            builtin.make_probe(reg, ActiveHealthConfig(kind="htp"), reactor=reactor)
        with pytest.raises(ValueError, match="health probe 'http': expected_statuses"):
            builtin.make_probe(reg, ActiveHealthConfig(kind="http", expected_statuses="2xx"), reactor=reactor)
