"""The example plugin's ``tcp_banner`` probe kind: found through the entry
point like any third-party kind, and judging what a backend says after
connecting (in memory and against a real local socket)."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import error, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

# installed by `make` (pip install ./plugins/lbtwist-example): a missing plugin is a failure
from lbtwist_example import plugin

from lbtwist.config.model import ActiveHealthConfig
from lbtwist.health import ProbeResult
from lbtwist.health.builtin import make_probe
from lbtwist.pool import Backend
from lbtwist.registry import Registry


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "probe did not finish"
    return out[0]


def connect(reactor):
    host, port, factory, _, _ = reactor.tcpClients[-1]
    proto = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_registered_through_the_entry_point_and_built_from_config():
    reg = Registry.default()
    assert reg.origin("health probe kind", "tcp_banner") == "example"
    probe = make_probe(reg, ActiveHealthConfig(kind="tcp_banner", timeout=0.5,
                                               options={"expect": "+PONG", "send": "PING\\r\\n"}),
                       reactor=MemoryReactorClock())
    assert (probe.expect, probe.send, probe.timeout) == (b"+PONG", b"PING\r\n", 0.5)
    with pytest.raises(ValueError, match="'expect' must be a non-empty string"):
        make_probe(reg, ActiveHealthConfig(kind="tcp_banner"), reactor=MemoryReactorClock())
    with pytest.raises(ValueError, match="unknown option"):
        make_probe(reg, ActiveHealthConfig(kind="tcp_banner", options={"expect": "x", "sned": "y"}),
                   reactor=MemoryReactorClock())


class TestInMemory:
    def probe(self, reactor, **kw):
        return plugin.make_tcp_banner({"timeout": 2.0, "expect": "+PONG", **kw}, reactor=reactor)

    def test_banner_in_pieces_passes_and_closes(self):
        reactor = MemoryReactorClock()
        d = self.probe(reactor, send="PING\\r\\n").probe(Backend("127.0.0.1:6379"))
        proto, transport = connect(reactor)
        assert transport.value() == b"PING\r\n"
        proto.dataReceived(b"+PO")
        proto.dataReceived(b"NG\r\n")
        r = result_of(d)
        assert r.ok and r.reason == "banner matched"
        assert transport.disconnecting

    def test_wrong_answer_fails_when_closed(self):
        reactor = MemoryReactorClock()
        d = self.probe(reactor).probe(Backend("127.0.0.1:6379"))
        proto, _ = connect(reactor)
        proto.dataReceived(b"-LOADING dataset\r\n")
        proto.connectionLost(Failure(error.ConnectionDone()))
        r = result_of(d)
        assert not r.ok and r.reason.startswith("closed before '+PONG' (got b'-LOADING")

    def test_silent_backend_times_out_and_is_aborted(self):
        """Accepts the connection but never speaks: a wedged process."""
        reactor = MemoryReactorClock()
        d = self.probe(reactor).probe(Backend("127.0.0.1:6379"))
        _, transport = connect(reactor)
        reactor.advance(2.0)
        assert result_of(d) == ProbeResult(False, "timed out after 2s")
        assert transport.disconnecting

    def test_refused(self):
        reactor = MemoryReactorClock()
        d = self.probe(reactor).probe(Backend("127.0.0.1:6379"))
        reactor.tcpClients[-1][2].clientConnectionFailed(reactor.connectors[-1],
                                                        Failure(error.ConnectionRefusedError()))
        assert result_of(d) == ProbeResult(False, "connection refused")


class Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(self.factory.banner)


@pytest_twisted.ensureDeferred
async def test_real_socket():
    f = protocol.Factory.forProtocol(Greeter)
    f.banner = b"SSH-2.0-OpenSSH_9.2\r\n"
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    try:
        addr = f"127.0.0.1:{port.getHost().port}"
        good = plugin.make_tcp_banner({"timeout": 1.0, "expect": "SSH-2.0"}, reactor=reactor)
        bad = plugin.make_tcp_banner({"timeout": 0.3, "expect": "220 "}, reactor=reactor)
        assert (await good.probe(Backend(addr))).ok
        f.banner = b""  # a wedged server: accepts, says nothing
        r = await bad.probe(Backend(addr))
        assert r == ProbeResult(False, "timed out after 0.3s")
    finally:
        await port.stopListening()


def checkout_plugin():
    """The checkout's plugin module (the tests above use the installed copy,
    which ``make`` refreshes; this one checks the source as it is now)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "plugins" / "lbtwist-example" / "lbtwist_example" / "plugin.py"
    spec = importlib.util.spec_from_file_location("lbtwist_example_checkout_plugin", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest_twisted.ensureDeferred
async def test_probes_do_not_log_starting_and_stopping_factory():
    """A probe every few seconds per backend must not write two log lines each."""
    from twisted.internet import defer
    from twisted.logger import formatEvent, globalLogPublisher

    f = protocol.Factory.forProtocol(Greeter)
    f.noisy = False
    f.banner = b"+PONG\r\n"
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        probe = checkout_plugin().make_tcp_banner({"timeout": 2.0, "expect": "+PONG"}, reactor=reactor)
        for _ in range(3):
            assert (await probe.probe(Backend(f"127.0.0.1:{port.getHost().port}"))).ok
        # the connection's teardown (and its factory's doStop) runs after the verdict
        d = defer.Deferred()
        reactor.callLater(0.05, d.callback, None)
        await d
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
    noisy = [formatEvent(e) for e in events if "factory" in (formatEvent(e) or "").lower()]
    assert noisy == []
