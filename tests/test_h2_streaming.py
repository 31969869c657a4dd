"""Large HTTP/2 bodies stream through lbtwist with flow control as
backpressure: a big upload (curl, h2c) to a slow-reading origin, and a big
download to a slow-reading curl, with the proxy process's RSS bounded as in
the HTTP/1.1 streaming tests (a proxy that buffered instead would grow by
the whole body: the fast side is many times faster than the slow one)."""
from __future__ import annotations

import sys
import zlib

import pytest
import pytest_twisted
from twisted.internet import reactor, utils

from support.procs import Proc
from test_l7_streaming import PATTERN, RSS_BOUND, BigSource, MiB, OriginFactory, RssSampler, SlowSink

pytestmark = pytest.mark.integration

SIZE = 160 * MiB
RATE = 40 * MiB


def start_proxy(origin_addr: str) -> tuple[Proc, int]:
    proc = Proc([sys.executable, "-m", "lbtwist.l7", "--http2", "--backend", origin_addr, "--max-body-size", "0",
                 "--body-timeout", "60", "--request-timeout", "120"])
    line = proc.wait_for("LISTENING", timeout=20)
    return proc, int(line.split()[1])


@pytest_twisted.ensureDeferred
async def test_large_h2_upload_to_a_slow_backend_keeps_rss_bounded(tmp_path):
    body = tmp_path / "up.bin"
    with open(body, "wb") as f:
        crc = 0
        for _ in range(SIZE // len(PATTERN)):
            f.write(PATTERN)
            crc = zlib.crc32(PATTERN, crc)
    origin = OriginFactory(SlowSink, rate=RATE)
    port = reactor.listenTCP(0, origin, interface="127.0.0.1")
    proc, pport = start_proxy(f"127.0.0.1:{port.getHost().port}")
    sampler = RssSampler(proc.p.pid)
    try:
        out, err, code = await utils.getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "90", "--http2-prior-knowledge", "-w", " %{http_version}",
                     "--data-binary", f"@{body}", f"http://127.0.0.1:{pport}/up"], env={})
        assert code == 0, err
        count, got_crc, version = out.split()
        assert (int(count), int(got_crc), version) == (SIZE, crc, b"2")
        grown = sampler.peak - sampler.baseline
        assert grown < RSS_BOUND, f"proxy RSS grew by {grown / MiB:.1f} MiB"
    finally:
        sampler.stop()
        proc.terminate(10)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_large_h2_download_to_a_slow_client_keeps_rss_bounded(tmp_path):
    origin = OriginFactory(BigSource, size=SIZE)
    port = reactor.listenTCP(0, origin, interface="127.0.0.1")
    proc, pport = start_proxy(f"127.0.0.1:{port.getHost().port}")
    sampler = RssSampler(proc.p.pid)
    dest = tmp_path / "down.bin"
    try:
        out, err, code = await utils.getProcessOutputAndValue(
            "curl", ["-sS", "--max-time", "90", "--http2-prior-knowledge", "--limit-rate", str(RATE),
                     "-w", "%{http_version} %{size_download}", "-o", str(dest),
                     f"http://127.0.0.1:{pport}/down"], env={})
        assert code == 0, err
        assert out.split() == [b"2", b"%d" % SIZE]
        crc = 0
        with open(dest, "rb") as f:
            while chunk := f.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
        assert crc == origin.producer.crc
        grown = sampler.peak - sampler.baseline
        assert grown < RSS_BOUND, f"proxy RSS grew by {grown / MiB:.1f} MiB"
    finally:
        sampler.stop()
        proc.terminate(10)
        await port.stopListening()
