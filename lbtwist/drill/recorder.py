# -*- test-case-name: tests.test_drill_recorder -*-
"""Per-second series of a drill run, sans-IO: the load generator, the backend
poller and the balancer poller feed events with timestamps; L{Recorder.series}
turns them into one row per second.

Client-side figures are bucketed by the request's *scheduled arrival* second
(success rate and latency: "of the requests offered at t, how many succeeded
and how long did they take, retries included"); throughput figures by the
second they happened in (attempts, retries, goodput). Backend figures are
deltas of the backends' own counters between two polls.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import attrs


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


@attrs.define
class _Second:
    offered: int = 0
    attempts: int = 0
    retries: int = 0
    goodput: int = 0
    failed_done: int = 0
    finished: int = 0
    ok: int = 0
    latencies: list[float] = attrs.Factory(list)
    lag: float = 0.0
    outcomes: dict[str, int] = attrs.Factory(dict)
    try_outcomes: dict[str, int] = attrs.Factory(dict)


class Recorder:
    """Collects one run. ``t0`` is the load's start (second 0)."""

    def __init__(self, t0: float, seconds: int) -> None:
        self.t0 = t0
        self.seconds = seconds
        self._s: dict[int, _Second] = defaultdict(_Second)
        self._backend_prev: dict[str, tuple[float, int]] = {}
        self.backend_rate: dict[str, dict[int, float]] = defaultdict(dict)
        self.backend_up: dict[str, dict[int, bool]] = defaultdict(dict)
        self.lb_state: dict[int, dict[str, str]] = {}
        self.cpu: dict[str, dict[int, float]] = defaultdict(dict)
        self._cpu_prev: dict[str, tuple[float, float]] = {}
        self.box: dict[int, float | None] = {}
        self.events: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def _sec(self, t: float) -> int:
        return int(math.floor(t - self.t0))

    # -- load generator (lbtwist.drill.loadgen.Sink) -------------------------

    def arrival(self, t: float) -> None:
        self._s[self._sec(t)].offered += 1

    def attempt(self, t: float, retry: bool) -> None:
        s = self._s[self._sec(t)]
        s.attempts += 1
        if retry:
            s.retries += 1

    def try_result(self, t: float, outcome: str) -> None:
        """How one try ended (status code, timeout, reset, refused...), by the second it ended."""
        s = self._s[self._sec(t)]
        s.try_outcomes[outcome] = s.try_outcomes.get(outcome, 0) + 1

    def result(self, t_sched: float, t_done: float, ok: bool, attempts: int, outcome: str) -> None:
        s = self._s[self._sec(t_sched)]
        s.finished += 1
        s.latencies.append(t_done - t_sched)
        s.outcomes[outcome] = s.outcomes.get(outcome, 0) + 1
        done = self._s[self._sec(t_done)]
        if ok:
            s.ok += 1
            done.goodput += 1
        else:
            done.failed_done += 1

    def lag(self, t: float, lag: float) -> None:
        s = self._s[self._sec(t)]
        if lag > s.lag:
            s.lag = lag

    # -- pollers -------------------------------------------------------------

    def backend_sample(self, t: float, backends: Iterable[dict[str, Any]]) -> None:
        """One poll of a backend group's control API (``/state`` rows)."""
        sec = self._sec(t)
        for b in backends:
            name = b["name"]
            attempts = int(b["counters"]["attempts"])
            prev = self._backend_prev.get(name)
            self._backend_prev[name] = (t, attempts)
            self.backend_up[name][sec] = bool(b.get("up", True))
            if prev is None:
                continue
            pt, pa = prev
            if t - pt <= 0:
                continue
            # a restarted process starts counting from zero again
            delta = attempts - pa if attempts >= pa else attempts
            self.backend_rate[name][sec] = delta / (t - pt)

    def backend_gone(self, t: float, names: Iterable[str]) -> None:
        """Backends whose process is dead (no control API to ask)."""
        sec = self._sec(t)
        for name in names:
            self.backend_up[name][sec] = False
            if name in self._backend_prev:  # it served before: it serves nothing now
                self.backend_rate[name].setdefault(sec, 0.0)
            # the restarted process counts from 0
            self._backend_prev[name] = (t, 0)

    def lb_sample(self, t: float, states: dict[str, str]) -> None:
        """Backend address/name -> state word as the balancer sees it
        (healthy, ejected, unhealthy, draining, ...)."""
        self.lb_state[self._sec(t)] = dict(states)

    def cpu_sample(self, t: float, who: str, cpu_seconds: float | None) -> None:
        if cpu_seconds is None:
            return
        prev = self._cpu_prev.get(who)
        self._cpu_prev[who] = (t, cpu_seconds)
        if prev is not None and t > prev[0]:
            self.cpu[who][self._sec(t)] = 100.0 * (cpu_seconds - prev[1]) / (t - prev[0])

    def box_sample(self, t: float, loadavg: float | None) -> None:
        """The machine's 1-minute load average (other work shares the CPUs)."""
        self.box[self._sec(t)] = loadavg

    def event(self, t: float, label: str) -> None:
        self.events.append({"t": round(t - self.t0, 3), "label": label})

    # -- output --------------------------------------------------------------

    def series(self) -> dict[str, Any]:
        """Rows for seconds 0..seconds-1 as parallel lists (JSON-ready)."""
        n = self.seconds
        out: dict[str, Any] = {k: [] for k in (
            "t", "offered", "attempts", "retries", "goodput", "failed", "finished", "success_rate",
            "p50", "p99", "p999", "lag", "backend_attempts", "healthy", "out_of_rotation")}
        names = sorted(set(self.backend_rate) | set(self.backend_up), key=_natural)
        out["backends"] = names
        out["share"] = {name: [] for name in names}
        out["backend_rate"] = {name: [] for name in names}
        out["lb_states"] = []
        out["outcomes"] = []
        out["try_outcomes"] = []
        out["cpu"] = {who: [self.cpu[who].get(i) for i in range(n)] for who in sorted(self.cpu)}
        out["loadavg"] = [self.box.get(i) for i in range(n)]
        for i in range(n):
            s = self._s.get(i, _Second())
            lat = sorted(s.latencies)
            out["t"].append(i)
            out["offered"].append(s.offered)
            out["attempts"].append(s.attempts)
            out["retries"].append(s.retries)
            out["goodput"].append(s.goodput)
            out["failed"].append(s.finished - s.ok)
            out["finished"].append(s.finished)
            out["success_rate"].append(100.0 * s.ok / s.finished if s.finished else None)
            out["p50"].append(percentile(lat, 50))
            out["p99"].append(percentile(lat, 99))
            out["p999"].append(percentile(lat, 99.9))
            out["lag"].append(s.lag)
            out["outcomes"].append(dict(s.outcomes))
            out["try_outcomes"].append(dict(s.try_outcomes))
            rates = {name: self.backend_rate[name].get(i) for name in names}
            known = [r for r in rates.values() if r is not None]
            total = sum(known) if known else None
            out["backend_attempts"].append(total)
            for name in names:
                r = rates[name]
                out["backend_rate"][name].append(r)
                out["share"][name].append(100.0 * r / total if (r is not None and total) else (0.0 if total else None))
            st = self.lb_state.get(i)
            out["lb_states"].append(st)
            if st is None:
                out["healthy"].append(None)
                out["out_of_rotation"].append(None)
            else:
                out["healthy"].append(sum(1 for v in st.values() if v in ("healthy", "slow_start")))
                out["out_of_rotation"].append(sum(1 for v in st.values() if v not in ("healthy", "slow_start")))
        return out

    def totals(self, start: float = 0, end: float | None = None) -> dict[str, Any]:
        """Sums over arrival seconds [start, end): requests, successes, success
        rate, overall latency percentiles."""
        end = self.seconds if end is None else end
        lat: list[float] = []
        fin = ok = att = ret = off = 0
        for i in range(int(start), int(math.ceil(end))):
            s = self._s.get(i)
            if s is None:
                continue
            fin += s.finished
            ok += s.ok
            att += s.attempts
            ret += s.retries
            off += s.offered
            lat.extend(s.latencies)
        lat.sort()
        return {
            "offered": off, "finished": fin, "ok": ok, "failed": fin - ok,
            "success_rate": 100.0 * ok / fin if fin else None,
            "attempts": att, "retries": ret,
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "p999": percentile(lat, 99.9),
            "max": lat[-1] if lat else None,
        }


def _natural(name: str) -> tuple[Any, ...]:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
