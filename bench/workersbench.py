"""``--workers 1,2`` for bench_l7.py and bench_l4.py: the same lbtwist config
run as ``twistd lbtwist`` with ``workers: N`` for each N, side by side in one
run (issue #13).

On a 2-core box the proxy processes, wrk and the origin cannot be kept apart
(two workers need both cores), so nothing is pinned here: every process may
run on every core, and the load generator and origin take their share of
it. What is compared:

- requests (or connections) per second, the wrk figure;
- CPU per request: CPU time (user + kernel, from /proc) of the master and all
  its worker processes together, divided by the requests wrk completed.
  With no shared bottleneck it stays about the same with 2 workers;
- idle RSS of the master and of each worker, measured before any load.

N values are interleaved (1 2, then 2 1, ...) for ``--rounds`` and the
medians compared.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable

from benchlib import PY, REPO, Procs, cpu_split, free_port, wait_port


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the master and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + kernel) of ``pid`` and its descendants alive now.
    A worker replaced mid-run would lose its share: the bench fails if the
    process set changed (L{LbtwistWorkers.check_same})."""
    total = 0.0
    for p in tree(pid):
        try:
            u, k = cpu_split(p)
        except OSError:
            continue
        total += u + k
    return total


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_counts(text: str) -> list[int]:
    """``"1,2"`` -> [1, 2] (each at least 1, no repeats)."""
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--workers takes numbers like 1,2, not {text!r}") from None
    if not ns or any(n < 1 for n in ns) or len(set(ns)) != len(ns):
        raise SystemExit(f"--workers takes distinct numbers >= 1 like 1,2, not {text!r}")
    return ns


class LbtwistWorkers:
    """``twistd -n lbtwist`` with ``workers: n``: one listener on ``backend``."""

    def __init__(self, procs: Procs, tmp: Path, n: int, mode: str, backend: int) -> None:
        self.n, self.mode = n, mode
        self.port, self.admin = free_port(), free_port()
        listener = {"name": "bench", "bind": f"tcp:{self.port}:interface=127.0.0.1", "mode": mode,
                    "pool": "origin", "max_connections": 20000}
        cfg = {
            "workers": n,
            "listeners": [listener],
            "pools": [{"name": "origin", "backends": [{"address": f"127.0.0.1:{backend}"}],
                       "limits": {"max_connections": 20000, "max_requests": 20000, "max_pending": 20000}}],
            "admin": {"bind": f"tcp:{self.admin}:interface=127.0.0.1"},
        }
        self.path = tmp / f"lbtwist-{mode}-w{n}.yaml"
        self.path.write_text(json.dumps(cfg, indent=2) + "\n")  # JSON is YAML
        self.log_path = tmp / f"lbtwist-{mode}-w{n}.log"
        twistd = str(Path(PY).with_name("twistd"))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        all_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        self.proc = procs.start([twistd, "-n", "--pidfile=", "lbtwist", "--config", str(self.path)], all_cpus,
                                stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=str(tmp))
        self.pid = self.proc.pid
        self.pids: list[int] = []

    def wait_ready(self, ready: Callable[[int, str], None], timeout: float = 60.0) -> None:
        """Until the port serves and the master has its n workers."""
        wait_port(self.admin if self.n > 1 else self.port, f"lbtwist workers={self.n} (see {self.log_path})", timeout)
        deadline = time.monotonic() + timeout
        while True:
            pids = tree(self.pid)
            # taskset execs twistd in place: the tree is the master (or the single process) and its workers
            workers = [p for p in pids if p != self.pid]
            if (self.n == 1 and not workers) or (self.n > 1 and len(self._api_workers()) == self.n):
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"lbtwist workers={self.n}: not ready after {timeout:g}s (see {self.log_path}):\n"
                                 + self.log_path.read_text()[-3000:])
            time.sleep(0.2)
        ready(self.port, f"lbtwist workers={self.n}")
        self.pids = tree(self.pid)

    def _api_workers(self) -> list[dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/api/workers", timeout=2) as r:
                return json.loads(r.read()).get("workers", [])
        except Exception:
            return []

    def idle_rss(self) -> tuple[int | None, list[int | None]]:
        """(master KiB, [each worker's KiB]); with n 1 the single process is the 'master'."""
        return rss_kib(self.pid), [rss_kib(p) for p in self.pids if p != self.pid]

    def check_same(self) -> None:
        now = tree(self.pid)
        if sorted(now) != sorted(self.pids):
            raise SystemExit(f"lbtwist workers={self.n}: its processes changed during the run "
                             f"({sorted(self.pids)} -> {sorted(now)}; see {self.log_path})")


def run_wrk(port: int, pid: int, duration: int, connections: int, threads: int, close: bool) -> tuple[float, float, float]:
    """(requests/s, p99 ms, CPU us per request of the whole lbtwist process tree)."""
    c0 = tree_cpu(pid)
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", *extra, f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout
    c1 = tree_cpu(pid)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    if not (rps and n and p99):
        raise SystemExit(f"wrk output not understood:\n{out}")
    bad = re.search(r"Socket errors:.*|Non-2xx.*", out)
    if bad:
        print(f"      (wrk: {bad.group(0).strip()})")
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[p99.group(2)]
    return float(rps.group(1)), float(p99.group(1)) * unit, (c1 - c0) * 1e6 / int(n.group(1))


def compare(procs: Procs, tmp: Path, counts: list[int], mode: str, backend: int, ready: Callable[[int, str], None],
            *, rounds: int, duration: int, connections: int, threads: int, close: bool, label: str) -> None:
    """Start one lbtwist per count, measure them interleaved, print the table."""
    runs = {n: LbtwistWorkers(procs, tmp, n, mode, backend) for n in counts}
    for r in runs.values():
        r.wait_ready(ready)
    time.sleep(2.0)  # idle: the start-up garbage settled
    print(f"\nlbtwist --workers {','.join(map(str, counts))} ({mode}, {label}); nothing pinned: proxy, wrk "
          f"(-t{threads} -c{connections}) and origin share all {len(os.sched_getaffinity(0))} cores; "
          f"load avg before {os.getloadavg()[0]:.2f}")
    for n, r in runs.items():
        master, workers = r.idle_rss()
        who = "single process" if n == 1 else "master"
        ws = ", ".join(f"{w / 1024:.1f}" if w else "?" for w in workers)
        print(f"  idle RSS workers={n}: {who} {master / 1024 if master else 0:.1f} MiB" + (f"; workers {ws} MiB" if workers else ""))
    table: dict[int, dict[str, list[float]]] = {n: {"rate": [], "p99": [], "cpu": []} for n in counts}
    for i in range(1, rounds + 1):
        order = counts if i % 2 else list(reversed(counts))
        for n in order:
            r = runs[n]
            rate, p99, cpu = run_wrk(r.port, r.pid, duration, connections, threads, close)
            r.check_same()
            table[n]["rate"].append(rate)
            table[n]["p99"].append(p99)
            table[n]["cpu"].append(cpu)
            print(f"  round {i} workers={n}: {rate:9.0f} {label}   p99 {p99:7.2f} ms   CPU {cpu:6.1f} us per "
                  f"{'connection' if close else 'request'} (master + workers)", flush=True)
    print(f"  load avg after {os.getloadavg()[0]:.2f}")
    base = counts[0]
    b_rate = statistics.median(table[base]["rate"])
    b_cpu = statistics.median(table[base]["cpu"])
    print(f"  medians (x = ratio to workers={base}):")
    for n in counts:
        m_rate = statistics.median(table[n]["rate"])
        m_cpu = statistics.median(table[n]["cpu"])
        print(f"    workers={n}: {m_rate:9.0f} {label} (x{m_rate / b_rate:.2f})   p99 "
              f"{statistics.median(table[n]['p99']):7.2f} ms   CPU {m_cpu:6.1f} us (x{m_cpu / b_cpu:.2f})")
