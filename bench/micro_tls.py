"""Micro-benchmark: the Python cost of one proxied keep-alive GET over TLS,
through the real objects (lbtwist's TLS termination in front of the L7
listener, as every ``tls:`` http listener runs) with in-memory transports:
no sockets, no reactor dispatch, no syscalls, but real OpenSSL records.

The client is a pyOpenSSL memory-BIO connection that encrypts the requests
beforehand (so their encryption is not timed); the server's records are
counted and thrown away (TLS 1.3 needs no reply from the client). Each read
runs inside a simulated lean-reactor poll pass (``fastio``'s batch active
while the read is dispatched, flushed after it), so the TLS layer's
end-of-pass path is the one measured, as in production.

    .venv/bin/python bench/micro_tls.py [--requests N] [--repeats R] [--body BYTES] [--profile]

Compare with ``bench/micro_l7.py`` (the same exchange without TLS): the
difference is the TLS layer's cost per request.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

from OpenSSL import SSL  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from lbtwist import fastio  # noqa: E402
from lbtwist.config.model import (  # noqa: E402
    BackendConfig,
    CertificateConfig,
    ConnectionPoolConfig,
    ListenerConfig,
    ListenerTLSConfig,
    PoolConfig,
)
from lbtwist.registry import Registry  # noqa: E402
from lbtwist.service import serve_one_listener  # noqa: E402
from lbtwist.tls.context import ServerTLS  # noqa: E402
from lbtwist.tls.server import wrap_server_factory  # noqa: E402
from lbtwist.tls.testing import TestCA  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"


def response(body: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 02:30:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % body) + b"x" * body


class _Wire(StringTransport):
    """The TCP transport under the TLS layer: keeps what is written until
    taken (during the handshake), then only counts (a StringTransport would grow)."""

    keep = True
    writes = 0
    nbytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.nbytes += len(data)
        if self.keep:
            super().write(data)

    def take(self) -> bytes:
        v = self.value()
        self.clear()
        return v


class _Backend(StringTransport):
    def write(self, data: bytes) -> None:
        self.last = data


def in_pass(fn, data: bytes) -> None:
    """``fn(data)`` as the lean reactor dispatches a read: batch active, flushed after."""
    batch = fastio._batch
    batch.active = True
    try:
        fn(data)
    finally:
        batch.flush()


def build(body: int):
    work = tempfile.mkdtemp(prefix="micro-tls-")
    leaf = TestCA().issue("bench.test")
    cert, key = leaf.write(work, "bench")
    reactor = MemoryReactorClock()
    tls_cfg = ListenerTLSConfig(certificates=[CertificateConfig(cert=cert, key=key)])
    pcfg = PoolConfig(name="bench", algorithm="round_robin", drain_timeout=1.0,
                      backends=[BackendConfig(address="127.0.0.1:9")],
                      connection_pool=ConnectionPoolConfig(max_requests=10**9))
    lcfg = ListenerConfig(name="https", bind="tcp:0:interface=127.0.0.1", mode="http", pool="bench", tls=tls_cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # serve_one_listener prints LISTENING
        svc, _ = serve_one_listener(reactor, lcfg, pcfg, Registry.default(entry_points=False))
    factory = wrap_server_factory(svc.proxy, ServerTLS.for_listener(lcfg, reactor), reactor)
    addr = IPv4Address("TCP", "127.0.0.1", 5555)
    server = factory.buildProtocol(addr)
    wire = _Wire(peerAddress=addr)
    server.makeConnection(wire)

    cctx = SSL.Context(SSL.TLS_METHOD)
    cctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    cctx.set_alpn_protos([b"http/1.1"])
    client = SSL.Connection(cctx, None)
    client.set_tlsext_host_name(b"bench.test")
    client.set_connect_state()
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            out = client.bio_read(65536)
        except SSL.WantReadError:
            out = b""
        if out:
            in_pass(server.dataReceived, out)
        back = wire.take()
        if back:
            client.bio_write(back)
        elif not out:
            break
    resp = response(body)

    def encrypted_requests(n: int) -> list[bytes]:
        recs = []
        for _ in range(n):
            client.send(REQUEST)
            recs.append(client.bio_read(65536))
        return recs

    # The first exchange opens the pooled backend connection.
    in_pass(server.dataReceived, encrypted_requests(1)[0])
    backend = reactor.tcpClients[-1][2].buildProtocol(None)
    backend.makeConnection(_Backend())
    in_pass(backend.dataReceived, resp)
    client.bio_write(wire.take())
    got = client.recv(65536)
    if not got.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"no response relayed: {got[:200]!r}")
    wire.keep = False
    return reactor, server, wire, backend, encrypted_requests, resp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--body", type=int, default=2, help="response body bytes")
    ap.add_argument("--profile", action="store_true", help="cProfile one run instead")
    ap.add_argument("--twisted-records", action="store_true",
                    help="Twisted's own record I/O instead of lbtwist.tls.records (for comparison)")
    args = ap.parse_args()
    if args.twisted_records:
        from lbtwist.tls.server import TLSServerProtocol

        TLSServerProtocol.lbtwist_records = False
    reactor, server, wire, backend, encrypted_requests, resp = build(args.body)
    n = args.requests
    batch = fastio._batch

    def run() -> float:
        recs = encrypted_requests(n)
        server_read, backend_read = server.dataReceived, backend.dataReceived
        t = time.thread_time()  # CPU time: preemption on a loaded box is not counted
        for rec in recs:
            batch.active = True
            server_read(rec)
            batch.flush()
            batch.active = True
            backend_read(resp)
            batch.flush()
        return (time.thread_time() - t) / n * 1e6

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
    w0, b0 = wire.writes, wire.nbytes
    best = min(run() for _ in range(args.repeats))
    total = n * args.repeats
    if len(reactor.tcpClients) != 1 or wire.nbytes - b0 < total * len(resp):
        raise SystemExit("requests were not all answered on the one pooled connection")
    print(f"{best:.2f} us per proxied TLS request, {args.body}-byte body (min of {args.repeats} x {n}); "
          f"{(wire.writes - w0) / total:.2f} transport writes per response")


if __name__ == "__main__":
    main()
