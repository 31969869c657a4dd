"""A slowloris flood on a real admin listener (real sockets on 127.0.0.x):
200 unauthenticated connections from 25 loopback addresses trickle a byte
every 0.25 s and reconnect a second after being closed. Meanwhile ``/metrics`` and a drain
call from another address still answer promptly; once the flood stops, every
trickling connection is closed by admin.header_timeout (not kept open for
minutes), and the listener never held more than admin.max_connections."""
from __future__ import annotations

import time

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor, task

from lbtwist.admin import AdminService
from lbtwist.config.model import AdminConfig, Config, PoolConfig
from lbtwist.pool import Backend, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime
from support.fakes import FirstBalancer

pytestmark = pytest.mark.integration

TOKEN = "flood-test-token-0123456789"
HEADER_TIMEOUT = 1.0
SOURCES = [f"127.0.0.{i}" for i in range(2, 27)]  # 25 addresses x 8 = 200 connections
PER_SOURCE = 8
MAX_ATTEMPTS = 3000  # every load loop is bounded: connections over the whole test
DEADLINE = 20.0  # generous: the box is loaded


class Trickle(protocol.Protocol):
    """An unauthenticated request line, then one header byte every 0.25 s."""

    def connectionMade(self):
        self.factory.flood.opened(self)
        self.received = b""
        self.made = time.monotonic()
        self.transport.write(b"GET /metrics HTTP/1.1\r\n")
        self.drip = task.LoopingCall(self.transport.write, b"X")
        self.drip.start(0.25, now=False)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        if self.drip.running:
            self.drip.stop()
        self.factory.flood.closed(self, time.monotonic() - self.made)


class TrickleFactory(protocol.ClientFactory):
    protocol = Trickle

    def __init__(self, flood, source):
        self.flood, self.source = flood, source

    def clientConnectionFailed(self, connector, reason):
        self.flood.failed(self.source)

    def clientConnectionLost(self, connector, reason):
        self.flood.again(self.source)


class Flood:
    def __init__(self, port):
        self.port = port
        self.attempts = 0
        self.open: set[Trickle] = set()
        self.lifetimes: list[float] = []
        self.timed_out = 0  # closed with a 408
        self.running = True
        self.all_up = defer.Deferred()
        self.all_gone: defer.Deferred | None = None
        self.settled = 0

    def start(self):
        for source in SOURCES:
            for _ in range(PER_SOURCE):
                self.connect(source)

    def connect(self, source):
        if not self.running or self.attempts >= MAX_ATTEMPTS:
            return
        self.attempts += 1
        reactor.connectTCP("127.0.0.1", self.port, TrickleFactory(self, source), timeout=5, bindAddress=(source, 0))

    def _settle(self):
        self.settled += 1
        if self.settled == len(SOURCES) * PER_SOURCE and not self.all_up.called:
            self.all_up.callback(None)

    def opened(self, conn):
        self.open.add(conn)
        self._settle()

    def failed(self, source):
        self._settle()
        self.again(source)

    def closed(self, conn, lifetime):
        self.open.discard(conn)
        self.lifetimes.append(lifetime)
        if conn.received.startswith(b"HTTP/1.1 408 "):
            self.timed_out += 1
        if not self.open and self.all_gone is not None and not self.all_gone.called:
            self.all_gone.callback(None)

    def again(self, source):
        if self.running:
            reactor.callLater(1.0, self.connect, source)

    def stop(self) -> defer.Deferred:
        self.running = False
        self.all_gone = defer.Deferred()
        if not self.open:
            self.all_gone.callback(None)
        return self.all_gone


@pytest_twisted.ensureDeferred
async def test_slowloris_flood_does_not_stop_metrics_or_a_drain():
    # a listen backlog above the flood's 200 connects (the default 50 drops SYNs,
    # so a client would wait for the kernel's 1 s retransmit, whatever lbtwist does)
    cfg = AdminConfig(bind="tcp:0:interface=127.0.0.1:backlog=1024", token=TOKEN, header_timeout=HEADER_TIMEOUT,
                      max_connections=64, max_connections_per_client=PER_SOURCE)
    rt = Runtime(reactor=reactor, registry=Registry(), config=Config(admin=cfg))
    pool = Pool("web", [Backend(address="127.0.0.1:9001")], FirstBalancer(), reactor)
    rt.pools["web"] = pool
    rt.pool_configs["web"] = PoolConfig(name="web")
    svc = AdminService(cfg, rt, process_metrics=False)
    svc.startService()
    flood = Flood(svc.address.port)
    peak = 0

    def sample():
        nonlocal peak
        peak = max(peak, len(svc.gate))

    sampler = task.LoopingCall(sample)
    sampler.start(0.01)
    try:
        flood.start()
        await flood.all_up.addTimeout(DEADLINE, reactor)
        base = f"http://127.0.0.1:{svc.address.port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        took = {}
        for name, call in [
            ("metrics", lambda: treq.get(base + "/metrics", headers=auth, persistent=False)),
            ("drain", lambda: treq.post(base + "/api/pools/web/backends/127.0.0.1:9001/drain", headers=auth,
                                        persistent=False)),
            ("metrics again", lambda: treq.get(base + "/metrics", headers=auth, persistent=False)),
        ]:
            assert flood.running and flood.open  # the flood is on
            t0 = time.monotonic()
            r = await call().addTimeout(DEADLINE, reactor)
            body = await r.text()
            took[name] = time.monotonic() - t0
            assert r.code == 200, (name, body)
        assert pool.backends()[0].draining
        # promptly (tens of ms on a quiet box; the bound leaves room for a loaded one)
        assert max(took.values()) < 5.0, took
        await flood.stop().addTimeout(DEADLINE, reactor)
        assert flood.timed_out > 0  # closed by admin.header_timeout, with a 408
        assert max(flood.lifetimes) < HEADER_TIMEOUT + 3.0  # not 60 s and more
        assert peak == 64 and svc.gate.evicted > 0  # the flood filled the cap, never more
        print(f"flood: {flood.attempts} connections, {flood.timed_out} timed out (408), "
              f"{svc.gate.evicted} evicted, {svc.gate.refused} refused, peak {peak} open; "
              f"answers took {', '.join(f'{k} {v * 1000:.0f} ms' for k, v in took.items())}; "
              f"longest trickle lived {max(flood.lifetimes):.2f}s")
    finally:
        flood.running = False
        sampler.stop()
        await svc.stopService()


class Raw(protocol.Protocol):
    """Sends a request head only, and records what comes back."""

    def __init__(self, head):
        self.head, self.got = head, b""
        self.answered, self.gone = defer.Deferred(), defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.head)

    def dataReceived(self, data):
        self.got += data
        if b"\r\n\r\n" in self.got and not self.answered.called:
            self.answered.callback(self.got)

    def connectionLost(self, reason):
        self.gone.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_ten_gigabyte_unauthenticated_post_is_answered_before_any_body(monkeypatch):
    from twisted.internet import endpoints
    from twisted.web import http

    spooled = []
    monkeypatch.setattr(http.tempfile, "TemporaryFile", lambda *a, **kw: spooled.append(a) or open("/dev/null", "w+b"))
    cfg = AdminConfig(bind="tcp:0:interface=127.0.0.1", token=TOKEN)
    rt = Runtime(reactor=reactor, registry=Registry(), config=Config(admin=cfg))
    svc = AdminService(cfg, rt, process_metrics=False)
    svc.startService()
    try:
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", svc.address.port, timeout=5)
        for head, status in [
            (b"POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000000\r\n\r\n", b"401"),
            (b"POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
             + b"\r\nContent-Length: 10000000000\r\n\r\n", b"413"),
        ]:
            client = Raw(head)
            await endpoints.connectProtocol(ep, client).addTimeout(DEADLINE, reactor)
            got = await client.answered.addTimeout(DEADLINE, reactor)  # no body byte was sent
            assert got.startswith(b"HTTP/1.1 " + status + b" "), got
            await client.gone.addTimeout(DEADLINE, reactor)  # and the server closed
        assert spooled == [] and len(svc.gate) == 0
    finally:
        await svc.stopService()
