# -*- test-case-name: tests.test_drill_loadgen -*-
"""An open-loop HTTP load generator whose clients behave like the field
guide's: each request has a 1s timeout and is retried at once, twice.

Open loop: arrivals follow a Poisson schedule fixed in advance by the rate,
whatever the target answers, so a slow target cannot slow the offered load
down (closed-loop generators do, and hide collapses). Latency is measured from
the *scheduled* arrival, so a generator running late cannot hide it either; if
it does run late, the lag is recorded per second and reported.

The HTTP/1.1 client is minimal on purpose (httptools, keep-alive, one request
per connection at a time, no pipelining): the generator must not be the
bottleneck of a box it shares with the balancer and the backends.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Protocol as TypingProtocol

import attrs
import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol

#: Final or per-attempt outcomes besides an HTTP status.
TIMEOUT, RESET, REFUSED, CONNECT_ERROR, CLIENT_LIMIT = "timeout", "reset", "refused", "connect-error", "client-limit"


class Sink(TypingProtocol):
    """What the generator reports to (L{lbtwist.drill.recorder.Recorder})."""

    def arrival(self, t: float) -> None: ...
    def attempt(self, t: float, retry: bool) -> None: ...
    def try_result(self, t: float, outcome: str) -> None: ...
    def result(self, t_sched: float, t_done: float, ok: bool, attempts: int, outcome: str) -> None: ...
    def lag(self, t: float, lag: float) -> None: ...


@attrs.define
class ClientPolicy:
    """The clients' behaviour: 1s per try, 2 immediate retries (3 tries in all)."""

    timeout: float = 1.0
    retries: int = 2

    def retryable(self, outcome: str) -> bool:
        if outcome in (TIMEOUT, RESET, REFUSED, CONNECT_ERROR):
            return True
        return outcome.isdigit() and int(outcome) >= 500

    @staticmethod
    def success(outcome: str) -> bool:
        return outcome.isdigit() and int(outcome) < 400


def poisson_arrivals(rate: Callable[[float], float] | float, duration: float, rng: random.Random) -> list[float]:
    """Arrival offsets in [0, duration) of a Poisson process whose rate may
    vary (thinning against the peak rate sampled every 100 ms)."""
    if not callable(rate):
        r0 = float(rate)
        out: list[float] = []
        t = rng.expovariate(r0) if r0 > 0 else duration
        while t < duration:
            out.append(t)
            t += rng.expovariate(r0)
        return out
    peak = max(rate(i * 0.1) for i in range(int(duration * 10) + 1))
    if peak <= 0:
        return []
    out = []
    t = rng.expovariate(peak)
    while t < duration:
        if rng.random() * peak < rate(t):
            out.append(t)
        t += rng.expovariate(peak)
    return out


class _Conn(Protocol):
    """One keep-alive client connection; one exchange at a time."""

    def __init__(self, gen: "LoadGenerator") -> None:
        self.gen = gen
        self.parser = httptools.HttpResponseParser(self)
        self.attempt: _Attempt | None = None
        self.status = 0
        self.done = False
        self.keep = False
        self.alive = False

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()
        self.done = True

    def connectionMade(self) -> None:
        self.alive = True
        att = self.attempt
        if att is not None and not att.finished:
            self.transport.write(self.gen.request_bytes)
        else:
            self.attempt = None
            self.gen._release(self)

    def send(self, att: "_Attempt") -> None:
        self.attempt = att
        self.done = False
        self.transport.write(self.gen.request_bytes)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abortConnection()
            return
        if self.done:
            att, self.attempt = self.attempt, None
            self.done = False
            if att is not None:
                self.gen._finish_attempt(att, str(self.status), self if self.keep else None)
            if not self.keep:
                self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.alive = False
        self.gen._conn_lost(self)
        att, self.attempt = self.attempt, None
        if att is not None:
            self.gen._finish_attempt(att, RESET, None)


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, gen: "LoadGenerator", att: "_Attempt") -> None:
        self.gen = gen
        self.att = att

    def buildProtocol(self, addr: Any) -> _Conn:
        self.gen._connecting -= 1
        conn = _Conn(self.gen)
        if not self.att.finished:
            conn.attempt = self.att
            self.att.conn = conn
        self.gen._conns.add(conn)
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.gen._connecting -= 1
        refused = reason.check(error.ConnectionRefusedError) is not None
        self.gen._finish_attempt(self.att, REFUSED if refused else CONNECT_ERROR, None)


class _Request:
    __slots__ = ("t_sched", "attempts")

    def __init__(self, t_sched: float) -> None:
        self.t_sched = t_sched
        self.attempts = 0


class _Attempt:
    __slots__ = ("req", "started", "timer", "conn", "connector", "finished")

    def __init__(self, req: _Request, started: float) -> None:
        self.req = req
        self.started = started
        self.timer: IDelayedCall | None = None
        self.conn: _Conn | None = None
        self.connector: Any = None
        self.finished = False


@attrs.define
class LoadStats:
    """Totals of one run, for the summary and the tests."""

    scheduled: int = 0
    issued: int = 0
    attempts: int = 0
    retries: int = 0
    succeeded: int = 0
    failed: int = 0
    connections_opened: int = 0
    max_lag: float = 0.0
    late_arrivals: int = 0
    client_limit: int = 0
    outcomes: dict[str, int] = attrs.Factory(dict)


class LoadGenerator:
    """Drives ``rate`` requests per second at ``host:port`` for ``duration``
    seconds, then waits (bounded) for the last ones. ``run()`` returns a
    Deferred firing with L{LoadStats}."""

    #: Arrivals more than this late count as "the generator fell behind".
    LATE = 0.05

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        *,
        rate: float | Callable[[float], float],
        duration: float,
        sink: Sink,
        policy: ClientPolicy | None = None,
        path: str = "/work",
        max_connections: int = 4000,
        seed: int | None = None,
        start_at: float | None = None,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError("drills only target 127.0.0.0/8")
        self.reactor = reactor
        self.host = host
        self.port = port
        self.rate = rate
        self.duration = duration
        self.sink = sink
        self.policy = policy or ClientPolicy()
        self.max_connections = max_connections
        self.request_bytes = f"GET {path} HTTP/1.1\r\nHost: drill\r\nUser-Agent: lbtwist-drill\r\n\r\n".encode()
        self.rng = random.Random(seed)
        self.stats = LoadStats()
        self._idle: deque[_Conn] = deque()
        self._conns: set[_Conn] = set()
        self._connecting = 0
        self._inflight: set[_Attempt] = set()
        self._arrivals: list[float] = []
        self._next = 0
        self._t0 = 0.0
        self._timer: IDelayedCall | None = None
        self._done: defer.Deferred | None = None
        self._stopping = False
        self._stopping_all = False
        self._open_requests = 0
        self._start_at = start_at

    # -- schedule ------------------------------------------------------------

    def run(self) -> defer.Deferred:
        self._t0 = self._start_at if self._start_at is not None else self.reactor.seconds()
        self._arrivals = [self._t0 + x for x in poisson_arrivals(self.rate, self.duration, self.rng)]
        self.stats.scheduled = len(self._arrivals)
        self._done = defer.Deferred()
        self._arm()
        return self._done

    def _arm(self) -> None:
        if self._next >= len(self._arrivals):
            self._timer = None
            self._stopping = True
            self._maybe_done()
            return
        delay = self._arrivals[self._next] - self.reactor.seconds()
        self._timer = self.reactor.callLater(max(0.0, delay), self._fire)

    def _fire(self) -> None:
        now = self.reactor.seconds()
        arr = self._arrivals
        i = self._next
        if i < len(arr):
            lag = now - arr[i]
            self.sink.lag(now, lag)
            if lag > self.stats.max_lag:
                self.stats.max_lag = lag
        while i < len(arr) and arr[i] <= now + 0.0005:
            t = arr[i]
            i += 1
            if now - t > self.LATE:
                self.stats.late_arrivals += 1
            req = _Request(t)
            self.stats.issued += 1
            self._open_requests += 1
            self.sink.arrival(t)
            self._attempt(req)
        self._next = i
        self._arm()

    def stop(self) -> None:
        """Stop issuing new requests now (in-flight ones finish)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._next = len(self._arrivals)
        self._stopping = True
        self._maybe_done()

    # -- attempts ------------------------------------------------------------

    def _attempt(self, req: _Request) -> None:
        now = self.reactor.seconds()
        retry = req.attempts > 0
        req.attempts += 1
        self.stats.attempts += 1
        if retry:
            self.stats.retries += 1
        self.sink.attempt(now, retry)
        att = _Attempt(req, now)
        self._inflight.add(att)
        att.timer = self.reactor.callLater(self.policy.timeout, self._timed_out, att)
        while self._idle:
            conn = self._idle.pop()
            if conn.alive:
                att.conn = conn
                conn.send(att)
                return
        if len(self._conns) + self._connecting >= self.max_connections:
            self.stats.client_limit += 1
            self._finish_attempt(att, CLIENT_LIMIT, None)
            return
        self._connecting += 1
        self.stats.connections_opened += 1
        factory = _Factory(self, att)
        att.connector = self.reactor.connectTCP(self.host, self.port, factory, timeout=self.policy.timeout + 1)

    def _timed_out(self, att: _Attempt) -> None:
        att.timer = None
        conn = att.conn
        if conn is not None:
            conn.attempt = None
            if conn.transport is not None:
                conn.transport.abortConnection()
        elif att.connector is not None:
            att.connector.disconnect()
        self._finish_attempt(att, TIMEOUT, None)

    def _conn_lost(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _release(self, conn: _Conn) -> None:
        """``conn`` is free for the next attempt (or closed when stopping)."""
        if self._stopping_all:
            conn.transport.loseConnection()
        else:
            self._idle.append(conn)

    def _finish_attempt(self, att: _Attempt, outcome: str, reusable: _Conn | None) -> None:
        if att.finished:
            if reusable is not None:
                self._release(reusable)
            return
        att.finished = True
        self._inflight.discard(att)
        if att.timer is not None and att.timer.active():
            att.timer.cancel()
        att.timer = None
        if reusable is not None:
            self._release(reusable)
        now = self.reactor.seconds()
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        self.sink.try_result(now, outcome)
        req = att.req
        pol = self.policy
        if pol.success(outcome):
            self._final(req, now, True, outcome)
        elif pol.retryable(outcome) and req.attempts <= pol.retries and outcome != CLIENT_LIMIT:
            self._attempt(req)
        else:
            self._final(req, now, False, outcome)

    def _final(self, req: _Request, now: float, ok: bool, outcome: str) -> None:
        if ok:
            self.stats.succeeded += 1
        else:
            self.stats.failed += 1
        self._open_requests -= 1
        self.sink.result(req.t_sched, now, ok, req.attempts, outcome)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._stopping and self._open_requests == 0 and self._done is not None:
            d, self._done = self._done, None
            self._stopping_all = True
            self.close()
            d.callback(self.stats)

    def close(self) -> None:
        """Drop every connection and timer (also on abort)."""
        self._stopping_all = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for att in list(self._inflight):
            if att.timer is not None and att.timer.active():
                att.timer.cancel()
            if att.connector is not None and att.conn is None:
                att.finished = True
                att.connector.disconnect()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abortConnection()
        self._idle.clear()
