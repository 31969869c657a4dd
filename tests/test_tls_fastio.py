"""The TLS data path on the lean reactor (lbtwist.fastio): the TCP transport
under a terminated TLS connection is accelerated (inline reads, eager and
batched sends), and plaintext written during a poll pass is encrypted as one
write at its end; closing sends it first. Real 127.0.0.1 sockets, a private
lean reactor driven by ``doPoll``, a stdlib ssl client in a thread."""
import socket
import ssl
import threading

import pytest
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol

from lbtwist import fastio
from lbtwist.config.model import CertificateConfig, ListenerTLSConfig
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.server import TLSServerProtocol, wrap_server_factory
from lbtwist.tls.testing import TestCA
from test_fastio_dispatch import LEAN, _Rig


class Replier(Protocol):
    """On each read: writes three pieces (then closes, if asked), noting what
    the TLS layer held meanwhile."""

    close = False

    def __init__(self):
        self.held_during = []

    def dataReceived(self, data):
        t = self.transport
        for piece in (b"one,", b"two,", b"three"):
            t.write(piece)
        self.held_during.append(list(t._held) if t._held is not None else None)
        if self.close:
            t.loseConnection()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA()
    cert, key = ca.issue("a.test").write(d, "a")
    return cert, key, ca.write_ca(d / "ca.pem")


class BigReplier(Protocol):
    """Answers the first read with SIZE bytes in a few writes, then closes."""

    SIZE = 3 * 1024 * 1024 + 7

    def dataReceived(self, data):
        body = bytes(range(256)) * (self.SIZE // 256) + b"x" * (self.SIZE % 256)
        self.transport.write(body[:100])  # held for the pass end
        self.transport.write(body[100:])  # large: sends what is held first, then itself
        self.transport.loseConnection()


def serve_one(pki, close=False, app=None, expect=13):
    rig = _Rig(LEAN)
    cert, key, cafile = pki
    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)]), task.Clock())
    if app is None:
        app = Replier()
        app.close = close
    factory = wrap_server_factory(Factory.forProtocol(lambda: app), state, rig.reactor)
    proto = factory.buildProtocol(("127.0.0.1", 0))
    t, peer = rig.connect(proto, accelerated=False)
    got = {}

    def client():
        try:
            ctx = ssl.create_default_context(cafile=cafile)
            with ctx.wrap_socket(peer, server_hostname="a.test") as s:
                s.sendall(b"go")
                buf = b""
                while len(buf) < expect:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                got["data"] = buf
                if close:
                    got["eof"] = s.recv(100)
        except Exception as e:  # reported by the assertions below
            got["error"] = e

    th = threading.Thread(target=client, daemon=True)
    th.start()
    for _ in range(400):  # bounded: at most 400 polls of 50 ms
        if not th.is_alive():
            break
        rig.reactor.doPoll(0.05)
    th.join(5)
    return rig, t, app, got


def test_tls_writes_in_a_pass_are_encrypted_once_at_its_end(pki):
    rig, t, app, got = serve_one(pki)
    try:
        assert "error" not in got, got
        assert got["data"] == b"one,two,three"
        assert app.held_during == [[b"one,", b"two,", b"three"]]  # one TLS write for the three
        assert isinstance(app.transport, TLSServerProtocol) and app.transport._held is None
        assert app.transport.lbtwist_records  # records moved by lbtwist.tls.records, as in production
        assert fastio.is_accelerated(t)  # the TCP transport under TLS has the levers
        # Only the first read (the ClientHello, before TLS was set up) went
        # through Twisted's dispatch; the handshake and data reads ran inline.
        assert rig.dispatched.count(t) == 1, rig.dispatched
        assert not fastio._batch.held and not fastio._batch.active
    finally:
        rig.close()


def test_close_sends_what_is_held_first(pki):
    rig, t, app, got = serve_one(pki, close=True)
    try:
        assert "error" not in got, got
        assert got["data"] == b"one,two,three" and got["eof"] == b""
    finally:
        rig.close()


def test_a_large_response_arrives_whole_and_in_order_then_the_close(pki):
    app = BigReplier()
    rig, t, app, got = serve_one(pki, close=True, app=app, expect=BigReplier.SIZE)
    try:
        assert "error" not in got, got
        size = BigReplier.SIZE
        assert got["data"] == bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        assert got["eof"] == b""
    finally:
        rig.close()


def test_abort_drops_what_is_held(pki):
    from twisted.internet.testing import StringTransport

    from lbtwist.tls.server import _ServerTLSFactory

    cert, key, _ = pki
    clock = task.Clock()
    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)]), clock)
    tls = TLSServerProtocol(_ServerTLSFactory(state, Factory.forProtocol(Protocol), clock), Protocol())
    wire = StringTransport()
    tls.makeConnection(wire)
    tls.write(b"outside a pass")  # not held: straight to the TLS layer
    assert tls._held is None
    fastio._batch.active = True  # as during a lean reactor pass
    try:
        tls.write(b"never")
        assert tls._held == [b"never"] and fastio._batch.held == [tls]
        tls.abortConnection()
        assert tls._held is None
    finally:
        fastio._batch.flush()
    assert not fastio._batch.held and not fastio._batch.active


class Streamer(Protocol):
    """On the first read registers itself as a streaming producer and writes
    CHUNK-sized pieces until paused or TOTAL is written; resumes when told."""

    CHUNK = 64 * 1024
    TOTAL = 16 * 1024 * 1024

    def __init__(self):
        self.sent = 0
        self.paused = False
        self.pauses = self.resumes = 0

    def dataReceived(self, data):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        if self.sent:
            self.resumes += 1
        self.paused = False
        while not self.paused and self.sent < self.TOTAL:
            self.transport.write(_pattern(self.sent, self.CHUNK))
            self.sent += self.CHUNK
        if self.sent >= self.TOTAL:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self):
        pass


def _pattern(offset, size):
    return bytes((offset + i) % 251 for i in range(0, size, 4096)) * 4096


def test_a_slow_reader_pauses_the_producer_and_gets_every_byte_in_order(pki):
    import threading as _t

    rig = _Rig(LEAN)
    cert, key, cafile = pki
    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)]), task.Clock())
    app = Streamer()
    factory = wrap_server_factory(Factory.forProtocol(lambda: app), state, rig.reactor)
    t, peer = rig.connect(factory.buildProtocol(("127.0.0.1", 0)), accelerated=False)
    go, got = _t.Event(), {}

    def client():
        try:
            ctx = ssl.create_default_context(cafile=cafile)
            with ctx.wrap_socket(peer, server_hostname="a.test") as s:
                s.sendall(b"go")
                go.wait(30)  # read nothing until the server saw backpressure
                buf = bytearray()
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    buf += chunk
                got["data"] = bytes(buf)
        except Exception as e:  # reported by the assertions below
            got["error"] = e

    th = threading.Thread(target=client, daemon=True)
    th.start()
    try:
        for _ in range(2000):  # bounded: at most 2000 polls of 20 ms
            if not th.is_alive():
                break
            if app.paused and not go.is_set():
                go.set()
            rig.reactor.doPoll(0.02)
        go.set()
        th.join(10)
        assert "error" not in got, got
        assert app.pauses >= 1 and app.resumes >= 1  # it was held back, then let go
        expected = b"".join(_pattern(o, Streamer.CHUNK) for o in range(0, Streamer.TOTAL, Streamer.CHUNK))
        assert got["data"] == expected
    finally:
        rig.close()
