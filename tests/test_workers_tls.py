"""TLS session resumption across worker processes: the master builds the
ticket keys and forks the workers, so a ticket from one worker resumes on
another (lbtwist.workers.forked)."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time

from lbtwist.tls.testing import TestCA
from support.procs import Proc, free_port, twistd_cmd
from test_workers_procs import _alive, _wait


def _config(tmp_path, port, admin, demo, cert, key):
    text = f"""
workers: 2
listeners:
  - name: web
    bind: "tcp:{port}:interface=127.0.0.1"
    mode: http
    pool: web
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]
pools:
  - name: web
    backends: [{{address: "127.0.0.1:{demo}"}}]
admin: {{bind: "tcp:{admin}:interface=127.0.0.1"}}
demo: {{http: ["tcp:{demo}:interface=127.0.0.1"]}}
"""
    p = tmp_path / "lbtwist.yaml"
    p.write_text(text)
    return p


def _workers(admin):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
    try:
        c.request("GET", "/api/workers")
        return json.loads(c.getresponse().read())["workers"]
    finally:
        c.close()


def _get(ctx, port, session):
    """One HTTPS request on a new connection; (resumed?, the session to offer next)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        return s.session_reused, s.session


def test_twenty_resumptions_in_a_row_across_workers(tmp_path):
    ca = TestCA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "site")
    port, admin, demo = free_port(), free_port(), free_port()
    proc = Proc(twistd_cmd(_config(tmp_path, port, admin, demo, cert, key)))
    pids = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ws = _workers(admin)
                if len(ws) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, proc.output()[-3000:]
            proc._pump(0.2)
        pids = [w["pid"] for w in ws]
        assert "forked, pid" in proc.output()
        before = {w["pid"]: w["requests"] for w in ws}
        ctx = ssl.create_default_context(cafile=ca.write_ca(tmp_path / "ca.pem"))
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx.minimum_version = ctx.maximum_version = version
            reused, session = _get(ctx, port, None)
            assert not reused
            results = []
            for _ in range(20):
                reused, session = _get(ctx, port, session)
                results.append(reused)
            assert results == [True] * 20, (version, results)
        # they landed on both workers (new connections spread by SO_REUSEPORT)
        _wait(lambda: all(w["requests"] > before[w["pid"]] for w in _workers(admin)), 30,
              "both workers served", proc)
    finally:
        assert proc.terminate(timeout=60) == 0, proc.output()[-3000:]
    _wait(lambda: not any(_alive(p) for p in pids), 10, "workers gone", proc)


def _maps_openssl(pid):
    """Has the process mapped pyOpenSSL/cryptography's libraries (imported them)?"""
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return "cryptography" in maps  # its Rust .so (libssl itself comes with asyncio's ssl)


def test_exec_workers_load_openssl_only_with_tls(tmp_path):
    """Exec'd workers (TLS without tickets: no fork) import Twisted's reactor
    with pyOpenSSL hidden (lbtwist.workers.child.OPENSSL_OPTIONAL); TLS
    termination imports it afterwards and serves. The master has it (it
    validates the certificates)."""
    ca = TestCA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "site")
    port, admin, demo = free_port(), free_port(), free_port()
    path = _config(tmp_path, port, admin, demo, cert, key)
    path.write_text(path.read_text().replace(
        f'key: "{key}"}}]', f'key: "{key}"}}]\n      session_tickets: {{enabled: false}}'))
    proc = Proc(twistd_cmd(path))
    pids = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ws = _workers(admin)
                if len(ws) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, proc.output()[-3000:]
            proc._pump(0.2)
        pids = [w["pid"] for w in ws]
        assert "forked, pid" not in proc.output()
        ctx = ssl.create_default_context(cafile=ca.write_ca(tmp_path / "ca.pem"))
        for _ in range(10):
            _get(ctx, port, None)
        assert all(_maps_openssl(p) for p in pids)  # TLS: imported when the listener was built
    finally:
        assert proc.terminate(timeout=60) == 0, proc.output()[-3000:]
    _wait(lambda: not any(_alive(p) for p in pids), 10, "workers gone", proc)
