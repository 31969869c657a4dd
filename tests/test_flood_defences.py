"""Defences against connection floods (issue 17), deterministic: the shared
client TimerHeap, per-client caps and canned refusals at L7 and L4, the
rate-limited rejection log, backlog resolution. Real sockets are in
tests/test_flood_real.py."""
from __future__ import annotations

import attrs
import pytest
from twisted.internet import error, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from lbtwist.l7.listener import OVERLOADED, PER_CLIENT, _Refusal
from lbtwist.l7.timers import EXPIRY_BATCH, Deadline, TimerHeap
from lbtwist.listener import FALLBACK_BACKLOG, PerClientLimit, RefusalLog, default_backlog, with_backlog
from support.l7 import MemHarness, listener_config


# -- TimerHeap ---------------------------------------------------------------------


def test_many_deadlines_share_one_delayed_call_and_fire_on_time():
    clock = task.Clock()
    heap = TimerHeap(clock)
    fired: list[tuple[float, str]] = []
    ds = [Deadline(clock, lambda k: fired.append((clock.seconds(), k)), heap) for _ in range(50)]
    for i, d in enumerate(ds):
        d.set(10.0 + i, f"d{i}")
    assert len(clock.getDelayedCalls()) == 1 and len(heap) == 50
    clock.advance(10.0)
    assert fired == [(10.0, "d0")]
    clock.pump([1.0] * 49)
    assert fired == [(10.0 + i, f"d{i}") for i in range(50)]
    assert clock.getDelayedCalls() == [] and len(heap) == 0


def test_moving_a_deadline_later_pushes_nothing_and_it_fires_at_the_new_time():
    clock = task.Clock()
    heap = TimerHeap(clock)
    fired = []
    d = Deadline(clock, fired.append, heap)
    d.set(5.0, "a")
    for _ in range(1000):  # re-armed on every request: no heap growth
        clock.advance(0.001)
        d.set(5.0, "b")
    assert len(heap._heap) == 1
    clock.advance(5.0 - 0.001)
    assert fired == []
    clock.advance(0.01)
    assert fired == ["b"]


def test_moving_earlier_rearms_and_stale_entries_are_compacted():
    clock = task.Clock()
    heap = TimerHeap(clock)
    fired = []
    d = Deadline(clock, fired.append, heap)
    for i in range(3000):
        d.set(3000.0 - i, "x")  # each earlier than the last: a new entry
    assert len(heap._heap) <= 2 * 1 + 64 + 1 and len(heap) == 1
    clock.advance(1.0)
    assert fired == ["x"]


def test_expiry_runs_in_batches_with_other_work_between():
    """3 x EXPIRY_BATCH connections due in the same instant: one reactor pass
    expires a batch, and anything scheduled meanwhile (the others' I/O) runs
    before the next batch."""
    clock = task.Clock()
    heap = TimerHeap(clock)
    order: list[str] = []
    n = 3 * EXPIRY_BATCH
    ds = [Deadline(clock, order.append, heap) for _ in range(n)]
    for i, d in enumerate(ds):
        d.set(10.0, f"c{i}")
    clock.callLater(10.0, lambda: None)
    marker_at = []

    def first(kind: str) -> None:
        order.append(kind)
        clock.callLater(0, lambda: marker_at.append(len(order)))

    ds[0]._fire = first
    clock.advance(10.0)
    assert len(order) == n
    assert marker_at == [EXPIRY_BATCH]  # the other work ran right after the first batch
    assert heap.deferred_passes == 2


def test_cleared_and_cancelled_deadlines_never_fire_and_leave_no_call():
    clock = task.Clock()
    heap = TimerHeap(clock)
    fired = []
    a, b = Deadline(clock, fired.append, heap), Deadline(clock, fired.append, heap)
    a.set(1.0, "a")
    b.set(2.0, "b")
    a.clear()
    b.cancel()
    clock.advance(3.0)
    assert fired == [] and not a.active and not b.active
    assert clock.getDelayedCalls() == []


def test_batch_must_be_positive():
    with pytest.raises(ValueError):
        TimerHeap(task.Clock(), batch=0)


# -- the L7 client uses it ------------------------------------------------------------


def test_idle_client_connections_share_one_timer():
    h = MemHarness(listener=listener_config(header_timeout=10.0))
    before = len(h.reactor.getDelayedCalls())
    conns = [h.client(peer=f"192.0.2.{i % 200 + 1}") for i in range(200)]
    assert len(h.reactor.getDelayedCalls()) - before <= 1
    h.advance(10.01)
    assert all(t.disconnecting for _, t in conns)


def test_header_timeouts_are_logged_once_per_interval_not_per_client():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = MemHarness(listener=listener_config(header_timeout=5.0))
        conns = [h.client() for _ in range(100)]
        for p, _ in conns:
            p.dataReceived(b"GET / HTTP/1.1\r\n")
        h.advance(5.1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert all(t.value().startswith(b"HTTP/1.1 408 ") for _, t in conns)
    lines = [e for e in events if "408" in str(e.get("what", "")) or "408" in str(e.get("status", ""))]
    assert len(lines) == 1 and lines[0]["n"] == 1  # the first one; the next 99 are counted for the next line


# -- caps and canned refusals ------------------------------------------------------------------


def _connect(factory, host: str):
    addr = IPv4Address("TCP", host, 40000)
    proto = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    proto.makeConnection(t)
    return proto, t


def test_l7_per_client_cap_answers_429_without_building_a_connection():
    cfg = attrs.evolve(listener_config(), max_connections_per_client=2)
    h = MemHarness(listener=cfg)
    f = h.factory
    a, at = _connect(f, "192.0.2.1")
    b, bt = _connect(f, "192.0.2.1")
    calls = len(h.reactor.getDelayedCalls())
    c, ct = _connect(f, "192.0.2.1")
    assert isinstance(c, _Refusal) and ct.value() == PER_CLIENT and ct.disconnecting
    assert ct.value().startswith(b"HTTP/1.1 429 ")
    assert len(h.reactor.getDelayedCalls()) == calls  # no timer for it
    other, ot = _connect(f, "192.0.2.2")  # another address is not affected
    assert not isinstance(other, _Refusal) and not ot.disconnecting
    assert f.active == 3 and f.refused == 1
    a.connectionLost(Failure(error.ConnectionDone()))
    again, gt = _connect(f, "192.0.2.1")
    assert not isinstance(again, _Refusal) and f.clients.open_from("192.0.2.1") == 2


def test_l7_listener_cap_answers_a_canned_503():
    cfg = attrs.evolve(listener_config(), max_connections=1)
    h = MemHarness(listener=cfg)
    _connect(h.factory, "192.0.2.1")
    p, t = _connect(h.factory, "192.0.2.9")
    assert isinstance(p, _Refusal) and t.value() == OVERLOADED and t.value().startswith(b"HTTP/1.1 503 ")


def test_l7_per_client_cap_holds_on_the_track_path_too():
    """A connection built without an address (a TLS wrapper) is counted when made."""
    cfg = attrs.evolve(listener_config(), max_connections_per_client=1)
    h = MemHarness(listener=cfg)
    _, t1 = h.client(peer="192.0.2.5")
    _, t2 = h.client(peer="192.0.2.5")
    assert not t1.disconnecting and t2.disconnecting


def test_l7_reload_keeps_counts_and_takes_the_new_cap():
    from lbtwist.l7.listener import HttpListenerService

    cfg = attrs.evolve(listener_config(), max_connections_per_client=1)
    h = MemHarness(listener=cfg)
    svc = HttpListenerService.__new__(HttpListenerService)
    svc.proxy, svc.runtime, svc.cfg = h.factory, h.factory.runtime, cfg
    _connect(h.factory, "192.0.2.1")
    svc.reconfigure(attrs.evolve(cfg, max_connections_per_client=2))
    assert h.factory.clients.cap == 2 and h.factory.clients.open_from("192.0.2.1") == 1
    p, _ = _connect(h.factory, "192.0.2.1")
    assert not isinstance(p, _Refusal)
    p, _ = _connect(h.factory, "192.0.2.1")
    assert isinstance(p, _Refusal)


def test_l4_per_client_cap_refuses_before_building_a_relay():
    from test_l4_tcp_logic import Rig, Sock

    rig = Rig(max_connections_per_client=1)
    a, at = rig.client(host="192.0.2.7")
    assert rig.factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1)) is None
    assert rig.factory.refused == 1
    # the connectionMade path (SNI passthrough builds relays itself) counts too
    b, bt = rig.client(host="192.0.2.7")
    assert bt.disconnecting and len(rig.clock.tcpClients) == 1
    c, ct = rig.client(host="192.0.2.8")
    assert not ct.disconnecting
    a.connectionLost(Failure(error.ConnectionLost()))
    assert rig.factory.clients.open_from("192.0.2.7") == 0
    d, dt = rig.client(host="192.0.2.7")
    assert not dt.disconnecting
    assert isinstance(dt, Sock)


def test_per_client_limit_off_counts_nothing():
    lim = PerClientLimit(0)
    assert all(lim.admit("a") for _ in range(10)) and lim.counts == {}
    lim.cap = 2
    assert lim.admit("a") and lim.admit("a") and not lim.admit("a")
    lim.release("a")
    lim.release("a")
    lim.release("a")  # more releases than admits: no negative count
    assert lim.counts == {}


def test_refusal_log_counts_between_lines():
    clock = task.Clock()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        rl = RefusalLog(clock, interval=10.0)
        for _ in range(50):
            rl.note("listener x: refused", "192.0.2.1")
        clock.advance(10.0)
        rl.note("listener x: refused", "192.0.2.1")
    finally:
        globalLogPublisher.removeObserver(events.append)
    ns = [e["n"] for e in events if e.get("what") == "listener x: refused"]
    assert ns == [1, 50]


# -- backlog ----------------------------------------------------------------------------------


def test_default_backlog_is_somaxconn(tmp_path):
    p = tmp_path / "somaxconn"
    p.write_text("8192\n")
    assert default_backlog(str(p)) == 8192
    assert default_backlog(str(tmp_path / "missing")) == FALLBACK_BACKLOG
    p.write_text("junk")
    assert default_backlog(str(p)) == FALLBACK_BACKLOG


def test_with_backlog_appends_only_where_it_applies():
    assert with_backlog("tcp:8080:interface=127.0.0.1", 100) == "tcp:8080:interface=127.0.0.1:backlog=100"
    assert with_backlog("8080", 7) == "8080:backlog=7"
    assert with_backlog("unix:/tmp/x.sock", 9) == "unix:/tmp/x.sock:backlog=9"
    assert with_backlog("tcp:8080:backlog=5", 100) == "tcp:8080:backlog=5"  # the bind's own wins
    assert with_backlog("systemd:domain=INET:index=0", 100) == "systemd:domain=INET:index=0"
    assert with_backlog("tcp:80", None) == f"tcp:80:backlog={default_backlog()}"


def test_config_checks_backlog_and_per_client_cap():
    from lbtwist.config import ConfigError, load_config

    def problems(extra: str, bind: str = "tcp:8080") -> list[str]:
        text = f"""
listeners:
  - name: web
    bind: "{bind}"
    pool: app
{extra}
pools:
  - name: app
    backends: [{{address: "127.0.0.1:9000"}}]
"""
        try:
            loaded = load_config(text, source_name="t.yaml")
        except ConfigError as e:  # errors: the config is refused
            return [str(e)]
        return [str(p) for p in loaded.warnings]

    assert not [p for p in problems("    backlog: 1024\n    max_connections_per_client: 50\n") if "backlog" in p or "per_client" in p]
    assert any("backlog" in p and "at least 1" in p for p in problems("    backlog: 0\n"))
    assert any("one place" in p for p in problems("    backlog: 10\n", bind="tcp:8080:backlog=5"))
    assert any("max_connections_per_client" in p for p in problems("    max_connections_per_client: -1\n"))
    assert any("never applies" in p for p in problems("    max_connections: 10\n    max_connections_per_client: 50\n"))
