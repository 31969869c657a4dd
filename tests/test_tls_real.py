"""TLS termination on the real reactor, 127.0.0.1 only: stdlib ssl clients
(in threads) and ``openssl s_client`` (subprocesses), all bounded in time."""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import types

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.protocol import Factory, Protocol

from lbtwist.config.model import CertificateConfig, ListenerTLSConfig, SessionTicketsConfig
from lbtwist.tls.clienthello import ClientHello, parse_client_hello
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.server import tls_info, wrap_server_factory
from lbtwist.tls.testing import TestCA

pytestmark = pytest.mark.integration

OPENSSL = shutil.which("openssl")
WAIT = 20.0  # bound on every wait in this file


class Echo(Protocol):
    """Echoes each read, prefixed with the negotiated TLS version."""

    def dataReceived(self, data):
        info = tls_info(self.transport)
        self.transport.write(f"{info.version} {info.resumed} ".encode() + data)


class Server:
    def __init__(self, ca, certs, **kw):
        self.clock = task.Clock()  # rotation is driven by the test
        self.cfg = ListenerTLSConfig(
            certificates=[CertificateConfig(cert=c, key=k) for c, k in certs], **kw
        )
        self.state = ServerTLS(self.cfg, self.clock, name="edge")
        self.port = reactor.listenTCP(
            0, wrap_server_factory(Factory.forProtocol(Echo), self.state, reactor), interface="127.0.0.1"
        )
        self.addr = ("127.0.0.1", self.port.getHost().port)
        self.ca = ca


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def files(ca, tmp_path):
    a = ca.issue("a.test", "*.a.test").write(tmp_path, "a")
    b = ca.issue("b.test").write(tmp_path, "b")
    cafile = ca.write_ca(tmp_path / "ca.pem")
    return types.SimpleNamespace(a=a, b=b, ca=cafile, dir=tmp_path)


@pytest_twisted.async_yield_fixture
async def server(ca, files):
    s = Server(ca, [files.a, files.b])
    yield s
    s.state.stop()
    await s.port.stopListening()


def state_failed(server) -> int:
    return server.state.stats.failed_handshakes


async def eventually(cond, timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition that the reactor makes true soon."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    assert cond()


def in_thread(fn, *a, **kw):
    return threads.deferToThread(fn, *a, **kw).addTimeout(WAIT, reactor)


class StdClient:
    """A blocking stdlib ssl client; call its methods through in_thread."""

    def __init__(self, cafile, version=None, tickets=True):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile)
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
        if not tickets:
            ctx.options |= ssl.OP_NO_TICKET
        self.ctx = ctx

    def exchange(self, addr, sni, session=None, keep_open=False):
        raw = socket.create_connection(addr, timeout=5)
        s = self.ctx.wrap_socket(raw, server_hostname=sni, session=session)
        s.sendall(b"ping")
        reply = s.recv(4096)  # TLS 1.3: reading also takes in the tickets
        out = types.SimpleNamespace(
            reply=reply, session=s.session, reused=s.session_reused,
            subject=dict(x[0] for x in s.getpeercert()["subject"]), version=s.version(),
        )
        if keep_open:
            out.sock = s
        else:
            s.close()
        return out


V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


# -- resumption with a Python client -------------------------------------------------------


# TLS 1.3 has no session ids: its stateful case is test_tls13_stateful_resumption.
@pytest.mark.parametrize(
    "version,tickets", [(V12, True), (V12, False), (V13, True)], ids=["1.2-ticket", "1.2-session-id", "1.3-ticket"]
)
@pytest_twisted.ensureDeferred
async def test_python_client_resumes(server, files, version, tickets):
    c = StdClient(files.ca, version, tickets)
    first = await in_thread(c.exchange, server.addr, "a.test")
    assert not first.reused and first.subject["commonName"] == "a.test"
    again = await in_thread(c.exchange, server.addr, "www.a.test", first.session)
    assert again.reused
    want = "TLSv1.3" if version == V13 else "TLSv1.2"
    assert again.reply == f"{want} True ping".encode()
    st = server.state.stats
    assert st.full_handshakes == 1 and st.resumed_handshakes == 1
    assert (st.resumed_by_ticket, st.resumed_by_cache) == ((1, 0) if tickets else (0, 1))


@pytest_twisted.ensureDeferred
async def test_tls13_stateful_resumption(ca, files):
    s = Server(ca, [files.a], session_tickets=SessionTicketsConfig(enabled=False))
    try:
        c = StdClient(files.ca, V13)
        first = await in_thread(c.exchange, s.addr, "a.test")
        again = await in_thread(c.exchange, s.addr, "a.test", first.session)
        assert again.reused and s.state.stats.resumed_by_cache == 1
    finally:
        await s.port.stopListening()


# -- resumption with openssl s_client ---------------------------------------------------------


def s_client(addr, *args, data=b"ping\n"):
    argv = [OPENSSL, "s_client", "-connect", f"{addr[0]}:{addr[1]}", "-ign_eof", *args]
    p = subprocess.run(argv, input=data, capture_output=True, timeout=10)
    return p.returncode, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def _reused(out: str) -> bool:
    return "\nReused, " in out


class CloseAfterEcho(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)
        self.transport.loseConnection()


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
@pytest.mark.parametrize(
    "flag,ticket", [("-tls1_2", True), ("-tls1_2", False), ("-tls1_3", True)],
    ids=["1.2-ticket", "1.2-session-id", "1.3-ticket"],
)
@pytest_twisted.ensureDeferred
async def test_openssl_s_client_resumes(ca, files, tmp_path, flag, ticket):
    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1])]),
                      task.Clock(), name="edge")
    port = reactor.listenTCP(0, wrap_server_factory(Factory.forProtocol(CloseAfterEcho), state, reactor),
                             interface="127.0.0.1")
    try:
        addr = ("127.0.0.1", port.getHost().port)
        sess = str(tmp_path / "sess.pem")
        common = [flag, "-servername", "a.test", "-CAfile", files.ca] + ([] if ticket else ["-no_ticket"])
        rc, out = await in_thread(s_client, addr, *common, "-sess_out", sess)
        assert rc == 0 and "ping" in out and "\nNew, " in out, out
        rc, out = await in_thread(s_client, addr, *common, "-sess_in", sess)
        assert rc == 0 and _reused(out), out
        st = state.stats
        assert st.resumed_handshakes == 1
        assert (st.resumed_by_ticket, st.resumed_by_cache) == ((1, 0) if ticket else (0, 1))
    finally:
        await port.stopListening()


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
@pytest.mark.parametrize("flag", ["-tls1", "-tls1_1"])
@pytest_twisted.ensureDeferred
async def test_tls10_and_tls11_refused(server, flag):
    # SECLEVEL=0 lets this client really send an old-version hello.
    rc, out = await in_thread(s_client, server.addr, flag, "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "a.test")
    assert rc != 0
    # The hello went out and the server answered with a protocol_version alert
    # (not the client refusing on its own).
    assert "tlsv1 alert protocol version" in out and "SSL alert number 70" in out, out
    await eventually(lambda: state_failed(server) == 1)
    assert server.state.stats.full_handshakes == 0


# -- reload and rotation, with real clients ----------------------------------------------------


@pytest.mark.parametrize("version", [V12, V13])
@pytest_twisted.ensureDeferred
async def test_resumption_across_reload_and_open_connection_survives(server, ca, files, version):
    c = StdClient(files.ca, version)
    open_conn = await in_thread(c.exchange, server.addr, "a.test", None, True)
    old_serial = open_conn.sock.getpeercert()["serialNumber"]
    ca.issue("a.test", "*.a.test").write(files.dir, "a")
    server.state.reload()
    # the established connection still works
    await in_thread(open_conn.sock.sendall, b"after")
    assert (await in_thread(open_conn.sock.recv, 4096)).endswith(b"after")
    open_conn.sock.close()
    # new handshakes see the new certificate; the old session still resumes
    fresh = await in_thread(StdClient(files.ca, version).exchange, server.addr, "a.test")
    again = await in_thread(c.exchange, server.addr, "a.test", open_conn.session)
    assert again.reused
    new = await in_thread(lambda: socket.create_connection(server.addr, timeout=5))
    s = await in_thread(lambda: ssl.create_default_context(cafile=files.ca).wrap_socket(new, server_hostname="a.test"))
    assert s.getpeercert()["serialNumber"] != old_serial
    s.close()
    assert not fresh.reused


@pytest.mark.parametrize("version", [V12, V13])
@pytest_twisted.ensureDeferred
async def test_resumption_across_key_rotation(server, files, version):
    server.state.start()
    c = StdClient(files.ca, version)
    before = await in_thread(c.exchange, server.addr, "b.test")
    server.clock.advance(12 * 3600)  # one rotation: previous key still accepted
    assert server.state.stats.rotations == 1
    after = await in_thread(c.exchange, server.addr, "b.test", before.session)
    assert after.reused and server.state.stats.resumed_previous_key == 1
    server.clock.advance(12 * 3600)
    server.clock.advance(12 * 3600)  # before's key is gone; after's (re-issued by the old key too)
    late = await in_thread(c.exchange, server.addr, "b.test", after.session)
    assert not late.reused and late.reply.endswith(b"ping")


# -- worker processes forked after the contexts were made ---------------------------------------------


def _serve_once_blocking(state: ServerTLS, listener: socket.socket) -> None:
    """A minimal blocking TLS echo using ``state``'s contexts (runs in a forked child)."""
    from OpenSSL import SSL

    s, _ = listener.accept()
    s.settimeout(5)
    buf = b""
    while True:
        buf += s.recv(65536)
        hello = parse_client_hello(buf)
        if isinstance(hello, ClientHello):
            break
    proto = types.SimpleNamespace(_lbtwist_hello=hello)
    conn = state.serverConnectionForTLS(proto)
    conn.set_accept_state()
    conn.bio_write(buf)

    def flush():
        try:
            out = conn.bio_read(65536)
        except SSL.WantReadError:
            return
        s.sendall(out)

    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            flush()
            conn.bio_write(s.recv(65536))
    flush()
    while True:
        try:
            data = conn.recv(4096)
            break
        except SSL.WantReadError:
            flush()
            conn.bio_write(s.recv(65536))
    conn.send(data)
    conn.shutdown()
    flush()
    s.close()


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest_twisted.ensureDeferred
async def test_forked_worker_tickets_resume_in_parent(ca, files, tmp_path, flag):
    """Contexts made before fork() are shared: a ticket issued by a child
    worker resumes on the parent (and would on any sibling)."""
    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1])]),
                      task.Clock(), name="edge")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    child_addr = listener.getsockname()
    pid = os.fork()
    if pid == 0:  # child: serve one connection, never return into pytest
        code = 1
        try:
            _serve_once_blocking(state, listener)
            code = 0
        finally:
            os._exit(code)
    listener.close()
    port = reactor.listenTCP(0, wrap_server_factory(Factory.forProtocol(CloseAfterEcho), state, reactor),
                             interface="127.0.0.1")
    try:
        sess = str(tmp_path / "sess.pem")
        common = [flag, "-servername", "a.test", "-CAfile", files.ca]
        rc, out = await in_thread(s_client, child_addr, *common, "-sess_out", sess)
        assert rc == 0 and "\nNew, " in out, out
        rc, out = await in_thread(s_client, ("127.0.0.1", port.getHost().port), *common, "-sess_in", sess)
        assert rc == 0 and _reused(out), out
    finally:
        await port.stopListening()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        await in_thread(os.waitpid, pid, 0)
