"""Bodies stream through the proxy with backpressure: a large upload to a
slow backend and a large download to a slow client keep the proxy's memory
bounded. The proxy runs in a subprocess (``python -m lbtwist.l7``) so its
VmRSS can be sampled from /proc; the client and the origin run here on the
real reactor, the slow side reading at a bounded rate (transport paused and
resumed on a timer), and every byte is counted and checksummed end to end.

Each 1 GiB run takes about 14 s here (the slow side reads at 80 MiB/s). A
proxy that buffered instead of streaming blows the memory bound within the
first second: the fast side sends far quicker than the slow side drains.
"""
from __future__ import annotations

import sys
import time
import zlib

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from support.procs import Proc

pytestmark = pytest.mark.integration

MiB = 1 << 20
#: Allowed growth of the proxy's RSS over its idle baseline.
RSS_BOUND = 40 * MiB

PATTERN = bytes(range(256)) * 4096  # 1 MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RateLimiter:
    """Pause a transport so that reads average ``rate`` bytes/s."""

    def __init__(self, transport, rate: float) -> None:
        self.transport = transport
        self.rate = rate
        self.start = time.monotonic()
        self.count = 0
        self.call = None

    def got(self, n: int) -> None:
        self.count += n
        ahead = self.count / self.rate - (time.monotonic() - self.start)
        if ahead > 0.005 and self.call is None:
            self.transport.pauseProducing()
            self.call = reactor.callLater(ahead, self._resume)

    def _resume(self) -> None:
        self.call = None
        self.transport.resumeProducing()

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


@implementer(IPushProducer)
class PatternProducer:
    """Writes ``total`` bytes of PATTERN to a transport as fast as it accepts them."""

    def __init__(self, transport, total: int, chunked: bool = False) -> None:
        self.transport = transport
        self.left = total
        self.chunked = chunked
        self.paused = False
        self.crc = 0
        self.done = defer.Deferred()

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            n = min(self.left, len(PATTERN))
            data = PATTERN if n == len(PATTERN) else PATTERN[:n]
            self.crc = zlib.crc32(data, self.crc)
            self.left -= n
            if self.chunked:
                self.transport.write(b"%x\r\n" % n + data + b"\r\n")
            else:
                self.transport.write(data)
        if self.left == 0 and not self.done.called:
            if self.chunked:
                self.transport.write(b"0\r\n\r\n")
            self.transport.unregisterProducer()
            self.done.callback(self.crc)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self.left = 0


class SlowSink(protocol.Protocol):
    """Origin that reads the request body at ``rate`` and answers with its
    length and CRC once it has it all."""

    def __init__(self, factory) -> None:
        self.f = factory
        self.head = b""
        self.body = 0
        self.crc = 0
        self.expect = None

    def connectionMade(self) -> None:
        self.limiter = RateLimiter(self.transport, self.f.rate)

    def dataReceived(self, data: bytes) -> None:
        self.limiter.got(len(data))
        if self.expect is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.expect = int(line.split(b":")[1])
        self.body += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self.body >= self.expect:
            body = b"%d %d" % (self.body, self.crc)
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    def connectionLost(self, reason=None) -> None:
        self.limiter.stop()


class BigSource(protocol.Protocol):
    """Origin that answers any request with ``size`` bytes, chunked, as fast as allowed."""

    def __init__(self, factory) -> None:
        self.f = factory
        self.buf = b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf and self.f.producer is None:
            self.transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            self.f.producer = PatternProducer(self.transport, self.f.size, chunked=True)
            self.f.producer.start()


class OriginFactory(protocol.ServerFactory):
    def __init__(self, proto, **kw) -> None:
        self.proto = proto
        self.producer = None
        self.__dict__.update(kw)

    def buildProtocol(self, addr):
        p = self.proto(self)
        p.factory = self
        return p


class SlowReader(protocol.Protocol):
    """Client that reads a response at ``rate``; counts and CRCs the decoded body."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.raw = b""
        self.in_body = False
        self.body = 0
        self.crc = 0
        self.pending = b""
        self.left = 0
        self.done = defer.Deferred()

    def connectionMade(self) -> None:
        self.limiter = RateLimiter(self.transport, self.rate)

    def dataReceived(self, data: bytes) -> None:
        self.limiter.got(len(data))
        if not self.in_body:
            self.raw += data
            if b"\r\n\r\n" not in self.raw:
                return
            head, _, data = self.raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            assert b"transfer-encoding: chunked" in head.lower()
            self.in_body = True
        self._decode(data)

    def _decode(self, data: bytes) -> None:
        # minimal chunked decoder (the proxy's own framing is what is tested)
        buf = self.pending + data
        self.pending = b""
        pos = 0
        while pos < len(buf):
            if self.left > 0:
                take = min(self.left, len(buf) - pos)
                piece = buf[pos:pos + take]
                self.crc = zlib.crc32(piece, self.crc)
                self.body += take
                self.left -= take
                pos += take
                if not self.left:
                    self.left = -2  # CRLF after the data
                continue
            if self.left == -2:
                if len(buf) - pos < 2:
                    break
                assert buf[pos:pos + 2] == b"\r\n"
                pos += 2
                self.left = 0
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol], 16)
            pos = eol + 2
            if size == 0:
                self.done.callback((self.body, self.crc))
                return
            self.left = size
        self.pending = buf[pos:]

    def connectionLost(self, reason=None) -> None:
        self.limiter.stop()
        if not self.done.called:
            self.done.errback(RuntimeError(f"closed after {self.body} bytes"))


class Uploader(protocol.Protocol):
    def __init__(self, size: int) -> None:
        self.size = size
        self.resp = b""
        self.got = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % self.size)
        self.producer = PatternProducer(self.transport, self.size)
        self.producer.start()

    def dataReceived(self, data: bytes) -> None:
        self.resp += data
        head, sep, body = self.resp.partition(b"\r\n\r\n")
        if sep and body and not self.got.called:
            self.got.callback(body)

    def connectionLost(self, reason=None) -> None:
        if not self.got.called:
            self.got.errback(RuntimeError("closed: " + self.resp[:200].decode("latin-1")))


def start_proxy(origin_addr: str) -> tuple[Proc, int]:
    """The standalone proxy process (``python -m lbtwist.l7``), unlimited body size."""
    proc = Proc([sys.executable, "-m", "lbtwist.l7", "--backend", origin_addr, "--max-body-size", "0",
                 "--body-timeout", "60", "--request-timeout", "120"])
    line = proc.wait_for("LISTENING", timeout=20)
    return proc, int(line.split()[1])


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss(pid)
        self.peak = self.baseline
        self.loop = task.LoopingCall(self._sample)
        self.loop.start(0.05)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, rss(self.pid))
        except Exception:
            pass

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()


async def _upload(size: int, rate: float, timeout: float) -> None:
    origin = OriginFactory(SlowSink, rate=rate)
    port = reactor.listenTCP(0, origin, interface="127.0.0.1")
    proc, pport = start_proxy(f"127.0.0.1:{port.getHost().port}")
    sampler = None
    client = None
    try:
        sampler = RssSampler(proc.p.pid)
        client = await protocol.ClientCreator(reactor, Uploader, size).connectTCP("127.0.0.1", pport)
        body = await client.got.addTimeout(timeout, reactor)
        count, crc = map(int, body.split())
        assert count == size
        assert crc == client.producer.crc  # every byte arrived intact, in order
        grown = sampler.peak - sampler.baseline
        assert grown < RSS_BOUND, f"proxy RSS grew by {grown / MiB:.1f} MiB"
    finally:
        if sampler:
            sampler.stop()
        if client is not None and client.transport is not None:
            client.transport.abortConnection()
        proc.terminate(10)
        await port.stopListening()


async def _download(size: int, rate: float, timeout: float) -> None:
    origin = OriginFactory(BigSource, size=size)
    port = reactor.listenTCP(0, origin, interface="127.0.0.1")
    proc, pport = start_proxy(f"127.0.0.1:{port.getHost().port}")
    sampler = None
    client = None
    try:
        sampler = RssSampler(proc.p.pid)
        client = await protocol.ClientCreator(reactor, SlowReader, rate).connectTCP("127.0.0.1", pport)
        client.transport.write(b"GET /download HTTP/1.1\r\nHost: t\r\n\r\n")
        count, crc = await client.done.addTimeout(timeout, reactor)
        assert count == size
        assert crc == origin.producer.crc
        grown = sampler.peak - sampler.baseline
        assert grown < RSS_BOUND, f"proxy RSS grew by {grown / MiB:.1f} MiB"
    finally:
        if sampler:
            sampler.stop()
        if client is not None and client.transport is not None:
            client.transport.abortConnection()
        proc.terminate(10)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_1gib_upload_to_slow_backend_streams_with_bounded_memory():
    await _upload(1024 * MiB, rate=80 * MiB, timeout=60)


@pytest_twisted.ensureDeferred
async def test_1gib_download_to_slow_client_streams_with_bounded_memory():
    await _download(1024 * MiB, rate=80 * MiB, timeout=60)
