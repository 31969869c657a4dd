"""Resilience through a real lbtwist L7 listener (LbtwistService on the real
reactor, built from YAML) in front of scripted origins on 127.0.0.1:0:
retries bounded by the budget, idempotency rules, pool limits, rate limits,
breakers, Retry-After and backoff, as seen from outside."""
from __future__ import annotations

import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

sys.path.insert(0, str(Path(__file__).parent))

from support.l7 import Origin, OriginRequest, ok, raw_request  # noqa: E402

from lbtwist.config import load_config  # noqa: E402
from lbtwist.registry import Registry  # noqa: E402
from lbtwist.resilience.limits import LIMIT_HEADER, Limit  # noqa: E402
from lbtwist.service import LbtwistService  # noqa: E402

TIMEOUT = 10.0
_REG: Registry | None = None


def registry() -> Registry:
    global _REG
    if _REG is None:
        _REG = Registry.default()
    return _REG


# -- origins -----------------------------------------------------------------------------

def resets(req: OriginRequest, proto: Any) -> None:
    proto.transport.abortConnection()
    return None


def silent(req: OriginRequest, proto: Any) -> None:
    return None  # never answers


def status(code: int, headers=()) -> Callable[[OriginRequest, Any], bytes]:
    return lambda req, proto: ok(b"status %d" % code, code, headers)


def half_then_reset(req: OriginRequest, proto: Any) -> None:
    proto.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
    reactor.callLater(0.05, proto.transport.abortConnection)
    return None


class LB:
    """An lbtwist service from YAML; one http listener ``web`` on pool ``app``."""

    def __init__(self, origins: list[Origin], route: str = "", pool: str = "", algorithm: str = "round_robin") -> None:
        backends = "\n".join(f'      - {{address: "{o.address}"}}' for o in origins)
        text = "\n".join(x for x in [
            "listeners:",
            "  - name: web",
            '    bind: "tcp:0:interface=127.0.0.1"',
            "    mode: http",
            "    http: {request_timeout: 5s}",
            "    routes:",
            "      - match: {path_prefix: /}",
            "        pool: app",
            route,
            "pools:",
            "  - name: app",
            f"    algorithm: {algorithm}",
            "    drain_timeout: 100ms",
            pool,
            "    backends:",
            backends,
            "",
        ] if x)
        loaded = load_config(text, registry())
        self.svc = LbtwistService(loaded.config, reactor, registry())
        self.svc.startService()

    @property
    def port(self) -> int:
        return self.svc.listeners.getServiceNamed("web").address.port

    @property
    def runtime(self) -> Any:
        return self.svc.runtime

    @property
    def factory(self) -> Any:
        return self.svc.listeners.getServiceNamed("web").proxy

    async def stop(self) -> None:
        await defer.maybeDeferred(self.svc.stopService).addTimeout(TIMEOUT, reactor)


async def lb_with(handlers: list[Callable], route: str = "", pool: str = "") -> tuple[LB, list[Origin]]:
    origins = [Origin(h).listen(reactor) for h in handlers]
    return LB(origins, route, pool), origins


async def shutdown(lb: LB, origins: list[Origin]) -> None:
    await lb.stop()
    for o in origins:
        await o.stop()


async def get(port: int, path: str = "/", method: str = "GET", headers: str = "", body: bytes = b"") -> Any:
    data = (f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}"
            f"content-length: {len(body)}\r\n\r\n").encode() + body
    resps, client = await raw_request(reactor, port, data, timeout=TIMEOUT)
    if client.transport is not None:
        client.transport.loseConnection()
    return resps[0] if resps else None


def pause(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def many(n: int, concurrency: int, fn: Callable[[int], Any]) -> list[Any]:
    sem = defer.DeferredSemaphore(concurrency)
    ds = [sem.run(lambda i=i: defer.ensureDeferred(fn(i))) for i in range(n)]
    return await defer.gatherResults(ds).addTimeout(60, reactor)


async def settled_memory() -> int:
    """Traced bytes once closing sockets are gone and garbage is collected."""
    await pause(0.1)
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def hits(origins: list[Origin]) -> int:
    return sum(len(o.requests) for o in origins)


# -- the bound ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_all_backends_failing_sees_at_most_budgeted_load():
    """Every backend resets: the backends see at most (1 + budget) x requests
    plus the floor, however many attempts the policy would allow."""
    percent, floor_rate, window = 20.0, 1.0, 10.0
    route = (f"        retry: {{retry_on: [connect-failure, reset], max_attempts: 3, budget_percent: {percent},"
             f" min_retries_per_second: {floor_rate}, budget_window: {window:g}s,"
             " backoff: {base: 1ms, max: 2ms}}")
    lb, origins = await lb_with([resets, resets, resets], route=route,
                                pool="    circuit_breaker: {consecutive_failures: 0}\n"
                                     "    health: {passive: {enabled: false}}")
    try:
        n = 200
        statuses = await many(n, 8, lambda i: get(lb.port, f"/{i}"))
        assert all(r is not None and r.status == 502 for r in statuses)
        seen = hits(origins)
        bound = n * (1 + percent / 100) + floor_rate * window
        # measured: retries happened, and stayed within the budget
        assert n < seen <= bound, (seen, bound)
        rr = lb.factory.router.routes[0].target.resilience
        assert rr.budget.exhausted > 0  # the policy asked for more; the budget said no
        st = lb.runtime.listener_state["retries"]("web")
        entry = st["by_route"][lb.factory.router.routes[0].name]
        assert entry["retries_total"] == seen - n
        assert entry["decision_budget_exhausted_total"] == rr.budget.exhausted
    finally:
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_get_to_resetting_backend_succeeds_elsewhere():
    lb, origins = await lb_with([resets, status(200)])
    try:
        results = [await get(lb.port, f"/{i}") for i in range(10)]
        assert [r.status for r in results] == [200] * 10
        assert len(origins[0].requests) >= 1  # the resetting one was tried
        assert len(origins[1].requests) == 10
    finally:
        await shutdown(lb, origins)


# -- POST exactly once ------------------------------------------------------------------------

POST_ROUTE = ("        retry: {retry_on: [connect-failure, reset, timeout, 503], max_attempts: 3,"
              " per_try_timeout: 300ms, backoff: {base: 1ms, max: 2ms}}")


@pytest.mark.parametrize("handler,expect", [(resets, 502), (silent, 504), (status(503), 503)],
                         ids=["reset", "timeout", "503"])
@pytest_twisted.ensureDeferred
async def test_post_without_key_is_sent_exactly_once(handler, expect):
    lb, origins = await lb_with([handler, handler], route=POST_ROUTE)
    try:
        r = await get(lb.port, "/pay", method="POST", body=b"amount=10")
        assert r.status == expect
        assert hits(origins) == 1
        # with an idempotency key the same failure is retried on the other backend
        r = await get(lb.port, "/pay", method="POST", body=b"amount=10", headers="Idempotency-Key: k1\r\n")
        assert r.status == expect
        assert hits(origins) == 3
        assert [req.body for o in origins for req in o.requests] == [b"amount=10"] * 3  # body replayed whole
    finally:
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_no_retry_after_a_response_byte_reached_the_client():
    lb, origins = await lb_with([half_then_reset, half_then_reset],
                                route="        retry: {retry_on: [reset, 5xx], max_attempts: 3}")
    try:
        data = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        _, client = await raw_request(reactor, lb.port, data, timeout=TIMEOUT)
        await client.closed(reactor, TIMEOUT)
        assert client.data.startswith(b"HTTP/1.1 200") and client.data.endswith(b"partial")
        assert hits(origins) == 1
    finally:
        await shutdown(lb, origins)


# -- limits -------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_max_pending_answers_503_at_once_and_memory_stays_flat():
    # the stuck requests must stay stuck for the whole test, however slow a
    # loaded box makes the 400 traced refusals: a route timeout far above it
    lb, origins = await lb_with(
        [silent], route="        retry: {max_attempts: 1}\n        timeout: 300s",
        pool="    limits: {max_connections: 2, max_pending: 2}",
    )
    stuck = []
    try:
        from support.l7 import connect

        for i in range(4):  # 2 on connections, 2 waiting for one
            c = await connect(reactor, lb.port)
            c.transport.write(f"GET /stuck{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            stuck.append(c)
        for _ in range(200):
            if len(origins[0].requests) == 2:
                break
            await pause(0.01)
        assert len(origins[0].requests) == 2
        limits = lb.runtime.resilience.pool("app").limits

        async def overflow(i: int) -> float:
            t0 = time.monotonic()
            r = await get(lb.port, f"/x{i}")
            assert r.status == 503 and r.header(LIMIT_HEADER.encode()) == b"max_pending"
            return time.monotonic() - t0

        tracemalloc.start()
        try:
            await many(200, 5, overflow)  # warm up: windows, logs and caches reach their size
            before = await settled_memory()
            took = await many(200, 5, overflow)
            after = await settled_memory()
        finally:
            tracemalloc.stop()
        assert max(took) < 1.0  # at once, not after the 5 s request timeout
        # flat: a refusal holds nothing (a queued request would hold a few KB each)
        assert after - before < 200 * 256, after - before
        assert len(origins[0].requests) == 2  # the backend never saw the overflow
        state = lb.runtime.pool_state["resilience"](lb.runtime.pools["app"])
        assert state["max_pending_in_use"] == 2 and state["max_pending_refused_total"] >= 400
        for c in stuck:  # the waiting clients leave: their slots come back
            c.transport.abortConnection()
        for _ in range(200):
            if limits.in_use(Limit.PENDING) == 0 and limits.in_use(Limit.REQUESTS) == 0:
                break
            await pause(0.01)
        assert limits.in_use(Limit.PENDING) == 0 and limits.in_use(Limit.REQUESTS) == 0
    finally:
        for c in stuck:
            c.transport.abortConnection()
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_rate_limit_answers_429_with_retry_after():
    lb, origins = await lb_with([status(200)],
                                route="        rate_limit: {rate: 0.5, burst: 2, key: client}")
    try:
        results = [await get(lb.port, f"/{i}") for i in range(5)]
        assert [r.status for r in results] == [200, 200, 429, 429, 429]
        assert int(results[2].header(b"retry-after")) >= 1
        assert len(origins[0].requests) == 2
        entry = next(iter(lb.runtime.listener_state["retries"]("web")["by_route"].values()))
        assert entry["rate_limited_total"] == 3
    finally:
        await shutdown(lb, origins)


# -- breakers, Retry-After, backoff ----------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_backend_retry_after_on_503_is_respected():
    lb, origins = await lb_with([status(503, [(b"retry-after", b"1")]), status(200)],
                                route="        retry: {max_attempts: 1}")
    try:
        first = [await get(lb.port, f"/{i}") for i in range(8)]
        statuses = [r.status for r in first]
        assert statuses.count(503) == 1 and first[statuses.index(503)].header(b"retry-after") == b"1"
        assert len(origins[0].requests) == 1  # held out after its Retry-After
        backend = lb.runtime.pools["app"].get(origins[0].address)
        assert lb.runtime.backend_state["breaker"](lb.runtime.pools["app"], backend)["held_seconds"] > 0
        await pause(1.1)
        later = [await get(lb.port, f"/later{i}") for i in range(2)]
        assert len(origins[0].requests) == 2  # back in rotation once the hold passed
        assert [r.status for r in later].count(503) == 1
    finally:
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_breaker_opens_then_half_opens():
    lb, origins = await lb_with(
        [status(502), status(200)], route="        retry: {max_attempts: 1}",
        # open_for outlasts the 10 requests below on a loaded box (they take ~50 ms on a quiet one)
        pool="    circuit_breaker: {consecutive_failures: 3, open_for: 2s, half_open_requests: 1}\n"
             "    health: {passive: {enabled: false}}",
    )
    pool = lb.runtime.pools["app"]
    bad = pool.get(origins[0].address)
    state = lambda: lb.runtime.backend_state["breaker"](pool, bad)["state"]  # noqa: E731
    try:
        for i in range(10):
            await get(lb.port, f"/{i}")
        assert len(origins[0].requests) == 3  # opened after 3 failures in a row
        assert state() == "open"
        await pause(2.05)
        assert state() == "half-open"
        for i in range(3):
            await get(lb.port, f"/again{i}")
        assert len(origins[0].requests) == 4  # one trial, which failed: open again
        assert state() == "open"
        assert lb.runtime.pool_state["resilience"](pool)["breakers_opened_total"] == 2
        # and /metrics exports it, through the providers
        from lbtwist.admin.live import Live
        from lbtwist.admin.metrics import exposition, make_registry

        text = exposition(make_registry(lb.runtime, Live(lb.runtime, reactor), reactor, process=False)).decode()
        assert f'lbtwist_backend_breaker_state{{backend="{origins[0].address}"' in text
        line = next(x for x in text.splitlines()
                    if x.startswith("lbtwist_backend_breaker_state") and origins[0].address in x and 'state="open"' in x)
        assert line.endswith(" 1.0")
        assert "lbtwist_pool_resilience_breakers_opened_total" in text
        assert 'lbtwist_listener_retries_total{listener="web",route=' in text
    finally:
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_backoff_delays_between_tries():
    lb, origins = await lb_with(
        [resets, resets, resets],
        route="        retry: {max_attempts: 3, backoff: {base: 150ms, max: 250ms}}",
    )

    class Ceiling(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the top of the jitter range, to observe the ceilings

    lb.factory.rng = Ceiling()
    arrivals: list[float] = []
    for o in origins:
        inner = o.handler

        def record(req, proto, inner=inner):
            arrivals.append(time.monotonic())
            return inner(req, proto)

        o.handler = record
    try:
        r = await get(lb.port, "/")
        assert r.status == 502
        assert len(arrivals) == 3
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert 0.14 <= gaps[0] < 0.6 and 0.24 <= gaps[1] < 0.7, gaps  # 150 ms, then min(300, 250) ms
    finally:
        await shutdown(lb, origins)


# -- L4 --------------------------------------------------------------------------------------------

async def closed_ports(n: int) -> list[int]:
    """Ports on 127.0.0.1 nobody listens on (bound, then released)."""
    from twisted.internet.protocol import Factory

    ports = [reactor.listenTCP(0, Factory(), interface="127.0.0.1") for _ in range(n)]
    numbers = [p.getHost().port for p in ports]
    for p in ports:
        await p.stopListening()
    return numbers


@pytest_twisted.ensureDeferred
async def test_l4_connect_retries_spend_the_pool_budget():
    """Every backend refuses: L4 connect failover would try 3 backends per
    client, but the pool's retry budget (1 retry per window here) caps it."""
    from support.l7 import connect

    numbers = await closed_ports(3)
    backends = "\n".join(f'      - {{address: "127.0.0.1:{p}"}}' for p in numbers)
    text = "\n".join([
        "listeners:",
        "  - name: relay",
        '    bind: "tcp:0:interface=127.0.0.1"',
        "    mode: tcp",
        "    pool: down",
        "pools:",
        "  - name: down",
        "    algorithm: round_robin",
        "    connect_attempts: 3",
        "    retry_budget: {budget_percent: 0, min_retries_per_second: 0.1, window: 10s}",
        "    circuit_breaker: {consecutive_failures: 0}",
        "    health: {passive: {enabled: false}}",
        "    backends:",
        backends,
        "",
    ])
    svc = LbtwistService(load_config(text, registry()).config, reactor, registry())
    svc.startService()
    try:
        port = svc.listeners.getServiceNamed("relay").address.port
        for _ in range(10):
            c = await connect(reactor, port)
            await c.closed(reactor, TIMEOUT)  # closed: no backend could be reached
        budget = svc.runtime.resilience.pool("down").budget
        assert budget.requests_total == 10
        assert budget.retries_total == 1  # the floor of this window, then no more retries
        assert budget.exhausted >= 9
        state = svc.runtime.pool_state["resilience"](svc.runtime.pools["down"])
        assert state["budget_exhausted_total"] == budget.exhausted
    finally:
        await defer.maybeDeferred(svc.stopService).addTimeout(TIMEOUT, reactor)
