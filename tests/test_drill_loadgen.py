"""The open-loop load generator: its schedule, and its clients' behaviour
(1 s timeout, 2 immediate retries) against in-process backends on loopback."""
from __future__ import annotations

import random

import pytest
import pytest_twisted

from lbtwist.drill.backend import DrillBackend
from lbtwist.drill.faults import ServerModel, ServiceTime
from lbtwist.drill.loadgen import ClientPolicy, LoadGenerator, poisson_arrivals
from lbtwist.drill.procs import free_port
from lbtwist.drill.recorder import Recorder


def test_poisson_schedule_has_the_rate_and_is_reproducible():
    a = poisson_arrivals(500.0, 20.0, random.Random(7))
    b = poisson_arrivals(500.0, 20.0, random.Random(7))
    assert a == b
    assert 9500 < len(a) < 10500  # 10000 expected, sd 100
    assert all(0 <= x < 20.0 for x in a) and a == sorted(a)


def test_poisson_schedule_follows_a_varying_rate():
    arr = poisson_arrivals(lambda t: 100.0 if t < 10 else 400.0, 20.0, random.Random(1))
    first = sum(1 for x in arr if x < 10)
    second = len(arr) - first
    assert 850 < first < 1150 and 3700 < second < 4300


def test_client_policy_retries_what_the_field_guide_retries():
    p = ClientPolicy()
    assert p.timeout == 1.0 and p.retries == 2
    for o in ("timeout", "reset", "refused", "connect-error", "500", "503"):
        assert p.retryable(o)
    for o in ("200", "404", "client-limit"):
        assert not p.retryable(o)
    assert p.success("200") and p.success("302") and not p.success("404")


def test_only_loopback_targets():
    with pytest.raises(ValueError):
        LoadGenerator(None, "10.0.0.1", 80, rate=1, duration=1, sink=None)


def _serve(reactor, capacity=8, median=0.001, **faults):
    m = ServerModel("t0", reactor, capacity=capacity, service=ServiceTime(median, 0.0), rng=random.Random(2))
    m.faults.update(faults)
    b = DrillBackend("t0", 0, m, reactor)
    b.start()
    return b


async def _run(reactor, port, rate, duration, policy=None):
    rec = Recorder(reactor.seconds(), int(duration) + 1)
    gen = LoadGenerator(reactor, "127.0.0.1", port, rate=rate, duration=duration, sink=rec,
                        policy=policy or ClientPolicy(), seed=5, start_at=reactor.seconds())
    d = gen.run()
    d.addTimeout(duration + 10, reactor)
    stats = await d
    return stats, rec, gen


@pytest_twisted.ensureDeferred
async def test_healthy_target_every_request_succeeds_once_over_keepalive():
    from twisted.internet import reactor

    b = _serve(reactor)
    try:
        stats, rec, gen = await _run(reactor, b.port_number, 300.0, 2.0)
    finally:
        await b.stop()
    assert stats.issued == stats.scheduled and 450 < stats.issued < 750
    assert stats.succeeded == stats.issued and stats.retries == 0
    assert stats.connections_opened < stats.issued / 5  # keep-alive reuse
    assert b.model.counters.attempts == stats.attempts
    t = rec.totals()
    assert t["success_rate"] == 100.0 and t["p99"] < 0.5
    assert not gen._conns and not gen._inflight


@pytest_twisted.ensureDeferred
async def test_open_loop_keeps_offering_load_to_a_hung_target_and_retries_twice():
    """A target that never answers does not slow the arrivals down (closed
    loops would); each request makes 3 tries, each cut at the timeout."""
    from twisted.internet import reactor

    b = _serve(reactor, hang_rate=1.0)
    try:
        stats, rec, gen = await _run(reactor, b.port_number, 100.0, 1.0, ClientPolicy(timeout=0.2))
    finally:
        await b.stop()
    assert stats.issued == stats.scheduled and stats.issued > 60
    assert stats.failed == stats.issued and stats.succeeded == 0
    assert stats.attempts == 3 * stats.issued and stats.outcomes == {"timeout": stats.attempts}
    lat = sorted(x for s in rec._s.values() for x in s.latencies)
    assert lat[0] >= 0.6 - 0.01  # three 200 ms timeouts back to back
    assert b.model.counters.hangs == stats.attempts


@pytest_twisted.ensureDeferred
async def test_5xx_and_refused_connections_are_retried():
    from twisted.internet import reactor

    b = _serve(reactor, error_rate=1.0, error_status=503)
    try:
        stats, _, _ = await _run(reactor, b.port_number, 50.0, 1.0)
    finally:
        await b.stop()
    assert stats.attempts == 3 * stats.issued and stats.outcomes == {"503": stats.attempts}

    stats, _, _ = await _run(reactor, free_port(), 50.0, 0.5)
    assert stats.failed == stats.issued and stats.attempts == 3 * stats.issued
    assert set(stats.outcomes) == {"refused"}
