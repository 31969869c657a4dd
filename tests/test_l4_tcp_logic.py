"""The TCP relay's lifecycle, deterministically: MemoryReactorClock records the
backend connects, StringTransports stand in for sockets, the clock is advanced
by hand. Real-socket behaviour is in test_l4_tcp_real.py."""
from __future__ import annotations

import random

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from lbtwist.balancers.round_robin import RoundRobin
from lbtwist.config.model import Config, ListenerConfig, PoolConfig, ProxyProtocolConfig
from lbtwist.interfaces import IBalancer
from lbtwist.l4.proxy_protocol import encode_v1, encode_v2, parse_v2
from lbtwist.l4.tcp import tcp_listener
from lbtwist.pool import Backend, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime

BACKENDS = ("10.0.0.1:81", "10.0.0.2:82", "10.0.0.3:83")


class Sock(StringTransport):
    """A StringTransport that also half-closes, like a TCP transport."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


@implementer(IBalancer)
class Recording(RoundRobin):
    """Round robin that remembers the contexts it was asked to pick for."""

    def __init__(self):
        super().__init__(random.Random(0))
        self.contexts = []

    def pick(self, candidates, ctx):
        self.contexts.append((ctx.key, ctx.client, tuple(b.address for b in ctx.exclude)))
        return super().pick(candidates, ctx)


class Rig:
    def __init__(self, backends=BACKENDS, attempts=3, connect_timeout=2.0, **listener):
        self.clock = MemoryReactorClock()
        self.balancer = Recording()
        self.pool = Pool("p", [Backend(address=a) for a in backends], self.balancer, self.clock)
        self.outcomes: list[tuple[str, str]] = []
        self.pool.observe_outcomes(lambda b, now, lat, outcome: self.outcomes.append((b.address, outcome)))
        pcfg = PoolConfig(name="p", connect_timeout=connect_timeout, connect_attempts=attempts)
        lcfg = ListenerConfig(name="l4", bind="tcp:0", pool="p", **listener)
        self.runtime = Runtime(reactor=self.clock, registry=Registry(), config=Config())
        self.runtime.pools["p"] = self.pool
        self.runtime.pool_configs["p"] = pcfg
        self.records = []
        self.runtime.traffic.subscribe(self.records.append)
        self.service = tcp_listener(lcfg, self.runtime)
        self.factory = self.service.relay

    def client(self, host="192.0.2.7", port=5555):
        proto = self.factory.buildProtocol(None)
        t = Sock(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(t)
        return proto, t

    def attempt(self, i=-1):
        host, port, factory, timeout, _ = self.clock.tcpClients[i]
        return f"{host}:{port}", factory

    def connect_backend(self, i=-1):
        _, factory = self.attempt(i)
        bp = factory.buildProtocol(None)
        bt = Sock()
        bp.makeConnection(bt)
        return bp, bt

    def refuse(self, i=-1):
        _, factory = self.attempt(i)
        factory.clientConnectionFailed(self.clock.connectors[i], Failure(error.ConnectionRefusedError()))


def test_early_bytes_held_then_sent_and_producers_wired():
    rig = Rig()
    fe, ct = rig.client()
    assert rig.attempt()[0] == "10.0.0.1:81"
    assert rig.balancer.contexts[0] == (b"192.0.2.7", "192.0.2.7", ())
    # Bytes the client sends while the backend connect is under way are held...
    fe.dataReceived(b"GET / HTTP/1.1\r\n")
    fe.dataReceived(b"\r\n")
    assert ct.producerState == "producing"
    bp, bt = rig.connect_backend()
    # ...and go out, in order, the moment the backend is up.
    assert bt.value() == b"GET / HTTP/1.1\r\n\r\n"
    bt.clear()
    # Backpressure: each transport is the streaming producer of the other, so a
    # full write buffer on one side pauses reading on the other.
    assert ct.producer is bt and ct.streaming
    assert bt.producer is ct and bt.streaming
    fe.dataReceived(b"hello")
    bp.dataReceived(b"world")
    assert bt.value() == b"hello" and ct.value() == b"world"
    assert rig.pool.get("10.0.0.1:81").active == 1
    assert fe in rig.service.connections


def test_client_paused_when_too_much_arrives_before_the_backend_is_up():
    from lbtwist.l4.tcp import PENDING_LIMIT

    rig = Rig()
    fe, ct = rig.client()
    fe.dataReceived(b"a" * (PENDING_LIMIT - 1))
    assert ct.producerState == "producing"
    fe.dataReceived(b"b")
    # The relay holds at most PENDING_LIMIT; the kernel keeps the rest.
    assert ct.producerState == "paused"
    bp, bt = rig.connect_backend()
    assert ct.producerState == "producing"
    assert bt.value() == b"a" * (PENDING_LIMIT - 1) + b"b"


def test_connect_timeout_fails_over_before_the_client_sees_anything():
    rig = Rig(connect_timeout=2.0)
    fe, ct = rig.client()
    rig.clock.advance(1.9)
    assert len(rig.clock.tcpClients) == 1
    rig.clock.advance(0.1)
    # The first attempt was abandoned and reported; the second backend is tried.
    assert rig.clock.connectors[0].stoppedConnecting
    assert rig.outcomes == [("10.0.0.1:81", "gateway")]
    assert rig.attempt()[0] == "10.0.0.2:82"
    assert rig.balancer.contexts[-1][2] == ("10.0.0.1:81",)
    assert ct.value() == b"" and not ct.disconnecting
    # The abandoned attempt completing late is aborted, not used.
    late_bp, late_bt = rig.connect_backend(0)
    assert late_bt.aborted
    bp, bt = rig.connect_backend()
    fe.dataReceived(b"x")
    assert bt.value() == b"x"


def test_refused_connects_fail_over_within_the_attempt_budget():
    rig = Rig(attempts=2)
    fe, ct = rig.client()
    rig.refuse()
    assert rig.attempt()[0] == "10.0.0.2:82" and not ct.disconnecting
    rig.refuse()
    # Two attempts allowed: the third backend is never tried; the client is closed.
    assert len(rig.clock.tcpClients) == 2
    assert ct.disconnecting and ct.value() == b""
    assert rig.outcomes == [("10.0.0.1:81", "gateway"), ("10.0.0.2:82", "gateway")]
    fe.connectionLost(Failure(error.ConnectionDone()))
    assert rig.factory.active == 0 and fe not in rig.service.connections
    assert rig.records[-1].outcome == "gateway" and rig.records[-1].tries == 2
    assert "connect failed on 2 backend(s)" in rig.records[-1].error
    # No timer is left behind.
    assert rig.clock.getDelayedCalls() == []


def test_every_backend_tried_once_at_most():
    rig = Rig(backends=("10.0.0.1:81",), attempts=3)
    fe, ct = rig.client()
    rig.refuse()
    assert len(rig.clock.tcpClients) == 1 and ct.disconnecting


def test_no_usable_backend_closes_at_once():
    rig = Rig()
    for b in rig.pool.backends():
        rig.pool.set_enabled(b, False, "test")
    fe, ct = rig.client()
    assert ct.disconnecting and rig.clock.tcpClients == []


def test_idle_timeout_closes_both_sides_only_after_silence():
    rig = Rig(idle_timeout=10.0)
    fe, ct = rig.client()
    bp, bt = rig.connect_backend()
    rig.clock.advance(6)
    bp.dataReceived(b"tick")  # activity pushes the deadline
    rig.clock.advance(6)
    assert not ct.aborted and not bt.aborted
    rig.clock.advance(4)
    assert ct.aborted and bt.aborted
    bp.connectionLost(Failure(error.ConnectionAborted()))
    fe.connectionLost(Failure(error.ConnectionAborted()))
    assert rig.outcomes == [("10.0.0.1:81", "cancelled")]
    assert rig.records[-1].error == "idle for 10s"
    assert rig.records[-1].bytes_out == 4
    assert rig.pool.get("10.0.0.1:81").active == 0


def test_max_connections_refuses_cleanly_then_admits_again():
    rig = Rig(max_connections=2)
    a, at = rig.client()
    b, bt_ = rig.client()
    c, ct = rig.client()
    assert ct.disconnecting and not at.disconnecting and not bt_.disconnecting
    assert len(rig.clock.tcpClients) == 2  # no backend work for the refused one
    assert rig.factory.refused == 1 and rig.factory.active == 2
    assert rig.records[-1].outcome == "rejected" and "max_connections=2" in rig.records[-1].error
    c.connectionLost(Failure(error.ConnectionDone()))
    assert rig.factory.active == 2
    # One ends (while still connecting): room for another.
    a.connectionLost(Failure(error.ConnectionLost()))
    assert rig.factory.active == 1
    d, dt = rig.client()
    assert not dt.disconnecting and len(rig.clock.tcpClients) == 3


def test_half_close_propagates_each_way_then_closes():
    rig = Rig()
    fe, ct = rig.client()
    bp, bt = rig.connect_backend()
    fe.dataReceived(b"request")
    fe.readConnectionLost()  # client sent FIN
    assert bt.write_closed and bt.producer is None
    assert not bt.disconnecting and not ct.disconnecting  # response may still come
    bp.dataReceived(b"response")
    assert ct.value() == b"response"
    bp.readConnectionLost()  # backend sent FIN too
    assert ct.write_closed
    assert ct.disconnecting and bt.disconnecting
    bp.connectionLost(Failure(error.ConnectionDone()))
    fe.connectionLost(Failure(error.ConnectionDone()))
    assert rig.outcomes == [("10.0.0.1:81", "ok")]
    assert (rig.records[-1].bytes_in, rig.records[-1].bytes_out) == (7, 8)


def test_client_half_close_while_connecting_is_forwarded_once_connected():
    rig = Rig()
    fe, ct = rig.client()
    fe.dataReceived(b"whole request")
    fe.readConnectionLost()
    assert not ct.disconnecting
    bp, bt = rig.connect_backend()
    assert bt.value() == b"whole request" and bt.write_closed
    bp.dataReceived(b"answer")
    bp.readConnectionLost()
    assert ct.value() == b"answer" and ct.disconnecting and bt.disconnecting


def test_backend_reset_is_passed_on_and_reported_as_gateway():
    rig = Rig()
    fe, ct = rig.client()
    bp, bt = rig.connect_backend()
    bp.connectionLost(Failure(error.ConnectionLost()))
    assert ct.aborted
    fe.connectionLost(Failure(error.ConnectionAborted()))
    assert rig.outcomes == [("10.0.0.1:81", "gateway")]


def test_client_reset_aborts_backend_and_is_not_blamed_on_it():
    rig = Rig()
    fe, ct = rig.client()
    bp, bt = rig.connect_backend()
    fe.connectionLost(Failure(error.ConnectionLost()))
    assert bt.aborted
    bp.connectionLost(Failure(error.ConnectionAborted()))
    assert rig.outcomes == [("10.0.0.1:81", "cancelled")]
    assert rig.factory.active == 0


def test_client_leaving_during_connect_stops_the_attempt():
    rig = Rig()
    fe, ct = rig.client()
    fe.connectionLost(Failure(error.ConnectionLost()))
    assert rig.clock.connectors[0].stoppedConnecting
    assert rig.outcomes == [("10.0.0.1:81", "cancelled")]
    assert rig.clock.getDelayedCalls() == []
    # A late refusal of that attempt changes nothing.
    rig.refuse()
    assert len(rig.clock.tcpClients) == 1 and rig.factory.active == 0


def test_drain_abort_closes_both_sides():
    rig = Rig()
    fe, ct = rig.client()
    bp, bt = rig.connect_backend()
    conn = next(iter(rig.service.connections))
    conn.drain()
    assert not ct.aborted
    conn.abort()
    assert ct.aborted and bt.aborted


# -- PROXY protocol ---------------------------------------------------------------


def test_accept_proxy_header_sets_client_and_forwards_following_bytes():
    rig = Rig(proxy_protocol=ProxyProtocolConfig(accept=True))
    fe, ct = rig.client(host="127.0.0.1", port=40000)
    assert ct.producerState == "producing" and rig.clock.tcpClients == []
    header = encode_v1(("203.0.113.9", 1234), ("198.51.100.2", 443))
    fe.dataReceived(header[:10])
    assert rig.clock.tcpClients == []
    fe.dataReceived(header[10:] + b"early data")
    # The hash key and client are the header's, not the socket's.
    assert rig.balancer.contexts[0][:2] == (b"203.0.113.9", "203.0.113.9")
    bp, bt = rig.connect_backend()
    assert bt.value() == b"early data"
    fe.connectionLost(Failure(error.ConnectionDone()))
    assert bt.disconnecting and rig.records == []
    bp.connectionLost(Failure(error.ConnectionDone()))
    assert rig.records[-1].client == "203.0.113.9:1234"


def test_accept_proxy_malformed_header_closes_without_backend():
    rig = Rig(proxy_protocol=ProxyProtocolConfig(accept=True))
    fe, ct = rig.client()
    fe.dataReceived(b"GET / HTTP/1.1\r\n")
    assert ct.aborted and rig.clock.tcpClients == []
    fe.connectionLost(Failure(error.ConnectionAborted()))
    assert rig.records[-1].outcome == "rejected"
    assert rig.outcomes == [] and rig.factory.active == 0


def test_accept_proxy_header_timeout():
    rig = Rig(proxy_protocol=ProxyProtocolConfig(accept=True, header_timeout=1.0))
    fe, ct = rig.client()
    fe.dataReceived(b"PROXY TCP4 ")
    rig.clock.advance(1.0)
    assert ct.aborted and rig.clock.tcpClients == []


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_header_precedes_client_bytes(version):
    rig = Rig(proxy_protocol=ProxyProtocolConfig(send=version))
    fe, ct = rig.client(host="192.0.2.50", port=6000)
    bp, bt = rig.connect_backend()
    fe.dataReceived(b"payload")
    if version == "v1":
        assert bt.value() == b"PROXY TCP4 192.0.2.50 127.0.0.1 6000 8080\r\npayload"
    else:
        raw = bt.value()
        assert raw.endswith(b"payload")
        h = parse_v2(raw[: -len(b"payload")])
        assert h.source == ("192.0.2.50", 6000) and h.dest == ("127.0.0.1", 8080)


def test_accept_and_send_relays_the_original_addresses():
    rig = Rig(proxy_protocol=ProxyProtocolConfig(accept=True, send="v2"))
    fe, ct = rig.client(host="127.0.0.1", port=40000)
    fe.dataReceived(encode_v2(("203.0.113.9", 1234), ("198.51.100.2", 443)) + b"x")
    bp, bt = rig.connect_backend()
    h = parse_v2(bt.value()[:-1])
    assert h.source == ("203.0.113.9", 1234) and h.dest == ("198.51.100.2", 443)
    assert bt.value().endswith(b"x")


def test_reconfigure_applies_to_new_connections_only():
    rig = Rig()
    other = Pool("q", [Backend(address="10.9.9.9:99")], RoundRobin(random.Random(0)), rig.clock)
    rig.runtime.pools["q"] = other
    old_fe, old_ct = rig.client()
    bp, bt = rig.connect_backend()
    rig.service.reconfigure(
        ListenerConfig(name="l4", bind="tcp:0", pool="q", max_connections=2,
                       proxy_protocol=ProxyProtocolConfig(send="v1"))
    )
    fe, ct = rig.client()
    assert rig.attempt()[0] == "10.9.9.9:99"
    nbp, nbt = rig.connect_backend()
    assert nbt.value().startswith(b"PROXY TCP4 ")
    # The live connection is untouched: same backend, no header injected.
    old_fe.dataReceived(b"still here")
    assert bt.value() == b"still here"
    # The new cap counts the connections already open.
    third, tt = rig.client()
    assert tt.disconnecting
    with pytest.raises(ValueError):
        rig.service.reconfigure(ListenerConfig(name="l4", bind="tcp:0"))


def test_config_errors_are_clear():
    clock = MemoryReactorClock()
    rt = Runtime(reactor=clock, registry=Registry(), config=Config())
    with pytest.raises(ValueError, match="needs a pool"):
        tcp_listener(ListenerConfig(name="x", bind="tcp:0"), rt)
    with pytest.raises(ValueError, match="hash_key"):
        tcp_listener(ListenerConfig(name="x", bind="tcp:0", pool="p", hash_key="header:x"), rt)
