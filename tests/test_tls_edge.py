"""The TLS edge against real clients on 127.0.0.1: server cipher, suite and
group preference, the ticket lifetime hint, HSTS and OCSP stapling, seen by
``openssl s_client`` (subprocesses, bounded in time)."""
from __future__ import annotations

import re
import shutil
import subprocess
import types

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.protocol import Factory, Protocol

from lbtwist.config.model import CertificateConfig, ListenerTLSConfig, SessionTicketsConfig
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.server import wrap_server_factory
from lbtwist.tls.testing import TestCA

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")]

OPENSSL = shutil.which("openssl") or "openssl"
WAIT = 20.0


class CloseAfterEcho(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)
        self.transport.loseConnection()


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def files(ca, tmp_path):
    a = ca.issue("a.test").write(tmp_path, "a")
    return types.SimpleNamespace(a=a, ca=ca.write_ca(tmp_path / "ca.pem"), dir=tmp_path)


class Listener:
    def __init__(self, files, **kw):
        cert = kw.pop("cert", CertificateConfig(cert=files.a[0], key=files.a[1]))
        self.cfg = ListenerTLSConfig(certificates=[cert], **kw)
        self.state = ServerTLS(self.cfg, task.Clock(), name="edge")
        self.port = reactor.listenTCP(
            0, wrap_server_factory(Factory.forProtocol(CloseAfterEcho), self.state, reactor), interface="127.0.0.1"
        )
        self.addr = ("127.0.0.1", self.port.getHost().port)


@pytest_twisted.async_yield_fixture
async def listen(files):
    made = []

    def make(**kw):
        made.append(Listener(files, **kw))
        return made[-1]

    yield make
    for m in made:
        m.state.stop()
        await m.port.stopListening()


def s_client(addr, *args, data=b"ping\n"):
    argv = [OPENSSL, "s_client", "-connect", f"{addr[0]}:{addr[1]}", "-servername", "a.test", "-ign_eof", *args]
    p = subprocess.run(argv, input=data, capture_output=True, timeout=10)
    return p.returncode, p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def in_thread(fn, *a, **kw):
    return threads.deferToThread(fn, *a, **kw).addTimeout(WAIT, reactor)


def cipher_of(out: str) -> str:
    m = re.search(r"Cipher is (\S+)", out)
    assert m, out
    return m.group(1)


# -- server preference ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls12_server_cipher_preference_by_default(listen, files):
    srv = listen()
    rc, out = await in_thread(s_client, srv.addr, "-tls1_2", "-CAfile", files.ca,
                              "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    assert rc == 0 and "ping" in out, out
    assert cipher_of(out) == "ECDHE-ECDSA-AES256-GCM-SHA384"


@pytest_twisted.ensureDeferred
async def test_tls13_server_suite_preference_by_default(listen, files):
    srv = listen()
    rc, out = await in_thread(s_client, srv.addr, "-tls1_3", "-CAfile", files.ca,
                              "-ciphersuites", "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384")
    assert rc == 0 and "ping" in out, out
    assert cipher_of(out) == "TLS_AES_256_GCM_SHA384"


@pytest_twisted.ensureDeferred
async def test_configured_lists_and_client_preference_when_turned_off(listen, files):
    srv = listen(ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
                 ciphersuites="TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256")
    rc, out = await in_thread(s_client, srv.addr, "-tls1_2", "-CAfile", files.ca,
                              "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305")
    assert rc == 0 and cipher_of(out) == "ECDHE-ECDSA-CHACHA20-POLY1305", out
    rc, out = await in_thread(s_client, srv.addr, "-tls1_2", "-CAfile", files.ca, "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert rc != 0 and "handshake failure" in out, out  # not in the configured list
    client_first = listen(prefer_server_ciphers=False)
    rc, out = await in_thread(s_client, client_first.addr, "-tls1_2", "-CAfile", files.ca,
                              "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    assert rc == 0 and cipher_of(out) == "ECDHE-ECDSA-AES128-GCM-SHA256", out


@pytest_twisted.ensureDeferred
async def test_server_group_preference(listen, files):
    srv = listen(groups="P-384:X25519")
    # (TLS 1.2 clients list P-256 too: it is also the curve of the ECDSA certificate)
    rc, out = await in_thread(s_client, srv.addr, "-tls1_2", "-CAfile", files.ca, "-groups", "X25519:P-256:P-384")
    assert rc == 0 and "ping" in out, out
    assert re.search(r"Server Temp Key: ECDH, (P-384|secp384r1)", out), out
    rc, out = await in_thread(s_client, srv.addr, "-tls1_2", "-CAfile", files.ca, "-groups", "P-256")
    assert rc != 0, out  # P-256 is not in the configured list


def test_runtime_refuses_an_unknown_suite_naming_it(files):
    from lbtwist.tls.context import TLSConfigError

    cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1])],
                            ciphersuites="TLS_AES_256_GCM_SHA384:TLS_NOPE")
    with pytest.raises(TLSConfigError, match="ciphersuites: unknown TLS 1.3 suite 'TLS_NOPE'"):
        ServerTLS(cfg, task.Clock())


# -- ticket lifetime hint -----------------------------------------------------------------


def hints(out: str) -> list[int]:
    return [int(h) for h in re.findall(r"TLS session ticket lifetime hint: (\d+) \(seconds\)", out)]


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest_twisted.ensureDeferred
async def test_ticket_lifetime_hint(listen, files, tmp_path, flag):
    default = listen()
    rc, out = await in_thread(s_client, default.addr, flag, "-CAfile", files.ca)
    assert rc == 0 and "ping" in out, out
    assert hints(out) and set(hints(out)) == {7200}, out
    three_hours = listen(session_tickets=SessionTicketsConfig(lifetime=10800.0))
    sess = str(tmp_path / "sess.pem")
    rc, out = await in_thread(s_client, three_hours.addr, flag, "-CAfile", files.ca, "-sess_out", sess)
    assert rc == 0 and set(hints(out)) == {10800}, out
    # the server honours what it announced: the ticket resumes
    rc, out = await in_thread(s_client, three_hours.addr, flag, "-CAfile", files.ca, "-sess_in", sess)
    assert rc == 0 and "\nReused, " in out, out
