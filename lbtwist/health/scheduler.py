# -*- test-case-name: tests.test_health_scheduler -*-
"""When to probe and what a run of results means.

L{Thresholds} is the sans-IO rise/fall rule. L{ProbeLoop} probes one backend
on an injected clock: one probe at a time, each bounded by ``timeout``, the
next one ``interval`` after the previous one *started*, shortened by up to
``jitter`` so loops of many backends drift apart and never exceed the
interval (that keeps the bound "a dead backend is out within interval x
unhealthy_threshold + timeout"). L{ProbeScheduler} runs the loops of one pool
and staggers their first probes over a window.

Loops are C{callLater} chains rather than LoopingCall: a LoopingCall stops
for good when its callable raises, and a health loop must never die.
"""
from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from lbtwist.config.model import ActiveHealthConfig
from lbtwist.health import ProbeResult
from lbtwist.health.probes import describe_failure
from lbtwist.interfaces import IHealthProbe
from lbtwist.pool import Backend, Health, Pool

log = Logger(namespace="lbtwist.health")


def summarize(reasons: list[str]) -> str:
    """``["timed out after 2s"] * 3`` -> ``"3 probes timed out after 2s"``."""
    n = len(reasons)
    if n and all(r == reasons[0] for r in reasons):
        if reasons[0].startswith("timed out"):
            return f"{n} probes {reasons[0]}"
        return f"{n} probes failed: {reasons[0]}"
    return f"{n} probes failed (last: {reasons[-1] if reasons else '?'})"


@attrs.define
class Thresholds:
    """Rise/fall counting. A backend changes state only after a run of
    agreeing results, so one lost probe (a GC pause) cannot take it out.

    An 'unknown' backend (never probed) joins on its first passing probe and
    becomes 'unhealthy' after ``unhealthy`` failures; a healthy one needs
    ``unhealthy`` failures in a row to go out; an unhealthy one needs
    ``healthy`` passes in a row to come back."""

    unhealthy: int = 3
    healthy: int = 2
    fails: list[str] = attrs.Factory(list)
    passes: int = 0

    def record(self, current: Health, result: ProbeResult) -> tuple[Health, str] | None:
        """Feed one result; returns (new health, reason) when it changes."""
        if result.ok:
            self.fails.clear()
            self.passes += 1
            if current is Health.UNKNOWN:
                return self._to(Health.HEALTHY, f"first probe passed ({result.reason})")
            if current is Health.UNHEALTHY and self.passes >= self.healthy:
                return self._to(Health.HEALTHY, f"{self.passes} probes passed ({result.reason})")
            return None
        self.passes = 0
        self.fails.append(result.reason)
        if current is not Health.UNHEALTHY and len(self.fails) >= self.unhealthy:
            return self._to(Health.UNHEALTHY, summarize(self.fails))
        return None

    def _to(self, health: Health, reason: str) -> tuple[Health, str]:
        self.fails.clear()
        self.passes = 0
        return health, reason


class ProbeLoop:
    """Probes one backend forever (until L{stop}) and applies L{Thresholds}."""

    def __init__(
        self,
        pool: Pool,
        backend: Backend,
        probe: IHealthProbe,
        clock: IReactorTime,
        *,
        interval: float,
        timeout: float,
        thresholds: Thresholds,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.probe = probe
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.thresholds = thresholds
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.running = False
        self.probes = 0
        #: The last result and when its probe started, for the admin API.
        self.last: ProbeResult | None = None
        self.last_at: float | None = None
        self._call: IDelayedCall | None = None
        self._inflight: defer.Deferred | None = None

    def start(self, delay: float = 0.0) -> None:
        self.running = True
        self._call = self.clock.callLater(max(0.0, delay), self._fire)

    def stop(self) -> None:
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        d, self._inflight = self._inflight, None
        if d is not None:
            d.cancel()

    def next_delay(self) -> float:
        """A jittered interval in [interval x (1 - jitter), interval]."""
        return self.interval * (1.0 - self.jitter * self.rng.random())

    def _fire(self) -> None:
        self._call = None
        if not self.running:
            return
        started = self.clock.seconds()
        d = defer.maybeDeferred(self.probe.probe, self.backend)
        # authoritative bound: a plugin probe may ignore its own timeout
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(lambda f: ProbeResult(False, describe_failure(f, self.timeout)))
        d.addCallback(self._result, started)
        d.addErrback(lambda f: log.failure("health probe of {backend} in pool {pool}: handling failed",
                                           f, backend=self.backend.address, pool=self.pool.name))
        d.addBoth(self._schedule, started)
        if not d.called:
            self._inflight = d

    def _result(self, result: ProbeResult, started: float) -> None:
        if not self.running:
            return
        self.probes += 1
        self.last, self.last_at = result, started
        change = self.thresholds.record(self.backend.health, result)
        if change is not None:
            self.pool.set_health(self.backend, change[0], change[1])

    def _schedule(self, _: Any, started: float) -> None:
        self._inflight = None
        if not self.running:
            return
        at = started + self.next_delay()
        self._call = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._fire)


class ProbeScheduler:
    """The probe loops of one pool. First probes are spread evenly (with a
    random phase) over ``min(stagger, interval)`` so a pool of many backends
    does not probe them all at once, yet new backends are let in quickly."""

    def __init__(
        self,
        pool: Pool,
        probe: IHealthProbe,
        cfg: ActiveHealthConfig,
        clock: IReactorTime,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.probe = probe
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self.loops: dict[Backend, ProbeLoop] = {}
        self.running = False

    @property
    def spread(self) -> float:
        return max(0.0, min(self.cfg.stagger, self.cfg.interval))

    def start(self) -> None:
        self.running = True
        backends = self.pool.backends()
        n = len(backends)
        for i, b in enumerate(backends):
            self._start_loop(b, self.spread * (i + self.rng.random()) / n)

    def stop(self) -> None:
        self.running = False
        for loop in self.loops.values():
            loop.stop()
        self.loops.clear()

    def add(self, backend: Backend) -> None:
        """A backend joined at runtime: unless ``assume_healthy``, it stays
        out ('unknown') until its first probe passes, which comes soon."""
        if not self.cfg.assume_healthy and backend.health is Health.HEALTHY:
            self.pool.set_health(backend, Health.UNKNOWN, "new backend, awaiting its first probe")
        if self.running:
            self._start_loop(backend, self.spread * self.rng.random())

    def last_result(self, backend: Backend) -> tuple[ProbeResult, float, int] | None:
        """The backend's last probe result, when that probe started, and how
        many probes it has had; None before its first result."""
        loop = self.loops.get(backend)
        if loop is None or loop.last is None:
            return None
        return loop.last, loop.last_at, loop.probes  # type: ignore[return-value]

    def remove(self, backend: Backend) -> None:
        loop = self.loops.pop(backend, None)
        if loop is not None:
            loop.stop()

    def _start_loop(self, backend: Backend, delay: float) -> None:
        if backend in self.loops:
            return
        loop = ProbeLoop(
            self.pool, backend, self.probe, self.clock,
            interval=self.cfg.interval,
            timeout=self.cfg.timeout,
            thresholds=Thresholds(self.cfg.unhealthy_threshold, self.cfg.healthy_threshold),
            jitter=self.cfg.jitter,
            rng=self.rng,
        )
        self.loops[backend] = loop
        loop.start(delay)
