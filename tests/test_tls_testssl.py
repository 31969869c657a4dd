"""testssl.sh against a real ``twistd lbtwist`` TLS listener: protocols,
ciphers, server preference, forward secrecy, vulnerabilities and HTTP
security headers. Fails on any "NOT ok", any "VULNERABLE" and any protocol
below TLS 1.2 being offered (Debian package ``testssl.sh``)."""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest

from lbtwist.tls.testing import TestCA
from support.procs import Proc, free_port, twistd_cmd

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")


def findings_against(problems_in: list[dict]) -> list[str]:
    """The findings that fail the scan."""
    bad = []
    for f in problems_in:
        text = str(f.get("finding", ""))
        fid = str(f.get("id", ""))
        if "NOT ok" in text or "VULNERABLE" in text.upper() and "NOT VULNERABLE" not in text.upper():
            bad.append(f"{fid}: {text}")
        elif fid in OLD_PROTOCOLS and "not offered" not in text:
            bad.append(f"{fid} offered: {text}")
    return bad


def test_findings_filter():
    """The filter itself: what testssl.sh reports for a weak server fails."""
    assert findings_against([{"id": "TLS1", "finding": "offered (deprecated)"},
                             {"id": "cipher_order", "finding": "no (NOT ok)"},
                             {"id": "heartbleed", "finding": "VULNERABLE, uses heartbeat"},
                             {"id": "TLS1_2", "finding": "offered"},
                             {"id": "SSLv3", "finding": "not offered"},
                             {"id": "BEAST", "finding": "not vulnerable, no SSL3 or TLS1"}]) == [
        "TLS1 offered: offered (deprecated)", "cipher_order: no (NOT ok)", "heartbleed: VULNERABLE, uses heartbeat"]


@pytest.mark.skipif(TESTSSL is None, reason="testssl.sh not installed (apt-get install testssl.sh)")
def test_testssl_finds_nothing_wrong(tmp_path):
    ca = TestCA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "site")
    web, origin = free_port(), free_port()
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        listeners:
          - name: web
            bind: "tcp:{web}:interface=127.0.0.1"
            mode: http
            pool: web
            tls:
              certificates: [{{cert: "{cert}", key: "{key}"}}]
              hsts: {{max_age: 8760h, include_subdomains: true}}
        pools:
          - name: web
            backends: [{{address: "127.0.0.1:{origin}"}}]
        demo:
          http: ["tcp:{origin}:interface=127.0.0.1"]
    """))
    proc = Proc(twistd_cmd(cfg), cwd=tmp_path)
    try:
        proc.wait_for("listener web on", timeout=30)
        out = tmp_path / "testssl.json"
        p = subprocess.run(
            [TESTSSL, "--quiet", "--color", "0", "--warnings", "off", "--ip", "one", "--sneaky",
             "--jsonfile", str(out), "-p", "-s", "-S", "-P", "-U", "-h", f"127.0.0.1:{web}"],
            capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )
        assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
        results = json.loads(out.read_text())
        ids = {r.get("id") for r in results}
        assert {"TLS1_2", "TLS1_3", "cipher_order", "HSTS_time"} <= ids, "\n".join(f"{r.get('id')}: {r.get('finding')}" for r in results)
        by_id = {r.get("id"): str(r.get("finding")) for r in results}
        assert by_id["cipher_order"] == "server", by_id["cipher_order"]
        assert "7200" in by_id.get("TLS_session_ticket", ""), by_id.get("TLS_session_ticket")
        bad = findings_against(results)
        assert bad == [], "\n".join(bad)
        assert "Traceback" not in proc.output()
    finally:
        proc.kill()
