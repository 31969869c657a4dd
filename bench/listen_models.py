"""How worker processes should share a listening port, measured on this box.

Three models, two worker processes each, 1000 connections from one client
process (each: connect, send a byte, read the answer), in batches of 20 open at once; one worker SIGKILLed
while a batch is queued (a replacement starts at once where the model has one):

  reuseport       each worker binds its own SO_REUSEPORT socket
  shared          the master binds one socket and passes the same fd to both
  master-held     the master binds one SO_REUSEPORT socket per worker slot,
                  passes each down and keeps its copy (what lbtwist does)

Prints per model: connections served by each worker, and how many failed.
Usage: python bench/listen_models.py [--conns 1000]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time


def serve(sock: socket.socket, tag: bytes) -> None:
    """Worker: accept forever, answer each connection with its tag."""
    sock.setblocking(True)
    while True:
        c, _ = sock.accept()
        try:
            c.recv(1)
            time.sleep(0.003)  # a little work per connection
            c.sendall(tag)
        except OSError:
            pass
        c.close()


def fork_worker(sock: socket.socket, tag: bytes) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            serve(sock, tag)
        finally:
            os._exit(0)
    return pid


def rp_socket(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def run(model: str, conns: int, kill_at: int) -> tuple[dict, int]:
    port = rp_socket(0).getsockname()[1]  # a free port (this socket is dropped)
    pids: dict[bytes, int] = {}
    held: list[socket.socket] = []
    if model == "shared":
        s = rp_socket(port)
        held.append(s)
        for tag in (b"A", b"B"):
            pids[tag] = fork_worker(s, tag)
    else:
        for tag in (b"A", b"B"):
            s = rp_socket(port)
            pids[tag] = fork_worker(s, tag)
            if model == "master-held":
                held.append(s)
            else:
                s.close()  # only the worker holds it
    time.sleep(0.3)
    counts: dict[str, int] = {}
    failed = 0
    batch = 20
    for start in range(0, conns, batch):
        socks = []
        for i in range(start, min(conns, start + batch)):
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                c.sendall(b"x")
                socks.append(c)
            except OSError:
                failed += 1
        if start <= kill_at < start + batch:  # connections queued on A's socket right now
            os.kill(pids[b"A"], signal.SIGKILL)
            os.waitpid(pids[b"A"], 0)
            if model == "master-held":  # the replacement takes the dead one's socket
                pids[b"A2"] = fork_worker(held[0], b"C")
            elif model == "reuseport":  # a replacement binds a new socket
                s = rp_socket(port)
                pids[b"A2"] = fork_worker(s, b"C")
                s.close()
            else:
                pids[b"A2"] = fork_worker(held[0], b"C")
        for c in socks:
            try:
                tag = c.recv(1)
                if tag:
                    counts[tag.decode()] = counts.get(tag.decode(), 0) + 1
                else:
                    failed += 1
            except OSError:
                failed += 1
            c.close()
    for tag, pid in pids.items():
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    for s in held:
        s.close()
    return counts, failed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    try:
        migrate = open("/proc/sys/net/ipv4/tcp_migrate_req").read().strip()
    except OSError:
        migrate = "?"
    print(f"net.ipv4.tcp_migrate_req = {migrate}; {a.conns} connections, worker A killed at {a.conns * 3 // 10}")
    for model in ("reuseport", "shared", "master-held"):
        for r in range(a.rounds):
            counts, failed = run(model, a.conns, a.conns * 3 // 10)
            print(f"{model:12s} round {r + 1}: served {dict(sorted(counts.items()))} failed {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
