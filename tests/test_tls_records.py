"""lbtwist.tls.records (the private-binding record I/O) and the TLS server
protocol's use of it: the same bytes, order, errors, buffering and closes as
Twisted's own record I/O. In memory (OpenSSL memory BIOs, StringTransport):
every protocol test runs with the record I/O production uses and with
Twisted's (``lbtwist_records=False``), and every shim test with the fast
functions and their public-API equivalents."""
import inspect
import re

import OpenSSL
import pytest
from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import tls as ttls
from twisted.python.failure import Failure

from lbtwist.config.model import CertificateConfig, ListenerTLSConfig
from lbtwist.tls import records
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.server import TLSServerProtocol, _ServerTLSFactory
from lbtwist.tls.testing import TestCA


def _flat(fn) -> str:
    return " ".join(re.sub(r"#[^\n]*", "", inspect.getsource(fn)).split())


def test_pyopenssl_and_twisted_internals_still_as_assumed():
    assert records.supported() and records.FAST and TLSServerProtocol.lbtwist_records, f"records was checked against pyOpenSSL {records.CHECKED_PYOPENSSL_MAJOR}, not {OpenSSL.__version__}"
    # pyOpenSSL: memory BIOs, partial-write mode (SSL_write takes one record per call), the error mapper.
    init = _flat(SSL.Connection.__init__)
    assert "self._into_ssl = _lib.BIO_new(_lib.BIO_s_mem())" in init and "self._from_ssl = _lib.BIO_new(_lib.BIO_s_mem())" in init
    assert "_lib.SSL_set_bio(self._ssl, self._into_ssl, self._from_ssl)" in init
    assert "_lib.SSL_MODE_ENABLE_PARTIAL_WRITE" in _flat(SSL.Context.__init__)
    assert "result = _lib.SSL_read(self._ssl, buf, bufsiz) self._raise_ssl_error(self._ssl, result)" in _flat(SSL.Connection.recv)
    assert "if error == _lib.SSL_ERROR_WANT_READ: raise WantReadError()" in _flat(SSL.Connection._raise_ssl_error)
    # Twisted: what TLSServerProtocol's overrides replace, and the state they read.
    p = ttls.TLSMemoryBIOProtocol
    assert "self._tlsConnection.bio_write(bytes) if not self._handshakeDone:" in _flat(p.dataReceived)
    assert "if self._appSendBuffer: self._unbufferPendingWrites() self._flushReceiveBIO()" in _flat(p.dataReceived)
    fr = _flat(p._flushReceiveBIO)
    assert "while not self._lostTLSConnection: try: bytes = self._tlsConnection.recv(2**15)" in fr
    assert "except ZeroReturnError: self._shutdownTLS() self._tlsShutdownFinished(None)" in fr
    assert "except Error: failure = Failure() self._tlsShutdownFinished(failure)" in fr
    assert "if not self._aborted: ProtocolWrapper.dataReceived(self, bytes) self._flushSendBIO()" in fr
    assert "bytes = self._tlsConnection.bio_read(2**15) except WantReadError: pass else: self.transport.write(bytes)" in _flat(p._flushSendBIO)
    w = _flat(p._write)
    assert "if self._lostTLSConnection: return" in w
    assert "except WantReadError: self._bufferedWrite(bytes[alreadySent:]) break except Error: self._tlsShutdownFinished(Failure()) break" in w
    assert "if self.disconnecting and self._producer is None: return self._write(bytes)" in _flat(p.write)
    assert "self._flushReceiveBIO()" in _flat(p.connectionLost)  # after bio_shutdown: may run mid-handshake
    for name in ("_handshakeDone", "_lostTLSConnection", "_aborted"):
        assert hasattr(p, name), name


# -- a memory-BIO client and server ---------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    cert, key = TestCA().issue("a.test").write(d, "a")
    return cert, key


def _client(version=SSL.TLS1_3_VERSION):
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    c = SSL.Connection(ctx, None)
    c.set_tlsext_host_name(b"a.test")
    c.set_connect_state()
    return c


def _bio_out(conn):
    out = b""
    while True:
        try:
            out += conn.bio_read(65536)
        except SSL.WantReadError:
            return out


def _drain_plain(conn):
    out = b""
    while True:
        try:
            out += conn.recv(65536)
        except SSL.WantReadError:
            return out


def _pair(pki, version=SSL.TLS1_3_VERSION):
    """An OpenSSL server and client connection after their handshake."""
    cert, key = pki
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.use_certificate_file(cert)
    sctx.use_privatekey_file(key)
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    client = _client(version)
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            out = _bio_out(a)
            if out:
                b.bio_write(out)
    _drain_plain(client)  # TLS 1.3 tickets
    return server, client


FAST = {"feed": records.feed_ciphertext, "read": records.read_plaintext,
        "write": records.write_plaintext, "take": records.take_ciphertext}
PUBLIC = {"feed": records._public_feed, "read": records._public_read,
          "write": records._public_write, "take": records._public_take}


@pytest.fixture(params=["fast", "public"])
def io(request):
    return FAST if request.param == "fast" else PUBLIC


@pytest.mark.parametrize("version", [SSL.TLS1_3_VERSION, SSL.TLS1_2_VERSION])
def test_records_round_trip_many_records_and_a_large_write_in_order(pki, io, version):
    server, client = _pair(pki, version)
    assert io["read"](server) == (b"", None)  # nothing there: no error
    assert io["take"](server) == b""
    pieces = [bytes([65 + i % 26]) * (1 + 997 * i) for i in range(40)]  # 40 records, up to ~38 KiB each
    for piece in pieces:
        client.sendall(piece)
    io["feed"](server, _bio_out(client))
    data, err = io["read"](server)
    assert err is None and data == b"".join(pieces)
    big = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: 65 records
    done, err = io["write"](server, big)
    assert (done, err) == (len(big), None)
    cipher = io["take"](server)
    assert io["take"](server) == b""  # all of it was taken at once
    client.bio_write(cipher)
    assert _drain_plain(client) == big


def test_a_bad_record_returns_the_data_before_it_and_the_error(pki, io):
    server, client = _pair(pki)
    client.sendall(b"good")
    good = _bio_out(client)
    client.sendall(b"evil")
    bad = bytearray(_bio_out(client))
    bad[-1] ^= 0xFF  # break its authentication tag
    io["feed"](server, good + bytes(bad))
    data, err = io["read"](server)
    assert data == b"good"
    assert type(err) is SSL.Error and "bad record mac" in str(err)


def test_close_notify_ends_reading_with_zero_return(pki, io):
    server, client = _pair(pki)
    client.sendall(b"last words")
    client.shutdown()
    io["feed"](server, _bio_out(client))
    data, err = io["read"](server)
    assert data == b"last words" and isinstance(err, SSL.ZeroReturnError)


def test_a_read_ending_inside_a_record_returns_what_is_whole_and_the_rest_later(pki, io):
    # The fast read stops once the input BIO is empty and nothing decrypted is
    # pending; a record cut by the TCP read must still wait for its tail.
    server, client = _pair(pki)
    client.sendall(b"first")
    one = _bio_out(client)
    client.sendall(b"second" * 1000)
    two = _bio_out(client)
    io["feed"](server, one + two[:100])
    assert io["read"](server) == (b"first", None)
    assert io["read"](server) == (b"", None)
    io["feed"](server, two[100:])
    assert io["read"](server) == (b"second" * 1000, None)
    assert io["read"](server) == (b"", None)
    client.sendall(b"a")
    client.sendall(b"b")
    io["feed"](server, _bio_out(client))  # two whole records in one read
    assert io["read"](server) == (b"ab", None)


def test_a_write_before_the_handshake_wants_read(pki, io):
    cert, key = pki
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.use_certificate_file(cert)
    sctx.use_privatekey_file(key)
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    done, err = io["write"](server, b"too early")
    assert done == 0 and isinstance(err, SSL.WantReadError)


# -- the protocol ---------------------------------------------------------------------


class App(Protocol):
    def __init__(self):
        self.got = []
        self.lost = None
        self.on_data = None

    def dataReceived(self, data):
        self.got.append(data)
        if self.on_data is not None:
            self.on_data(self, data)

    def connectionLost(self, reason):
        self.lost = reason


class Producer:
    def __init__(self):
        self.events = []

    def pauseProducing(self):
        self.events.append("pause")

    def resumeProducing(self):
        self.events.append("resume")

    def stopProducing(self):
        self.events.append("stop")


@pytest.fixture(params=[True, False], ids=["lbtwist-records", "twisted-records"])
def fast_records(request):
    return request.param


def _server(pki, fast_records, app=None):
    cert, key = pki
    clock = task.Clock()
    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)]), clock)
    app = app or App()
    proto = TLSServerProtocol(_ServerTLSFactory(state, Factory.forProtocol(Protocol), clock), app)
    proto.lbtwist_records = fast_records
    proto._lbtwist_state = state
    wire = StringTransport()
    proto.makeConnection(wire)
    return proto, wire, app


def _handshake(proto, wire, client):
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        out = _bio_out(client)
        if out:
            proto.dataReceived(out)
        back = wire.value()
        wire.clear()
        if back:
            client.bio_write(back)
        elif not out:
            break
    assert proto._handshakeDone


def test_protocol_delivers_every_record_of_a_read_in_order_and_writes_once(pki, fast_records):
    proto, wire, app = _server(pki, fast_records)
    client = _client()
    _handshake(proto, wire, client)
    pieces = [b"%d," % i * (1 + 50 * i) for i in range(30)]
    for piece in pieces:
        client.sendall(piece)
    proto.dataReceived(_bio_out(client))
    assert b"".join(app.got) == b"".join(pieces)
    if fast_records:
        assert len(app.got) == 1  # one call for the whole read
    writes = []
    wire.write = lambda data: writes.append(data)
    big = b"0123456789abcdef" * 65536 + b"end"  # 1 MiB + 3
    proto.write(big)
    if fast_records:
        assert len(writes) == 1  # all 65 records in one transport write (Twisted: one per record)
    client.bio_write(b"".join(writes))
    assert _drain_plain(client) == big


def test_protocol_buffers_a_write_made_before_the_handshake_and_pauses_the_producer(pki, fast_records):
    proto, wire, app = _server(pki, fast_records)
    producer = Producer()
    proto.registerProducer(producer, True)
    client = _client()
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    proto.dataReceived(_bio_out(client))  # ClientHello: the server flight is out, handshake not done
    assert not proto._handshakeDone
    proto.write(b"early bytes")
    assert producer.events == ["pause"]
    assert proto._appSendBuffer == [b"early bytes"]
    client.bio_write(wire.value())
    wire.clear()
    _handshake(proto, wire, client)  # hands the client everything the server wrote
    assert _drain_plain(client) == b"early bytes"
    assert producer.events == ["pause", "resume"]
    assert proto._appSendBuffer == []


def test_protocol_close_notify_from_the_client_closes_cleanly(pki, fast_records):
    proto, wire, app = _server(pki, fast_records)
    client = _client()
    _handshake(proto, wire, client)
    client.sendall(b"bye")
    client.shutdown()
    proto.dataReceived(_bio_out(client))
    assert b"".join(app.got) == b"bye"
    assert wire.disconnecting  # the TCP connection is being closed
    client.bio_write(wire.value())
    with pytest.raises(SSL.ZeroReturnError):  # our close_notify went out first
        client.recv(100)
    proto.connectionLost(Failure(Exception("tcp closed")))
    assert app.lost is not None


def test_protocol_a_bad_record_delivers_what_came_before_then_loses_the_connection(pki, fast_records):
    proto, wire, app = _server(pki, fast_records)
    client = _client()
    _handshake(proto, wire, client)
    client.sendall(b"fine")
    good = _bio_out(client)
    client.sendall(b"tampered")
    bad = bytearray(_bio_out(client))
    bad[-1] ^= 0xFF
    proto.dataReceived(good + bytes(bad))
    assert b"".join(app.got) == b"fine"
    assert proto._lostTLSConnection and wire.disconnecting
    proto.write(b"after the error")  # dropped, as Twisted drops it
    proto.connectionLost(Failure(Exception("tcp closed")))
    assert isinstance(app.lost.value, SSL.Error) and "bad record mac" in str(app.lost.value)


def test_protocol_after_abort_nothing_more_is_delivered(pki, fast_records):
    proto, wire, app = _server(pki, fast_records)
    client = _client()
    _handshake(proto, wire, client)
    app.on_data = lambda a, data: a.transport.abortConnection()
    client.sendall(b"first")
    proto.dataReceived(_bio_out(client))
    assert app.got == [b"first"] and wire.disconnecting
    client.sendall(b"second")
    proto.dataReceived(_bio_out(client))
    assert app.got == [b"first"]
