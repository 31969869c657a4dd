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


# -- OCSP stapling ------------------------------------------------------------------------


def ocsp_response(ca, tmp_path, cert_pem: str, status: str = "V", ndays: int = 2, name: str = "resp.der") -> str:
    """A real OCSP response for ``cert_pem``, made by ``openssl ocsp`` acting as
    the CA's responder (request file in, response file out)."""
    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import serialization

    key = tmp_path / "ca.key"
    key.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    cafile = ca.write_ca(tmp_path / "ca.pem")
    leaf = cx509.load_pem_x509_certificate(open(cert_pem, "rb").read())
    revoked = "250101000000Z" if status == "R" else ""
    (tmp_path / "index.txt").write_text(
        f"{status}\t{leaf.not_valid_after_utc:%y%m%d%H%M%SZ}\t{revoked}\t{leaf.serial_number:X}\tunknown\t/CN={leaf.subject.rfc4514_string()}\n"
    )
    req, out = tmp_path / "req.der", tmp_path / name
    for argv in (
        ["ocsp", "-issuer", cafile, "-cert", cert_pem, "-no_nonce", "-reqout", str(req)],
        ["ocsp", "-index", str(tmp_path / "index.txt"), "-rsigner", cafile, "-rkey", str(key), "-CA", cafile,
         "-reqin", str(req), "-respout", str(out), "-ndays", str(ndays)],
    ):
        p = subprocess.run([OPENSSL, *argv], capture_output=True, timeout=10)
        assert p.returncode == 0, p.stderr
    return str(out)


def stapled(out: str) -> str | None:
    if "OCSP response: no response sent" in out:
        return None
    m = re.search(r"Cert Status: (\w+)", out)
    assert "OCSP Response Status: successful" in out and m, out
    return m.group(1)


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
@pytest_twisted.ensureDeferred
async def test_ocsp_staple_served_and_reloaded(listen, ca, files, tmp_path, flag):
    resp = ocsp_response(ca, tmp_path, files.a[0])
    srv = listen(cert=CertificateConfig(cert=files.a[0], key=files.a[1], ocsp=resp))
    rc, out = await in_thread(s_client, srv.addr, flag, "-CAfile", files.ca, "-status")
    assert rc == 0 and "ping" in out, out
    assert stapled(out) == "good"
    assert srv.state.stats.ocsp_stapled == 1
    # the responder now says revoked: after a reload (what SIGHUP does) that is not stapled
    ocsp_response(ca, tmp_path, files.a[0], status="R")
    srv.state.reload()
    rc, out = await in_thread(s_client, srv.addr, flag, "-CAfile", files.ca, "-status")
    assert rc == 0 and stapled(out) is None, out
    # good again, reloaded again
    ocsp_response(ca, tmp_path, files.a[0])
    srv.state.reload()
    rc, out = await in_thread(s_client, srv.addr, flag, "-CAfile", files.ca, "-status")
    assert rc == 0 and stapled(out) == "good", out


@pytest_twisted.ensureDeferred
async def test_stale_ocsp_response_is_not_stapled(ca, files, tmp_path):
    import time

    resp = ocsp_response(ca, tmp_path, files.a[0], ndays=1)
    later = [time.time()]
    cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1], ocsp=resp)])
    state = ServerTLS(cfg, task.Clock(), name="edge", wallclock=lambda: later[0])
    port = reactor.listenTCP(0, wrap_server_factory(Factory.forProtocol(CloseAfterEcho), state, reactor),
                             interface="127.0.0.1")
    try:
        addr = ("127.0.0.1", port.getHost().port)
        rc, out = await in_thread(s_client, addr, "-CAfile", files.ca, "-status")
        assert rc == 0 and stapled(out) == "good", out
        later[0] += 2 * 86400  # past nextUpdate, without any reload
        rc, out = await in_thread(s_client, addr, "-CAfile", files.ca, "-status")
        assert rc == 0 and stapled(out) is None, out
    finally:
        await port.stopListening()


def test_ocsp_file_checks(ca, files, tmp_path):
    import time

    from lbtwist.tls.context import TLSConfigError
    from lbtwist.tls.files import TLSFileError
    from lbtwist.tls.ocsp import OCSP_WARNING, load_staple

    other = ca.issue("b.test").write(tmp_path, "b")
    wrong = ocsp_response(ca, tmp_path, other[0], name="b.der")
    cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1], ocsp=wrong)])
    with pytest.raises(TLSConfigError, match=r"b\.der: the OCSP response is for another certificate"):
        ServerTLS(cfg, task.Clock())
    garbage = tmp_path / "garbage.der"
    garbage.write_bytes(b"not ocsp")
    cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1], ocsp=str(garbage))])
    with pytest.raises(TLSConfigError, match=r"garbage\.der: not a DER OCSP response"):
        ServerTLS(cfg, task.Clock())
    with pytest.raises(TLSFileError, match="cannot read OCSP response"):
        load_staple(str(tmp_path / "missing.der"), ca.issue("c.test").cert)
    from cryptography import x509 as cx509

    leaf = cx509.load_pem_x509_certificate(open(files.a[0], "rb").read())
    st = load_staple(ocsp_response(ca, tmp_path, files.a[0], ndays=3), leaf)
    now = time.time()
    assert st.problem(now) is None and st.usable(now)
    assert "expires soon" in st.problem(st.next_update - OCSP_WARNING / 2) and st.usable(st.next_update - 1)
    assert "is stale" in st.problem(st.next_update + 1) and not st.usable(st.next_update + 1)
    revoked = load_staple(ocsp_response(ca, tmp_path, files.a[0], status="R"), leaf)
    assert "revoked" in revoked.problem(now) and not revoked.usable(now)


def test_ocsp_config_check_places_problems_on_the_key(ca, files, tmp_path):
    import time

    from lbtwist.tls.checks import check_listener_tls

    good = ocsp_response(ca, tmp_path, files.a[0], ndays=3, name="good.der")
    cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1], ocsp=good)])
    now = time.time()
    assert [f for f in check_listener_tls(cfg, "http", now) if f[0].endswith("ocsp")] == []
    found = [f for f in check_listener_tls(cfg, "http", now + 4 * 86400) if f[0].endswith("ocsp")]
    assert len(found) == 1 and found[0][:2] == ("certificates[0].ocsp", "warning") and "stale" in found[0][2]
    cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=files.a[0], key=files.a[1], ocsp=str(tmp_path / "nope.der"))])
    found = [f for f in check_listener_tls(cfg, "http", now) if f[0].endswith("ocsp")]
    assert len(found) == 1 and found[0][:2] == ("certificates[0].ocsp", "error") and "nope.der" in found[0][2]
