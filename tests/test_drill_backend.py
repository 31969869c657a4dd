"""Drill backends: the HTTP and TCP adapters on memory transports, then the
real process with its control API (loopback, ephemeral ports)."""
from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection

from lbtwist.drill.backend import DrillBackend, parse_duration
from lbtwist.drill.faults import ServerModel, ServiceTime
from lbtwist.drill.fleet import BackendFleet, GroupSpec
from lbtwist.drill.control import http_call


def backend(kind: str = "http", capacity: int = 4) -> tuple[DrillBackend, MemoryReactorClock]:
    r = MemoryReactorClock()
    m = ServerModel("b7", r, capacity=capacity, service=ServiceTime(0.010, 0.0), rng=random.Random(3))
    return DrillBackend("b7", 0, m, r, kind=kind), r


def connect(b: DrillBackend):
    p = b.buildProtocol(None)
    t = StringTransportWithDisconnection()
    t.protocol = p
    p.makeConnection(t)
    return p, t


def test_http_keepalive_answers_in_order_after_the_service_time():
    b, clock = backend()
    p, t = connect(b)
    p.dataReceived(b"GET /work HTTP/1.1\r\nHost: x\r\n\r\nGET /work HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.value() == b""
    clock.advance(0.010)
    first = t.value()
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-backend: b7" in first and first.endswith(b"b7\n")
    assert first.count(b"HTTP/1.1") == 1  # the second waits for the first (no pipelining in parallel)
    clock.advance(0.010)
    assert t.value().count(b"HTTP/1.1 200") == 2
    assert t.connected and b.model.counters.attempts == 2


def test_http_health_path_is_fast_during_a_gray_failure():
    b, clock = backend()
    b.model.faults.update({"latency": 0.9})
    p, t = connect(b)
    p.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(0.001)
    assert t.value().startswith(b"HTTP/1.1 200")
    assert b.model.counters.probes == 1 and b.model.counters.attempts == 0


def test_http_connection_close_is_honoured():
    b, clock = backend()
    p, t = connect(b)
    p.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    clock.advance(0.02)
    assert b"connection: close" in t.value() and not t.connected


def test_http_reset_fault_aborts_the_connection():
    b, clock = backend()
    b.model.faults.update({"reset_rate": 1.0})
    p, t = connect(b)
    p.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not t.connected and t.value() == b""


def test_http_accept_close_fault_closes_before_reading():
    b, clock = backend()
    b.model.faults.update({"accept_close": True})
    p, t = connect(b)
    assert not t.connected


def test_client_gone_mid_request_is_abandoned_work():
    b, clock = backend(capacity=1)
    p, t = connect(b)
    p.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    t.loseConnection()
    assert b.model.busy == 1
    clock.advance(0.02)
    assert b.model.counters.abandoned == 1 and b.model.busy == 0


def test_tcp_line_backend_answers_each_line():
    b, clock = backend(kind="tcp")
    p, t = connect(b)
    p.dataReceived(b"one\ntwo\nHEALTH\n")
    clock.pump([0.005] * 10)
    assert t.value() == b"OK b7 one\nOK b7 two\nOK b7 HEALTH\n"
    assert b.model.counters.attempts == 2 and b.model.counters.probes == 1


def test_parse_duration():
    assert parse_duration("2ms") == 0.002
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("0.25") == 0.25


async def _get(reactor, port: int, path: str) -> bytes:
    return await http_call(reactor, "GET", f"http://127.0.0.1:{port}{path}", raw=True, timeout=5)


@pytest_twisted.ensureDeferred
async def test_backend_process_control_api_faults_and_kill():
    """The real process: ready line, traffic counted, faults applied at
    runtime, stop/start of one port, SIGKILL of the whole process."""
    from twisted.internet import reactor

    fleet = BackendFleet(reactor, [GroupSpec("g", ("a", "b"), capacity=2), GroupSpec("solo", ("c",))], seed=3)
    try:
        await fleet.start()
        pa, pc = fleet.ports["a"], fleet.ports["c"]
        assert (await _get(reactor, pa, "/work")) == b"a\n"
        await fleet.set_faults(["a"], error_rate=1.0, error_status=503)
        with pytest.raises(Exception, match="503"):
            await _get(reactor, pa, "/work")
        rows, gone = await fleet.state()
        by = {r["name"]: r for r in rows}
        assert by["a"]["counters"]["attempts"] == 2 and by["a"]["counters"]["errors"] == 1
        assert by["a"]["faults"]["error_status"] == 503 and by["b"]["faults"]["error_rate"] == 0
        assert gone == []
        await fleet.reset_faults(["a"])
        await fleet.stop_backends(["b"])
        rows, _ = await fleet.state()
        assert {r["name"]: r["up"] for r in rows} == {"a": True, "b": False, "c": True}
        await fleet.start_backends(["b"])
        assert (await _get(reactor, fleet.ports["b"], "/work")) == b"b\n"
        await fleet.kill_group("solo")
        assert fleet.children["solo"].exit_signal == 9
        rows, gone = await fleet.state()
        assert gone == ["c"] and {r["name"] for r in rows} == {"a", "b"}
        with pytest.raises(Exception):
            await _get(reactor, pc, "/work")
        await fleet.start_group("solo")  # restart on the same port
        assert (await _get(reactor, pc, "/work")) == b"c\n"
    finally:
        await fleet.shutdown()
    assert all(c.ended for c in fleet.children.values())
