# -*- test-case-name: tests.test_health_outlier -*-
"""Passive outlier detection, sans-IO: fed live outcomes and times, it ejects
and returns backends through the L{Pool}.

Three rules, all judged on real traffic because a probe can lie:
  - ``consecutive_5xx`` answers 5xx in a row;
  - ``consecutive_gateway_failures`` connect failures/resets/timeouts in a row
    (an "ok" resets both runs; "cancelled" says nothing about the backend);
  - latency: a backend whose recent mean latency is over ``factor`` times the
    median of the others (and over ``min_latency``). The mean is decayed over
    ``window`` seconds and needs ``min_requests`` of recent evidence, so one
    slow request does not eject a backend but a 900 ms node among 3 ms ones
    does.

An ejection lasts ``base_ejection_time`` times the backend's ejection count
(30 s, 60 s, 90 s ... up to ``max_ejection_time``); the count drops by one for
every ``base_ejection_time`` the backend then serves without being ejected, so
an old offence is forgotten. ``max_ejection_percent`` caps how much of the
pool may be out at once (at least one backend of a pool of two or more):
past that, ejecting more would only overload the rest. A returning backend
goes back through slow start (the pool restarts its ramp on return).
"""
from __future__ import annotations

import math
import statistics

import attrs
from twisted.logger import Logger

from lbtwist.config.model import PassiveHealthConfig
from lbtwist.pool import Backend, Pool

log = Logger(namespace="lbtwist.health")


@attrs.define
class _Track:
    """What the detector remembers about one backend."""

    c5xx: int = 0
    cgw: int = 0
    #: Decayed latency sum and count; mean = lat_sum / lat_n.
    lat_sum: float = 0.0
    lat_n: float = 0.0
    lat_at: float = 0.0
    #: Ejection multiplier (grows per ejection, decays with good behaviour).
    ejections: int = 0
    #: Since when the multiplier has been decaying (None while ejected).
    decay_from: float | None = None
    #: The max_ejection_percent refusal was already logged for this run.
    capped: bool = False

    def reset_counts(self) -> None:
        self.c5xx = self.cgw = 0
        self.lat_sum = self.lat_n = 0.0
        self.capped = False


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f}ms"


class OutlierDetector:
    """Use C{pool.observe_outcomes(detector.on_outcome)} and call L{tick} at
    the time it returns (the service does both)."""

    def __init__(self, pool: Pool, cfg: PassiveHealthConfig) -> None:
        self.pool = pool
        self.cfg = cfg
        self.tracks: dict[Backend, _Track] = {}

    def _track(self, backend: Backend) -> _Track:
        t = self.tracks.get(backend)
        if t is None:
            t = self.tracks[backend] = _Track()
        return t

    def forget(self, backend: Backend) -> None:
        self.tracks.pop(backend, None)

    # -- live traffic ---------------------------------------------------------

    def on_outcome(self, backend: Backend, now: float, latency: float, outcome: str) -> None:
        """One unit of work on ``backend`` ended (an L{OutcomeObserver})."""
        if outcome == "cancelled" or self.pool.get(backend.address) is not backend:
            return
        if backend.ejected_until is not None and backend.ejected_until > now:
            return  # already out (panic traffic says nothing new)
        t = self._track(backend)
        lat = self.cfg.latency
        if lat.enabled:
            self._decay(t, now)
            t.lat_sum += latency
            t.lat_n += 1.0
        if outcome == "ok":
            t.c5xx = t.cgw = 0
            return
        if outcome == "5xx":
            t.c5xx += 1
            if 0 < self.cfg.consecutive_5xx <= t.c5xx:
                self.eject(backend, now, f"{t.c5xx} consecutive 5xx")
        elif outcome == "gateway":
            t.cgw += 1
            if 0 < self.cfg.consecutive_gateway_failures <= t.cgw:
                self.eject(backend, now, f"{t.cgw} consecutive gateway failures (connect failure, reset or timeout)")

    def _decay(self, t: _Track, now: float) -> None:
        dt = now - t.lat_at
        if dt > 0:
            w = math.exp(-dt / self.cfg.latency.window) if self.cfg.latency.window > 0 else 0.0
            t.lat_sum *= w
            t.lat_n *= w
            t.lat_at = now

    # -- ejection -------------------------------------------------------------

    def max_ejected(self) -> int:
        """How many backends may be out at once under ``max_ejection_percent``."""
        n = sum(1 for b in self.pool.backends() if b.enabled and not b.draining)
        pct = self.cfg.max_ejection_percent
        allowed = int(n * pct / 100.0 + 1e-9)
        if pct > 0 and n >= 2:
            allowed = max(1, allowed)
        return allowed

    def ejected(self, now: float) -> list[Backend]:
        return [b for b in self.pool.backends() if b.ejected_until is not None and b.ejected_until > now]

    def eject(self, backend: Backend, now: float, reason: str) -> bool:
        """Eject ``backend`` unless the cap forbids it; True if it was ejected."""
        if backend.ejected_until is not None and backend.ejected_until > now:
            return False
        t = self._track(backend)
        out = len(self.ejected(now))
        allowed = self.max_ejected()
        if out + 1 > allowed:
            if not t.capped:
                t.capped = True
                log.warn(
                    "pool {pool} backend {backend}: not ejected ({reason}): "
                    "max_ejection_percent {pct:g} reached, {out} of {n} already out",
                    pool=self.pool.name, backend=backend.address, reason=reason,
                    pct=self.cfg.max_ejection_percent, out=out, n=len(self.pool.backends()),
                )
            return False
        t.ejections += 1
        t.decay_from = None
        duration = min(self.cfg.base_ejection_time * t.ejections, self.cfg.max_ejection_time)
        t.reset_counts()
        self.pool.eject(backend, now + duration, f"{reason}; out for {duration:g}s (ejection {t.ejections})")
        return True

    # -- time -----------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Return expired ejections, decay multipliers, apply the latency
        rule. Returns when it wants to be called next."""
        base = self.cfg.base_ejection_time
        for b in self.pool.backends():
            if b.ejected_until is not None and b.ejected_until <= now:
                t = self._track(b)
                t.decay_from = now
                t.reset_counts()
                slow = f"; slow start {self.pool.slow_start:g}s" if self.pool.slow_start > 0 else ""
                self.pool.unject(b, f"ejection over{slow}")
        for b, t in self.tracks.items():
            if t.ejections > 0 and t.decay_from is not None and base > 0:
                while t.ejections > 0 and now - t.decay_from >= base:
                    t.ejections -= 1
                    t.decay_from += base
        if self.cfg.latency.enabled:
            self._latency_rule(now)
        nxt = now + self.cfg.interval
        for b in self.pool.backends():
            if b.ejected_until is not None and now < b.ejected_until < nxt:
                nxt = b.ejected_until
        return nxt

    def recent_latency(self, backend: Backend, now: float) -> tuple[float, float] | None:
        """(decayed mean latency, decayed request count), or None without data."""
        t = self.tracks.get(backend)
        if t is None or t.lat_n <= 0:
            return None
        w = math.exp(-(now - t.lat_at) / self.cfg.latency.window) if self.cfg.latency.window > 0 else 0.0
        return t.lat_sum / t.lat_n, t.lat_n * w

    def _latency_rule(self, now: float) -> None:
        rule = self.cfg.latency
        means: dict[Backend, float] = {}
        for b in self.pool.backends():
            if not b.enabled or b.draining or (b.ejected_until is not None and b.ejected_until > now):
                continue
            r = self.recent_latency(b, now)
            if r is not None and r[1] >= rule.min_requests:
                means[b] = r[0]
        if len(means) < 2:
            return
        for b, mean in sorted(means.items(), key=lambda kv: -kv[1]):
            if mean <= rule.min_latency or len(means) < 2:
                break
            others = [m for o, m in means.items() if o is not b]
            median = statistics.median(others)
            if mean <= rule.factor * median:
                break  # sorted slowest first: nobody faster can be an outlier
            ratio = f"{mean / median:.0f}x" if median > 0 else "far above"
            if self.eject(b, now, f"latency {_ms(mean)} is {ratio} the pool median {_ms(median)}"):
                del means[b]  # the next one is judged against the backends still in

    def snapshot(self, backend: Backend, now: float) -> dict:
        """Counters for the admin API."""
        t = self.tracks.get(backend) or _Track()
        r = self.recent_latency(backend, now)
        return {
            "consecutive_5xx": t.c5xx,
            "consecutive_gateway_failures": t.cgw,
            "recent_latency": r[0] if r else None,
            "recent_requests": r[1] if r else 0.0,
            "ejections": t.ejections,
        }
