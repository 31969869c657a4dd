"""OCSP fetch end to end: ``openssl ocsp`` as the CA's responder on
127.0.0.1 (see L{Responder}), a real ``twistd lbtwist``, alone and with two workers (the master
fetches and pushes), and ``openssl s_client -status`` as the client. The leaf names
the responder in its Authority Information Access; the issuer comes from the
cert file's chain. Then the leaf is revoked in the responder's index: the
next refresh must stop the stapling, with a warning."""
from __future__ import annotations

import http.client
import json
import http.server
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from lbtwist.tls.ocsp import load_staple
from lbtwist.tls.testing import TestCA
from support.procs import Proc, free_port, source_env, twistd_cmd

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")]

OPENSSL = shutil.which("openssl") or "openssl"


def index_line(leaf, revoked: bool) -> str:
    when = "250101000000Z" if revoked else ""
    return (f"{'R' if revoked else 'V'}\t{leaf.not_valid_after_utc:%y%m%d%H%M%SZ}\t{when}\t"
            f"{leaf.serial_number:X}\tunknown\t/CN=a.test\n")


def s_client(port: int) -> str:
    argv = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.test", "-status"]
    p = subprocess.run(argv, input=b"", capture_output=True, timeout=10)
    return p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def stapled(out: str) -> str | None:
    if "OCSP response: no response sent" in out:
        return None
    if "Connection refused" in out:
        return "not listening yet"
    m = re.search(r"Cert Status: (\w+)", out)
    assert m, out
    return m.group(1)


def until(pred, timeout: float, what: str, *procs: Proc):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s:\n" + "\n----\n".join(p.output()[-3000:] for p in procs))
        for p in procs:
            p._pump(0.1)


def post(admin: int, path: str) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        c.request("POST", path)
        r = c.getresponse()
        assert r.status == 200, (r.status, r.read())
        return json.loads(r.read())
    finally:
        c.close()


def metrics(admin: int) -> str:
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()
    finally:
        c.close()


class Responder:
    """``openssl ocsp`` answering OCSP over HTTP on 127.0.0.1:``port``.

    OpenSSL 3.0's ``ocsp -port`` takes only a port number and listens on
    every interface, which tests must not do; so a loopback-only HTTP front
    (stdlib, in a thread) hands each POSTed request to ``openssl ocsp
    -reqin ... -respout ...`` (the same responder code, once per request; it
    reads the index each time, so a revocation shows at once)."""

    def __init__(self, port: int, argv: list[str], tmp) -> None:
        self.answered = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                req, resp = tmp / "req.der", tmp / "resp.der"
                req.write_bytes(self.rfile.read(n))
                p = subprocess.run([*argv, "-reqin", str(req), "-respout", str(resp)], capture_output=True, timeout=10)
                if p.returncode != 0 or self.headers.get("Content-Type") != "application/ocsp-request":
                    self.send_response(400)
                    self.end_headers()
                    return
                body = resp.read_bytes()
                outer.answered += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.mark.parametrize("workers,trigger", [(0, "schedule"), (2, "admin")])
def test_fetched_staple_good_then_revoked(tmp_path, workers, trigger):
    ca = TestCA()
    rport, port, admin, demo = free_port(), free_port(), free_port(), free_port()
    issued = ca.issue("a.test", ocsp_url=f"http://127.0.0.1:{rport}/")
    cert, key = issued.write(tmp_path, "a")
    with open(cert, "ab") as f:  # the issuer in the chain: what ocsp_fetch builds the request with
        f.write(ca.cert_pem)
    ca_pem = ca.write_ca(tmp_path / "ca.pem")
    ca_key = tmp_path / "ca.key"
    ca_key.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    index = tmp_path / "index.txt"
    index.write_text(index_line(issued.cert, revoked=False))
    (tmp_path / "index.txt.attr").write_text("unique_subject = no\n")
    der_file = tmp_path / "a.ocsp.der"
    cfg = tmp_path / "lbtwist.yaml"
    cfg.write_text(("workers: 2\n" if workers else "") + f"""
listeners:
  - name: web
    bind: "tcp:{port}:interface=127.0.0.1"
    mode: http
    pool: web
    tls:
      certificates:
        - cert: "{cert}"
          key: "{key}"
          ocsp: "{der_file}"
          ocsp_fetch: true
          ocsp_timeout: 2s
          ocsp_refresh_min: 1s
          ocsp_refresh_max: {"1s" if trigger == "schedule" else "1h"}
pools:
  - name: web
    backends: [{{address: "127.0.0.1:{demo}"}}]
admin: {{bind: "tcp:{admin}:interface=127.0.0.1"}}
demo: {{http: ["tcp:{demo}:interface=127.0.0.1"]}}
""")
    responder = Responder(rport, [OPENSSL, "ocsp", "-index", str(index), "-rsigner", ca_pem, "-rkey", str(ca_key),
                                  "-CA", ca_pem, "-nmin", "5"], tmp_path)
    lb = None
    try:
        check = subprocess.run([sys.executable, "-m", "lbtwist.cli", "check", str(cfg)], env=source_env(),
                               capture_output=True, timeout=30)
        out = (check.stdout + check.stderr).decode()
        # valid; the operational review's warnings (single instance, ...) are not about OCSP
        assert ": valid" in out and "ocsp" not in out, out
        lb = Proc(twistd_cmd(cfg))
        lb.wait_for("stapling a good OCSP response", timeout=15)
        assert responder.answered >= 1
        if workers:
            until(lambda: lb.output().count(") serving") >= workers, 20, "both workers serving", lb)
        # every worker staples it (connections spread over both by SO_REUSEPORT)
        until(lambda: all(stapled(s_client(port)) == "good" for _ in range(6)), 15, "good staple", lb)
        assert load_staple(str(der_file), issued.cert).status == "good"  # written for a restart
        m = metrics(admin)
        assert re.search(r'lbtwist_listener_ocsp_fetch_ok_total\{[^}]*certificate="[^"]*a\.pem"[^}]*\} [1-9]', m), m
        assert re.search(r'lbtwist_listener_ocsp_state\{[^}]*state="good"[^}]*\} 1\.0', m), m
        assert re.search(r'lbtwist_listener_ocsp_next_update_seconds\{[^}]*\} [1-9]', m), m
        # revoke: the responder reads its index per request; the next refresh (every 1 s, or
        # asked for on the admin API) stops the stapling
        index.write_text(index_line(issued.cert, revoked=True))
        if trigger == "admin":
            assert responder.answered == 1  # next refresh in ~150 s: half of the 5 min nextUpdate
            assert post(admin, "/api/ocsp/refresh") == {"refreshing": [cert]}
        lb.wait_for("revoked", timeout=15)
        until(lambda: all(stapled(s_client(port)) is None for _ in range(6)), 10, "no staple", lb)
        assert load_staple(str(der_file), issued.cert).status == "revoked"
        out = lb.output()
        assert out.count("says the certificate is revoked") == 1, out[-3000:]  # once, not per fetch
        assert out.count("stapling a good OCSP response") == 1, out[-3000:]  # the master fetches, not the workers
        assert responder.answered >= 2  # the revoked answer came from a refresh
    finally:
        if lb is not None:
            assert lb.terminate(timeout=30) == 0, lb.output()[-3000:]
        responder.close()
