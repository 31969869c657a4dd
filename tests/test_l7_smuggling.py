"""Request smuggling and malformed requests: each raw byte string and the
status the proxy must answer. Rejected requests are answered by lbtwist and
the connection closed; the backend must see nothing of them (not a byte),
even when a warm keep-alive connection to it is sitting in the pool."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from lbtwist.l7.listener import http_listener
from support.l7 import Origin, connect, listener_config, make_runtime, ok, raw_request, split_responses

pytestmark = pytest.mark.integration

H = b"Host: example.test\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"

#: (name, raw request, expected status)
CASES = [
    # -- framing: Content-Length / Transfer-Encoding ---------------------------------
    ("cl-and-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n" + CHUNKED + b"\r\n0\r\n\r\n", 400),
    ("te-and-cl", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"Content-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-cl-same", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("duplicate-cl-conflicting", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-plus-sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("cl-inner-space", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nabc", 400),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-chunked-not-final", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-gzip-only", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("te-chunked-twice", b"POST / HTTP/1.1\r\n" + H + CHUNKED + CHUNKED + b"\r\n0\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-vertical-tab", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-in-http10", b"POST / HTTP/1.0\r\n" + CHUNKED + b"\r\n0\r\n\r\n", 400),
    # -- chunk sizes and extensions -----------------------------------------------------
    ("chunk-size-not-hex", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n-1\r\n\r\n", 400),
    ("chunk-size-trailing-space", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-leading-space", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n 3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n1ffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-ext-control-char", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3;a\x01b\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-ext-bare-lf", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3;ext\nabc\r\n0\r\n\r\n", 400),
    ("chunk-ext-unterminated-quote", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b'\r\n3;a="b\r\nabc\r\n0\r\n\r\n', 400),
    ("chunk-data-without-crlf", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    ("chunk-lines-bare-lf", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3\nabc\n0\n\n", 400),
    ("chunk-trailer-space-before-colon", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3\r\nabc\r\n0\r\nX : y\r\n\r\n", 400),
    # -- line endings and header syntax ------------------------------------------------------
    ("bare-cr-in-header", b"GET / HTTP/1.1\r\n" + H + b"X: a\rY: b\r\n\r\n", 400),
    ("bare-lf-in-header", b"GET / HTTP/1.1\r\n" + H + b"X: a\nY: b\r\n\r\n", 400),
    ("bare-lf-line-endings", b"GET / HTTP/1.1\nHost: example.test\n\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n  folded\r\n\r\n", 400),
    ("obs-fold-te", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-Thing : 1\r\n\r\n", 400),
    ("space-before-colon-te", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("tab-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-Thing\t: 1\r\n\r\n", 400),
    ("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    ("del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", 400),
    ("ctl-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\x01Y: 1\r\n\r\n", 400),
    ("space-in-name", b"GET / HTTP/1.1\r\n" + H + b"X Y: 1\r\n\r\n", 400),
    ("empty-name", b"GET / HTTP/1.1\r\n" + H + b": 1\r\n\r\n", 400),
    ("no-colon", b"GET / HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n", 400),
    ("leading-space-first-field", b"GET / HTTP/1.1\r\n Host: example.test\r\n\r\n", 400),
    # -- request line -------------------------------------------------------------------------
    ("invalid-method-char", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("unknown-method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("double-space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("ctl-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("non-ascii-target", b"GET /caf\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("fragment-in-target", b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("relative-target", b"GET index.html HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk-with-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute-target-userinfo", b"GET http://user@evil.test/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("http09", b"GET /\r\n\r\n", 400),
    ("version-1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("version-garbage", b"GET / HTTP/1.x\r\n" + H + b"\r\n", 400),
    ("version-2", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("connect", b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 501),
    # -- Host -------------------------------------------------------------------------------------
    ("missing-host", b"GET / HTTP/1.1\r\nX: 1\r\n\r\n", 400),
    ("repeated-host", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    ("repeated-host-other-case", b"GET / HTTP/1.1\r\nHost: a.test\r\nhOST: b.test\r\n\r\n", 400),
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: a b.test\r\n\r\n", 400),
    ("host-with-slash", b"GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n", 400),
    ("host-with-at", b"GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n", 400),
    # -- Expect --------------------------------------------------------------------------------------
    ("expect-unknown", b"POST / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 1\r\n\r\nx", 417),
    # -- limits ----------------------------------------------------------------------------------------
    ("request-line-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("request-line-too-long-unterminated", b"GET /" + b"a" * 9000, 414),
    ("header-block-too-large", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n", 431),
    ("body-too-large-cl", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2000000\r\n\r\nabc", 413),
    ("body-too-large-chunked", b"POST / HTTP/1.1\r\n" + H + CHUNKED + b"\r\n" + b"f4241\r\n" + b"z" * 1000001 + b"\r\n0\r\n\r\n", 413),
    # -- a valid request smuggled behind a bad one is never forwarded -------------------------------------
    ("smuggled-second-request", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /admin HTTP/1.1\r\n" + H + b"\r\n", 400),
]


class _Setup:
    origin: Origin
    service: object
    port: int


@pytest.fixture(scope="module")
def proxy():
    s = _Setup()
    s.origin = Origin(lambda req, p: ok(b"served " + req.url)).listen(reactor)
    listener = listener_config(max_body_size=1_000_000)
    s.runtime = make_runtime(reactor, {"app": [s.origin.address]}, listener)
    s.service = http_listener(listener, s.runtime)
    s.service.startService()
    s.port = s.service.address.port
    yield s
    pytest_twisted.blockon(s.service.stopService(drain_timeout=1.0))
    s.runtime.connection_pools.close_idle()
    pytest_twisted.blockon(defer.ensureDeferred(s.origin.stop()))


async def _warm(proxy) -> None:
    """Leave an idle keep-alive connection to the backend in the pool, so a
    request that slipped through would reach it at once."""
    rs, c = await raw_request(reactor, proxy.port, b"GET /warm HTTP/1.1\r\n" + H + b"\r\n")
    assert rs[0].status == 200
    c.transport.loseConnection()
    await c.closed(reactor)


@pytest.mark.parametrize("name,raw,status", CASES, ids=[c[0] for c in CASES])
@pytest_twisted.ensureDeferred
async def test_rejected_and_never_forwarded(proxy, name, raw, status):
    await _warm(proxy)
    origin = proxy.origin
    origin.raw = b""
    seen = len(origin.requests)
    c = await connect(reactor, proxy.port)
    c.transport.write(raw)
    data = await c.closed(reactor, timeout=5)  # answered, then closed
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:200]
    assert b"connection: close" in data.lower()
    assert len(split_responses(data)) == 1
    await task.deferLater(reactor, 0.01, lambda: None)
    assert origin.raw == b"", origin.raw[:200]
    assert len(origin.requests) == seen


@pytest.mark.parametrize("split", [1, 7])
@pytest_twisted.ensureDeferred
async def test_rejected_when_fed_in_small_pieces(proxy, split):
    """The same verdict when the bytes trickle in (no reliance on one read)."""
    for name, raw, status in CASES:
        if status == 413 or len(raw) > 2000:
            continue
        c = await connect(reactor, proxy.port)
        for i in range(0, len(raw), split * 13):
            c.transport.write(raw[i:i + split * 13])
        data = await c.closed(reactor, timeout=5)
        assert data.startswith(b"HTTP/1.1 %d " % status), (name, data[:120])


@pytest_twisted.ensureDeferred
async def test_streamed_body_over_limit_is_cut_off(proxy):
    """A chunked body is streamed, so the limit can only bite mid-way: the
    client gets 413 and the backend connection is aborted, so the backend
    never receives a complete request."""
    await _warm(proxy)
    origin = proxy.origin
    seen = len(origin.requests)
    origin.body_bytes = 0
    c = await connect(reactor, proxy.port)
    c.transport.write(b"POST /big HTTP/1.1\r\n" + H + CHUNKED + b"\r\n")
    await task.deferLater(reactor, 0.02, lambda: None)
    chunk = b"10000\r\n" + b"z" * 65536 + b"\r\n"
    for _ in range(20):  # 1.3 MB > max_body_size 1 MB
        c.transport.write(chunk)
    c.transport.write(b"0\r\n\r\n")
    data = await c.closed(reactor, timeout=5)
    assert data.startswith(b"HTTP/1.1 413 ")
    await task.deferLater(reactor, 0.02, lambda: None)
    assert len(origin.requests) == seen
    assert origin.body_bytes <= 1_000_000 + 65536 * 4


@pytest_twisted.ensureDeferred
async def test_normalised_before_forwarding(proxy):
    """Accepted oddities are normalised: TE case and whitespace, chunk
    extensions and trailers dropped, absolute-form target to origin-form."""
    origin = proxy.origin
    origin.raw = b""
    raw = (b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding:  CHUNKED \r\n\r\n"
           b"3;name=value;q=\"x y\"\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
           b"GET http://Other.Test/abs?q=1 HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
    rs, c = await raw_request(reactor, proxy.port, raw, count=2)
    assert [r.status for r in rs] == [200, 200]
    up, absreq = origin.requests[-2], origin.requests[-1]
    assert up.body == b"abcde"
    assert up.header(b"transfer-encoding") == b"chunked"
    assert b"CHUNKED" not in origin.raw and b"name=value" not in origin.raw and b"X-Trailer" not in origin.raw
    assert absreq.url == b"/abs?q=1"
    assert absreq.header(b"host") == b"Other.Test"
    c.transport.loseConnection()
