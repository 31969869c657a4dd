"""Per-backend live figures, sans-IO: rate, error rate and latency percentiles
over the last seconds, a per-second history for sparklines, and cumulative
counts for Prometheus. Fed events and times; never reads a clock itself.

Percentiles come from a log-scale histogram (about 5% wide buckets), so one
observation costs a log and a few additions, and merging a window is cheap.
"""
from __future__ import annotations

import math
from bisect import bisect_left as _bisect_left
from typing import Iterable, Mapping, Sequence

import attrs

#: Smallest latency the fine histogram tells apart (seconds) and its growth factor.
_FINE_MIN = 1e-5
_FINE_GROWTH = 1.05
_FINE_LOG = math.log(_FINE_GROWTH)
_FINE_MAX_INDEX = int(math.log(600.0 / _FINE_MIN) / _FINE_LOG) + 1

#: Prometheus histogram bucket upper bounds (seconds): the usual web spread.
PROM_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

#: Outcomes that count as the backend's fault (see lbtwist.pool.OUTCOMES).
ERROR_OUTCOMES = frozenset({"5xx", "gateway"})


_INV_MIN = 1.0 / _FINE_MIN
_INV_LOG = 1.0 / _FINE_LOG
_log = math.log


def fine_index(latency: float) -> int:
    if latency <= _FINE_MIN:
        return 0
    i = int(_log(latency * _INV_MIN) * _INV_LOG) + 1
    return i if i < _FINE_MAX_INDEX else _FINE_MAX_INDEX


def fine_value(index: int) -> float:
    """Representative latency of a fine bucket (its geometric middle)."""
    if index <= 0:
        return _FINE_MIN
    return _FINE_MIN * _FINE_GROWTH ** (index - 0.5)


def percentile(hist: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a fine histogram, or None when empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for idx in sorted(hist):
        seen += hist[idx]
        if seen >= rank:
            return fine_value(idx)
    return fine_value(max(hist))


class _Slot:
    __slots__ = ("second", "count", "errors", "hist", "p99")

    def __init__(self) -> None:
        self.second = -1
        self.count = 0
        self.errors = 0
        self.hist: dict[int, int] = {}
        #: p99 of a completed second, computed once (the dashboard asks every second).
        self.p99: float | None | bool = False

    def reset(self, second: int) -> None:
        self.second = second
        self.count = 0
        self.errors = 0
        self.hist = {}
        self.p99 = False


@attrs.frozen
class WindowStats:
    """Figures over a window of complete seconds."""

    seconds: int
    count: int
    errors: int
    rps: float
    error_rate: float  # errors / count, 0 when idle
    p50: float | None  # seconds
    p99: float | None

    def as_json(self) -> dict:
        return {
            "window_s": self.seconds,
            "requests": self.count,
            "errors": self.errors,
            "rps": round(self.rps, 3),
            "error_rate": round(self.error_rate, 4),
            "p50_ms": None if self.p50 is None else round(self.p50 * 1000, 3),
            "p99_ms": None if self.p99 is None else round(self.p99 * 1000, 3),
        }


class Meter:
    """Counts one stream of work (a backend's tries, a pool's requests).

    ``observe(now, latency, error)`` per unit of work; reads take ``now`` too.
    Keeps ``history`` one-second slots, so windows and sparklines can look
    that far back; cumulative counters never reset (Prometheus wants that)."""

    def __init__(self, history: int = 60, buckets: Sequence[float] = PROM_BUCKETS) -> None:
        self.history = history
        self._slots = [_Slot() for _ in range(history)]
        self.buckets = tuple(buckets)
        #: Cumulative: observations per Prometheus bucket (non-cumulative per bucket; +Inf last).
        self.bucket_counts = [0] * (len(self.buckets) + 1)
        self.latency_sum = 0.0
        self.count = 0
        self.errors = 0

    def observe(self, now: float, latency: float | None, error: bool) -> None:
        """One unit of work ended at ``now``; ``latency`` None when it says
        nothing about the server (e.g. the client gave up first)."""
        sec = int(now)
        slot = self._slots[sec % self.history]
        if slot.second != sec:
            slot.reset(sec)
        slot.count += 1
        self.count += 1
        if error:
            slot.errors += 1
            self.errors += 1
        if latency is not None and latency >= 0:
            if latency <= _FINE_MIN:
                i = 0
            else:
                i = int(_log(latency * _INV_MIN) * _INV_LOG) + 1
                if i > _FINE_MAX_INDEX:
                    i = _FINE_MAX_INDEX
            hist = slot.hist
            hist[i] = hist.get(i, 0) + 1
            self.bucket_counts[_bisect_left(self.buckets, latency)] += 1
            self.latency_sum += latency

    def _complete(self, now: float, seconds: int) -> Iterable[_Slot]:
        """Slots of the last ``seconds`` complete seconds before ``now``."""
        sec = int(now)
        lo = sec - seconds
        for s in self._slots:
            if lo <= s.second < sec:
                yield s

    def window(self, now: float, seconds: int = 10) -> WindowStats:
        seconds = max(1, min(seconds, self.history - 1))
        count = errors = 0
        hist: dict[int, int] = {}
        for s in self._complete(now, seconds):
            count += s.count
            errors += s.errors
            for k, v in s.hist.items():
                hist[k] = hist.get(k, 0) + v
        return WindowStats(
            seconds=seconds,
            count=count,
            errors=errors,
            rps=count / seconds,
            error_rate=errors / count if count else 0.0,
            p50=percentile(hist, 0.50),
            p99=percentile(hist, 0.99),
        )

    def series(self, now: float, seconds: int | None = None) -> dict:
        """Per-second history of the last ``seconds`` complete seconds, oldest
        first: requests, errors and p99 (ms, None when idle) per second."""
        seconds = min(seconds or self.history - 1, self.history - 1)
        sec = int(now)
        by_sec = {s.second: s for s in self._complete(now, seconds)}
        req, err, p99 = [], [], []
        for t in range(sec - seconds, sec):
            s = by_sec.get(t)
            if s is None:
                req.append(0)
                err.append(0)
                p99.append(None)
            else:
                req.append(s.count)
                err.append(s.errors)
                if s.p99 is False:  # only complete seconds get here: their p99 is final
                    p = percentile(s.hist, 0.99)
                    s.p99 = None if p is None else round(p * 1000, 3)
                p99.append(s.p99)
        return {"start": sec - seconds, "step_s": 1, "requests": req, "errors": err, "p99_ms": p99}

    def prometheus_buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``."""
        out, acc = [], 0
        for bound, n in zip(self.buckets, self.bucket_counts):
            acc += n
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + self.bucket_counts[-1]))
        return out


def spread(loads: Sequence[float]) -> float:
    """Coefficient of variation (stddev / mean) of per-backend loads: 0 when
    even, growing as one backend takes more than its share. 0 when idle."""
    if len(loads) < 2:
        return 0.0
    mean = sum(loads) / len(loads)
    if mean <= 0:
        return 0.0
    var = sum((x - mean) ** 2 for x in loads) / len(loads)
    return math.sqrt(var) / mean
