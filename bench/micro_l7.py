"""Micro-benchmark: the Python cost of one proxied keep-alive GET through the
real L7 objects (listener factory, client protocol, exchange, retry state,
pool, connection pool, backend connection, both parsers and head builders),
with in-memory transports: no sockets, no reactor dispatch, no syscalls.

What is left out is what ``bench_l7.py`` adds on a real box (the poll loop,
recv/send and the kernel); what is in is every per-request line of lbtwist,
so this number moves with code changes and barely with machine load.

    .venv/bin/python bench/micro_l7.py [--requests N] [--repeats R] [--split] [--profile]

``--split`` prints the request side (client read to backend write) and the
response side (backend read to client write) apart; ``--profile`` prints a
cProfile table of one run instead (call counts per request are exact).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from lbtwist.config.model import (  # noqa: E402
    BackendConfig,
    ConnectionPoolConfig,
    ListenerConfig,
    PoolConfig,
)
from lbtwist.registry import Registry  # noqa: E402
from lbtwist.service import serve_one_listener  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 02:30:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class _Transport(StringTransport):
    """Keeps only the last write and counts them (a StringTransport would grow)."""

    writes = 0
    last = b""

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1


def build() -> tuple:
    """A listener over one backend, one client connection and one pooled
    backend connection, after a first exchange (so the next ones reuse it)."""
    reactor = MemoryReactorClock()
    pcfg = PoolConfig(name="bench", algorithm="round_robin", drain_timeout=1.0,
                      backends=[BackendConfig(address="127.0.0.1:9")],
                      connection_pool=ConnectionPoolConfig(max_requests=10**9))
    lcfg = ListenerConfig(name="http", bind="tcp:0:interface=127.0.0.1", mode="http", pool="bench")
    with contextlib.redirect_stdout(io.StringIO()):  # serve_one_listener prints LISTENING
        svc, _ = serve_one_listener(reactor, lcfg, pcfg, Registry.default(entry_points=False))
    client = svc.proxy.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    client_t = _Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    client.makeConnection(client_t)
    client.dataReceived(REQUEST)
    backend = reactor.tcpClients[-1][2].buildProtocol(None)
    backend.makeConnection(_Transport())
    backend.dataReceived(RESPONSE)
    if not client_t.last.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"no response relayed: {client_t.last!r}")
    return reactor, client, client_t, backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--split", action="store_true", help="request and response sides apart")
    ap.add_argument("--profile", action="store_true", help="cProfile one run instead")
    args = ap.parse_args()
    reactor, client, client_t, backend = build()
    n = args.requests
    send_request, send_response = client.dataReceived, backend.dataReceived

    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            send_request(REQUEST)
            send_response(RESPONSE)
        return (time.perf_counter() - t) / n * 1e6

    run()  # warm up
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run()
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"{stats.total_calls / n:.1f} Python-visible calls per request")
        stats.sort_stats("tottime").print_stats(30)
        return
    if args.split:
        clock = time.perf_counter
        best_a = best_b = float("inf")
        for _ in range(args.repeats):
            a = b = 0.0
            for _ in range(n):
                t0 = clock()
                send_request(REQUEST)
                t1 = clock()
                send_response(RESPONSE)
                b += clock() - t1
                a += t1 - t0
            best_a, best_b = min(best_a, a), min(best_b, b)
        print(f"request side {best_a / n * 1e6:.2f} us, response side {best_b / n * 1e6:.2f} us "
              f"(min of {args.repeats}, timer calls included)")
        return
    w0 = client_t.writes
    best = min(run() for _ in range(args.repeats))
    if client_t.writes - w0 != n * args.repeats or len(reactor.tcpClients) != 1:
        raise SystemExit("requests were not all answered on the one pooled connection")
    print(f"{best:.2f} us per proxied request (min of {args.repeats} x {n})")


if __name__ == "__main__":
    main()
