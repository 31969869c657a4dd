"""HTTP/2 through lbtwist with real peers: curl (--http2 over TLS with ALPN,
--http2-prior-knowledge on a plain port that still serves HTTP/1.1), h2load,
headless Chromium over h2, raw attack frames from a socket, and a drain
(GOAWAY) with a stream in flight. lbtwist runs in this process
(LbtwistService from YAML); waits are bounded by events."""
from __future__ import annotations

import re
import shutil
import textwrap

import pytest
import pytest_twisted
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from twisted.internet import defer, protocol, reactor, task, utils

from lbtwist.config import load_config
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService
from lbtwist.tls.testing import TestCA
from support.h2 import PREFACE, get_headers, goaways, h2_connect, headers_frame_bytes, split_frames
from support.l7 import Origin, ok

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("h2pki")
    ca = TestCA()
    cert, key = ca.issue("127.0.0.1", "localhost").write(d, "site")
    return {"ca_file": ca.write_ca(d / "ca.pem"), "cert": cert, "key": key}


class LB:
    def __init__(self, text: str) -> None:
        self.svc = LbtwistService(load_config(textwrap.dedent(text), Registry.default()).config, reactor,
                                  Registry.default(), install_signals=False)
        self.svc.startService()

    def port(self, name: str) -> int:
        return self.svc.listeners.getServiceNamed(name).address.port

    async def stop(self) -> None:
        await self.svc.stopService().addTimeout(TIMEOUT, reactor)


def config(pki, backends: list[str], *, alpn: str = "", h2: str = "", drain: str = "1s") -> str:
    bl = "\n".join(f"          - {{address: {b}}}" for b in backends)
    return f"""
    listeners:
      - name: plain
        bind: "tcp:0:interface=127.0.0.1"
        mode: http
        pool: app
        http2: true
        http: {{h2: {{{h2}}}}}
      - name: tls
        bind: "tcp:0:interface=127.0.0.1"
        mode: http
        pool: app
        tls:
          certificates: [{{cert: {pki['cert']}, key: {pki['key']}}}]
          {alpn}
    pools:
      - name: app
        algorithm: round_robin
        drain_timeout: {drain}
        backends:
{bl}
    """


async def curl(*args: str) -> tuple[int, str, str]:
    out, err, code = await utils.getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "20", "-w", "\n%{http_version} %{http_code}", *args], env={})
    return code, out.decode(errors="replace"), err.decode(errors="replace")


@pytest_twisted.ensureDeferred
async def test_curl_h2_over_tls_alpn_and_h2c_prior_knowledge_beside_http11(pki, tmp_path):
    origin = Origin(lambda req, p: ok(b"%s %s host=%s" % (req.method, req.url, req.header(b"host")))).listen(reactor)
    lb = LB(config(pki, [origin.address]))
    try:
        tls, plain = lb.port("tls"), lb.port("plain")
        code, out, err = await curl("--http2", "--cacert", pki["ca_file"], f"https://127.0.0.1:{tls}/a?x=1")
        assert code == 0, err
        assert out.endswith("\n2 200") and out.startswith("GET /a?x=1 host=127.0.0.1:%d" % tls), out
        code, out, err = await curl("--http1.1", "--cacert", pki["ca_file"], f"https://127.0.0.1:{tls}/b")
        assert out.endswith("\n1.1 200"), (out, err)
        (tmp_path / "body").write_bytes(b"x" * 300000)
        code, out, err = await curl("--http2-prior-knowledge", "--data-binary", f"@{tmp_path / 'body'}",
                                    f"http://127.0.0.1:{plain}/c")
        assert out.endswith("\n2 200") and out.startswith("POST /c"), (out, err)
        assert origin.requests[-1].body == b"x" * 300000
        code, out, err = await curl(f"http://127.0.0.1:{plain}/d")  # HTTP/1.1 on the same port
        assert out.endswith("\n1.1 200") and out.startswith("GET /d"), (out, err)
    finally:
        await lb.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_tls_alpn_setting_takes_h2_away(pki):
    origin = Origin().listen(reactor)
    lb = LB(config(pki, [origin.address], alpn="alpn: [http/1.1]"))
    try:
        code, out, err = await curl("--http2", "--cacert", pki["ca_file"], f"https://127.0.0.1:{lb.port('tls')}/")
        assert out.endswith("\n1.1 200"), (out, err)
    finally:
        await lb.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_h2load_many_streams_spread_over_backends(pki):
    origins = [Origin(lambda req, p, i=i: ok(b"o%d" % i)).listen(reactor) for i in range(2)]
    lb = LB(config(pki, [o.address for o in origins]))
    try:
        out, err, code = await utils.getProcessOutputAndValue(
            "h2load", ["-n", "400", "-c", "4", "-m", "10", f"https://127.0.0.1:{lb.port('tls')}/"], env={})
        text = out.decode()
        assert code == 0, text + err.decode()
        m = re.search(r"requests: 400 total, 400 started, 400 done, (\d+) succeeded, (\d+) failed", text)
        assert m and m.group(1) == "400", text
        assert "h2" in re.search(r"Application protocol: (\S+)", text).group(1)
        # Per-request balancing: a few connections, both backends busy.
        assert all(len(o.requests) >= 150 for o in origins), [len(o.requests) for o in origins]
    finally:
        await lb.stop()
        for o in origins:
            await o.stop()


class Raw(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.data)


@pytest_twisted.ensureDeferred
async def test_rapid_reset_from_a_socket_ends_in_goaway_and_little_backend_work(pki):
    origin = Origin().listen(reactor)
    lb = LB(config(pki, [origin.address], h2="max_resets: 100, resets_per_second: 10"))
    try:
        c = await protocol.ClientCreator(reactor, Raw).connectTCP("127.0.0.1", lb.port("plain"), timeout=5)
        c.transport.write(PREFACE + SettingsFrame(0).serialize())
        enc = Encoder()
        sid = 1
        for _ in range(20):  # bounded: 20 writes of 50 HEADERS+RST_STREAM each
            if c.closed.called:
                break
            c.transport.write(b"".join(headers_frame_bytes(s, get_headers(), encoder=enc)
                                       + RstStreamFrame(s, error_code=8).serialize() for s in range(sid, sid + 100, 2)))
            sid += 100
            await task.deferLater(reactor, 0.01, lambda: None)
        data = await c.closed.addTimeout(TIMEOUT, reactor)
        g = goaways(split_frames(data))
        assert g and g[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert len(origin.requests) <= 100  # never the 1000 streams opened
    finally:
        await lb.stop()
        await origin.stop()


@pytest_twisted.ensureDeferred
async def test_drain_sends_goaway_and_the_stream_in_flight_finishes(pki):
    held: list = []
    origin = Origin(lambda req, p: held.append(p)).listen(reactor)
    lb = LB(config(pki, [origin.address], drain="5s"))
    try:
        c = await h2_connect(reactor, lb.port("plain"))
        sid = c.request("/slow")
        for _ in range(200):  # bounded wait for the origin to get it
            if held:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert held
        stopping = lb.svc.stopService()
        await c.wait(lambda c: goaways(c.frames), reactor)
        g = goaways(c.frames)[-1]
        assert g.error_code == 0 and g.last_stream_id == sid
        held[0].transport.write(ok(b"finished"))
        await c.wait(lambda c: c.lost, reactor)  # closed once its last stream ended
        # (hyper-h2's client state machine stops at a GOAWAY: read the frames themselves)
        data = [f for f in c.frames if isinstance(f, DataFrame) and f.stream_id == sid]
        assert b"".join(f.data for f in data) == b"finished" and "END_STREAM" in data[-1].flags
        assert any(isinstance(f, HeadersFrame) and f.stream_id == sid for f in c.frames)
        await stopping.addTimeout(TIMEOUT, reactor)
    finally:
        if lb.svc.running:
            await lb.stop()
        await origin.stop()


PAGE = (b"<html><body><p id=p>loading</p><img src=/a.png><img src=/b.png><script>"
        b"document.getElementById('p').textContent = 'proto=' + "
        b"performance.getEntriesByType('navigation')[0].nextHopProtocol;</script></body></html>")


@pytest_twisted.ensureDeferred
async def test_headless_chromium_loads_a_page_over_h2(pki, tmp_path):
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is required: apt-get install -y chromium")
    origin = Origin(lambda req, p: ok(PAGE, headers=((b"content-type", b"text/html"),)) if req.url == b"/"
                    else ok(b"", status=404)).listen(reactor)
    lb = LB(config(pki, [origin.address]))
    try:
        out, err, code = await utils.getProcessOutputAndValue(
            CHROMIUM, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                       "--ignore-certificate-errors", "--no-first-run", "--disable-extensions",
                       f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                       "--dump-dom", f"https://127.0.0.1:{lb.port('tls')}/"], env={"HOME": str(tmp_path)})
        assert b"proto=h2" in out, (out[-500:], err[-2000:])
        assert {r.url for r in origin.requests} >= {b"/", b"/a.png", b"/b.png"}
    finally:
        await lb.stop()
        await origin.stop()
