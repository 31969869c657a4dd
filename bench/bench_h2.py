#!/usr/bin/env python3
"""HTTP/2 benchmark: ``h2load -c 50 -m 10`` (50 connections, 10 streams
each) through lbtwist and through HAProxy terminating TLS with ALPN
``h2,http/1.1``, to the same nginx origin (HTTP/1.1 keep-alive behind both);
then gRPC unary calls per second through both (h2load POSTing a gRPC frame
to a grpcio server behind lbtwist ``protocol: h2`` and HAProxy ``proto h2``).

Method (/work/shared/notes/performance-facts.md): each proxy on CPU 0
(taskset), h2load and the origins on CPU 1; contenders interleaved for
``--rounds`` rounds, medians compared. Compare the ratios, not absolutes.

Usage: .venv/bin/python bench/bench_h2.py [--rounds 3] [--duration 5] [--no-grpc]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import LOAD_CPU, PROXY_CPU, PY, REPO, check_tools, cpu_seconds, free_port, wait_port  # noqa: E402


def grpc_origin(port: int) -> None:
    """A grpcio server answering /t.Echo/U (run as a subprocess with --grpc-origin)."""
    import threading
    from concurrent import futures

    import grpc

    h = grpc.method_handlers_generic_handler("t.Echo", {"U": grpc.unary_unary_rpc_method_handler(lambda r, c: r)})
    srv = grpc.server(futures.ThreadPoolExecutor(8))
    srv.add_generic_rpc_handlers((h,))
    srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    threading.Event().wait()


def origin_conf(tmp: Path, port: int) -> str:
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
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = / {{ return 200 "ok"; }}
    }}
}}
"""


def h2load(url: str, duration: int, extra: list[str]) -> tuple[float, int, int]:
    out = subprocess.run(["taskset", "-c", LOAD_CPU, "h2load", "-c", "50", "-m", "10", "-D", str(duration),
                          "--warm-up-time", "1", *extra, url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    n = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    if not (m and n):
        raise SystemExit(f"h2load output not understood:\n{out}")
    proto = re.search(r"Application protocol: (\S+)", out)
    if proto is None or proto.group(1) != "h2":
        raise SystemExit(f"not h2:\n{out}")
    return float(m.group(1)), int(n.group(1)), int(n.group(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--no-grpc", action="store_true")
    ap.add_argument("--grpc-origin", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grpc_origin:
        grpc_origin(args.grpc_origin)
        return
    check_tools(("haproxy", "nginx", "h2load", "taskset"))
    from lbtwist.tls.testing import TestCA

    work = tempfile.mkdtemp(prefix="bench-h2-")
    tmp = Path(work)
    issued = TestCA().issue("127.0.0.1", "localhost")
    cert, key = issued.write(tmp, "site")
    combined = str(tmp / "combined.pem")
    Path(combined).write_bytes(issued.cert_pem + issued.key_pem)
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], cpu: str, **kw: object) -> subprocess.Popen:
        p = subprocess.Popen(["taskset", "-c", cpu, *argv], **kw)  # type: ignore[arg-type]
        procs.append(p)
        return p

    origin, grpc_port = free_port(), free_port()
    (tmp / "origin.conf").write_text(origin_conf(tmp, origin))
    start(["nginx", "-p", str(tmp), "-c", str(tmp / "origin.conf")], LOAD_CPU, stderr=subprocess.DEVNULL)
    wait_port(origin, "origin nginx")
    grpc_on = not args.no_grpc
    if grpc_on:
        start([PY, __file__, "--grpc-origin", str(grpc_port)], LOAD_CPU)
        wait_port(grpc_port, "grpc origin")
    lb_port, lb_grpc, hp_port, hp_grpc = (free_port() for _ in range(4))
    grpc_lb = f"""
  - name: grpc
    bind: "tcp:{lb_grpc}:interface=127.0.0.1"
    mode: http
    pool: grpc
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]""" if grpc_on else ""
    (tmp / "lb.yaml").write_text(f"""
listeners:
  - name: tls
    bind: "tcp:{lb_port}:interface=127.0.0.1"
    mode: http
    pool: origin
    tls:
      certificates: [{{cert: "{cert}", key: "{key}"}}]{grpc_lb}
pools:
  - name: origin
    backends: [{{address: "127.0.0.1:{origin}"}}]
  - name: grpc
    protocol: h2
    backends: [{{address: "127.0.0.1:{grpc_port}"}}]
""")
    twistd = str(Path(PY).with_name("twistd"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    lb = start([twistd, "-n", "--pidfile=", "--reactor=lbtwist-lean", "lbtwist", "--config", str(tmp / "lb.yaml")],
               PROXY_CPU, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=work)
    grpc_hp = f"""
frontend grpc
  bind 127.0.0.1:{hp_grpc} ssl crt {combined} alpn h2,http/1.1
  default_backend grpc
backend grpc
  server g1 127.0.0.1:{grpc_port} proto h2
""" if grpc_on else ""
    (tmp / "hp.cfg").write_text(f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend tls
  bind 127.0.0.1:{hp_port} ssl crt {combined} alpn h2,http/1.1
  default_backend origin
backend origin
  server o1 127.0.0.1:{origin}
{grpc_hp}""")
    hp = start(["haproxy", "-f", str(tmp / "hp.cfg"), "-db"], PROXY_CPU,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for port in (lb_port, hp_port) + ((lb_grpc, hp_grpc) if grpc_on else ()):
        wait_port(port, "proxy")
    msg = tmp / "grpc-msg"
    msg.write_bytes(b"\x00\x00\x00\x00\x05hello")
    grpc_args = ["-d", str(msg), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    cases = {"h2 GET": ("", "/", [])}
    if grpc_on:
        cases["gRPC unary"] = ("grpc", "/t.Echo/U", grpc_args)
    targets = {"lbtwist": (lb, lb_port, lb_grpc), "haproxy": (hp, hp_port, hp_grpc)}
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for case, (kind, path, extra) in cases.items():
                order = list(targets) if r % 2 == 0 else list(targets)[::-1]
                for name in order:
                    p, port, gport = targets[name]
                    cpu0 = cpu_seconds(p.pid)
                    rate, ok, failed = h2load(f"https://127.0.0.1:{gport if kind else port}{path}", args.duration, extra)
                    cpu = max(cpu_seconds(p.pid) - cpu0, 1e-3)
                    results.setdefault((name, case), []).append(rate)
                    print(f"round {r + 1}: {name:8s} {case:11s} {rate:9.0f} req/s  {ok / cpu:9.0f} per proxy CPU-s"
                          f"  ({ok} ok, {failed} failed)", flush=True)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\nmedians of {args.rounds} rounds, h2load -c 50 -m 10 x {args.duration}s over TLS (ALPN h2)"
          f" (proxies on CPU {PROXY_CPU}, h2load and origins on CPU {LOAD_CPU})")
    print(f"{'':12s}{'lbtwist':>10s}{'haproxy':>10s}{'lbtwist/haproxy':>17s}")
    for case in cases:
        lbm, hpm = statistics.median(results[("lbtwist", case)]), statistics.median(results[("haproxy", case)])
        print(f"{case:12s}{lbm:10.0f}{hpm:10.0f}{lbm / hpm:17.2f}")


if __name__ == "__main__":
    main()
