# -*- test-case-name: tests.test_drill_flood -*-
"""The hostile clients of the flood drill, as their own process
(``python -m lbtwist.drill.flood --port P ...``), so their work does not share
a CPU loop with the drill's measured background client.

Three kinds of connection, all to one ``127.0.0.1`` port, all bounded in count
and time (the process exits by itself after ``--duration``):

  - **slowloris**: ``--slowloris N`` connections, each sending a request head
    one byte every ``--interval`` seconds and never finishing it; a connection
    the server cuts is reopened (the attacker keeps N open).
  - **idle**: ``--idle N`` connections that never send a byte; reopened when cut.
  - **connect flood**: ``--connect-rate R`` new connections a second, closed as
    soon as they are established.

Opening is paced at ``--ramp`` connections a second (a hostile client opens
as fast as it can; the bound keeps the drill's own box usable). Once a second
it prints one JSON line of counters (``held_slow``, ``held_idle``, ``opened``,
``cut``, ``connects``, ``connect_failed``, ``errors``) that the drill reads.

The process raises its own ``RLIMIT_NOFILE`` to the hard limit.
"""
from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import socket
import sys
import time
from collections import deque
from typing import Any

#: What a slowloris connection trickles, one byte at a time (never ends the head).
SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: flood\r\nX-Slow: " + b"a" * 4096

SLOW, IDLE, FLASH = "slow", "idle", "flash"


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's open-file limit towards ``want`` (default: the hard
    limit); returns the soft limit now in force. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(hard, max(soft, want))
    if hard == resource.RLIM_INFINITY and want is None:
        target = max(soft, 65536)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class _Conn:
    __slots__ = ("sock", "kind", "connected", "sent", "next_at")

    def __init__(self, sock: socket.socket, kind: str) -> None:
        self.sock = sock
        self.kind = kind
        self.connected = False
        self.sent = 0
        self.next_at = 0.0


class Flood:
    """One attacker process's state and loop (blocking; run from ``main``)."""

    def __init__(self, host: str, port: int, *, slowloris: int, idle: int, connect_rate: float,
                 interval: float, ramp: float, duration: float, sources: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost") and not host.startswith("127."):
            raise ValueError(f"the flood attacks loopback only, not {host!r}")
        if not 0 <= sources <= 250:
            raise ValueError(f"sources must be 0..250 loopback addresses, not {sources}")
        self.addr = (host, port)
        #: Source addresses the connections are spread over (127.0.0.2 ...),
        #: as a flood from many hosts; none: the kernel's choice (127.0.0.1).
        self.sources = [f"127.0.0.{2 + i}" for i in range(sources)]
        self._next_source = 0
        self.want = {SLOW: slowloris, IDLE: idle}
        self.connect_rate = connect_rate
        self.interval = interval
        self.ramp = ramp
        self.duration = duration
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.open = {SLOW: 0, IDLE: 0}
        self.held = {SLOW: 0, IDLE: 0}
        self.counts = {"opened": 0, "cut": 0, "connects": 0, "connect_failed": 0, "errors": 0}
        #: slowloris connections by when their next byte is due (FIFO: the interval is fixed)
        self.trickle: deque[_Conn] = deque()

    def _open(self, kind: str, now: float) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            if self.sources:
                s.bind((self.sources[self._next_source % len(self.sources)], 0))
                self._next_source += 1
            s.connect_ex(self.addr)
        except OSError:
            s.close()
            self.counts["errors"] += 1
            return False
        c = _Conn(s, kind)
        self.conns[s.fileno()] = c
        self.sel.register(s, selectors.EVENT_WRITE, c)
        self.counts["opened"] += 1
        if kind in self.open:
            self.open[kind] += 1
        return True

    def _drop(self, c: _Conn, cut: bool) -> None:
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(c.sock.fileno(), None)
        if c.kind in self.open:
            self.open[c.kind] -= 1
            if c.connected:
                self.held[c.kind] -= 1
        if cut:
            self.counts["cut"] += 1
        c.sock.close()
        c.sock = None  # type: ignore[assignment]

    def _established(self, c: _Conn, now: float) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.counts["connect_failed"] += 1
            self._drop(c, cut=False)
            return
        c.connected = True
        if c.kind == FLASH:
            self.counts["connects"] += 1
            self._drop(c, cut=False)
            return
        self.held[c.kind] += 1
        self.sel.modify(c.sock, selectors.EVENT_READ, c)
        if c.kind == SLOW:
            c.next_at = now
            self.trickle.append(c)

    def _readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # cut by the server (an answer such as 408 is read first, then EOF)
            self._drop(c, cut=True)

    def _trickle(self, now: float) -> None:
        q = self.trickle
        while q and (q[0].sock is None or q[0].next_at <= now):
            c = q.popleft()
            if c.sock is None:
                continue
            try:
                c.sock.send(SLOW_HEAD[c.sent % len(SLOW_HEAD):][:1])
                c.sent += 1
            except BlockingIOError:
                pass
            except OSError:
                self._drop(c, cut=True)
                continue
            c.next_at = now + self.interval
            q.append(c)
            if q[0] is c:
                break

    def run(self, out: Any = sys.stdout) -> dict[str, Any]:
        start = time.monotonic()
        end = start + self.duration
        budget = 0.0  # connections we may open now (paced at ramp/s)
        flash_budget = 0.0
        last = start
        report_at = start + 1.0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            dt = now - last
            last = now
            budget = min(budget + dt * self.ramp, self.ramp / 10 + 1)
            flash_budget = min(flash_budget + dt * self.connect_rate, self.connect_rate / 10 + 1)
            for kind in (SLOW, IDLE):
                while self.open[kind] < self.want[kind] and budget >= 1:
                    budget -= 1
                    if not self._open(kind, now):
                        break
            while flash_budget >= 1:
                flash_budget -= 1
                self._open(FLASH, now)
            self._trickle(now)
            for key, ev in self.sel.select(timeout=0.01):
                c: _Conn = key.data
                if c.sock is None:
                    continue
                if not c.connected:
                    self._established(c, now)
                elif ev & selectors.EVENT_READ:
                    self._readable(c)
            if now >= report_at:
                report_at += 1.0
                self._report(now - start, out)
        status = self._report(time.monotonic() - start, out, final=True)
        for c in list(self.conns.values()):
            self._drop(c, cut=False)
        self.sel.close()
        return status

    def _report(self, t: float, out: Any, final: bool = False) -> dict[str, Any]:
        status = {"t": round(t, 2), "held_slow": self.held[SLOW], "held_idle": self.held[IDLE], **self.counts}
        if final:
            status["final"] = True
        out.write("flood " + json.dumps(status) + "\n")
        out.flush()
        return status


def parse_status(line: str) -> dict[str, Any] | None:
    """The counters of one ``flood {...}`` line, else None."""
    if not line.startswith("flood {"):
        return None
    try:
        return json.loads(line[6:])
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lbtwist.drill.flood", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--slowloris", type=int, default=0)
    ap.add_argument("--idle", type=int, default=0)
    ap.add_argument("--connect-rate", type=float, default=0.0)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between two slowloris bytes")
    ap.add_argument("--ramp", type=float, default=2000.0, help="new held connections a second at most")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--sources", type=int, default=0,
                    help="spread connections over this many loopback source addresses (127.0.0.2 ...), 0..250")
    a = ap.parse_args(argv)
    if a.duration <= 0 or a.duration > 3600:
        ap.error("--duration must be in (0, 3600] seconds")
    if a.slowloris + a.idle > 20000 or a.connect_rate > 5000:
        ap.error("bounded: at most 20000 held connections and 5000 connects/s")
    limit = raise_nofile(a.slowloris + a.idle + int(a.connect_rate) + 256)
    if limit < a.slowloris + a.idle + 64:
        print(f"flood: open-file limit {limit} is below {a.slowloris + a.idle} connections", file=sys.stderr)
        return 2
    from lbtwist.drill.procs import die_with_parent

    die_with_parent()
    Flood(a.host, a.port, slowloris=a.slowloris, idle=a.idle, connect_rate=a.connect_rate,
          interval=a.interval, ramp=a.ramp, duration=a.duration, sources=a.sources).run()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:
        if e.errno == errno.EMFILE:
            print("flood: out of file descriptors", file=sys.stderr)
            sys.exit(2)
        raise
