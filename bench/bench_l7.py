#!/usr/bin/env python3
"""L7 benchmark: lbtwist in http mode (``python -m lbtwist.l7``) against
HAProxy (``mode http``, one thread, ``http-reuse always``) and nginx
(``proxy_pass`` with upstream keepalive, one worker), all in front of the same
local origin, driven by ``wrk`` in one run.

Printed per contender: requests/s, p99 latency, the proxy's own CPU time per
request (from /proc), and the ratios to HAProxy. On a shared machine the
absolute rates swing with other load; CPU per request swings much less, so
both ratios are shown.

Method (see /work/shared/notes/performance-facts.md): proxies on CPU 0, wrk and
the origin (one nginx worker answering ``200 ok`` with unlimited keep-alive)
on CPU 1 (taskset); contenders interleaved A B C ... then ... C B A for
``--rounds`` rounds and the medians compared. Compare ratios, not absolutes.
Each contender adds X-Forwarded-For, so all do comparable header work
(lbtwist also adds X-Forwarded-Proto/-Host, Via and X-Request-Id).

Usage: .venv/bin/python bench/bench_l7.py [--rounds 3] [--duration 10]
       [--connections 50] [--variants tuned,lean,stock] [--profile SECONDS]
       [--compare OTHER_CHECKOUT]
Variants of lbtwist: ``tuned`` (eager write), ``lean`` (tuned + fastio's
lean epoll reactor), ``stock`` (Twisted's buffered writes).
``--profile N`` also records N seconds of py-spy on the first lbtwist variant
under load and prints where the time goes (needs py-spy in the venv).
Missing tools: ``apt-get install haproxy nginx-light wrk``.

``--workers 1,2`` instead runs ``twistd lbtwist`` with ``workers: 1`` and
``workers: 2`` side by side (bench/workersbench.py: req/s, CPU per request of
the master and its workers together, idle RSS; nothing pinned).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import (
    LOAD_CPU, PROXY_CPU, PY, REPO, Procs, check_tools, cpu_split, free_port, nginx_common, nginx_temp,
    start_origin,
)

VARIANTS = {
    "tuned": [],
    "lean": ["--lean-reactor"],
    "lean-nobatch": ["--lean-reactor", "--no-batch"],
    "stock": ["--no-eager"],
}


def wait_http(port: int, what: str, timeout: float = 15.0) -> None:
    """Wait until ``GET /`` through ``port`` answers 200."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    d = s.recv(4096)
                    if not d:
                        break
                    data += d
                if data.startswith(b"HTTP/1.1 200"):
                    return
                last = data[:80].decode("latin-1")
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise SystemExit(f"{what}: no 200 from 127.0.0.1:{port} after {timeout}s ({last})")


def children_cpu(pid: int) -> tuple[float, float]:
    """(user, kernel) CPU of ``pid`` plus its direct children (nginx master + worker)."""
    user, kernel = cpu_split(pid)
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for k in kids:
        try:
            u, k_ = cpu_split(int(k))
        except OSError:
            continue
        user += u
        kernel += k_
    return user, kernel


def start_haproxy(procs: Procs, tmp: Path, origin: int) -> tuple[int, int]:
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server origin 127.0.0.1:{origin}
""")
    p = procs.start(["haproxy", "-db", "-f", str(cfg)], PROXY_CPU, stderr=open(tmp / "haproxy.stderr", "w"))
    wait_http(port, f"haproxy (see {tmp}/haproxy.stderr)")
    return port, p.pid


def start_nginx_proxy(procs: Procs, tmp: Path, origin: int) -> tuple[int, int]:
    port = free_port()
    conf = tmp / "proxy.conf"
    conf.write_text(nginx_common(tmp, "proxy") + f"""
http {{
    access_log off;
{nginx_temp(tmp, "proxy")}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
""")
    p = procs.start(["nginx", "-p", str(tmp), "-c", str(conf)], PROXY_CPU, stderr=open(tmp / "proxy.stderr", "w"))
    wait_http(port, f"nginx proxy (see {tmp}/proxy.stderr)")
    return port, p.pid


def start_lbtwist(procs: Procs, origin: int, extra: list[str], repo: Path = REPO) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=str(repo))
    p = procs.start([PY, "-m", "lbtwist.l7", "--backend", f"127.0.0.1:{origin}", *extra],
                    PROXY_CPU, stdout=subprocess.PIPE, env=env, text=True)
    line = p.stdout.readline()
    if not line.startswith("LISTENING"):
        raise SystemExit(f"lbtwist did not start: {line!r}")
    port = int(line.split()[1])
    wait_http(port, "lbtwist")
    return port, p.pid


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def run_wrk(port: int, pid: int, duration: int, connections: int,
            nginx: bool) -> tuple[float, float, float, float]:
    """(requests/s, p99 ms, proxy CPU us per request, of which kernel us)."""
    cpu = children_cpu if nginx else cpu_split
    u0, k0 = cpu(pid)
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    u1, k1 = cpu(pid)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    if not (rps and n and p99):
        raise SystemExit(f"wrk output not understood:\n{out}")
    bad = re.search(r"Socket errors:.*|Non-2xx.*", out)
    if bad:
        print(f"      (wrk: {bad.group(0).strip()})")
    per = 1e6 / int(n.group(1))
    return (float(rps.group(1)), float(p99.group(1)) * _UNIT[p99.group(2)],
            (u1 - u0 + k1 - k0) * per, (k1 - k0) * per)


def profile(pid: int, port: int, seconds: int, connections: int) -> None:
    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        print("\n(--profile: py-spy not found; .venv/bin/pip install py-spy)")
        return
    raw = Path(tempfile.mkdtemp(prefix="bench_l7_prof_")) / "prof.txt"
    rec = subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(seconds), "-r", "400",
                            "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                    f"http://127.0.0.1:{port}/"], capture_output=True, timeout=seconds + 30)
    rec.wait(seconds + 30)
    if not raw.exists():
        print("\n(--profile: py-spy produced nothing; it may need ptrace permission)")
        return
    summarize_profile(raw)


#: Profile buckets, first match wins (substring of a frame "func (file:line)").
BUCKETS = [
    ("socket send (eager, batched per poll pass)", ("_EagerWriteMixin", "_WriteBatch", "writeSomeData")),
    ("socket recv (inline read in the poll loop)", ("LeanEPollReactor._dispatch", "Connection.doRead")),
    ("request parsing (httptools + checks)", ("RequestParser.", "_HeadCollector", "httptools")),
    ("response parsing (httptools + checks)", ("ResponseParser.",)),
    ("header serialisation", ("l7/headers.py",)),
    ("routing, balancing, accounting", ("Exchange.pick", "Pool.", "balancers/", "routing.py", "traffic.py")),
    ("resilience (retry state, breakers, limits)", ("lbtwist/resilience/",)),
    ("access log / metrics subscribers", ("accesslog.py", "metrics")),
    ("exchange / attempt / pool glue", ("l7/machine.py", "l7/connpool.py", "l7/backend.py",
                                        "l7/client.py", "l7/timers.py")),
    ("reactor dispatch + epoll", ("LeanEPollReactor.doPoll", "epollreactor.py", "posixbase.py", "log.py",
                                  "context.py", "base.py")),
]


def summarize_profile(path: Path) -> None:
    """Attribute each sample's self time to the innermost frame that names a bucket."""
    buckets: collections.Counter = collections.Counter()
    funcs: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        funcs[frames[-1].split(" (")[0]] += n
        for frame in reversed(frames):
            hit = next((name for name, keys in BUCKETS if any(k in frame for k in keys)), None)
            if hit:
                buckets[hit] += n
                break
        else:
            buckets["other"] += n
    print(f"\nwhere the time goes (py-spy, {total} samples, self time by innermost matching frame):")
    for name, n in buckets.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("top functions (self):")
    for name, n in funcs.most_common(12):
        print(f"  {100 * n / total:5.1f}%  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description="lbtwist L7 vs HAProxy mode http vs nginx proxy_pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=50, help="wrk concurrent connections")
    ap.add_argument("--variants", default="lean,tuned", help=f"lbtwist variants: {','.join(VARIANTS)}")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS", help="py-spy the first lbtwist variant")
    ap.add_argument("--compare", metavar="CHECKOUT", type=Path,
                    help="also run the first variant from another checkout (A/B of two code versions in one "
                         "interleaved run, e.g. a `git archive` of the commit before a change)")
    ap.add_argument("--workers", default=None, metavar="N,M",
                    help="instead: twistd lbtwist with workers: N, M ... side by side (req/s, CPU per request "
                         "of master + workers, idle RSS); see bench/workersbench.py")
    args = ap.parse_args()

    if args.workers:
        return workers_mode(args)
    check_tools()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="bench_l7_"))
    try:
        origin = start_origin(procs, tmp)
        targets: dict[str, tuple[int, int, bool]] = {}
        port, pid = start_haproxy(procs, tmp, origin)
        targets["haproxy"] = (port, pid, False)
        port, pid = start_nginx_proxy(procs, tmp, origin)
        targets["nginx"] = (port, pid, True)
        for v in variants:
            port, pid = start_lbtwist(procs, origin, VARIANTS[v])
            targets[f"lbtwist-{v}"] = (port, pid, False)
        if args.compare is not None:
            port, pid = start_lbtwist(procs, origin, VARIANTS[variants[0]], args.compare.resolve())
            targets[f"{variants[0]}@{args.compare.name}"[:20]] = (port, pid, False)
        names = list(targets)
        rps: dict[str, list[float]] = {n: [] for n in names}
        p99: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        ker: dict[str, list[float]] = {n: [] for n in names}
        print(f"load avg before: {os.getloadavg()[0]:.2f}; rounds={args.rounds} duration={args.duration}s "
              f"wrk -t1 -c{args.connections}")
        for r in range(1, args.rounds + 1):
            order = names if r % 2 else list(reversed(names))
            for n in order:
                port, pid, is_nginx = targets[n]
                a, b, c, k = run_wrk(port, pid, args.duration, args.connections, is_nginx)
                rps[n].append(a)
                p99[n].append(b)
                cpu[n].append(c)
                ker[n].append(k)
                print(f"  round {r} {n:20s} {a:9.0f} req/s   p99 {b:7.2f} ms   proxy CPU {c:6.1f} us/req "
                      f"({k:.1f} kernel)", flush=True)
        print(f"load avg after: {os.getloadavg()[0]:.2f}")
        base_rps = statistics.median(rps["haproxy"])
        base_cpu = statistics.median(cpu["haproxy"])
        print("\nmedians (ratio to HAProxy; CPU ratio = haproxy_us / proxy_us, higher is better):")
        print(f"  {'contender':20s} {'req/s':>9s} {'ratio':>6s} {'p99 ms':>8s} {'us/req':>7s} {'kernel':>7s} "
              f"{'cpu ratio':>9s}")
        for n in names:
            m_rps = statistics.median(rps[n])
            m_cpu = statistics.median(cpu[n])
            print(f"  {n:20s} {m_rps:9.0f} {m_rps / base_rps:6.2f} {statistics.median(p99[n]):8.2f} "
                  f"{m_cpu:7.1f} {statistics.median(ker[n]):7.1f} {base_cpu / m_cpu:9.2f}")
        if args.profile:
            first = next(n for n in names if n.startswith("lbtwist"))
            port, pid, _ = targets[first]
            print(f"\nprofiling {first} for {args.profile}s under the same load...")
            profile(pid, port, args.profile, args.connections)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def workers_mode(args: argparse.Namespace) -> None:
    from workersbench import compare, parse_counts

    counts = parse_counts(args.workers)
    check_tools(("nginx", "wrk", "taskset"))
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="bench_l7_workers_"))
    try:
        origin = start_origin(procs, tmp)
        compare(procs, tmp, counts, "http", origin, wait_http, rounds=args.rounds, duration=args.duration,
                connections=args.connections, threads=2, close=False, label="req/s")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
