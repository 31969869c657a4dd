# -*- test-case-name: tests.test_health_outlier -*-
"""Passive outlier detection, sans-IO: fed live outcomes and times, it ejects
and returns backends through the L{Pool}.

Four rules, all judged on real traffic because a probe can lie:
  - ``consecutive_5xx`` answers 5xx in a row;
  - ``consecutive_gateway_failures`` connect failures/resets/timeouts in a row
    (an "ok" resets both runs; "cancelled" says nothing about the backend);
  - failure rate (Envoy's failure-percentage ejection, for little traffic):
    a backend's recent tries are its last ``request_volume`` tries no older
    than ``window`` (time in rotation only). With at least ``min_requests``
    of them, of which at least ``threshold`` percent failed (5xx or
    gateway), while the median share of failed tries of the other backends
    in rotation (those with ``min_requests`` recent tries) is under half of
    ``threshold`` (a pool-wide failure is not an outlier), it is ejected.
    Judged when a try fails, and at each tick while its newest try (by
    time: a master's workers' reports interleave) was a failure; so a
    backend that fails fast is caught even when the algorithm, repelled by
    its failure penalty, sends it a try only every few seconds. A backend
    the algorithm avoids is judged by its failure run: its newest
    ``min_requests`` or more tries all failed and the median peer has been
    tried ``request_volume`` times since (a busy backend's record holds the
    successes from just before a fault, which no new try dilutes away once
    the algorithm stops sending it work).
    The record does not age while the backend is ejected: it returns with
    it, one more failure sends it back out, and successes dilute it;
  - latency: a backend whose recent mean latency is over ``factor`` times the
    median of the others (and over ``min_latency``). The mean is decayed over
    ``window`` seconds and needs ``min_requests`` of recent evidence, so one
    slow request does not eject a backend but a 900 ms node among 3 ms ones
    does. But a backend the load-aware algorithm avoids gets too few new
    requests to move that mean, which still holds its fast past: so with
    ``balancer_estimate`` a backend is also judged by its last
    ``min_requests`` results (their median, undecayed, including tries its
    clients gave up on) against the median of the others' last results, and
    ejected when that is an outlier by the same ``factor``/``min_latency``
    and the algorithm's own estimate (L{Pool.latency_estimate}: peak EWMA)
    agrees, instead of waiting for samples that never come; not while in
    slow start (a cold node is slow and rarely chosen by design).

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
from collections import deque

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
    #: The last tries as (time, failed) for the failure-rate rule; times are
    #: moved forward by the time spent ejected, so the record does not age
    #: while the backend is out.
    recent: deque = attrs.field(factory=deque)
    #: When the running ejection started (None while in rotation).
    out_since: float | None = None
    #: The newest try failed (the failure-rate rule re-judges at each tick).
    last_failed: bool = False
    #: When the newest try was: a master is fed its workers' reports, which
    #: interleave (one worker's older success can arrive after another's
    #: newer failure), so "newest" is by time, not by arrival.
    last_at: float = -math.inf
    #: Latencies of the last few units of work since the backend (re)joined,
    #: undecayed, cancelled ones included (a client that gave up after 1 s
    #: still waited 1 s on this backend).
    last: deque = attrs.field(factory=deque)
    #: Who decided the running ejection when another instance did (shared
    #: through the fleet, L{OutlierDetector.apply_remote_ejection}); None
    #: for this detector's own ejections and while in rotation.
    remote: str | None = None

    def reset_counts(self) -> None:
        """Ejected or returned: runs and latency start over. The failure-rate
        record is kept (its clock stops while the backend is out)."""
        self.c5xx = self.cgw = 0
        self.lat_sum = self.lat_n = 0.0
        self.capped = False
        self.last_failed = False
        self.last.clear()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f}ms"


class OutlierDetector:
    """Use C{pool.observe_outcomes(detector.on_outcome)} and call L{tick} at
    the time it returns (the service does both)."""

    def __init__(self, pool: Pool, cfg: PassiveHealthConfig) -> None:
        self.pool = pool
        self.cfg = cfg
        self.tracks: dict[Backend, _Track] = {}
        #: ``fn(backend, event, until, reason)`` for this detector's own
        #: decisions only: event "ejected" (``until`` the end time) or
        #: "returned" (``until`` None). Remote ejections are not announced,
        #: so whoever shares them never echoes what it applied.
        self._ejection_observers: list = []
        #: Remote ejections refused by max_ejection_percent (a counter).
        self.remote_refused = 0

    def observe_ejections(self, fn) -> None:  # type: ignore[no-untyped-def]
        self._ejection_observers.append(fn)

    def unobserve_ejections(self, fn) -> None:  # type: ignore[no-untyped-def]
        if fn in self._ejection_observers:
            self._ejection_observers.remove(fn)

    def _announce(self, backend: Backend, event: str, until: float | None, reason: str) -> None:
        for fn in list(self._ejection_observers):
            try:
                fn(backend, event, until, reason)
            except Exception:
                log.failure("pool {pool}: an ejection observer failed", pool=self.pool.name)

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
        if self.pool.get(backend.address) is not backend:
            return
        if backend.ejected_until is not None and backend.ejected_until > now:
            return  # already out (panic traffic says nothing new)
        t = self._track(backend)
        lat = self.cfg.latency
        if lat.enabled:
            t.last.append(latency)
            while len(t.last) > lat.min_requests:
                t.last.popleft()
        if outcome == "cancelled":
            return
        if lat.enabled:
            self._decay(t, now)
            t.lat_sum += latency
            t.lat_n += 1.0
        fr = self.cfg.failure_rate
        if fr.enabled:
            t.recent.append((now, outcome != "ok"))
            while len(t.recent) > fr.request_volume:
                t.recent.popleft()
        if now >= t.last_at:
            t.last_at = now
            t.last_failed = outcome != "ok"
        if outcome == "ok":
            t.c5xx = t.cgw = 0
            return
        if outcome == "5xx":
            t.c5xx += 1
            if 0 < self.cfg.consecutive_5xx <= t.c5xx:
                if self.eject(backend, now, f"{t.c5xx} consecutive 5xx"):
                    return
        elif outcome == "gateway":
            t.cgw += 1
            if 0 < self.cfg.consecutive_gateway_failures <= t.cgw:
                if self.eject(backend, now, f"{t.cgw} consecutive gateway failures (connect failure, reset or timeout)"):
                    return
        if fr.enabled:
            self._failure_rule(backend, t, now)

    def recent_failures(self, backend: Backend, now: float) -> tuple[int, int]:
        """(recent tries, of which failed) for the failure-rate rule."""
        t = self.tracks.get(backend)
        if t is None:
            return 0, 0
        oldest = now - self.cfg.failure_rate.window
        tries = failed = 0
        for at, bad in t.recent:
            if at >= oldest:
                tries += 1
                failed += bad
        return tries, failed

    def _in_rotation(self, b: Backend, now: float) -> bool:
        return b.enabled and not b.draining and not (b.ejected_until is not None and b.ejected_until > now)

    def failure_run(self, backend: Backend, now: float) -> tuple[int, float]:
        """(how many of its newest tries failed in a row, when the newest of
        them was) within the failure-rate window, in time order."""
        t = self.tracks.get(backend)
        if t is None:
            return 0, -math.inf
        oldest = now - self.cfg.failure_rate.window
        run, newest = 0, -math.inf
        # newest first; of equal times the one that arrived last (a stable sort, reversed)
        for at, bad in reversed(sorted(t.recent, key=lambda r: r[0])):
            if at < oldest or not bad:
                break
            run += 1
            newest = max(newest, at)
        return run, newest

    def _tries_since(self, backend: Backend, since: float) -> int:
        """Tries of ``backend`` in its record newer than ``since`` (at most ``request_volume``)."""
        t = self.tracks.get(backend)
        return 0 if t is None else sum(1 for at, _ in t.recent if at > since)

    def _failure_rule(self, backend: Backend, t: _Track, now: float) -> bool:
        """The failure-rate rule (module doc). A backend whose recent tries
        do not reach ``threshold`` is judged by its failure run instead once
        the balancer avoids it: its newest ``min_requests`` or more tries
        all failed and since the newest of them the median peer has been
        tried ``request_volume`` times (its whole record is newer). A busy
        backend's record holds successes from just before a fault; when the
        load-aware algorithm then stops sending it work, no new try will
        ever dilute them away, and without this it would stay in rotation
        (two-liars drill: 4 failures of its last 10, then no try)."""
        rule = self.cfg.failure_rate
        tries, failed = self.recent_failures(backend, now)
        by_rate = tries >= rule.min_requests and 100.0 * failed >= rule.threshold * tries
        run, run_at = (0, now) if by_rate else self.failure_run(backend, now)
        if not by_rate and run < rule.min_requests:
            return False
        shares, since = [], []
        for o in self.pool.backends():
            if o is not backend and self._in_rotation(o, now):
                n, f = self.recent_failures(o, now)
                if n >= rule.min_requests:
                    shares.append(100.0 * f / n)
                    if not by_rate:
                        since.append(self._tries_since(o, run_at))
        if not shares:
            return False  # nobody to compare with: an outlier needs peers
        moved_on = statistics.median(since) if since else 0
        if not by_rate and moved_on < rule.request_volume:
            return False  # the balancer still tries it like the others: its successes count
        peer_pct = statistics.median(shares)
        if peer_pct >= rule.threshold / 2:
            return False  # the whole pool fails: ejecting one would not help
        if by_rate:
            return self.eject(backend, now, (
                f"{100.0 * failed / tries:.0f}% of its recent tries failed ({failed} of {tries}), "
                f"the pool median {peer_pct:.0f}%"))
        return self.eject(backend, now, (
            f"its last {run} tries failed and the balancer has avoided it since "
            f"(the median backend was tried {moved_on:g} times meanwhile), the pool median {peer_pct:.0f}%"))

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
        t.out_since = now
        t.remote = None
        self.pool.eject(backend, now + duration, f"{reason}; out for {duration:g}s (ejection {t.ejections})")
        self._announce(backend, "ejected", now + duration, reason)
        return True

    # -- ejections decided elsewhere (another instance of the fleet) -------------

    def apply_remote_ejection(self, address: str, until: float, reason: str, origin: str, now: float) -> bool:
        """Eject the backend at ``address`` until ``until`` because instance
        ``origin`` did: under the same ``max_ejection_percent`` cap, never
        announced to the observers (no echo). True if it was ejected."""
        backend = self.pool.get(address)
        if backend is None or until <= now:
            return False
        if backend.ejected_until is not None and backend.ejected_until > now:
            return False
        t = self._track(backend)
        out = len(self.ejected(now))
        if out + 1 > self.max_ejected():
            self.remote_refused += 1
            if not t.capped:
                t.capped = True
                log.warn(
                    "pool {pool} backend {backend}: ejection shared by {origin} not applied: "
                    "max_ejection_percent {pct:g} reached, {out} of {n} already out",
                    pool=self.pool.name, backend=address, origin=origin,
                    pct=self.cfg.max_ejection_percent, out=out, n=len(self.pool.backends()),
                )
            return False
        t.decay_from = None
        t.reset_counts()
        t.out_since = now
        t.remote = origin
        self.pool.eject(backend, until, f"{reason}; shared by {origin}, out for {until - now:.3g}s")
        return True

    def end_remote_ejection(self, address: str, reason: str, now: float) -> bool:
        """The instance that ejected ``address`` returned it: return it here
        too, if it is out because of that instance. True if it returned."""
        backend = self.pool.get(address)
        if backend is None or backend.ejected_until is None or backend.ejected_until <= now:
            return False
        t = self.tracks.get(backend)
        if t is None or t.remote is None:
            return False  # out by our own decision: ours to end
        self._return(backend, t, now, f"{reason} (shared by {t.remote})")
        return True

    def _return(self, b: Backend, t: _Track, now: float, reason: str) -> None:
        t.decay_from = now
        t.reset_counts()
        if t.out_since is not None:  # the record did not age while out
            shift = now - t.out_since
            t.recent = deque((at + shift, bad) for at, bad in t.recent)
            t.out_since = None
        remote, t.remote = t.remote, None
        slow = f"; slow start {self.pool.slow_start:g}s" if self.pool.slow_start > 0 else ""
        self.pool.unject(b, f"{reason}{slow}")
        if remote is None:
            self._announce(b, "returned", None, reason)

    # -- time -----------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Return expired ejections, decay multipliers, apply the latency
        rule. Returns when it wants to be called next."""
        base = self.cfg.base_ejection_time
        for b in self.pool.backends():
            if b.ejected_until is not None and b.ejected_until <= now:
                self._return(b, self._track(b), now, "ejection over")
        for b, t in self.tracks.items():
            if t.ejections > 0 and t.decay_from is not None and base > 0:
                while t.ejections > 0 and now - t.decay_from >= base:
                    t.ejections -= 1
                    t.decay_from += base
        if self.cfg.failure_rate.enabled:
            for b, t in list(self.tracks.items()):
                if t.last_failed and self._in_rotation(b, now) and self.pool.get(b.address) is b:
                    self._failure_rule(b, t, now)
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
        inside = [b for b in self.pool.backends() if self._in_rotation(b, now)]
        for b in inside:
            r = self.recent_latency(b, now)
            if r is not None and r[1] >= rule.min_requests:
                means[b] = r[0]
        self._mean_rule(means, now)
        if rule.balancer_estimate:
            self._avoided_rule([b for b in inside if self._in_rotation(b, now)], now)

    def _avoided_rule(self, inside: list[Backend], now: float) -> None:
        """A backend the algorithm avoids for latency gets too few new
        requests to move its decayed mean, which still holds the fast
        requests from before it turned slow. Judge it by its last
        ``min_requests`` results instead: eject it when their median is above
        ``min_latency`` and ``factor`` times the median of the other backends'
        last results (the same statistic: a stall of the whole box slows
        every backend's last results and ejects nobody), and the algorithm's
        own estimate agrees (it avoids the backend: it has not measured it
        fast since). One slow request among fast ones does not do it (the
        median of the last results is fast)."""
        rule = self.cfg.latency
        last: dict[Backend, float] = {}
        for b in inside:
            t = self.tracks.get(b)
            if t is not None and t.last:
                last[b] = statistics.median(t.last)
        if len(last) < 2:
            return
        for b, lat in sorted(last.items(), key=lambda kv: -kv[1]):
            if lat <= rule.min_latency:
                break
            ref = statistics.median([v for o, v in last.items() if o is not b])
            if lat <= rule.factor * ref:
                break  # sorted slowest first: nobody faster is an outlier
            if b.ramp(now) < 1.0:
                continue  # a newcomer ramping up: slow and rarely chosen by design
            est = self.pool.latency_estimate(b, now)
            if est is None or est <= rule.min_latency or est <= rule.factor * ref:
                continue  # the algorithm sees it fast (again): it will be measured
            ratio = f"{lat / ref:.0f}x" if ref > 0 else "far above"
            if self.eject(b, now, (
                    f"its last {len(self.tracks[b].last)} requests took {_ms(lat)} (median), {ratio} the pool's "
                    f"{_ms(ref)}; avoided by the balancer (latency estimate {_ms(est)})")):
                del last[b]

    def _mean_rule(self, means: dict[Backend, float], now: float) -> None:
        rule = self.cfg.latency
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
        tries, failed = self.recent_failures(backend, now)
        return {
            "consecutive_5xx": t.c5xx,
            "consecutive_gateway_failures": t.cgw,
            "recent_latency": r[0] if r else None,
            "recent_requests": r[1] if r else 0.0,
            "recent_tries": tries,
            "recent_failure_percent": 100.0 * failed / tries if tries > 0 else None,
            "failure_run": self.failure_run(backend, now)[0],
            "ejections": t.ejections,
        }
