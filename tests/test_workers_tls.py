"""TLS session resumption across worker processes: the master builds the
ticket keys and forks the workers, so a ticket from one worker resumes on
another (lbtwist.workers.forked)."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl

from lbtwist.tls.testing import TestCA
from support.procs import Proc, free_port, twistd_cmd
from test_workers_procs import _alive, _wait


def _config(tmp_path, port, admin, demo, cert, key, tickets=""):
    text = f"""
workers: 2
listeners:
  - name: web
    bind: "tcp:{port}:interface=127.0.0.1"
    mode: http
    pool: web
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]{tickets}
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


def _post(admin, path):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
    try:
        c.request("POST", path)
        r = c.getresponse()
        return r.status, r.read()
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
        ws = _serving(admin, proc)
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
        # a reload (same file: certificates re-read) keeps the shared ticket keys: a session
        # from before it resumes on every worker after it, 20 times in a row
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        reused, session = _get(ctx, port, None)
        assert not reused
        status, body = _post(admin, "/api/reload")
        assert status == 200 and json.loads(body)["reloaded"] is True, body
        _wait(lambda: proc.output().count("configuration applied") >= 3, 30,
              "master and both workers applied the reload", proc)
        assert "sessions start afresh" not in proc.output(), proc.output()[-3000:]
        results = []
        for _ in range(20):
            reused, session = _get(ctx, port, session)
            results.append(reused)
        assert results == [True] * 20, results
        assert sorted(w["pid"] for w in _workers(admin)) == sorted(pids)  # in place: the same workers
    finally:
        assert proc.terminate(timeout=60) == 0, proc.output()[-3000:]
    _wait(lambda: not any(_alive(p) for p in pids), 10, "workers gone", proc)


def _serial(port, cafile, request=False):
    """The serial number of the certificate a new connection is served (with
    ``request``, after one request on it: a worker's requests count)."""
    from cryptography import x509

    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            serial = x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number
            if request:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200"), data[:200]
            return serial


def test_a_renewed_certificate_reaches_replacement_workers_and_new_ticket_settings_replace_the_workers(tmp_path):
    """The master's TLS (what forked workers inherit) follows a reload: a
    worker started after a certificate renewal serves the renewed one; a
    change of session settings replaces the workers one at a time, so they
    share the new ticket keys (each reloading on its own would not)."""
    ca = TestCA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "site")
    cafile = ca.write_ca(tmp_path / "ca.pem")
    port, admin, demo = free_port(), free_port(), free_port()
    cfg = _config(tmp_path, port, admin, demo, cert, key)
    proc = Proc(twistd_cmd(cfg))
    pids: list[int] = []
    try:
        pids = [w["pid"] for w in _serving(admin, proc)]
        old_serial = _serial(port, cafile)
        # renewed in place (same paths), then a reload: the same workers take it
        ca.issue("localhost", "127.0.0.1").write(tmp_path, "site")
        status, body = _post(admin, "/api/reload")
        assert status == 200, body
        new_serial = _serial(port, cafile)
        assert new_serial != old_serial
        # a worker killed after the reload: its replacement (forked from the master) has the renewed one
        os.kill(pids[0], signal.SIGKILL)
        _wait(lambda: (lambda ws: len(ws) == 2 and pids[0] not in [w["pid"] for w in ws])(_try_workers(admin, 0) or []),
              60, "the killed worker replaced", proc)
        replacement = next(w["pid"] for w in _workers(admin) if w["pid"] != pids[1])

        def replacement_served():
            return next(w["requests"] for w in _workers(admin) if w["pid"] == replacement)

        served = []
        while replacement_served() == 0:  # SO_REUSEPORT spreads new connections over both workers
            assert len(served) < 200, "the replacement worker served none of 200 connections"
            served.append(_serial(port, cafile, request=True))
        # every connection was served the renewed certificate, the replacement's included
        assert set(served) == {new_serial}, (served, new_serial)
        # new ticket settings: the workers are replaced, and share the new keys
        before = sorted(w["pid"] for w in _workers(admin))
        _config(tmp_path, port, admin, demo, cert, key, tickets="\n      session_tickets: {lifetime: 1h}")
        status, body = _post(admin, "/api/reload")
        assert status == 200, body
        _wait(lambda: (lambda ws: len(ws) == 2 and not set(w["pid"] for w in ws) & set(before))(
            _try_workers(admin, 0) or []), 60, "both workers replaced", proc)
        assert "workers are replaced one at a time so they share the new ticket keys" in proc.output()
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        reused, session = _get(ctx, port, None)
        results = []
        for _ in range(20):
            reused, session = _get(ctx, port, session)
            results.append(reused)
        assert results == [True] * 20, results
        pids = [w["pid"] for w in _workers(admin)] + pids
    finally:
        assert proc.terminate(timeout=60) == 0, proc.output()[-3000:]
    _wait(lambda: not any(_alive(p) for p in pids), 10, "workers gone", proc)


def _serving(admin, proc):
    """/api/workers' list once both workers serve (within 60 s)."""
    _wait(lambda: _try_workers(admin, 2), 60, "2 workers serving", proc)
    return _workers(admin)


def _try_workers(admin, n):
    """/api/workers' list (None while the admin port is not up); with n, only once n are listed."""
    try:
        ws = _workers(admin)
    except OSError:
        return None
    return ws if (n == 0 or len(ws) == n) else None


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
        ws = _serving(admin, proc)
        pids = [w["pid"] for w in ws]
        assert "forked, pid" not in proc.output()
        ctx = ssl.create_default_context(cafile=ca.write_ca(tmp_path / "ca.pem"))
        for _ in range(10):
            _get(ctx, port, None)
        assert all(_maps_openssl(p) for p in pids)  # TLS: imported when the listener was built
    finally:
        assert proc.terminate(timeout=60) == 0, proc.output()[-3000:]
    _wait(lambda: not any(_alive(p) for p in pids), 10, "workers gone", proc)
