#!/usr/bin/env python3
"""L4 relay benchmark: lbtwist (``python -m lbtwist.l4``) against HAProxy in
``mode tcp`` (one thread), in front of the same local backends, in one run.

Two measures, each printed per contender with its ratio to HAProxy:
  - connections per second: ``wrk`` with ``Connection: close`` through the
    relay to one nginx worker answering ``200 ok`` (one TCP connection per
    request, so this is connection setup + a small exchange + teardown);
  - bulk MB/s: one TCP stream of ``--bulk`` bytes from a Python source through
    the relay to a Python sink.

For each it also prints the proxy's own CPU time per connection / per GiB
(from /proc): on a shared machine the rates swing with other load, the CPU
cost per unit of work much less, so both ratios are shown.

Method (see /work/shared/notes/performance-facts.md): every proxy runs on CPU 0,
load generators and origins on CPU 1 (taskset); contenders are interleaved
A B A B ... for ``--rounds`` rounds and the medians compared, because this
machine's absolute numbers drift between runs. Compare ratios, not absolutes.

Usage: .venv/bin/python bench/bench_l4.py [--rounds 3] [--duration 10]
       [--bulk 1GiB] [--variants tuned,stock] [--skip-bulk] [--skip-conns]
``--workers 1,2`` instead runs ``twistd lbtwist`` (tcp) with ``workers: 1``
and ``workers: 2`` side by side (bench/workersbench.py).

Variants of lbtwist: ``tuned`` (default levers: eager write, 1 MiB reads),
``lean`` (tuned + lean epoll reactor), ``stock`` (no levers: Twisted's
buffered writes and 64 KiB reads).
"""
from __future__ import annotations

import argparse
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
    LOAD_CPU, PROXY_CPU, PY, REPO, Procs, check_tools, cpu_seconds, free_port, start_origin, wait_port,
)

VARIANTS = {
    "tuned": [],
    "lean": ["--lean-reactor"],
    "stock": ["--no-eager", "--read-size", "0"],
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)(i?b?)", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]


# -- bulk source and sink (run as subprocesses on the load CPU) -----------------


def run_sink(port_file: str) -> None:
    """Accept connections one at a time; read to EOF; answer with the count."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    Path(port_file).write_text(str(ls.getsockname()[1]))
    buf = bytearray(1 << 20)
    while True:
        conn, _ = ls.accept()
        n = 0
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            n += k
        conn.sendall(b"%d\n" % n)
        conn.close()


def run_source(port: int, total: int) -> None:
    """Send ``total`` bytes, half-close, wait for the sink's count; print MB/s."""
    chunk = memoryview(os.urandom(1 << 20))
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    local = s.getsockname()
    t0 = time.perf_counter()
    left = total
    try:
        while left > 0:
            n = min(left, len(chunk))
            s.sendall(chunk[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        got = b""
        while not got.endswith(b"\n"):
            d = s.recv(64)
            if not d:
                break
            got += d
    except OSError as e:
        # What the soak needs to tell one failure from another: where it stopped and when.
        raise SystemExit(f"{type(e).__name__} {e} from 127.0.0.1:{local[1]} after {total - left} of {total} bytes "
                         f"sent, {time.perf_counter() - t0:.2f}s in")
    dt = time.perf_counter() - t0
    s.close()
    if int(got or b"0") != total:
        raise SystemExit(f"sink counted {got!r}, sent {total}")
    print(f"{total / dt / 1e6:.1f}")


# -- contenders ------------------------------------------------------------------


def start_sink(procs: Procs, tmp: Path) -> int:
    pf = tmp / "sink.port"
    procs.start([PY, __file__, "--role", "sink", str(pf)], LOAD_CPU)
    deadline = time.monotonic() + 10
    while not (pf.exists() and pf.read_text()):
        if time.monotonic() > deadline:
            raise SystemExit("sink did not start")
        time.sleep(0.05)
    return int(pf.read_text())


def start_haproxy(procs: Procs, tmp: Path, http_port: int, sink_port: int) -> tuple[tuple[int, int], tuple[int, int]]:
    fe_http, fe_bulk = free_port(), free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend fe_http
    bind 127.0.0.1:{fe_http}
    default_backend be_http
backend be_http
    server s1 127.0.0.1:{http_port}
frontend fe_bulk
    bind 127.0.0.1:{fe_bulk}
    default_backend be_bulk
backend be_bulk
    server s1 127.0.0.1:{sink_port}
"""
    )
    p = procs.start(["haproxy", "-db", "-f", str(cfg)], PROXY_CPU, stderr=open(tmp / "haproxy.stderr", "w"))
    wait_port(fe_http, f"haproxy (see {tmp}/haproxy.stderr)")
    wait_port(fe_bulk, f"haproxy (see {tmp}/haproxy.stderr)")
    # taskset execs haproxy: same pid. One process serves both frontends.
    return (fe_http, p.pid), (fe_bulk, p.pid)


def start_lbtwist(procs: Procs, backend_port: int, extra: list[str], stderr=None) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = procs.start(
        [PY, "-m", "lbtwist.l4", "--backend", f"127.0.0.1:{backend_port}", "--max-connections", "8000", *extra],
        PROXY_CPU, stdout=subprocess.PIPE, env=env, text=True, stderr=stderr,
    )
    line = p.stdout.readline()
    if not line.startswith("LISTENING"):
        raise SystemExit(f"lbtwist relay did not start: {line!r}")
    return int(line.split()[1]), p.pid


# -- measurements ------------------------------------------------------------------


def measure_conns(port: int, pid: int, duration: int, connections: int, keepalive: bool = False) -> tuple[float, float]:
    """(requests/s, proxy CPU microseconds per request); one connection per
    request unless ``keepalive``."""
    c0 = cpu_seconds(pid)
    close = [] if keepalive else ["-H", "Connection: close"]
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s",
         *close, f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    cpu = cpu_seconds(pid) - c0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if not m or not n:
        raise SystemExit(f"wrk output not understood:\n{out}")
    errors = re.search(r"Socket errors:.*|Non-2xx.*", out)
    if errors:
        print(f"      (wrk: {errors.group(0).strip()})")
    return float(m.group(1)), cpu / int(n.group(1)) * 1e6


class BulkFailed(Exception):
    """A bulk transfer through a named contender did not complete."""


def measure_bulk(port: int, pid: int, total: int, name: str) -> tuple[float, float]:
    """(MB/s, proxy CPU seconds per GiB); BulkFailed names the contender."""
    c0 = cpu_seconds(pid)
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, PY, __file__, "--role", "source", str(port), str(total)],
        capture_output=True, text=True, timeout=300,
    )
    if out.returncode != 0:
        raise BulkFailed(f"bulk source through {name} failed: {out.stderr.strip()}")
    cpu = cpu_seconds(pid) - c0
    return float(out.stdout.strip()), cpu / (total / 2**30)


def soak(ports: dict, args: argparse.Namespace, logs: dict[str, Path]) -> None:
    """Up to ``--soak`` runs (or ``--soak-minutes``): per run and contender, a
    ``--duration`` conns/s burst, then one bulk transfer, 256 MiB and 1 GiB
    alternately. Failures are counted per contender, never raised, and each is
    printed with the contender's log lines written since the run started."""
    names = list(ports)
    sizes = (256 << 20, 1 << 30)
    mbs: dict[str, list[float]] = {n: [] for n in names}
    fails: dict[str, list[str]] = {n: [] for n in names}
    deadline = time.monotonic() + args.soak_minutes * 60
    runs = 0
    print(f"soak: up to {args.soak} runs or {args.soak_minutes:g} min; contenders {', '.join(names)}; "
          f"burst {args.duration}s wrk -c{args.connections}, bulk 256 MiB / 1 GiB alternately", flush=True)
    for i in range(args.soak):
        if time.monotonic() > deadline:
            break
        total = sizes[i % 2]
        order = names if i % 2 else list(reversed(names))
        for n in order:
            if not args.skip_conns:
                measure_conns(*ports[n][0], args.duration, args.connections, args.keepalive)
            log = logs.get(n)
            mark = log.stat().st_size if log is not None and log.exists() else 0
            try:
                b, _ = measure_bulk(*ports[n][1], total, n)
            except (BulkFailed, subprocess.TimeoutExpired) as e:
                fails[n].append(f"run {i + 1} {total >> 20} MiB: {e}")
                print(f"  FAIL run {i + 1} {n} {total >> 20} MiB: {e}", flush=True)
                if log is not None and log.exists():
                    with open(log) as f:
                        f.seek(mark)
                        print("    log: " + f.read()[-4000:].replace("\n", "\n    log: "), flush=True)
                continue
            mbs[n].append(b)
        runs += 1
        if runs % 10 == 0 or runs == 1:
            line = "; ".join(f"{n} {statistics.median(mbs[n]) if mbs[n] else 0:.0f} MB/s {len(fails[n])} fail"
                             for n in names)
            print(f"  after {runs} runs (load {os.getloadavg()[0]:.2f}): {line}", flush=True)
    print(f"\nsoak done: {runs} runs")
    for n in names:
        v = mbs[n]
        fig = f"median {statistics.median(v):.0f} min {min(v):.0f} max {max(v):.0f} MB/s" if v else "no transfers"
        print(f"  {n:16s} {len(v)} ok, {len(fails[n])} failed; {fig}")
        for f in fails[n]:
            print(f"    {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description="lbtwist L4 relay vs HAProxy mode tcp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=50, help="wrk concurrent connections")
    ap.add_argument("--bulk", type=parse_size, default=1 << 30, help="bytes per bulk stream (e.g. 1GiB)")
    ap.add_argument("--variants", default="tuned,stock", help=f"lbtwist variants: {','.join(VARIANTS)}")
    ap.add_argument("--keepalive", action="store_true",
                    help="wrk over persistent connections (requests/s through the relay) instead of Connection: close")
    ap.add_argument("--skip-conns", action="store_true")
    ap.add_argument("--skip-bulk", action="store_true")
    ap.add_argument("--soak", type=int, default=0, metavar="N",
                    help="reproduction loop: N runs of (conns/s burst, bulk 256 MiB / 1 GiB) per contender")
    ap.add_argument("--soak-minutes", type=float, default=120.0, help="time bound of --soak")
    ap.add_argument("--workers", default=None, metavar="N,M",
                    help="instead: twistd lbtwist (tcp) with workers: N, M ... side by side: conns/s and CPU per "
                         "connection of master + workers, idle RSS (bench/workersbench.py)")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "sink":
        return run_sink(args.role_args[0])
    if args.role == "source":
        return run_source(int(args.role_args[0]), int(args.role_args[1]))

    if args.workers:
        return workers_mode(args)
    check_tools()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="bench_l4_"))
    try:
        http_port = start_origin(procs, tmp)
        sink_port = start_sink(procs, tmp)
        ports = {"haproxy": start_haproxy(procs, tmp, http_port, sink_port)}
        logs = {"haproxy": tmp / "haproxy.stderr"}
        for v in variants:
            # the relay's log (connect failures, closes) goes to a file the soak shows on a failure
            logs[f"lbtwist-{v}"] = tmp / f"lbtwist-{v}.log"
            log = open(logs[f"lbtwist-{v}"], "w")
            ports[f"lbtwist-{v}"] = (
                start_lbtwist(procs, http_port, [*VARIANTS[v], "--log"], stderr=log),
                start_lbtwist(procs, sink_port, [*VARIANTS[v], "--log"], stderr=log),
            )
        if args.soak:
            return soak(ports, args, logs)
        names = list(ports)
        rate_label, cost_label = ("req/s", "us/req") if args.keepalive else ("conns/s", "us/conn")
        conns: dict[str, list[float]] = {n: [] for n in names}
        conns_cpu: dict[str, list[float]] = {n: [] for n in names}
        bulk: dict[str, list[float]] = {n: [] for n in names}
        bulk_cpu: dict[str, list[float]] = {n: [] for n in names}
        print(f"load avg before: {os.getloadavg()[0]:.2f}; rounds={args.rounds} duration={args.duration}s "
              f"wrk -c{args.connections} bulk={args.bulk / 2**20:.0f} MiB")
        for r in range(1, args.rounds + 1):
            order = names if r % 2 else list(reversed(names))  # A B ... then ... B A
            for n in order:
                if not args.skip_conns:
                    c, cu = measure_conns(*ports[n][0], args.duration, args.connections, args.keepalive)
                    conns[n].append(c)
                    conns_cpu[n].append(cu)
                    print(f"  round {r} {n:16s} {rate_label} {c:10.0f}   proxy CPU {cu:6.0f} {cost_label}", flush=True)
                if not args.skip_bulk:
                    try:
                        b, bu = measure_bulk(*ports[n][1], args.bulk, n)
                    except BulkFailed as e:
                        log = logs.get(n)
                        tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
                        raise SystemExit(f"{e}\n{n} log (end):\n{tail}")
                    bulk[n].append(b)
                    bulk_cpu[n].append(bu)
                    print(f"  round {r} {n:16s} bulk MB/s {b:8.1f}   proxy CPU {bu:6.2f} s/GiB", flush=True)
        print(f"load avg after: {os.getloadavg()[0]:.2f}")
        print("\nmedians; ratio = lbtwist/haproxy for rates, haproxy/lbtwist for CPU cost (higher is better):")
        for label, table, higher_better in (
            (rate_label, conns, True),
            (cost_label, conns_cpu, False),
            ("bulk MB/s", bulk, True),
            ("s/GiB", bulk_cpu, False),
        ):
            if not table["haproxy"]:
                continue
            base = statistics.median(table["haproxy"])
            for n in names:
                med = statistics.median(table[n])
                ratio = med / base if higher_better else base / med
                print(f"  {label:10s} {n:16s} {med:10.2f}   x{ratio:.2f}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def workers_mode(args: argparse.Namespace) -> None:
    from workersbench import compare, parse_counts

    counts = parse_counts(args.workers)
    check_tools(("nginx", "wrk", "taskset"))
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="bench_l4_workers_"))
    try:
        origin = start_origin(procs, tmp)
        close = not args.keepalive
        compare(procs, tmp, counts, "tcp", origin, lambda port, what: wait_port(port, what), rounds=args.rounds,
                duration=args.duration, connections=args.connections, threads=2, close=close,
                label="conns/s" if close else "req/s")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
