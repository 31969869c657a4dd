"""What every bench script needs: ports, process control pinned to a CPU, CPU
accounting from /proc, and a check that the comparison tools are installed.
Imported by the scripts in this folder (``python bench/bench_*.py``)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
#: The proxy under test runs on CPU 0; load generators and origins on CPU 1.
PROXY_CPU = "0"
LOAD_CPU = "1"

#: Debian package for each tool a bench may drive.
PACKAGES = {"haproxy": "haproxy", "nginx": "nginx-light", "wrk": "wrk", "taskset": "util-linux", "openssl": "openssl"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, what: str, timeout: float = 15.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what}: nothing listening on 127.0.0.1:{port} after {timeout}s")


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process so far (from /proc), in seconds: user and kernel."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (from /proc), in seconds."""
    return sum(cpu_split(pid))


def check_tools(tools: tuple[str, ...] = ("haproxy", "nginx", "wrk", "taskset")) -> None:
    """Exit with the apt-get line to run when a tool is missing, or with one CPU."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)}; install with: "
                         f"apt-get install {' '.join(PACKAGES[m] for m in missing)}")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs (proxy on CPU 0, load and origin on CPU 1)")


class Procs:
    """Background processes pinned to a CPU, all stopped at exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], cpu: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["taskset", "-c", cpu, *argv], **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# -- the shared origin: one nginx worker answering 200 "ok" ------------------------


def nginx_common(tmp: Path, name: str) -> str:
    """The top of an nginx config: one worker in the foreground, files under ``tmp``."""
    return f"""
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 8192; }}
"""


def nginx_temp(tmp: Path, name: str) -> str:
    """nginx's temp paths under ``tmp`` (an unprivileged run cannot use the defaults)."""
    return "".join(f"    {k}_temp_path {tmp}/{name}-{k};\n"
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def start_origin(procs: Procs, tmp: Path) -> int:
    """One nginx worker on the load CPU answering ``200 "ok"`` with unlimited
    keep-alive: the origin every proxy under test forwards to."""
    port = free_port()
    conf = tmp / "origin.conf"
    conf.write_text(nginx_common(tmp, "origin") + f"""
http {{
    access_log off;
{nginx_temp(tmp, "origin")}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
""")
    procs.start(["nginx", "-p", str(tmp), "-c", str(conf)], LOAD_CPU, stderr=open(tmp / "origin.stderr", "w"))
    wait_port(port, f"origin nginx (see {tmp}/origin.stderr)")
    return port
