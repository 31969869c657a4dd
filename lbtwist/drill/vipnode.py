# -*- test-case-name: tests.test_drill_failover -*-
"""The processes of the balancer-failover drill that run inside its network
namespaces (``python -m lbtwist.drill.vipnode backend|client ...``).

``backend PORT...``: answers every HTTP request with 200 and an
``X-Served-Via`` header naming the address the request came from, i.e. which
balancer of the pair forwarded it.

``client --host VIP --port P --rate R``: an open-loop client. Arrivals follow
a Poisson schedule fixed by the rate, whatever the VIP does; every request
is one try on a fresh connection with ``--timeout`` for the whole exchange
(no retry, so each failure is one request a user saw fail). One line per
finished request on stdout: ``R <scheduled> <sent> <done> <outcome> <via>``
(wall-clock seconds, shared with the drill process). It stops issuing when
stdin says ``stop`` (or closes) or after ``--max-duration``, waits for what
is in flight (bounded by the timeout) and prints ``done``.

The client refuses to run in its parent's network namespace unless the
address is loopback: the drill only ever talks to addresses inside namespaces it
created.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

from lbtwist.drill.procs import die_with_parent

REFUSED, RESET, TIMEOUT, CONNECT_ERROR, BAD = "refused", "reset", "timeout", "connect-error", "bad-answer"


def in_root_netns() -> bool:
    """Is this process in the network namespace of the drill that started it
    (its parent: ``ip netns exec`` execs), i.e. not in one the drill made?
    Unknown counts as yes."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat(f"/proc/{os.getppid()}/ns/net").st_ino
    except OSError:
        return True


def _guard(host: str) -> None:
    if not host.startswith("127.") and in_root_netns():
        raise SystemExit(f"vipnode: refusing {host}: outside a drill namespace only 127.0.0.0/8 may be used")


def backend_main(ports: list[int]) -> None:
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Via(resource.Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            peer = request.getClientAddress()
            request.setHeader(b"x-served-via", getattr(peer, "host", "?").encode())
            request.setHeader(b"content-type", b"text/plain")
            return b"ok\n"

    site = server.Site(Via())
    site.log = lambda request: None  # type: ignore[method-assign]
    for p in ports:
        reactor.listenTCP(p, site, backlog=1024)
    print(f"backend ready on {ports}", flush=True)
    reactor.run()


def client_main(host: str, port: int, rate: float, timeout: float, max_duration: float, seed: int) -> None:
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import ClientFactory, Protocol
    from twisted.protocols.basic import LineReceiver

    _guard(host)
    request = f"GET /work HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: lbtwist-drill\r\n\r\n".encode()
    rng = random.Random(seed)
    state = {"open": 0, "stopping": False, "next": None}
    out = sys.stdout

    def emit(t_sched: float, t_sent: float, outcome: str, via: str) -> None:
        out.write(f"R {t_sched:.4f} {t_sent:.4f} {time.time():.4f} {outcome} {via or '-'}\n")

    class Exchange(Protocol):
        def __init__(self, att: "Attempt") -> None:
            self.att = att
            self.buf = b""

        def connectionMade(self) -> None:
            self.transport.write(request)

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            head, sep, body = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[1].isdigit():
                self.att.finish(BAD)
                self.transport.abortConnection()
                return
            length, via = 0, ""
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length" and v.strip().isdigit():
                    length = int(v.strip())
                elif k == b"x-served-via":
                    via = v.strip().decode("ascii", "replace")
            if len(body) >= length:
                self.att.finish(parts[1].decode(), via)
                self.transport.abortConnection()

        def connectionLost(self, reason: Any = None) -> None:
            self.att.finish(RESET)

    class Attempt(ClientFactory):
        noisy = False

        def __init__(self, t_sched: float) -> None:
            self.t_sched = t_sched
            self.t_sent = time.time()
            self.done = False
            self.timer = reactor.callLater(timeout, self.expire)
            self.proto: Exchange | None = None
            self.connector = reactor.connectTCP(host, port, self, timeout=timeout + 1)

        def buildProtocol(self, addr: Any) -> Exchange:
            self.proto = Exchange(self)
            return self.proto

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            from twisted.internet import error

            self.finish(REFUSED if reason.check(error.ConnectionRefusedError) else CONNECT_ERROR)

        def expire(self) -> None:
            self.timer = None
            self.finish(TIMEOUT)
            if self.proto is not None and self.proto.transport is not None:
                self.proto.transport.abortConnection()
            else:
                self.connector.disconnect()

        def finish(self, outcome: str, via: str = "") -> None:
            if self.done:
                return
            self.done = True
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            emit(self.t_sched, self.t_sent, outcome, via)
            state["open"] -= 1
            maybe_done()

    t0 = time.time() + 0.05
    deadline = t0 + max_duration
    arrivals = [t0]

    def fire() -> None:
        now = time.time()
        while arrivals[0] <= now and not state["stopping"]:
            t = arrivals[0]
            if t >= deadline:
                stop()
                return
            state["open"] += 1
            Attempt(t)
            arrivals[0] = t + rng.expovariate(rate)
        if not state["stopping"]:
            state["next"] = reactor.callLater(max(0.0, arrivals[0] - time.time()), fire)

    def stop() -> None:
        if state["stopping"]:
            return
        state["stopping"] = True
        nxt = state["next"]
        if nxt is not None and nxt.active():
            nxt.cancel()
        maybe_done()

    def maybe_done() -> None:
        if state["stopping"] and state["open"] == 0 and reactor.running:
            out.write("done\n")
            out.flush()
            reactor.stop()

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"stop":
                reactor.callLater(0, stop)

        def connectionLost(self, reason: Any = None) -> None:
            reactor.callLater(0, stop)

    def flush() -> None:
        out.flush()
        reactor.callLater(0.2, flush)

    # stdin carries the drill's "stop"; the records go to stdout through
    # sys.stdout, so StandardIO gets /dev/null as its (unused) output
    stdio.StandardIO(Control(), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    print(f"client ready: {rate:g}/s to {host}:{port}", flush=True)
    reactor.callLater(max(0.0, t0 - time.time()), fire)
    flush()
    reactor.run()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lbtwist.drill.vipnode")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backend")
    b.add_argument("ports", type=int, nargs="+")
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--rate", type=float, required=True)
    c.add_argument("--timeout", type=float, default=1.0)
    c.add_argument("--max-duration", type=float, default=300.0)
    c.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    die_with_parent()
    if args.cmd == "backend":
        backend_main(args.ports)
    else:
        client_main(args.host, args.port, args.rate, args.timeout, args.max_duration, args.seed)


if __name__ == "__main__":
    main()
