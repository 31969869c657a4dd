# -*- test-case-name: tests.test_drill_faults -*-
"""How a drill backend behaves, without sockets: a server with a fixed number
of workers (its capacity), a FIFO queue in front of them (so it has a latency
knee), and faults that can be changed while it runs.

The network adapters in L{lbtwist.drill.backend} hand each request to
L{ServerModel.submit} and act on the L{Decision} they get back. Work already
accepted is finished even if the client has gone, as a thread-pool server
does: abandoned work still occupies a worker, which is what lets a retry storm
outlive its trigger.
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Request kinds: the real path does the work (and suffers "real" latency);
#: the health path answers at once from outside the worker pool.
REAL, HEALTH = "real", "health"

#: What the adapter must do with a request.
RESPOND, RESET, HANG = "respond", "reset", "hang"


@attrs.define
class Faults:
    """Faults currently injected. Every field can be set through the control
    API; the defaults are a healthy server."""

    #: Seconds added to every service time ...
    latency: float = 0.0
    #: ... on "real" paths only (a gray failure: /healthz stays fast) or on "all".
    latency_scope: str = REAL
    #: Fraction of real requests answered with ``error_status`` (fast, no worker).
    error_rate: float = 0.0
    error_status: int = 500
    #: Fraction of real requests whose connection is reset instead of answered.
    reset_rate: float = 0.0
    #: Fraction of real requests never answered (the connection stays open).
    hang_rate: float = 0.0
    #: Connections are accepted and closed at once, before reading anything.
    accept_close: bool = False
    #: Fraction of health probes answered 503 (a flapping check).
    probe_fail_rate: float = 0.0
    #: Cold start: service times are multiplied by ``cold_factor`` from the
    #: first real request after a (re)start, falling linearly to 1 over
    #: ``cold_seconds`` (caches and JITs warm up under traffic, not while idle).
    cold_factor: float = 1.0
    cold_seconds: float = 0.0

    def update(self, changes: dict[str, Any]) -> list[str]:
        """Apply ``changes``; return the names that are not fault fields."""
        unknown = []
        for k, v in changes.items():
            field = getattr(attrs.fields(Faults), k, None)
            if field is None:
                unknown.append(k)
                continue
            cur = getattr(self, k)
            if isinstance(cur, bool):
                v = bool(v)
            elif isinstance(cur, float):
                v = float(v)
            elif isinstance(cur, int):
                v = int(v)
            elif isinstance(cur, str):
                v = str(v)
                if k == "latency_scope" and v not in (REAL, "all"):
                    raise ValueError(f"latency_scope must be 'real' or 'all', not {v!r}")
            setattr(self, k, v)
        return unknown


@attrs.define
class Counters:
    """Monotonic counters the drill reads through the control API."""

    #: Real requests received (the "attempts seen by backends").
    attempts: int = 0
    probes: int = 0
    probes_failed: int = 0
    ok: int = 0
    errors: int = 0
    resets: int = 0
    hangs: int = 0
    #: Finished work whose client had already gone.
    abandoned: int = 0
    #: Connections accepted.
    connections: int = 0


@attrs.define
class Decision:
    """The model's answer to one request."""

    action: str
    #: For RESPOND: the status ``reply`` will be called with (the model calls
    #: it on the clock; adapters only react).
    status: int = 200
    #: The request waits for a free worker.
    queued: bool = False


class _Job:
    __slots__ = ("reply", "arrived", "gone", "delay")

    def __init__(self, reply: Callable[[int], None], arrived: float) -> None:
        self.reply = reply
        self.arrived = arrived
        self.gone = False
        self.delay: IDelayedCall | None = None


@attrs.define(eq=False)
class ServiceTime:
    """Base service time: log-normal around ``median`` seconds, so the tail
    looks like a real server's (p99 about ``median * exp(2.33 * sigma)``)."""

    median: float = 0.002
    sigma: float = 0.5

    def draw(self, rng: random.Random) -> float:
        if self.sigma <= 0:
            return self.median
        return self.median * math.exp(rng.gauss(0.0, self.sigma))


class ServerModel:
    """One backend: ``capacity`` workers, an unbounded FIFO, faults, counters.

    ``submit(kind, reply)`` returns a L{Decision}. For RESPOND, ``reply(status)``
    is called later on ``clock``; the adapter writes the answer then (or drops
    it if the client left, after telling the model with the returned handle's
    L{ServerModel.abandon}).
    """

    def __init__(
        self,
        name: str,
        clock: IReactorTime,
        *,
        capacity: int = 8,
        service: ServiceTime | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.name = name
        self.clock = clock
        self.capacity = capacity
        self.service = service or ServiceTime()
        self.rng = rng or random.Random()
        self.faults = Faults()
        self.counters = Counters()
        self.busy = 0
        self.queue: deque[_Job] = deque()
        self.started_at = clock.seconds()
        #: When the first real request after the (re)start arrived.
        self.warming_from: float | None = None
        self._pending: set[_Job] = set()

    # -- state ---------------------------------------------------------------

    def restarted(self) -> None:
        """The process came back: empty queue, cold-start clock reset."""
        self.stop()
        self.started_at = self.clock.seconds()
        self.warming_from = None

    def cold_multiplier(self, now: float) -> float:
        f = self.faults
        if f.cold_factor <= 1.0 or f.cold_seconds <= 0:
            return 1.0
        if self.warming_from is None:
            return f.cold_factor
        age = now - self.warming_from
        if age >= f.cold_seconds:
            return 1.0
        return f.cold_factor - (f.cold_factor - 1.0) * (age / f.cold_seconds)

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capacity": self.capacity,
            "busy": self.busy,
            "queued": len(self.queue),
            "counters": attrs.asdict(self.counters),
            "faults": attrs.asdict(self.faults),
        }

    # -- requests ------------------------------------------------------------

    def submit(self, kind: str, reply: Callable[[int], None]) -> tuple[Decision, Any]:
        """A request arrived. Returns the decision and a handle for L{abandon}."""
        f = self.faults
        c = self.counters
        now = self.clock.seconds()
        if kind == HEALTH:
            c.probes += 1
            status = 200
            if f.probe_fail_rate > 0 and self.rng.random() < f.probe_fail_rate:
                status = 503
                c.probes_failed += 1
            delay = 0.0005 + (f.latency if f.latency_scope == "all" else 0.0)
            job = _Job(reply, now)
            self._later(job, delay, status, worker=False)
            return Decision(RESPOND, status), job
        c.attempts += 1
        if self.warming_from is None:
            self.warming_from = now
        r = self.rng.random()
        if r < f.reset_rate:
            c.resets += 1
            return Decision(RESET), None
        r -= f.reset_rate
        if r < f.hang_rate:
            c.hangs += 1
            return Decision(HANG), None
        r -= f.hang_rate
        if r < f.error_rate:
            c.errors += 1
            job = _Job(reply, now)
            self._later(job, self.service.draw(self.rng), f.error_status, worker=False)
            return Decision(RESPOND, f.error_status), job
        job = _Job(reply, now)
        if self.busy < self.capacity:
            self._start(job)
            return Decision(RESPOND, 200), job
        self.queue.append(job)
        return Decision(RESPOND, 200, queued=True), job

    def abandon(self, job: Any) -> None:
        """The client of ``job`` went away; the work still runs to the end."""
        if job is not None:
            job.gone = True

    def _start(self, job: _Job) -> None:
        self.busy += 1
        now = self.clock.seconds()
        d = self.service.draw(self.rng) * self.cold_multiplier(now) + self.faults.latency
        self._later(job, d, 200, worker=True)

    def _later(self, job: _Job, delay: float, status: int, worker: bool) -> None:
        self._pending.add(job)
        job.delay = self.clock.callLater(max(0.0, delay), self._done, job, status, worker)

    def _done(self, job: _Job, status: int, worker: bool) -> None:
        self._pending.discard(job)
        if worker:
            self.busy -= 1
            if status < 500:
                if job.gone:
                    self.counters.abandoned += 1
                else:
                    self.counters.ok += 1
            while self.queue and self.busy < self.capacity:
                self._start(self.queue.popleft())
        if not job.gone:
            job.reply(status)

    def stop(self) -> None:
        """Cancel every timer (process shutdown or test teardown)."""
        for job in list(self._pending):
            if job.delay is not None and job.delay.active():
                job.delay.cancel()
        self._pending.clear()
        self.queue.clear()
        self.busy = 0
