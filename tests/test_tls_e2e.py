"""TLS end to end through a real LbtwistService on the real reactor: termination
on http and tcp listeners (SNI, versions, resumption, reload), TLS to backends
(verification, mTLS, failover), and SNI passthrough. Clients are stdlib ssl
(in threads) and ``openssl s_client`` subprocesses; everything is on
127.0.0.1 with ephemeral ports and certificates made at test time."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, ssl as tssl, task, threads
from twisted.web import resource, server

from lbtwist.admin import AdminService
from lbtwist.config import load_config
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService, ReloadError
from lbtwist.tls.testing import TestCA

TIMEOUT = 20.0
OPENSSL = "openssl"

# -- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA()
    p: dict[str, Any] = {"dir": d, "ca": ca, "ca_file": ca.write_ca(d / "ca.pem")}
    for stem, names in {
        "a": ("a.example.com",), "b": ("b.example.com",), "dflt": ("default.example.com",),
        "ip": ("127.0.0.1",), "wrong": ("other.example.com",),
    }.items():
        issued = ca.issue(*names)
        p[stem] = issued
        p[stem + "_files"] = issued.write(d, stem)
    client = ca.issue("lb-client", client=True)
    p["client"] = client
    p["client_files"] = client.write(d, "client")
    rogue = TestCA("rogue CA").issue("127.0.0.1")
    p["rogue"] = rogue
    p["rogue_files"] = rogue.write(d, "rogue")
    return p


def cn_of_der(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def serial_of_der(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


# -- origins ------------------------------------------------------------------------------


class Echo(resource.Resource):
    """Answers with its name, the forwarding header it saw and the TLS client
    certificate's CN (mTLS)."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.hits = 0

    def render_GET(self, request):
        self.hits += 1
        cn = None
        try:
            cert = request.channel.transport.getPeerCertificate()
            if cert is not None:
                cn = cert.get_subject().CN
        except Exception:
            pass
        body = {"name": self.name, "xfp": (request.getHeader("x-forwarded-proto") or ""), "client_cn": cn}
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()


class NamedEcho(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(self.factory.name + b":" + data)


def echo_factory(name: bytes) -> protocol.Factory:
    f = protocol.Factory.forProtocol(NamedEcho)
    f.name = name
    return f


def server_options(issued, ca_pem: bytes | None = None):
    pc = tssl.PrivateCertificate.loadPEM(issued.cert_pem + issued.key_pem)
    if ca_pem is None:
        return pc.options()
    return pc.options(tssl.Certificate.loadPEM(ca_pem))  # requires a client certificate


@pytest.fixture
def origins():
    ports = []

    def http(name: str, tls=None) -> tuple[int, Echo]:
        r = Echo(name)
        site = server.Site(r)
        site.noisy = False
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port, r

    def echo(name: bytes, tls=None) -> int:
        f = echo_factory(name)
        port = reactor.listenTCP(0, f, interface="127.0.0.1") if tls is None else reactor.listenSSL(0, f, tls, interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield type("Origins", (), {"http": staticmethod(http), "echo": staticmethod(echo)})
    for p in ports:
        p.stopListening()


# -- the balancer -------------------------------------------------------------------------


class LB:
    def __init__(self, text: str, path: Path | None = None, signals: bool = False) -> None:
        self.reg = Registry.default()
        if path is not None:
            path.write_text(text)
            loaded = load_config(str(path), self.reg)
        else:
            loaded = load_config(text, self.reg)
        self.svc = LbtwistService(loaded.config, reactor, self.reg,
                                  config_path=str(path) if path else None, install_signals=signals)
        self.svc.startService()

    def port(self, name: str) -> int:
        return self.svc.listeners.getServiceNamed(name).address.port

    def admin_port(self) -> int:
        for s in self.svc:
            if isinstance(s, AdminService):
                return s.address.port
        raise AssertionError("no admin service")

    def tls_stats(self, name: str) -> dict:
        return self.svc.runtime.tls.servers[name].stats.as_dict()

    async def stop(self) -> None:
        await self.svc.stopService().addTimeout(TIMEOUT, reactor)


@pytest.fixture
def lbs():
    made: list[LB] = []

    def make(*a, **kw) -> LB:
        lb = LB(*a, **kw)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        if lb.svc.running:
            lb.svc.stopService()


def in_thread(fn, *a, **kw) -> defer.Deferred:
    return threads.deferToThread(fn, *a, **kw).addTimeout(TIMEOUT, reactor)


def pause(seconds: float = 0.05) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


# -- clients (run in threads) -------------------------------------------------------------


def client_ctx(ca_file: str | None, *, verify_name: bool = True, maxv=None, minv=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        ctx.load_verify_locations(ca_file)
    ctx.check_hostname = verify_name
    if not verify_name:
        ctx.verify_mode = ssl.CERT_NONE
    if maxv is not None:
        ctx.maximum_version = maxv
    if minv is not None:
        ctx.minimum_version = minv
    return ctx


def read_response(s: ssl.SSLSocket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:n]


def https_get(port: int, sni: str | None, ctx: ssl.SSLContext, path: str = "/", session=None) -> dict:
    """One request on a fresh TLS connection: what the client saw."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=sni, session=session) as s:
        host = sni or "localhost"
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status, headers, body = read_response(s)
        der = s.getpeercert(binary_form=True)
        # read after the response: TLS 1.3 tickets arrive after the handshake
        return {"status": status, "body": body, "cn": cn_of_der(der), "serial": serial_of_der(der),
                "version": s.version(), "reused": s.session_reused, "session": s.session}


def s_client(port: int, sni: str | None, ca_file: str, *args: str, sess_in: str | None = None,
             sess_out: str | None = None, request: bool = True) -> subprocess.CompletedProcess:
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca_file, "-ign_eof"]
    if sni:
        argv += ["-servername", sni]
    else:
        argv += ["-noservername"]
    if sess_in:
        argv += ["-sess_in", sess_in]
    if sess_out:
        argv += ["-sess_out", sess_out]
    argv += list(args)
    data = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" if request else b""
    return subprocess.run(argv, input=data, capture_output=True, timeout=15)


# -- config -------------------------------------------------------------------------------


def http_tls_config(pki, web: int, sni_pool: int, admin: bool = True) -> str:
    a, ak = pki["a_files"]
    b, bk = pki["b_files"]
    d, dk = pki["dflt_files"]
    return f"""
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: web
    routes:
      - match: {{sni: "b.example.com"}}
        pool: sni
    tls:
      certificates:
        - {{cert: "{a}", key: "{ak}"}}
        - {{cert: "{b}", key: "{bk}"}}
        - {{cert: "{d}", key: "{dk}", default: true}}
pools:
  - name: web
    backends: [{{address: "127.0.0.1:{web}"}}]
  - name: sni
    backends: [{{address: "127.0.0.1:{sni_pool}"}}]
""" + ('admin: {bind: "tcp:0:interface=127.0.0.1"}\n' if admin else "")


# -- termination on an http listener -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_listener_sni_versions_forwarded_proto_and_sni_route(pki, origins, lbs):
    web, web_r = origins.http("web")
    sni_port, sni_r = origins.http("sni")
    lb = lbs(http_tls_config(pki, web, sni_port, admin=False))
    port = lb.port("web")
    ctx = client_ctx(pki["ca_file"])

    a = await in_thread(https_get, port, "a.example.com", ctx)
    assert a["cn"] == "a.example.com" and a["status"] == 200
    body = json.loads(a["body"])
    assert body == {"name": "web", "xfp": "https", "client_cn": None}

    b = await in_thread(https_get, port, "b.example.com", ctx)
    assert b["cn"] == "b.example.com"
    assert json.loads(b["body"])["name"] == "sni"  # match: {sni: b.example.com}

    loose = client_ctx(pki["ca_file"], verify_name=False)
    for name in (None, "unknown.example.com"):
        r = await in_thread(https_get, port, name, loose)
        assert r["cn"] == "default.example.com"
        assert json.loads(r["body"])["name"] == "web"

    # TLS 1.0 and 1.1 are refused by the server (the client is allowed to offer them).
    failed_before = lb.tls_stats("web")["failed_handshakes"]
    for flag in ("-tls1", "-tls1_1"):
        res = await in_thread(s_client, port, "a.example.com", pki["ca_file"], flag, "-cipher", "DEFAULT@SECLEVEL=0")
        out = res.stdout.decode(errors="replace") + res.stderr.decode(errors="replace")
        assert res.returncode != 0, out
        assert "alert protocol version" in out or "unsupported protocol" in out or "no protocols available" in out, out
    # and TLS 1.2 works with the same tool
    ok12 = await in_thread(s_client, port, "a.example.com", pki["ca_file"], "-tls1_2")
    assert b"Verification: OK" in ok12.stdout and b'"xfp": "https"' in ok12.stdout
    stats = lb.tls_stats("web")
    assert stats["versions"].get("TLSv1.3", 0) >= 4 and stats["versions"].get("TLSv1.2", 0) >= 1
    # The refusals were seen by our TLS stack (not only by the client).
    assert stats["failed_handshakes"] >= failed_before + 1
    assert web_r.hits == 4 and sni_r.hits == 1
    await lb.stop()


# -- resumption ---------------------------------------------------------------------------


def _reused(res: subprocess.CompletedProcess) -> bool:
    out = res.stdout.decode(errors="replace")
    assert "Verification: OK" in out or "Reused" in out, out + res.stderr.decode(errors="replace")
    return "\nReused, " in out


def metric(text: str, name: str, listener: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'listener="{listener}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {listener} not in /metrics")


@pytest_twisted.ensureDeferred
async def test_resumption_tickets_and_session_ids_counted_in_metrics(pki, origins, lbs, tmp_path):
    web, _ = origins.http("web")
    sni_port, _ = origins.http("sni")
    lb = lbs(http_tls_config(pki, web, sni_port))
    port = lb.port("web")
    ca = pki["ca_file"]
    cases = [("tls12-ticket", ("-tls1_2",)), ("tls12-sessionid", ("-tls1_2", "-no_ticket")), ("tls13-ticket", ("-tls1_3",))]
    for name, flags in cases:
        sess = str(tmp_path / f"{name}.sess")
        first = await in_thread(s_client, port, "a.example.com", ca, *flags, sess_out=sess)
        assert not _reused(first), name
        again = await in_thread(s_client, port, "a.example.com", ca, *flags, sess_in=sess)
        assert _reused(again), (name, again.stdout.decode(errors="replace"))

    # Python's ssl: a TLS 1.3 session (ticket) resumes too.
    ctx = client_ctx(ca)
    first = await in_thread(https_get, port, "a.example.com", ctx)
    again = await in_thread(https_get, port, "a.example.com", ctx, session=first["session"])
    assert not first["reused"] and again["reused"] and again["version"] == "TLSv1.3"

    st = lb.tls_stats("web")
    assert st["full_handshakes"] == 4 and st["resumed_handshakes"] == 4
    assert st["resumed_by_cache"] == 1 and st["resumed_by_ticket"] == 3

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{lb.admin_port()}/metrics", timeout=10) as r:
            return r.read().decode()

    text = await in_thread(scrape)
    assert metric(text, "lbtwist_listener_tls_full_handshakes", "web") == 4
    assert metric(text, "lbtwist_listener_tls_resumed_handshakes", "web") == 4
    assert metric(text, "lbtwist_listener_tls_resumed_by_ticket", "web") == 3

    def api() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{lb.admin_port()}/api/listeners", timeout=10) as r:
            return json.loads(r.read())

    listeners = await in_thread(api)
    items = listeners if isinstance(listeners, list) else listeners.get("listeners", [])
    (web_l,) = [l for l in items if l["name"] == "web"]
    assert web_l["tls"]["resumed_handshakes"] == 4
    await lb.stop()


# -- reload ---------------------------------------------------------------------------------


def open_keepalive(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="a.example.com")


def keepalive_get(s: ssl.SSLSocket) -> tuple[int, bytes, int]:
    s.sendall(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
    status, _, body = read_response(s)
    return status, body, serial_of_der(s.getpeercert(binary_form=True))


@pytest_twisted.ensureDeferred
async def test_sighup_replaces_certificate_keeps_connections_and_sessions(pki, origins, lbs, tmp_path):
    web, _ = origins.http("web")
    sni_port, _ = origins.http("sni")
    # a private copy of a.example.com's files, replaced in place below
    a_cert, a_key = tmp_path / "a.pem", tmp_path / "a.key"
    a_cert.write_bytes(pki["a"].cert_pem)
    a_key.write_bytes(pki["a"].key_pem)
    text = http_tls_config(pki, web, sni_port, admin=False).replace(pki["a_files"][0], str(a_cert)).replace(pki["a_files"][1], str(a_key))
    cfg = tmp_path / "lbtwist.yaml"
    lb = lbs(text, path=cfg, signals=True)
    await pause(0.05)  # signal handlers are installed once the reactor runs (it does)
    port = lb.port("web")
    ca = pki["ca_file"]
    ctx = client_ctx(ca)
    old_serial = pki["a"].cert.serial_number

    conn = await in_thread(open_keepalive, port, ctx)
    try:
        status, _, serial = await in_thread(keepalive_get, conn)
        assert status == 200 and serial == old_serial
        sess12 = str(tmp_path / "before12.sess")
        sess13 = str(tmp_path / "before13.sess")
        assert not _reused(await in_thread(s_client, port, "a.example.com", ca, "-tls1_2", sess_out=sess12))
        assert not _reused(await in_thread(s_client, port, "a.example.com", ca, "-tls1_3", sess_out=sess13))

        new = pki["ca"].issue("a.example.com")
        a_cert.write_bytes(new.cert_pem)
        a_key.write_bytes(new.key_pem)
        reloads = lb.tls_stats("web")["reloads"]
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if lb.tls_stats("web")["reloads"] > reloads:
                break
            await pause(0.02)
        assert lb.tls_stats("web")["reloads"] == reloads + 1

        # the established connection lives on (with the certificate it had)
        status, _, serial = await in_thread(keepalive_get, conn)
        assert status == 200 and serial == old_serial
        # new handshakes get the new certificate
        fresh = await in_thread(https_get, port, "a.example.com", ctx)
        assert fresh["serial"] == new.cert.serial_number
        # sessions from before still resume (TLS 1.2 ticket, TLS 1.3 ticket)
        assert _reused(await in_thread(s_client, port, "a.example.com", ca, "-tls1_2", sess_in=sess12))
        assert _reused(await in_thread(s_client, port, "a.example.com", ca, "-tls1_3", sess_in=sess13))

        # a broken certificate file: the reload is refused naming it; the new cert keeps serving
        a_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        with pytest.raises(Exception) as err:
            await lb.svc.reload()
        assert str(a_cert) in str(err.value)
        after = await in_thread(https_get, port, "a.example.com", ctx)
        assert after["serial"] == new.cert.serial_number and after["status"] == 200
        status, _, serial = await in_thread(keepalive_get, conn)
        assert status == 200
    finally:
        conn.close()
    await lb.stop()


@pytest_twisted.ensureDeferred
async def test_apply_refuses_a_bad_certificate_before_changing_anything(pki, origins, lbs, tmp_path):
    """apply() itself (no loader checks) reads every certificate first."""
    web, _ = origins.http("web")
    sni_port, _ = origins.http("sni")
    lb = lbs(http_tls_config(pki, web, sni_port, admin=False))
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    before = lb.svc.runtime.config
    (web_l,) = before.listeners
    certs = list(web_l.tls.certificates)
    certs[1] = attrs.evolve(certs[1], cert=str(bad), key=None)
    broken = attrs.evolve(web_l, tls=attrs.evolve(web_l.tls, certificates=certs))
    with pytest.raises(ReloadError) as err:
        lb.svc.apply(attrs.evolve(before, listeners=[broken]))
    assert str(bad) in str(err.value)
    assert lb.svc.runtime.config is before
    r = await in_thread(https_get, lb.port("web"), "b.example.com", client_ctx(pki["ca_file"]))
    assert r["cn"] == "b.example.com"
    await lb.stop()


# -- TLS to backends --------------------------------------------------------------------------


def plain_get(port: int, path: str = "/") -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, _, body = read_response(s)
    return status, body


def pool_tls_config(pki, pools: dict[str, list[int]], mtls: bool = True) -> str:
    cert, key = pki["client_files"]
    lines = ["listeners:"]
    for name in pools:
        lines += [f"  - name: {name}", '    bind: "tcp:0:interface=127.0.0.1"', "    mode: http", f"    pool: {name}"]
    lines += ["pools:"]
    for name, ports in pools.items():
        lines += [f"  - name: {name}", "    algorithm: round_robin",
                  "    backends: [" + ", ".join(f'{{address: "127.0.0.1:{p}"}}' for p in ports) + "]",
                  f'    tls: {{ca: "{pki["ca_file"]}"' + (f', cert: "{cert}", key: "{key}"' if mtls else "") + "}"]
    return "\n".join(lines) + "\n"


@pytest_twisted.ensureDeferred
async def test_pool_tls_verifies_presents_client_cert_and_fails_over_on_bad_certs(pki, origins, lbs):
    ca_pem = pki["ca"].cert_pem
    good, good_r = origins.http("good", server_options(pki["ip"], ca_pem))  # requires our client cert
    wrong, wrong_r = origins.http("wrong-name", server_options(pki["wrong"]))
    rogue, rogue_r = origins.http("rogue", server_options(pki["rogue"]))
    lb = lbs(pool_tls_config(pki, {"ok": [good], "mixed": [wrong, good], "bad": [wrong], "rogue": [rogue]}))

    # verified, with the client certificate presented (mTLS)
    status, body = await in_thread(plain_get, lb.port("ok"))
    assert status == 200
    assert json.loads(body) == {"name": "good", "xfp": "http", "client_cn": "lb-client"}

    # round robin over [wrong-name, good]: the wrong-name backend never gets a
    # byte of a request; its failed handshake is a connect failure, counted
    # against it as a gateway outcome, and the GET is retried on good.
    rt = lb.svc.runtime
    pool = rt.pools["mixed"]
    seen: list[tuple[str, str]] = []
    pool.observe_outcomes(lambda b, now, latency, outcome: seen.append((b.address, outcome)))
    for _ in range(6):
        status, body = await in_thread(plain_get, lb.port("mixed"))
        assert status == 200 and json.loads(body)["name"] == "good"
    assert wrong_r.hits == 0 and good_r.hits == 1 + 6
    assert (f"127.0.0.1:{wrong}", "gateway") in seen
    assert {o for a, o in seen if a == f"127.0.0.1:{good}"} == {"ok"}
    b = pool.get(f"127.0.0.1:{wrong}")
    st = rt.tls.backend_tls("mixed").creator_for(b.host, key=b.address).stats
    assert st.verify_failures >= 1 and "does not match" in st.last_verify_error
    # counted against the failing backends: passive health saw gateway failures there
    state = rt.backend_state["tls"](pool, pool.get(f"127.0.0.1:{wrong}"))
    assert state["verify_failures_total"] >= 1 and state["handshakes_total"] == 0
    good_state = rt.backend_state["tls"](pool, pool.get(f"127.0.0.1:{good}"))
    assert good_state["handshakes_total"] >= 1 and good_state["verify_failures_total"] == 0

    # nowhere else to go: a gateway error naming the backend and the reason
    status, body = await in_thread(plain_get, lb.port("bad"))
    assert status == 502 and b"does not match" in body and str(wrong).encode() in body
    status, body = await in_thread(plain_get, lb.port("rogue"))
    assert status == 502 and b"certificate verify failed" in body and rogue_r.hits == 0
    await lb.stop()


@pytest_twisted.ensureDeferred
async def test_pool_tls_without_client_cert_is_refused_by_an_mtls_backend(pki, origins, lbs):
    good, good_r = origins.http("good", server_options(pki["ip"], pki["ca"].cert_pem))
    lb = lbs(pool_tls_config(pki, {"nocert": [good]}, mtls=False))
    status, _ = await in_thread(plain_get, lb.port("nocert"))
    assert status == 502 and good_r.hits == 0
    await lb.stop()


# -- tcp listeners -------------------------------------------------------------------------------


def tls_echo(port: int, sni: str | None, ctx: ssl.SSLContext, payload: bytes = b"ping") -> tuple[str, bytes]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(payload)
        data = b""
        while not data.endswith(payload):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return cn_of_der(s.getpeercert(binary_form=True)), data


def plain_echo(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        data = b""
        while not data.endswith(payload):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def closed_without_reply(port: int, payload: bytes) -> bool:
    try:
        return plain_echo(port, payload) == b""
    except ConnectionResetError:
        return True


@pytest_twisted.ensureDeferred
async def test_tcp_listener_terminates_tls(pki, origins, lbs):
    backend = origins.echo(b"plain")
    a, ak = pki["a_files"]
    lb = lbs(f"""
listeners:
  - name: t
    bind: "tcp:0:interface=127.0.0.1"
    mode: tcp
    pool: p
    tls: {{certificates: [{{cert: "{a}", key: "{ak}"}}]}}
pools:
  - name: p
    backends: [{{address: "127.0.0.1:{backend}"}}]
""")
    cn, data = await in_thread(tls_echo, lb.port("t"), "a.example.com", client_ctx(pki["ca_file"]))
    assert cn == "a.example.com" and data == b"plain:ping"
    assert lb.tls_stats("t")["full_handshakes"] == 1
    await lb.stop()


@pytest_twisted.ensureDeferred
async def test_tcp_listener_tls_to_backends_fails_over_on_a_bad_certificate(pki, origins, lbs):
    wrong = origins.echo(b"wrong", server_options(pki["wrong"]))
    good = origins.echo(b"good", server_options(pki["ip"]))
    lb = lbs(f"""
listeners:
  - name: t
    bind: "tcp:0:interface=127.0.0.1"
    mode: tcp
    pool: p
pools:
  - name: p
    algorithm: round_robin
    backends: [{{address: "127.0.0.1:{wrong}"}}, {{address: "127.0.0.1:{good}"}}]
    tls: {{ca: "{pki["ca_file"]}"}}
""")
    for _ in range(4):
        assert await in_thread(plain_echo, lb.port("t")) == b"good:ping"
    st = lb.svc.runtime.tls.backend_tls("p").creator_for("127.0.0.1", key=f"127.0.0.1:{wrong}").stats
    assert st.verify_failures >= 1
    await lb.stop()


@pytest_twisted.ensureDeferred
async def test_tcp_passthrough_routes_by_sni_to_pools(pki, origins, lbs):
    pa = origins.echo(b"A", server_options(pki["a"]))
    pb = origins.echo(b"B", server_options(pki["b"]))
    pd = origins.echo(b"D", server_options(pki["dflt"]))
    lb = lbs(f"""
listeners:
  - name: pt
    bind: "tcp:0:interface=127.0.0.1"
    mode: tcp
    tls_passthrough:
      routes: {{"a.example.com": pa, "*.b.example.com": pb, "b.example.com": pb}}
      default: pd
pools:
  - name: pa
    backends: [{{address: "127.0.0.1:{pa}"}}]
  - name: pb
    backends: [{{address: "127.0.0.1:{pb}"}}]
  - name: pd
    backends: [{{address: "127.0.0.1:{pd}"}}]
""")
    port = lb.port("pt")
    ctx = client_ctx(pki["ca_file"])
    loose = client_ctx(pki["ca_file"], verify_name=False)
    assert await in_thread(tls_echo, port, "a.example.com", ctx) == ("a.example.com", b"A:ping")
    assert await in_thread(tls_echo, port, "b.example.com", ctx) == ("b.example.com", b"B:ping")
    assert await in_thread(tls_echo, port, "x.b.example.com", loose) == ("b.example.com", b"B:ping")
    assert await in_thread(tls_echo, port, "zzz.example.com", loose) == ("default.example.com", b"D:ping")
    assert await in_thread(tls_echo, port, None, loose) == ("default.example.com", b"D:ping")
    state = lb.svc.runtime.listener_state["tls"]("pt")
    assert state["passthrough_routed"] == {"pa": 1, "pb": 2, "pd": 2}
    # not TLS at all: closed without reaching any backend
    assert await in_thread(closed_without_reply, port, b"GET / HTTP/1.0\r\n\r\n")
    assert lb.svc.runtime.listener_state["tls"]("pt")["not_tls"] == 1
    await lb.stop()


@pytest_twisted.ensureDeferred
async def test_health_probes_use_the_pool_tls_settings(pki, origins, lbs):
    """tcp probes pass on a verified handshake only; http probes talk TLS with
    the client certificate (the mTLS backend refuses anything else)."""
    good, good_r = origins.http("good", server_options(pki["ip"], pki["ca"].cert_pem))
    wrong, _ = origins.http("wrong-name", server_options(pki["wrong"]))
    cert, key = pki["client_files"]
    tls = f'{{ca: "{pki["ca_file"]}", cert: "{cert}", key: "{key}"}}'
    health = "interval: 200ms, timeout: 150ms, stagger: 0s, healthy_threshold: 1, unhealthy_threshold: 1"
    lb = lbs(f"""
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: tcpcheck
pools:
  - name: tcpcheck
    backends: [{{address: "127.0.0.1:{good}"}}, {{address: "127.0.0.1:{wrong}"}}]
    tls: {tls}
    health: {{active: {{kind: tcp, {health}}}}}
  - name: httpcheck
    backends: [{{address: "127.0.0.1:{good}"}}, {{address: "127.0.0.1:{wrong}"}}]
    tls: {tls}
    health: {{active: {{kind: http, path: /healthz, {health}}}}}
""")
    pools = lb.svc.runtime.pools
    from lbtwist.pool import Health

    def states():
        return {(p, b.address): b.health for p in ("tcpcheck", "httpcheck") for b in pools[p].backends()}

    want = {
        ("tcpcheck", f"127.0.0.1:{good}"): Health.HEALTHY, ("tcpcheck", f"127.0.0.1:{wrong}"): Health.UNHEALTHY,
        ("httpcheck", f"127.0.0.1:{good}"): Health.HEALTHY, ("httpcheck", f"127.0.0.1:{wrong}"): Health.UNHEALTHY,
    }
    for _ in range(150):
        if states() == want:
            break
        await pause(0.02)
    assert states() == want
    assert good_r.hits >= 1  # the http probe's request reached the mTLS backend over TLS
    await lb.stop()


# -- HSTS ------------------------------------------------------------------------------------


class OwnSTS(resource.Resource):
    """An origin that sets its own (weaker) Strict-Transport-Security."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"strict-transport-security", b"max-age=1")
        return b"own"


def plain_fields(port: int, path: str = "/") -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [tuple(x.strip() for x in line.partition(":")[::2]) for line in lines[1:]]
    return int(lines[0].split()[1]), fields, body


def tls_fields(port: int, ctx: ssl.SSLContext, path: str = "/", keep_alive: bool = False) -> list[list[tuple]]:
    """The header fields of one (or two keep-alive) responses over TLS."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
        out = []
        for conn in ((b"keep-alive", b"close") if keep_alive else (b"close",)):
            s.sendall(b"GET %s HTTP/1.1\r\nHost: a.example.com\r\nConnection: %s\r\n\r\n" % (path.encode(), conn))
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(buf)
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = [tuple(x.strip() for x in line.partition(":")[::2]) for line in lines[1:]]
            n = int(dict((k.lower(), v) for k, v in fields).get("content-length", "0"))
            while len(rest) < n:
                rest += s.recv(65536)
            out.append([(int(lines[0].split()[1]), "")] + fields)
        return out


def sts(fields) -> list[str]:
    return [v for k, v in fields if isinstance(k, str) and k.lower() == "strict-transport-security"]


@pytest_twisted.ensureDeferred
async def test_hsts_on_tls_listener_only_replacing_the_backends_and_on_error_pages(pki, origins, lbs):
    web, _ = origins.http("web")
    own = server.Site(OwnSTS())
    own_port = reactor.listenTCP(0, own, interface="127.0.0.1")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    a, ak = pki["a_files"]
    pools = f"""
pools:
  - name: web
    backends: [{{address: "127.0.0.1:{web}"}}]
  - name: own
    backends: [{{address: "127.0.0.1:{own_port.getHost().port}"}}]
  - name: dead
    backends: [{{address: "127.0.0.1:{dead.getsockname()[1]}"}}]
    health: {{passive: {{enabled: false}}}}
"""
    routes = """
    routes:
      - match: {path_prefix: /own}
        pool: own
      - match: {path_prefix: /dead}
        pool: dead
"""
    lb = lbs(f"""
listeners:
  - name: secure
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: web
{routes}
    tls:
      certificates: [{{cert: "{a}", key: "{ak}"}}]
      hsts: {{max_age: 8760h, include_subdomains: true, preload: true}}
  - name: plain
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: web
{routes}
""" + pools)
    try:
        want = "max-age=31536000; includeSubDomains; preload"
        ctx = client_ctx(pki["ca_file"])
        first, second = await in_thread(tls_fields, lb.port("secure"), ctx, "/", True)
        assert first[0][0] == 200 and sts(first) == [want], first       # the common keep-alive answer
        assert second[0][0] == 200 and sts(second) == [want], second    # the general (closing) path
        [own_resp] = await in_thread(tls_fields, lb.port("secure"), ctx, "/own")
        assert sts(own_resp) == [want], own_resp                        # replaces the backend's max-age=1
        [err] = await in_thread(tls_fields, lb.port("secure"), ctx, "/dead")
        assert err[0][0] == 502 and sts(err) == [want], err             # lbtwist's own error page
        status, fields, _ = await in_thread(plain_fields, lb.port("plain"))
        assert status == 200 and sts(fields) == [], fields
        status, fields, _ = await in_thread(plain_fields, lb.port("plain"), "/own")
        assert status == 200 and sts(fields) == ["max-age=1"], fields   # plain: the backend's, untouched
    finally:
        dead.close()
        await own_port.stopListening()
        await lb.stop()
