"""Flood defences on real 127.0.0.1 sockets: the listen backlog reaches the
kernel, one accept pass takes a bounded batch, max_connections_per_client
refuses one address and not another, and the drill's attacker holds and
trickles what it says. Counts are small and every wait is bounded."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

from lbtwist.drill.flood import Flood, parse_status
from lbtwist.l7.listener import http_listener
from lbtwist.listener import ACCEPT_BATCH, ListenerService, default_backlog
from support.l7 import Origin, listener_config, make_runtime, ok, split_responses

pytestmark = pytest.mark.integration


class _Counting(protocol.ServerFactory):
    def __init__(self) -> None:
        self.made = 0
        self.data = b""

    def buildProtocol(self, addr):
        self.made += 1
        f = self

        class P(protocol.Protocol):
            def dataReceived(self, data):
                f.data += data

        return P()


def _listen_queue(port: int) -> int | None:
    """The backlog the kernel holds for a listening socket (``ss``'s Send-Q)."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0] == "LISTEN":
            return int(f[2])
    return None


def _service(backlog=None) -> tuple[ListenerService, _Counting]:
    f = _Counting()
    svc = ListenerService("t", "tcp:0:interface=127.0.0.1", f, reactor, backlog=backlog)
    svc.startService()
    return svc, f


@pytest_twisted.ensureDeferred
async def test_backlog_reaches_the_kernel():
    svc, _ = _service(backlog=77)
    dflt, _ = _service()
    try:
        q = _listen_queue(svc.address.port)
        if q is None:
            pytest.fail("ss (iproute2) is needed to read a listen queue")
        assert q == 77
        assert _listen_queue(dflt.address.port) == min(default_backlog(), 1 << 16)
        assert dflt.port.backlog == default_backlog()  # not Twisted's 50
    finally:
        await svc.stop_accepting()
        await dflt.stop_accepting()


@pytest_twisted.ensureDeferred
async def test_one_accept_pass_takes_a_bounded_batch():
    """Queued connections: one readable event accepts ACCEPT_BATCH of them
    (Twisted's own count starts at 100, falls to what the last pass found and
    climbs back 20 a pass)."""
    svc, f = _service(backlog=1024)
    port = svc.port
    port.stopReading()  # let connections queue in the kernel
    n = 2 * ACCEPT_BATCH + 5
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", svc.address.port), timeout=5)
            socks.append(s)
        port.doRead()
        assert f.made == ACCEPT_BATCH
        port.doRead()
        assert f.made == 2 * ACCEPT_BATCH
        port.doRead()  # all that are queued, up to the batch
        assert f.made == n
        # a quiet pass does not shrink the next batch
        port.doRead()
        assert port.numberAccepts == ACCEPT_BATCH
    finally:
        for s in socks:
            s.close()
        port.startReading()
        await svc.stop_accepting()


@pytest_twisted.ensureDeferred
async def test_max_connections_per_client_over_real_sockets():
    origin = Origin(lambda req, p: ok(b"hi")).listen(reactor)
    lcfg = attrs.evolve(listener_config(), max_connections_per_client=2)
    runtime = make_runtime(reactor, {"app": [origin.address]}, lcfg)
    svc = http_listener(lcfg, runtime)
    svc.startService()
    port = svc.address.port
    held: list[protocol.Protocol] = []
    try:
        for _ in range(2):
            held.append(await _raw(port, "127.0.0.1"))
        third = await _raw(port, "127.0.0.1")
        await _wait(lambda: third.lost, 10.0)
        assert third.data.startswith(b"HTTP/1.1 429 ")
        # another loopback address is another client
        other = await _raw(port, "127.0.0.2")
        other.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await _wait(lambda: split_responses(other.data), 10.0)
        assert split_responses(other.data)[0].status == 200
        # one of the first client's connections closes: it may open another
        held[0].transport.loseConnection()
        await _wait(lambda: svc.proxy.clients.open_from("127.0.0.1") == 1, 10.0)
        again = await _raw(port, "127.0.0.1")
        again.transport.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        await _wait(lambda: split_responses(again.data), 10.0)
        assert split_responses(again.data)[0].status == 200
        for c in (other, again, *held[1:]):
            c.transport.loseConnection()
    finally:
        await svc.stopService(drain_timeout=1.0)
        runtime.connection_pools.close_idle()
        await origin.stop()
        await task.deferLater(reactor, 0.05, lambda: None)


class _Raw(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=None):
        self.lost = True


async def _raw(port: int, source: str) -> _Raw:
    cc = protocol.ClientCreator(reactor, _Raw)
    d = cc.connectTCP("127.0.0.1", port, timeout=5, bindAddress=(source, 0))
    return await d.addTimeout(10, reactor)


async def _wait(pred, timeout: float) -> None:
    deadline = reactor.seconds() + timeout
    while not pred():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        await task.deferLater(reactor, 0.02, lambda: None)


# -- the drill's attacker ----------------------------------------------------------------------


def test_attacker_refuses_non_loopback():
    with pytest.raises(ValueError):
        Flood("10.0.0.1", 80, slowloris=1, idle=0, connect_rate=0, interval=1, ramp=10, duration=1)


@pytest_twisted.ensureDeferred
async def test_attacker_holds_trickles_and_reopens():
    from lbtwist.drill.procs import Child, python

    f = _Counting()
    port = reactor.listenTCP(0, f, interface="127.0.0.1", backlog=512)
    child = Child(reactor, "flood", [python(), "-m", "lbtwist.drill.flood", "--port", str(port.getHost().port),
                                     "--slowloris", "20", "--idle", "20", "--connect-rate", "30",
                                     "--interval", "0.5", "--duration", "3"])
    try:
        code = await child.wait_exit(30.0)
        assert code == 0, child.tail()
        final = [parse_status(x) for x in child.lines if parse_status(x)]
        assert final and final[-1].get("final")
        st = final[-1]
        assert st["held_slow"] == 20 and st["held_idle"] == 20
        assert st["connects"] >= 30 and st["connect_failed"] == 0
        assert f.made >= 40 + 30
        assert f.data.startswith(b"GET / HTTP/1.1\r\n"[:1])  # the trickle arrived
        assert len(f.data) >= 20 * 3  # about one byte every 0.5 s each, for 3 s
    finally:
        child.kill()
        await port.stopListening()


def test_status_lines_parse():
    assert parse_status('flood {"t": 1, "held_slow": 3}') == {"t": 1, "held_slow": 3}
    assert parse_status("something else") is None
    assert parse_status("flood {broken") is None
