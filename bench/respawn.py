"""Worker replacement time and idle memory of ``twistd lbtwist`` with
``workers: N`` (issue #13: "a worker that exits or is killed is replaced
within 1 s"; "each worker at or below 40 MB RSS idle, the master too").

What runs: one twistd master with ``--workers`` workers (default 2) in front
of the built-in demo backend, on 127.0.0.1 only. First, idle memory of every
process (RSS, and PSS / USS from /proc/PID/smaps_rollup). Then ``--kills``
times (default 5): SIGKILL one worker (slots alternate) and time, polling
every 10 ms, until

- ``spawned``: a new child of the master exists (/proc/PID/task/*/children;
  with the spare, that is the next spare, started once the old one serves);
- ``serving``: /api/workers lists the new pid (it has loaded its config,
  applied the fleet view, listens and said Ready);

Kills are spaced ``--gap`` seconds (default 4) so no slot reaches the
crash-loop backoff (3 exits within 10 s). Every wait is bounded.

    .venv/bin/python bench/respawn.py --kills 5
    .venv/bin/python bench/respawn.py --kills 5 --tls    # TLS with tickets: forked workers
    .venv/bin/python bench/respawn.py --kills 5 --kill-spare   # no spare: a fresh process
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import REPO, free_port

BIN = Path(sys.executable).parent


def children(pid: int) -> set[int]:
    try:
        return {int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def memory(pid: int) -> dict[str, int]:
    """rss / pss / uss (private clean + dirty) in bytes, from smaps_rollup."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                continue
            kb = int(parts[1]) * 1024
            if parts[0] == "Rss:":
                out["rss"] = kb
            elif parts[0] == "Pss:":
                out["pss"] = kb
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                out["uss"] += kb
    except OSError:
        pass
    return out


def config(web: int, admin: int, demo: int, workers: int, tls: Path | None) -> str:
    tls_block = ""
    if tls is not None:
        tls_block = f"""
    tls:
      certificates: [{{cert: "{tls / 'cert.pem'}", key: "{tls / 'key.pem'}"}}]
      session_tickets: {{enabled: true}}"""
    return f"""
workers: {workers}
listeners:
  - name: web
    bind: "tcp:{web}:interface=127.0.0.1"
    mode: http
    pool: web{tls_block}
pools:
  - name: web
    backends:
      - {{address: "127.0.0.1:{demo}", name: a}}
admin:
  bind: "tcp:{admin}:interface=127.0.0.1"
demo:
  http: ["tcp:{demo}:interface=127.0.0.1"]
"""


def make_cert(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench.example")]), False)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))


def api_workers(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/workers", timeout=2) as r:
        return json.loads(r.read())


def listed(admin: int) -> dict[int, dict]:
    try:
        return {int(w["pid"]): w for w in api_workers(admin)["workers"]}
    except Exception:
        return {}


def wait(pred, timeout: float, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--gap", type=float, default=4.0)
    ap.add_argument("--tls", action="store_true", help="TLS with session tickets (forked workers)")
    ap.add_argument("--kill-spare", action="store_true",
                    help="SIGKILL the spare first: the slot gets a fresh process (the cold path)")
    args = ap.parse_args()
    web, admin, demo = free_port(), free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="lbtwist-respawn-"))
    if args.tls:
        make_cert(tmp)
    path = tmp / "lbtwist.yaml"
    path.write_text(config(web, admin, demo, args.workers, tmp if args.tls else None))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(tmp / "twistd.log", "wb")
    p = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "lbtwist", "--config", str(path)],
                         env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        if not wait(lambda: len(listed(admin)) >= args.workers, 60, 0.1):
            print(f"workers never listed; log in {tmp / 'twistd.log'}")
            return 1
        time.sleep(2.0)  # idle: let start-up garbage settle
        print(f"idle memory (MiB), pid: rss / pss / uss   [/api/workers rss_bytes]")
        ws = listed(admin)
        m = memory(p.pid)
        master_rss = api_workers(admin)["master"]["rss_bytes"]
        print(f"  master {p.pid}: {m['rss']/2**20:.1f} / {m['pss']/2**20:.1f} / {m['uss']/2**20:.1f}"
              f"   [{master_rss/2**20:.1f}]")
        for pid, w in sorted(ws.items()):
            m = memory(pid)
            print(f"  worker {pid}: {m['rss']/2**20:.1f} / {m['pss']/2**20:.1f} / {m['uss']/2**20:.1f}"
                  f"   [{int(w.get('rss_bytes') or 0)/2**20:.1f}]")
        spare = wait(lambda: (api_workers(admin).get("spare") or {}).get("prepared") and api_workers(admin)["spare"]["pid"], 30, 0.1)
        if spare:
            m = memory(spare)
            print(f"  spare  {spare}: {m['rss']/2**20:.1f} / {m['pss']/2**20:.1f} / {m['uss']/2**20:.1f}")
        rows = []
        for i in range(args.kills):
            before = listed(admin)
            victim = sorted(before)[i % len(before)]
            if args.kill_spare:
                sp = api_workers(admin).get("spare")
                if sp:
                    os.kill(sp["pid"], signal.SIGKILL)
                    wait(lambda: (api_workers(admin).get("spare") or {}).get("pid") != sp["pid"], 5)
            kids = children(p.pid)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            new = wait(lambda: children(p.pid) - kids - {victim}, 10)
            t_spawn = time.monotonic() - t0 if new else None
            def serving():
                now = listed(admin)
                fresh = [q for q in now if q not in before]
                return fresh[0] if fresh and victim not in now else None
            rpid = wait(serving, 10)
            t_serve = time.monotonic() - t0 if rpid else None
            rows.append((t_spawn, t_serve))
            print(f"  kill {i + 1}: {victim} -> {rpid}: spawned {t_spawn if t_spawn is None else round(t_spawn, 3)} s,"
                  f" serving {t_serve if t_serve is None else round(t_serve, 3)} s", flush=True)
            time.sleep(args.gap)
        serves = [s for _, s in rows if s is not None]
        spawns = [s for s, _ in rows if s is not None]
        if serves:
            print(f"kill -> serving: median {statistics.median(serves):.3f} s, min {min(serves):.3f},"
                  f" max {max(serves):.3f} ({len(serves)}/{len(rows)} replaced);"
                  f" spawned median {statistics.median(spawns):.3f} s")
        ws = listed(admin)
        time.sleep(1.0)
        for pid in sorted(ws):
            m = memory(pid)
            print(f"  replacement/idle worker {pid}: rss {m['rss']/2**20:.1f} / pss {m['pss']/2**20:.1f}"
                  f" / uss {m['uss']/2**20:.1f} MiB")
        return 0 if len(serves) == len(rows) else 1
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
