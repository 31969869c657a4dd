"""Prometheus metrics for one Runtime, broken down per backend: fleet averages
hide a dying node.

Everything is collected at scrape time from L{Live} (the same figures the JSON
API shows), from the Pool objects, and from the parts' state providers, so
the data plane pays nothing per request for Prometheus. The registry is our
own, never prometheus_client's global default (two runtimes in one process,
as in tests, must not mix).

Provider sections become metrics generically: numbers are gauges (counters
when the key ends in ``_total``), booleans 0/1, and a string under ``state``
or ``*_state`` a one-hot gauge with the value as a label; other strings stay
JSON-only (a free-text label would explode the series count). A mapping under
``by_<label>`` holds one section per value of that label (``by_route``: the
route as a ``route`` label, never in the metric name).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from lbtwist.admin.live import Live
from lbtwist.admin.state import WINDOW, provided
from lbtwist.admin.window import Meter, spread
from lbtwist.pool import Health

STATES = ("healthy", "slow_start", "unknown", "unhealthy", "ejected", "draining", "disabled")
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OUTCOMES = ("ok", "5xx", "gateway", "cancelled")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(*parts: str) -> str:
    return _NAME_BAD.sub("_", "_".join(p for p in parts if p)).lower()


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_meter(h: HistogramMetricFamily, values: list[str], m: Meter) -> None:
    h.add_metric(values, m.prometheus_buckets(), sum_value=m.latency_sum)


def provider_metric(scope: str, provider: str, key: str) -> str:
    """``lbtwist_<scope>_<provider>_<key>``, the provider's name not repeated
    when the key starts with it (``retries`` + ``retries_total`` is
    ``lbtwist_listener_retries_total``)."""
    if key == provider or key.startswith(provider + "_"):
        return metric_name("lbtwist", scope, key)
    return metric_name("lbtwist", scope, provider, key)


class _Dynamic:
    """Families built from provider sections, keyed by metric name."""

    def __init__(self, scope: str, labels: list[str]) -> None:
        self.scope = scope
        self.labels = labels
        self.families: dict[str, Metric] = {}

    def _family(self, name: str, kind: str, extra: list[str]) -> Metric | None:
        fam = self.families.get(name)
        if fam is None:
            doc = f"{self.scope} state from provider (see docs/operations.md)"
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name, doc, labels=self.labels + extra)
            fam._lbtwist_kind = (kind, tuple(extra))  # type: ignore[attr-defined]
            self.families[name] = fam
        elif getattr(fam, "_lbtwist_kind", None) != (kind, tuple(extra)):
            return None  # a provider changed a key's type or labels: keep the first
        return fam

    def add(self, provider: str, section: Mapping, values: list[str], prefix: str = "",
            labels: tuple[str, ...] = ()) -> None:
        if not isinstance(section, Mapping):
            return
        extra = list(labels)
        for key, v in section.items():
            key = str(key)
            if key == "error" and not prefix:
                continue
            if isinstance(v, Mapping) and not prefix and not labels and key.startswith("by_") and len(key) > 3:
                # one section per value of a label: {"by_route": {"api": {...}}} -> {route="api"}
                label = metric_name(key[3:])
                for lv, sub in v.items():
                    self.add(provider, sub, values + [str(lv)], "", (label,))
                continue
            full = f"{prefix}_{key}" if prefix else key
            if isinstance(v, Mapping) and not prefix:
                self.add(provider, v, values, full, labels)
                continue
            name = provider_metric(self.scope, provider, full)
            if isinstance(v, bool):
                fam = self._family(name, "gauge", extra)
                if fam is not None:
                    fam.add_metric(values, 1.0 if v else 0.0)
            elif isinstance(v, (int, float)):
                fam = self._family(name, "counter" if full.endswith("_total") else "gauge", extra)
                if fam is not None:
                    fam.add_metric(values, float(v))
            elif isinstance(v, str) and (key == "state" or key.endswith("_state")):
                fam = self._family(name, "gauge", extra + [metric_name(key)])
                if fam is not None:
                    fam.add_metric(values + [v], 1.0)


class LbtwistCollector:
    """A prometheus_client custom collector reading a runtime at scrape time."""

    def __init__(self, runtime: Any, live: Live, clock: Any) -> None:
        self.runtime = runtime
        self.live = live
        self.clock = clock

    def describe(self) -> Iterable[Metric]:
        return ()  # dynamic families: do not let the registry pre-check names

    def collect(self) -> Iterable[Metric]:
        self.live.sync()
        now = self.clock.seconds()
        yield from self._backends(now)
        yield from self._pools(now)
        yield from self._listeners(now)
        yield from discovery_metrics(self.runtime, now)
        yield from fleet_metrics(self.runtime)

    # -- per backend ----------------------------------------------------------

    def _backends(self, now: float) -> Iterable[Metric]:
        L = ["pool", "backend"]
        tries = CounterMetricFamily("lbtwist_backend_tries", "Work sent to the backend by how it ended (ok, 5xx, gateway, cancelled); a retried request counts on every backend it tried", labels=L + ["outcome"])
        responses = CounterMetricFamily("lbtwist_backend_responses", "Responses the backend served to clients, by status class", labels=L + ["code"])
        latency = _histogram("lbtwist_backend_latency_seconds", "Time from sending work to the backend until it ended (p50/p99 with histogram_quantile)", L)
        started = CounterMetricFamily("lbtwist_backend_started", "Work ever started on the backend", labels=L)
        active = GaugeMetricFamily("lbtwist_backend_active", "Work in flight on the backend (connections at L4, requests at L7)", labels=L)
        health = GaugeMetricFamily("lbtwist_backend_health", "Health as the checks see it, one-hot", labels=L + ["state"])
        state = GaugeMetricFamily("lbtwist_backend_state", "Overall state (most restrictive first), one-hot", labels=L + ["state"])
        rotation = GaugeMetricFamily("lbtwist_backend_in_rotation", "1 when new work may go to the backend", labels=L)
        weight = GaugeMetricFamily("lbtwist_backend_weight", "Configured weight", labels=L)
        ramp = GaugeMetricFamily("lbtwist_backend_slow_start_ramp", "Slow-start factor applied to the weight (0.1..1)", labels=L)
        ejections = CounterMetricFamily("lbtwist_backend_ejections", "Times passive detection ejected the backend", labels=L)
        changes = CounterMetricFamily("lbtwist_backend_state_changes", "State changes by the state entered (a fast-growing count means flapping)", labels=L + ["to"])
        dyn = _Dynamic("backend", L)
        for pool in list(self.runtime.pools.values()):
            rot = set(pool.candidates(now))
            for b in pool.backends():
                v = [pool.name, b.address]
                bl = self.live.backend(pool.name, b.address)
                for o in OUTCOMES:
                    tries.add_metric(v + [o], bl.outcomes.get(o, 0))
                for o, n in bl.outcomes.items():
                    if o not in OUTCOMES:
                        tries.add_metric(v + [o], n)
                for c in CODE_CLASSES:
                    responses.add_metric(v + [c], bl.responses.get(c, 0))
                _add_meter(latency, v, bl.meter)
                started.add_metric(v, b.total)
                active.add_metric(v, b.active)
                for h in Health:
                    health.add_metric(v + [h.value], 1.0 if b.health is h else 0.0)
                word = b.state(now)
                for s in STATES:
                    state.add_metric(v + [s], 1.0 if s == word else 0.0)
                rotation.add_metric(v, 1.0 if b in rot else 0.0)
                weight.add_metric(v, b.weight)
                ramp.add_metric(v, b.ramp(now))
                ejections.add_metric(v, bl.ejections)
                for to, n in sorted(bl.state_changes.items()):
                    changes.add_metric(v + [to], n)
                for name, section in provided(self.runtime.backend_state, pool, b).items():
                    dyn.add(name, section, v)
        yield from (tries, responses, latency, started, active, health, state, rotation, weight, ramp, ejections, changes)
        yield from dyn.families.values()

    # -- per pool -------------------------------------------------------------

    def _pools(self, now: float) -> Iterable[Metric]:
        L = ["pool"]
        total = GaugeMetricFamily("lbtwist_pool_backends", "Backends in the pool", labels=L)
        healthy = GaugeMetricFamily("lbtwist_pool_backends_healthy", "Backends the health checks consider healthy", labels=L)
        rotation = GaugeMetricFamily("lbtwist_pool_backends_in_rotation", "Backends new work may go to", labels=L)
        panic = GaugeMetricFamily("lbtwist_pool_panic", "1 while too few backends are healthy and the pool routes across all", labels=L)
        spread_g = GaugeMetricFamily("lbtwist_pool_load_spread", f"Coefficient of variation of per-backend request rate per unit of effective weight (slow start included) over {WINDOW}s, across backends in rotation (0 = even; alarm when it widens)", labels=L)
        requests = CounterMetricFamily("lbtwist_pool_requests", "Client requests (L7) or connections (L4) routed to the pool", labels=L)
        responses = CounterMetricFamily("lbtwist_pool_responses", "Responses sent to clients for the pool, by status class", labels=L + ["code"])
        retries = CounterMetricFamily("lbtwist_pool_retries", "Backend attempts beyond the first (retries and connect failovers)", labels=L)
        duration = _histogram("lbtwist_pool_request_duration_seconds", "Client-visible duration of requests/connections routed to the pool", L)
        dyn = _Dynamic("pool", L)
        for pool in list(self.runtime.pools.values()):
            v = [pool.name]
            backends = pool.backends()
            rot = pool.candidates(now)
            total.add_metric(v, len(backends))
            healthy.add_metric(v, sum(1 for b in backends if b.health is Health.HEALTHY))
            rotation.add_metric(v, len(rot))
            panic.add_metric(v, 1.0 if pool.panic else 0.0)
            loads = [
                self.live.backend(pool.name, b.address).meter.window(now, WINDOW).rps / b.effective_weight(now)
                for b in rot if b.effective_weight(now) > 0
            ]
            spread_g.add_metric(v, spread(loads))
            pl = self.live.pool(pool.name)
            requests.add_metric(v, pl.meter.count)
            for c in CODE_CLASSES:
                responses.add_metric(v + [c], pl.responses.get(c, 0))
            retries.add_metric(v, pl.retries)
            _add_meter(duration, v, pl.meter)
            for name, section in provided(self.runtime.pool_state, pool).items():
                dyn.add(name, section, v)
        yield from (total, healthy, rotation, panic, spread_g, requests, responses, retries, duration)
        yield from dyn.families.values()

    # -- per listener ---------------------------------------------------------

    def _listeners(self, now: float) -> Iterable[Metric]:
        L = ["listener"]
        finished = CounterMetricFamily("lbtwist_listener_finished", "Finished work: http requests, tcp connections, udp flows", labels=L + ["kind"])
        nbytes = CounterMetricFamily("lbtwist_listener_bytes", "Bytes from (in) and to (out) clients", labels=L + ["direction"])
        responses = CounterMetricFamily("lbtwist_listener_responses", "Responses sent to clients, by status class", labels=L + ["code"])
        rejected = CounterMetricFamily("lbtwist_listener_rejected", "Requests/connections refused by lbtwist itself (limits, no backend)", labels=L)
        dyn = _Dynamic("listener", L)
        names = [lc.name for lc in getattr(self.runtime.config, "listeners", []) or []]
        names += [n for n in self.live.listeners if n not in names]
        for name in names:
            v = [name]
            ll = self.live.listener(name)
            for kind, n in sorted(ll.by_kind.items()):
                finished.add_metric(v + [kind], n)
            nbytes.add_metric(v + ["in"], ll.bytes_in)
            nbytes.add_metric(v + ["out"], ll.bytes_out)
            for c in CODE_CLASSES:
                responses.add_metric(v + [c], ll.responses.get(c, 0))
            rejected.add_metric(v, ll.rejected)
            for pname, section in provided(self.runtime.listener_state, name).items():
                dyn.add(pname, section, v)
        yield from (finished, nbytes, responses, rejected)
        yield from dyn.families.values()


def discovery_metrics(runtime: Any, now: float) -> Iterable[Metric]:
    """``lbtwist_discovery_*``: one series per pool and discovery source."""
    found = getattr(runtime, "discovery", None)
    if not found:
        return
    L = ["pool", "source", "target"]
    up = GaugeMetricFamily("lbtwist_discovery_up", "1 when the source's last answer was good (ok or held); 0 while failing (the last known backends stay)", labels=L)
    state = GaugeMetricFamily("lbtwist_discovery_state", "Source state, one-hot: starting, ok, held (a large shrink awaiting confirmation), failing", labels=L + ["state"])
    age = GaugeMetricFamily("lbtwist_discovery_age_seconds", "Seconds since the source last answered well", labels=L)
    backends = GaugeMetricFamily("lbtwist_discovery_backends", "Backends the source currently contributes", labels=L)
    failures = CounterMetricFamily("lbtwist_discovery_failures", "Failed resolutions or reads of the source", labels=L)
    updates = CounterMetricFamily("lbtwist_discovery_updates", "Changes of the source's backend set applied to the pool", labels=L)
    for pool_name, disc in sorted(found.items()):
        for st in disc.status()["sources"]:
            v = [pool_name, st["kind"], st["target"]]
            up.add_metric(v, 1.0 if st["up"] else 0.0)
            for s_ in ("starting", "ok", "held", "failing"):
                state.add_metric(v + [s_], 1.0 if st["state"] == s_ else 0.0)
            if st["age_seconds"] is not None:
                age.add_metric(v, st["age_seconds"])
            backends.add_metric(v, float(st["backends"]))
            failures.add_metric(v, float(st["failures_total"]))
            updates.add_metric(v, float(st["updates_total"]))
    yield from (up, state, age, backends, failures, updates)


def fleet_metrics(runtime: Any) -> Iterable[Metric]:
    """``lbtwist_fleet_*``: the Redis link, fallbacks, rate decisions by source, shared ejections."""
    fleet = getattr(runtime, "fleet", None)
    if fleet is None:
        return
    st = fleet.status()
    L = ["fleet"]
    v = [st["name"]]
    up = GaugeMetricFamily("lbtwist_fleet_redis_up", "1 while Redis answers in time (fleet mode); 0 while lbtwist decides locally", labels=L)
    up.add_metric(v, 1.0 if st["redis_up"] else 0.0)
    fallbacks = CounterMetricFamily("lbtwist_fleet_fallbacks", "Changes from fleet mode to local decisions (Redis down, slow or answering garbage)", labels=L)
    fallbacks.add_metric(v, float(st["fallbacks_total"]))
    resumes = CounterMetricFamily("lbtwist_fleet_resumes", "Returns to fleet mode after a fallback", labels=L)
    resumes.add_metric(v, float(st["resumes_total"]))
    errors = CounterMetricFamily("lbtwist_fleet_redis_errors", "Failed Redis calls and connection attempts by kind", labels=L + ["kind"])
    for kind, n in st["errors_total"].items():
        errors.add_metric(v + [kind], float(n))
    decisions = CounterMetricFamily("lbtwist_fleet_rate_decisions", "Fleet-scope rate-limit decisions by where they were made (fleet: Redis answered; lease: leased tokens or a remembered refusal; local: fallback) and result", labels=L + ["route", "source", "result"])
    calls = CounterMetricFamily("lbtwist_fleet_rate_redis_calls", "Lease requests sent to Redis", labels=L + ["route"])
    for route, rs in st["rate_limits"].items():
        for source, by in rs["decisions_by_source"].items():
            decisions.add_metric(v + [route, source, "allowed"], float(by["allowed_total"]))
            decisions.add_metric(v + [route, source, "limited"], float(by["limited_total"]))
        calls.add_metric(v + [route], float(rs["redis_calls_total"]))
    # With workers, each process has its own link; the rate decisions are the
    # workers' (summed by the master's merged /metrics), the link and the
    # shared ejections the master's (lbtwist.workers.metricsmerge keeps a
    # master family no worker exports).
    role = getattr(runtime, "role", "single")
    if role != "master":
        yield from (decisions, calls)
    if role == "worker":
        return
    yield from (up, fallbacks, resumes, errors)
    ej = st["ejections"]
    if ej is not None:
        fam = CounterMetricFamily("lbtwist_fleet_ejection_messages", "Shared ejections by what happened to them", labels=L + ["event"])
        for key in ("published", "publish_failed", "received", "applied", "returned", "echoes_ignored", "not_applied", "bad_messages", "synced"):
            fam.add_metric(v + [key], float(ej[f"{key}_total"]))
        yield fam


def make_registry(runtime: Any, live: Live, clock: Any, process: bool = True) -> CollectorRegistry:
    """A fresh registry holding lbtwist's collector (and the process's CPU,
    memory and file-descriptor metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LbtwistCollector(runtime, live, clock))
    if process:
        ProcessCollector(registry=reg)
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format."""
    return generate_latest(registry)
