#!/usr/bin/env python3
"""TLS handshake benchmark: full vs resumed handshakes per second, lbtwist's
TLS termination (L{lbtwist.tls}) side by side with HAProxy terminating the
same certificate, in one run.

Load: ``openssl s_time`` clients (``-new``: a full handshake per connection;
``-reuse``: every connection after the first resumes the session), each
fetching a tiny page so TLS 1.3 tickets are read. Both servers answer
``200 ok`` themselves and close: the cost measured is accept + handshake +
one small exchange + close.

Method (see /work/shared/notes/performance-facts.md): each server runs on
CPU 0 (taskset), the clients on CPU 1; contenders are interleaved for
``--rounds`` rounds and medians compared. Compare the ratios, not absolutes.
The clients share one core and also pay for the handshakes, so HAProxy's
full-handshake rate is probably client-bound: its ratio is a lower bound.

Usage: .venv/bin/python bench/bench_tls.py [--rounds 3] [--duration 5]
       [--clients 4] [--versions 1.3,1.2]

``--mode keepalive``: HTTPS throughput instead of handshakes. ``twistd
lbtwist`` (an http listener with ``tls:``, the lean reactor) and HAProxy
(``mode http``, ``ssl crt``, one thread, ``http-reuse always``) proxy to one
nginx origin; ``wrk -t1 -c50`` over TLS keep-alive connections fetches a
2-byte answer (``small``) and a 16 KiB one with 1 KiB of request headers
(``16k``), and the same two runs over a plain listener of each proxy
(``plain-small``, ``plain-16k``) for reference: the TLS layer's own cost
per request is the TLS case's CPU per request minus the plain one's. ``--profile N`` instead records N seconds of
py-spy on lbtwist per case, under the same load, and prints where the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import LOAD_CPU, PY, REPO, cpu_seconds, free_port, wait_port
from benchlib import PROXY_CPU as SERVER_CPU


# -- the lbtwist side (run as a subprocess with --serve) ---------------------------------


def serve(port: int, cert: str, key: str) -> None:
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from lbtwist.config.model import CertificateConfig, ListenerTLSConfig
    from lbtwist.tls.context import ServerTLS
    from lbtwist.tls.server import wrap_server_factory

    class Ok(Protocol):
        buf = b""

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" in self.buf or b"\n\n" in self.buf:
                self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                self.transport.loseConnection()

    state = ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)]), reactor,
                      name="bench", alpn=())
    reactor.listenTCP(port, wrap_server_factory(Factory.forProtocol(Ok), state, reactor),
                      interface="127.0.0.1", backlog=1024)

    def dump(*_: object) -> None:
        print(json.dumps(state.stats.as_dict()), flush=True)

    def stop(*_: object) -> None:
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    reactor.run()


# -- contenders ------------------------------------------------------------------------------


class Contender:
    name = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Lbtwist(Contender):
    name = "lbtwist"

    def __init__(self, cert: str, key: str) -> None:
        self.port = free_port()
        self.cert, self.key = cert, key

    def start(self) -> None:
        self.p = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, PY, __file__, "--serve", str(self.port), self.cert, self.key],
            stdout=subprocess.PIPE, text=True,
        )
        wait_port(self.port, "lbtwist")

    def stats(self) -> dict:
        self.p.send_signal(signal.SIGUSR1)
        while True:
            line = self.p.stdout.readline()
            if not line:
                return {}
            if line.startswith("{"):
                return json.loads(line)

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


class HAProxy(Contender):
    name = "haproxy"

    def __init__(self, combined: str, workdir: str) -> None:
        self.port = free_port()
        self.cfg = os.path.join(workdir, "haproxy.cfg")
        Path(self.cfg).write_text(f"""
global
  nbthread 1
  maxconn 4000
  tune.ssl.cachesize 20000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:{self.port} ssl crt {combined}
  http-request return status 200 content-type text/plain string ok
""")

    def start(self) -> None:
        self.p = subprocess.Popen(["taskset", "-c", SERVER_CPU, "haproxy", "-f", self.cfg, "-db"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, "haproxy")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def s_time(port: int, mode: str, version: str, duration: int, clients: int) -> tuple[float, int, int]:
    """Run ``clients`` s_time processes at once; (connections per second,
    connections, connections the clients saw resumed)."""
    flag = {"1.2": "-tls1_2", "1.3": "-tls1_3"}[version]
    argv = ["taskset", "-c", LOAD_CPU, "openssl", "s_time", "-connect", f"127.0.0.1:{port}",
            f"-{mode}", "-time", str(duration), flag, "-www", "/"]
    t0 = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(clients)]
    total = reused = 0
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        m = re.search(r"^(\d+) connections in [\d.]+s", out, re.MULTILINE)
        if not m:
            raise SystemExit(f"s_time failed:\n{out[-2000:]}")
        total += int(m.group(1))
        reused += sum(line.count("r") for line in out.splitlines() if line and set(line) <= set("r*"))
    wall = time.monotonic() - t0
    return total / wall, total, reused


# -- keep-alive throughput (--mode keepalive) ----------------------------------------------


def _origin_conf(tmp: Path, port: int) -> str:
    www = Path(tempfile.mkdtemp(prefix="bench-tls-www-"))  # readable by nginx's unprivileged worker
    os.chmod(www, 0o755)
    (www / "16k").write_bytes(b"x" * 16384)
    os.chmod(www / "16k", 0o644)
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/origin.pid;
error_log {tmp}/origin-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
""" + "".join(f"    {k}_temp_path {tmp}/origin-{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")) + f"""
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    large_client_header_buffers 4 16k;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ return 200 "ok"; }}
        location = /16k {{ root {www}; }}
    }}
}}
"""


_PAD = "x" * 1024
#: keep-alive cases: name -> (scheme, path, extra wrk arguments)
_CASES = {
    "small": ("https", "/", []),
    "16k": ("https", "/16k", ["-H", f"X-Pad: {_PAD}"]),
    "plain-small": ("http", "/", []),
    "plain-16k": ("http", "/16k", ["-H", f"X-Pad: {_PAD}"]),
}

#: Profile buckets for the TLS data path, first match wins, ahead of bench_l7's.
TLS_BUCKETS = [
    ("TLS record I/O (lbtwist.tls.records, OpenSSL calls)", ("tls/records.py", "OpenSSL/SSL.py")),
    ("TLS protocol (lbtwist.tls.server, Twisted's TLS)", ("tls/server.py", "protocols/tls.py", "tls/peek.py")),
    ("handshakes (new connections)", ("tls/context.py", "tls/clienthello.py", "tls/sni.py")),
]


def profile_keepalive(pid: int, url: str, extra: list[str], args: argparse.Namespace) -> None:
    """py-spy the lbtwist process for ``--profile`` seconds while wrk loads ``url``."""
    from bench_l7 import BUCKETS, summarize_profile

    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        found = shutil.which("py-spy")  # e.g. pip install --target DIR py-spy, DIR/bin on PATH
        if found is None:
            print("(--profile: py-spy not found; .venv/bin/pip install py-spy, or put one on PATH)")
            return
        spy = Path(found)
    raw = Path(tempfile.mkdtemp(prefix="bench_tls_prof_")) / "prof.txt"
    rec = subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(args.profile), "-r", "250",
                            "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{args.connections}", f"-d{args.profile}s",
                    *extra, url], capture_output=True, timeout=args.profile + 60)
    rec.wait(args.profile + 60)
    if not raw.exists():
        print("(--profile: py-spy produced nothing; it may need ptrace permission)")
        return
    summarize_profile(raw, TLS_BUCKETS + BUCKETS)
    shutil.rmtree(raw.parent, ignore_errors=True)


def keepalive(args: argparse.Namespace, cert: str, key: str, combined: str, work: str) -> None:
    tmp = Path(work)
    origin = free_port()
    (tmp / "origin.conf").write_text(_origin_conf(tmp, origin))
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], cpu: str, **kw: object) -> subprocess.Popen:
        p = subprocess.Popen(["taskset", "-c", cpu, *argv], **kw)  # type: ignore[arg-type]
        procs.append(p)
        return p

    start(["nginx", "-p", str(tmp), "-c", str(tmp / "origin.conf")], LOAD_CPU, stderr=subprocess.DEVNULL)
    wait_port(origin, "origin nginx")
    lb_tls, lb_plain, hp_tls, hp_plain = (free_port() for _ in range(4))
    (tmp / "lb.yaml").write_text(f"""
listeners:
  - name: tls
    bind: "tcp:{lb_tls}:interface=127.0.0.1"
    mode: http
    pool: origin
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]
  - name: plain
    bind: "tcp:{lb_plain}:interface=127.0.0.1"
    mode: http
    pool: origin
pools:
  - name: origin
    backends: [{{address: "127.0.0.1:{origin}"}}]
""")
    twistd = str(Path(PY).with_name("twistd"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    lb = start([twistd, "-n", "--pidfile=", "lbtwist", "--config", str(tmp / "lb.yaml")], SERVER_CPU,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=work)
    (tmp / "hp.cfg").write_text(f"""
global
  nbthread 1
  maxconn 4000
  tune.ssl.cachesize 20000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend tls
  bind 127.0.0.1:{hp_tls} ssl crt {combined}
  default_backend origin
frontend plain
  bind 127.0.0.1:{hp_plain}
  default_backend origin
backend origin
  server o1 127.0.0.1:{origin}
""")
    hp = start(["haproxy", "-f", str(tmp / "hp.cfg"), "-db"], SERVER_CPU,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port in (lb_tls, lb_plain, hp_tls, hp_plain):
        wait_port(port, "proxy")
    if args.profile:
        try:
            for case, (scheme, path, extra) in _CASES.items():
                port = lb_tls if scheme == "https" else lb_plain
                print(f"\nprofiling lbtwist, {case}, for {args.profile}s under the same load...", flush=True)
                profile_keepalive(lb.pid, f"{scheme}://127.0.0.1:{port}{path}", extra, args)
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                p.wait(10)
        return
    targets = {"lbtwist": (lb, lb_tls, lb_plain), "haproxy": (hp, hp_tls, hp_plain)}
    cases = _CASES
    results: dict[tuple[str, str], list[float]] = {}
    per_cpu: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for case, (scheme, path, extra) in cases.items():
                order = list(targets) if r % 2 == 0 else list(targets)[::-1]
                for name in order:
                    p, tls_port, plain_port = targets[name]
                    port = tls_port if scheme == "https" else plain_port
                    cpu0 = cpu_seconds(p.pid)
                    out = subprocess.run(
                        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s",
                         *extra, f"{scheme}://127.0.0.1:{port}{path}"],
                        capture_output=True, text=True, timeout=args.duration + 60,
                    ).stdout
                    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
                    n = re.search(r"(\d+) requests in", out)
                    if not (m and n):
                        raise SystemExit(f"wrk output not understood:\n{out}")
                    bad = re.search(r"Socket errors:.*|Non-2xx.*", out)
                    cpu = max(cpu_seconds(p.pid) - cpu0, 1e-3)
                    results.setdefault((name, case), []).append(float(m.group(1)))
                    per_cpu.setdefault((name, case), []).append(int(n.group(1)) / cpu)
                    print(f"round {r + 1}: {name:8s} {case:10s} {float(m.group(1)):9.0f} req/s"
                          f" {int(n.group(1)) / cpu:9.0f} req per proxy CPU-second"
                          + (f"  ({bad.group(0).strip()})" if bad else ""), flush=True)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\nmedians of {args.rounds} rounds, wrk -t1 -c{args.connections} x {args.duration}s "
          f"(proxies on CPU {SERVER_CPU}, wrk and nginx on CPU {LOAD_CPU})")
    for title, table in (("requests per second (wall clock)", results),
                         ("requests per proxy CPU-second (steadier on a loaded box)", per_cpu)):
        print(f"{title}:")
        print(f"{'':12s}{'lbtwist':>10s}{'haproxy':>10s}{'lbtwist/haproxy':>17s}   lbtwist min-max, haproxy min-max")
        for case in cases:
            lb_v, hp_v = table[("lbtwist", case)], table[("haproxy", case)]
            lbm, hpm = statistics.median(lb_v), statistics.median(hp_v)
            print(f"{case:12s}{lbm:10.0f}{hpm:10.0f}{lbm / hpm:17.2f}   "
                  f"{min(lb_v):.0f}-{max(lb_v):.0f}, {min(hp_v):.0f}-{max(hp_v):.0f}")
    print("proxy CPU per request, and what TLS adds (TLS case minus its plain one), microseconds:")
    for tls_case, plain_case in (("small", "plain-small"), ("16k", "plain-16k")):
        row = []
        for name in targets:
            t = 1e6 / statistics.median(per_cpu[(name, tls_case)])
            pl = 1e6 / statistics.median(per_cpu[(name, plain_case)])
            row.append(f"{name} {t:6.1f} (plain {pl:6.1f}, TLS adds {t - pl:5.1f})")
        print(f"{tls_case:12s}" + "   ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--clients", type=int, default=4, help="concurrent s_time processes")
    ap.add_argument("--versions", default="1.3,1.2")
    ap.add_argument("--key", default="p256", choices=["p256", "rsa2048"], help="certificate key type")
    ap.add_argument("--mode", default="handshakes", choices=["handshakes", "keepalive"])
    ap.add_argument("--connections", type=int, default=50, help="keepalive: wrk connections")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="keepalive: py-spy lbtwist for SECONDS per case under wrk load instead of comparing")
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return
    missing = [t for t in ("haproxy", "openssl", "taskset") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install haproxy openssl util-linux)")

    sys.path.insert(0, str(REPO))
    from lbtwist.tls.testing import TestCA

    work = tempfile.mkdtemp(prefix="bench-tls-")
    leaf = TestCA().issue("bench.test", key_type=args.key)
    cert, key = leaf.write(work, "bench")
    combined = os.path.join(work, "combined.pem")
    Path(combined).write_bytes(leaf.cert_pem + leaf.key_pem)

    if args.mode == "keepalive":
        try:
            keepalive(args, cert, key, combined, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    contenders = [Lbtwist(cert, key), HAProxy(combined, work)]
    for c in contenders:
        c.start()
    results: dict[tuple[str, str, str], list[float]] = {}
    resumed_seen: dict[tuple[str, str], int] = {}
    per_core: dict[tuple[str, str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for version in args.versions.split(","):
                for mode in ("new", "reuse"):
                    order = contenders if r % 2 == 0 else contenders[::-1]
                    for c in order:
                        cpu0 = cpu_seconds(c.p.pid)
                        rate, total, reused = s_time(c.port, mode, version, args.duration, args.clients)
                        per_cpu = total / max(cpu_seconds(c.p.pid) - cpu0, 1e-3)
                        results.setdefault((c.name, version, mode), []).append(rate)
                        per_core.setdefault((c.name, version, mode), []).append(per_cpu)
                        if mode == "reuse":
                            resumed_seen[(c.name, version)] = resumed_seen.get((c.name, version), 0) + reused
                        print(f"round {r + 1}: {c.name:8s} TLS {version} {mode:5s} {rate:8.0f} conn/s"
                              f" {per_cpu:8.0f} conn per server CPU-second", flush=True)
        lb_stats = contenders[0].stats()
    finally:
        for c in contenders:
            c.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmedians of {args.rounds} rounds, {args.clients} clients x {args.duration}s, {args.key} certificate "
          f"(server on CPU {SERVER_CPU}, clients on CPU {LOAD_CPU})")
    for title, table in (("connections per second (wall clock)", results),
                         ("connections per server CPU-second (capacity of one core)", per_core)):
        med = {k: statistics.median(v) for k, v in table.items()}
        print(f"\n{title}:")
        print(f"{'':20s}{'lbtwist':>10s}{'haproxy':>10s}{'lbtwist/haproxy':>17s}")
        for version in args.versions.split(","):
            for mode, label in (("new", "full"), ("reuse", "resumed")):
                lb, hp = med[("lbtwist", version, mode)], med[("haproxy", version, mode)]
                print(f"TLS {version} {label:8s}     {lb:10.0f}{hp:10.0f}{lb / hp:17.2f}")
            for name in ("lbtwist", "haproxy"):
                gain = med[(name, version, "reuse")] / med[(name, version, "new")]
                print(f"TLS {version} resumed/full {name}: {gain:.2f}x")
    print(f"\nlbtwist counters: full={lb_stats.get('full_handshakes')} resumed={lb_stats.get('resumed_handshakes')} "
          f"(ticket {lb_stats.get('resumed_by_ticket')}, cache {lb_stats.get('resumed_by_cache')}) "
          f"failed={lb_stats.get('failed_handshakes')} versions={lb_stats.get('versions')}")
    print("s_time 'r' marks (resumed as the client saw it): "
          + ", ".join(f"{n} TLS {v}: {k}" for (n, v), k in sorted(resumed_seen.items())))


if __name__ == "__main__":
    main()
