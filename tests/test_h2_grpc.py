"""gRPC through lbtwist with real grpcio peers (generic handlers, no protoc):
client (h2c prior knowledge) -> lbtwist (``http2: true``) -> grpcio server
(``pools[].protocol: h2``). Unary, server-streaming, client-streaming and
bidi calls, the backend's own status and trailers relayed, and lbtwist's own
failures answered as gRPC statuses (UNAVAILABLE with no backend or a refused
connect, RESOURCE_EXHAUSTED at a rate limit). grpcio calls block, so they run
in threads; each has a deadline."""
from __future__ import annotations

import textwrap
from concurrent import futures

import grpc
import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from lbtwist.config import load_config
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


def _not_found(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


@pytest.fixture
def grpc_server():
    handlers = grpc.method_handlers_generic_handler("t.Echo", {
        "U": grpc.unary_unary_rpc_method_handler(lambda r, c: b"echo:" + r),
        "SS": grpc.unary_stream_rpc_method_handler(lambda r, c: (r + b"%d" % i for i in range(3))),
        "CS": grpc.stream_unary_rpc_method_handler(lambda it, c: b"+".join(it)),
        "B": grpc.stream_stream_rpc_method_handler(lambda it, c: (m.upper() for m in it)),
        "NF": grpc.unary_unary_rpc_method_handler(_not_found),
    })
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    srv.add_generic_rpc_handlers((handlers,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield port
    srv.stop(0)


class LB:
    def __init__(self, backends: list[str], route: str = "", pool: str = "") -> None:
        bl = ", ".join(f"{{address: '{b}'}}" for b in backends)
        text = f"""
        listeners:
          - name: grpc
            bind: "tcp:0:interface=127.0.0.1"
            mode: http
            http2: true
            routes:
              - {{pool: app{route}}}
        pools:
          - name: app
            protocol: h2
            algorithm: round_robin
            drain_timeout: 1s
            backends: [{bl}]
            {pool}
        """
        self.svc = LbtwistService(load_config(textwrap.dedent(text), Registry.default()).config, reactor,
                                  Registry.default(), install_signals=False)
        self.svc.startService()
        self.port = self.svc.listeners.getServiceNamed("grpc").address.port

    async def stop(self) -> None:
        await self.svc.stopService().addTimeout(TIMEOUT, reactor)


def calls(port: int) -> dict:
    """Every kind of call through lbtwist (run in a thread)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        out = {
            "U": ch.unary_unary("/t.Echo/U")(b"hi", timeout=10),
            "SS": list(ch.unary_stream("/t.Echo/SS")(b"s", timeout=10)),
            "CS": ch.stream_unary("/t.Echo/CS")(iter([b"a", b"b", b"c"]), timeout=10),
            "B": list(ch.stream_stream("/t.Echo/B")(iter([b"x", b"y"]), timeout=10)),
            "many": [ch.unary_unary("/t.Echo/U")(b"%d" % i, timeout=10) for i in range(50)],
        }
        try:
            ch.unary_unary("/t.Echo/NF")(b"k", timeout=10)
        except grpc.RpcError as e:
            out["NF"] = (e.code(), e.details())
    return out


def failing_call(port: int, n: int = 1) -> list:
    """(code, details) of ``n`` unary calls that are expected to fail."""
    got = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as ch:
        for _ in range(n):
            try:
                ch.unary_unary("/t.Echo/U")(b"x", timeout=10)
                got.append(("OK", ""))
            except grpc.RpcError as e:
                got.append((e.code(), e.details()))
    return got


@pytest_twisted.ensureDeferred
async def test_unary_streaming_and_bidi_calls_and_backend_status(grpc_server):
    lb = LB([f"127.0.0.1:{grpc_server}"])
    try:
        out = await threads.deferToThread(calls, lb.port).addTimeout(TIMEOUT, reactor)
        assert out["U"] == b"echo:hi"
        assert out["SS"] == [b"s0", b"s1", b"s2"]
        assert out["CS"] == b"a+b+c"
        assert out["B"] == [b"X", b"Y"]
        assert out["many"] == [b"echo:%d" % i for i in range(50)]
        # The backend's own status and message came through in its trailers.
        assert out["NF"] == (grpc.StatusCode.NOT_FOUND, "no such thing: k")
        # Fifty-odd calls, one backend connection (multiplexed).
        bcs = list(lb.svc.runtime.connection_pools.by_backend.values())
        assert len(bcs) == 1 and bcs[0].opened == 1
    finally:
        await lb.stop()


@pytest_twisted.ensureDeferred
async def test_lbtwist_own_failures_are_grpc_statuses(grpc_server):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()  # nothing listens there: connect refused
    lb = LB([f"127.0.0.1:{dead}"])
    try:
        [(code, details)] = await threads.deferToThread(failing_call, lb.port).addTimeout(TIMEOUT, reactor)
        assert code == grpc.StatusCode.UNAVAILABLE and "lbtwist" in details and "refused" in details
    finally:
        await lb.stop()
    lb = LB([f"127.0.0.1:{grpc_server}"], route=", rate_limit: {rate: 0.01, burst: 1, key: route}")
    try:
        got = await threads.deferToThread(failing_call, lb.port, 2).addTimeout(TIMEOUT, reactor)
        assert got[0] == ("OK", "")
        assert got[1][0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in got[1][1]
    finally:
        await lb.stop()


@pytest_twisted.ensureDeferred
async def test_grpc_to_a_tls_backend_negotiates_h2_by_alpn(tmp_path):
    from lbtwist.tls.testing import TestCA

    ca = TestCA()
    issued = ca.issue("127.0.0.1", "localhost")
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    handlers = grpc.method_handlers_generic_handler("t.Echo", {
        "U": grpc.unary_unary_rpc_method_handler(lambda r, c: b"tls:" + r)})
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers((handlers,))
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(issued.key_pem, issued.cert_pem)]))
    srv.start()
    lb = LB([f"127.0.0.1:{port}"], pool=f"tls: {{ca: '{ca_file}'}}")
    try:
        def call(p: int) -> bytes:
            with grpc.insecure_channel(f"127.0.0.1:{p}", options=OPTIONS) as ch:
                return ch.unary_unary("/t.Echo/U")(b"x", timeout=10)

        assert await threads.deferToThread(call, lb.port).addTimeout(TIMEOUT, reactor) == b"tls:x"
    finally:
        await lb.stop()
        srv.stop(0)
