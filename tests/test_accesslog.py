"""Structured access log: JSON lines per request/connection and per state
change, through twisted.logger, buffered with a flush timer, surviving log
rotation, to a file or to the real stdout under twistd."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from lbtwist.accesslog import ACCESS_NAMESPACE, AccessLogService, access_fields, access_line, iso_time
from lbtwist.config.model import AccessLogConfig, Config
from lbtwist.pool import Backend, Health, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime
from lbtwist.traffic import TrafficRecord

from support.procs import REPO
from support.fakes import FirstBalancer


def runtime(clock) -> Runtime:
    rt = Runtime(reactor=clock, registry=Registry(), config=Config())
    rt.pools["web"] = Pool("web", [Backend(address="127.0.0.1:9001"), Backend(address="127.0.0.1:9002")],
                           FirstBalancer(), clock)
    return rt


def record(**kw) -> TrafficRecord:
    base = dict(kind="http", listener="edge", start=1767322245.6789, duration=0.0123, client="127.0.0.1:50000",
                pool="web", backend="127.0.0.1:9001", route="0", method="GET", path="/a?b=1", status=200,
                bytes_in=120, bytes_out=4567, tries=2, request_id="req-1", tls_resumed=True,
                tls_version="TLSv1.3", tls_cipher="TLS_AES_128_GCM_SHA256")
    base.update(kw)
    return TrafficRecord(**base)


def lines(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f.read().splitlines()]


def test_one_json_line_per_record_with_every_field(tmp_path):
    clock = Clock()
    rt = runtime(clock)
    path = tmp_path / "access.log"
    svc = AccessLogService(AccessLogConfig(path=str(path), flush_interval=0.0), rt, clock)
    svc.startService()
    try:
        rt.traffic.publish(record())
        rt.traffic.publish(record(kind="tcp", method=None, path=None, status=None, tls_resumed=None,
                                  outcome="gateway", error="127.0.0.1:9001: connection refused"))
        (http, tcp) = lines(path)
        assert http == {
            "time": "2026-01-02T02:50:45.678Z", "type": "access", "kind": "http", "client": "127.0.0.1:50000",
            "listener": "edge", "route": "0", "pool": "web", "backend": "127.0.0.1:9001", "method": "GET",
            "path": "/a?b=1", "status": 200, "bytes_in": 120, "bytes_out": 4567, "duration_ms": 12.3,
            "tries": 2, "request_id": "req-1", "tls_resumed": True, "tls_version": "TLSv1.3",
            "tls_cipher": "TLS_AES_128_GCM_SHA256", "outcome": "ok", "error": None,
        }
        assert tcp["status"] is None and tcp["tls_resumed"] is None and tcp["outcome"] == "gateway"
        assert tcp["error"].endswith("connection refused")
    finally:
        svc.stopService()


def test_state_changes_are_logged_as_events(tmp_path):
    clock = Clock()
    clock.advance(100)
    rt = runtime(clock)
    path = tmp_path / "access.log"
    svc = AccessLogService(AccessLogConfig(path=str(path), flush_interval=0.0), rt, clock)
    svc.startService()
    try:
        pool = rt.pools["web"]
        a, b = pool.backends()
        pool.set_health(a, Health.UNHEALTHY, "3 probes failed: connection refused")
        pool.eject(b, 130.0, "5 consecutive 5xx")
        events = [x for x in lines(path) if x["type"] == "state"]
        assert {"pool": "web", "backend": a.address, "state": "unhealthy",
                "reason": "3 probes failed: connection refused", "health": "unhealthy"}.items() <= events[0].items()
        assert any(e["backend"] is None and e["state"] == "panic" and e["panic"] is True for e in events)
        assert any(e["backend"] == b.address and e["state"] == "ejected" and e["summary"] == "ejected" for e in events)
    finally:
        svc.stopService()


def test_lines_are_buffered_until_the_flush_tick_and_on_stop(tmp_path):
    clock = Clock()
    rt = runtime(clock)
    path = tmp_path / "access.log"
    svc = AccessLogService(AccessLogConfig(path=str(path), flush_interval=1.0), rt, clock)
    svc.startService()
    rt.traffic.publish(record(request_id="r1"))
    assert lines(path) == []  # no write syscall per request
    clock.advance(1.0)
    assert [x["request_id"] for x in lines(path)] == ["r1"]
    rt.traffic.publish(record(request_id="r2"))
    svc.stopService()  # the last requests of a drain are not lost
    assert [x["request_id"] for x in lines(path)] == ["r1", "r2"]
    rt.traffic.publish(record(request_id="r3"))  # stopped: detached from the hub
    assert len(lines(path)) == 2


def test_rotated_file_is_reopened(tmp_path):
    clock = Clock()
    rt = runtime(clock)
    path = tmp_path / "access.log"
    svc = AccessLogService(AccessLogConfig(path=str(path), flush_interval=1.0), rt, clock)
    svc.startService()
    try:
        rt.traffic.publish(record(request_id="before"))
        clock.advance(1.0)
        os.rename(path, tmp_path / "access.log.1")  # what logrotate does
        rt.traffic.publish(record(request_id="after"))
        clock.advance(1.0)  # flushed to the old file, then reopened
        rt.traffic.publish(record(request_id="new"))
        clock.advance(1.0)
        assert [x["request_id"] for x in lines(tmp_path / "access.log.1")] == ["before", "after"]
        assert [x["request_id"] for x in lines(path)] == ["new"]
    finally:
        svc.stopService()


def test_events_travel_through_twisted_logger_observers(tmp_path):
    clock = Clock()
    rt = runtime(clock)
    svc = AccessLogService(AccessLogConfig(path=str(tmp_path / "a.log")), rt, clock)
    seen = []
    svc.publisher.addObserver(seen.append)  # e.g. a log shipper
    svc.startService()
    try:
        rt.traffic.publish(record())
        (event,) = seen
        assert event["log_namespace"] == ACCESS_NAMESPACE and event["log_level"] == LogLevel.info
        assert access_fields(event["lbtwist_record"])["backend"] == "127.0.0.1:9001"
        assert formatEvent(event) == ""  # text observers (twistd's log) print nothing for it
    finally:
        svc.stopService()


@pytest.mark.parametrize("text", ['/a"b\\c', "/caf\u00e9/\u2603", "/tab\there\nnewline\x00", ""])
def test_fast_line_is_exactly_the_json_of_the_fields(text):
    rec = record(path=text, error=text, client=text, tls_resumed=False, status=None, duration=float("nan"))
    line = access_line(rec)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == access_fields(rec)
    assert list(json.loads(line)) == list(access_fields(rec))  # same key order


def test_iso_time_is_utc_with_milliseconds():
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1767322245.9999) == "2026-01-02T02:50:45.999Z"


def test_stdout_gets_raw_json_lines_even_when_twistd_redirects_sys_stdout(tmp_path):
    script = textwrap.dedent("""
        import sys
        from twisted.internet.task import Clock
        from twisted.logger import Logger, LoggingFile
        from lbtwist.accesslog import AccessLogService
        from lbtwist.config.model import AccessLogConfig, Config
        from lbtwist.registry import Registry
        from lbtwist.runtime import Runtime
        from lbtwist.traffic import TrafficRecord
        sys.stdout = LoggingFile(Logger(namespace="stdout"))  # as twistd does
        rt = Runtime(reactor=Clock(), registry=Registry(), config=Config())
        svc = AccessLogService(AccessLogConfig(path="stdout"), rt, rt.reactor)
        svc.startService()
        rt.traffic.publish(TrafficRecord(kind="tcp", listener="l", start=0.0, duration=0.5, tries=1))
        svc.stopService()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert json.loads(line)["duration_ms"] == 500.0


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Once(protocol.Protocol):
    def __init__(self):
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"ping\n")

    def dataReceived(self, data):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_real_relay_connections_are_logged(tmp_path):
    from lbtwist.config import load_config
    from lbtwist.service import LbtwistService

    echo = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
    port = echo.getHost().port
    registry = Registry.default(entry_points=False)
    config = load_config(textwrap.dedent(f"""
        listeners: [{{name: echo, bind: "tcp:0:interface=127.0.0.1", mode: tcp, pool: echo}}]
        pools: [{{name: echo, backends: [{{address: "127.0.0.1:{port}"}}]}}]
        access_log: {{path: "{tmp_path / 'access.log'}", flush_interval: 0}}
    """), registry).config
    svc = LbtwistService(config, reactor, registry)  # starts the access log itself
    svc.startService()
    try:
        relay = svc.listeners.getServiceNamed("echo").address.port
        for _ in range(3):
            p = _Once()
            ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", relay, timeout=5)
            await endpoints.connectProtocol(ep, p).addTimeout(10, reactor)
            await p.done.addTimeout(10, reactor)
        waited = 0.0
        while len(lines(tmp_path / "access.log")) < 3 and waited < 10:
            await task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
        logged = lines(tmp_path / "access.log")
        assert len(logged) == 3
        for x in logged:
            assert (x["type"], x["kind"], x["listener"], x["pool"]) == ("access", "tcp", "echo", "echo")
            assert x["backend"] == f"127.0.0.1:{port}" and x["bytes_in"] == 5 and x["bytes_out"] == 5
            assert x["tries"] == 1 and x["outcome"] == "ok" and x["client"].startswith("127.0.0.1:")
            assert 0 < x["duration_ms"] < 10_000
    finally:
        await svc.stopService()
        await echo.stopListening()


# -- what the L7 proxy records (the fields the access log writes) ------------------------------

from support.l7 import MemHarness, ok, split_responses  # noqa: E402


def _l7():
    h = MemHarness()
    records: list[TrafficRecord] = []
    h.runtime.traffic.subscribe(records.append)
    return h, records


def test_relayed_backend_5xx_is_logged_with_outcome_5xx():
    h, records = _l7()
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    b = h.accept()
    b.reply(ok(b"down", status=503))
    proto.dataReceived(b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
    (h.accept() if h.pending_connects() else b).reply(ok(b"fine"))
    assert [(r.status, r.outcome) for r in records] == [(503, "5xx"), (200, "ok")]
    assert json.loads(access_line(records[0]))["outcome"] == "5xx"


def test_l7_client_is_logged_with_its_port():
    h, records = _l7()
    proto, t = h.client(peer="203.0.113.7")
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.accept().reply(ok())
    assert records[0].client == "203.0.113.7:40000"


def test_l7_ipv6_client_is_bracketed_like_l4():
    from twisted.internet.address import IPv6Address
    from twisted.internet.testing import StringTransport

    h, records = _l7()
    proto = h.factory.buildProtocol(None)
    proto.makeConnection(StringTransport(peerAddress=IPv6Address("TCP", "2001:db8::7", 50412)))
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.accept().reply(ok())
    assert records[0].client == "[2001:db8::7]:50412"


def test_request_refused_by_the_parser_is_logged_when_it_began_and_for_how_long():
    import time

    h, records = _l7()
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHo")
    h.advance(2.5)
    before = time.time()
    proto.dataReceived(b"st: a\r\nContent-Length: x\r\n\r\n")
    (r,) = records
    assert (r.status, r.outcome) == (400, "rejected")
    assert r.duration == pytest.approx(2.5)
    assert before - 2.5 - 5 < r.start <= time.time() - 2.5 + 0.001
    assert not json.loads(access_line(r))["time"].startswith("1970")
    assert r.client == "192.0.2.7:40000"


def test_header_timeout_is_logged_with_the_time_the_head_took():
    h, records = _l7()
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\n")
    h.advance(h.listener.http.header_timeout)
    (r,) = records
    assert r.status == 408 and r.duration == pytest.approx(h.listener.http.header_timeout)


def test_lbtwists_own_error_pages_log_the_bytes_sent():
    h, records = _l7()
    proto, t = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    while h.pending_connects():
        h.refuse()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    answers = split_responses(t.value())
    assert [r.status for r in records] == [a.status for a in answers] and answers[0].status >= 500
    assert [r.bytes_out for r in records] == [len(a.body) for a in answers]
    assert all(r.bytes_out > 0 for r in records)


def test_http_connection_over_max_connections_is_logged_like_l4():
    from lbtwist.config.model import ListenerConfig

    h = MemHarness(listener=ListenerConfig(name="web", bind="tcp:0", mode="http", pool="app", max_connections=1))
    records: list[TrafficRecord] = []
    h.runtime.traffic.subscribe(records.append)
    h.client()
    _, t = h.client(peer="198.51.100.4")
    (answer,) = split_responses(t.value())
    (r,) = records
    assert (r.kind, r.listener, r.client, r.status, r.outcome) == ("http", "web", "198.51.100.4:40000", 503, "rejected")
    assert r.bytes_out == len(answer.body) and "max_connections=1" in r.error
