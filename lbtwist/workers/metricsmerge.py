# -*- test-case-name: tests.test_workers_metricsmerge -*-
"""One /metrics for a master and its workers: each worker's Prometheus text
exposition merged into one, sans-IO.

- Counters are summed (``_created``: the earliest).
- Histograms are merged bucket-wise (buckets, ``_sum`` and ``_count`` summed;
  a worker without some boundary counts there what its next lower one holds,
  so merging never invents observations).
- Gauges are summed (in-flight work, slots in use, budget allowances add up
  across workers), except:
  - per-worker series (L{PER_WORKER}: memory, file descriptors, open
    connections) keep one series per worker with a ``worker`` label;
  - fleet-view gauges (L{SAME_IN_EVERY_WORKER} and the suffixes in
    L{SAME_SUFFIXES}: states, health, weights, ramps, flags, ages) are the
    same in every worker (the master decided them): the largest value is
    shown (while a change travels, up to 100 ms, a one-hot state may show
    two states at 1).
- The master's own text (``master_text``) adds its per-worker series (as
  ``worker="master"``) and the families no worker exports (discovery
  sources, say). Its other series are left out: the master's pools see the
  workers' outcomes too (fed for passive detection) and would count them
  twice.
"""
from __future__ import annotations

import math
from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: Gauge families kept per worker, with a ``worker`` label.
PER_WORKER = frozenset({
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "lbtwist_listener_connections_active",
})

#: Gauge families that say the same in every worker (the fleet view).
SAME_IN_EVERY_WORKER = frozenset({
    "lbtwist_backend_health",
    "lbtwist_backend_state",
    "lbtwist_backend_in_rotation",
    "lbtwist_backend_weight",
    "lbtwist_backend_slow_start_ramp",
    "lbtwist_pool_backends",
    "lbtwist_pool_backends_healthy",
    "lbtwist_pool_backends_in_rotation",
    "lbtwist_pool_panic",
    "lbtwist_pool_load_spread",
})
#: ... and any gauge named like these (one-hot states, flags, ages, shares).
SAME_SUFFIXES = ("_state", "_health", "_up", "_seconds", "_percent", "_ratio", "_spread")

#: The label per-worker series get.
WORKER_LABEL = "worker"


def _key(labels: dict) -> tuple:
    return tuple(sorted(labels.items()))


def _same(name: str) -> bool:
    return name in SAME_IN_EVERY_WORKER or name.endswith(SAME_SUFFIXES)


def _parse(text: str, what: str) -> list[Metric]:
    try:
        return list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError and friends with the line
        raise ValueError(f"metrics of {what}: not Prometheus text format: {e}") from None


def merge(texts: list[str], worker_labels: list[str], master_text: str | None = None) -> str:
    """The workers' expositions (``texts[i]`` from worker ``worker_labels[i]``)
    as one (see the module doc)."""
    if len(texts) != len(worker_labels):
        raise ValueError(f"merge: {len(texts)} texts but {len(worker_labels)} worker labels")
    if len(set(worker_labels)) != len(worker_labels):
        raise ValueError(f"merge: worker labels are not unique: {worker_labels}")
    parsed = [(_parse(t, f"worker {w}"), w) for t, w in zip(texts, worker_labels)]
    if master_text is not None:
        if "master" in worker_labels:
            raise ValueError("merge: 'master' is the master's own worker label")
        fams = _parse(master_text, "the master")
        seen = {f.name for fs, _ in parsed for f in fs}
        parsed.append(([f for f in fams if f.name in PER_WORKER or f.name not in seen], "master"))
    order: list[str] = []
    groups: dict[str, list[tuple[Metric, str]]] = {}
    for fams, worker in parsed:
        for f in fams:
            if f.name not in groups:
                order.append(f.name)
                groups[f.name] = []
            groups[f.name].append((f, worker))
    out = [_merge_family(groups[name]) for name in order]
    return _render(out)


def _merge_family(members: list[tuple[Metric, str]]) -> Metric:
    first = members[0][0]
    kinds = {m.type for m, _ in members}
    if len(kinds) > 1:
        raise ValueError(f"merge: metric {first.name} has different types across workers: {sorted(kinds)}")
    merged = Metric(first.name, first.documentation, first.type, first.unit)
    if first.type == "gauge" and first.name in PER_WORKER:
        for m, worker in members:
            for s in m.samples:
                merged.samples.append(Sample(s.name, {**s.labels, WORKER_LABEL: worker}, s.value))
        return merged
    if first.type in ("histogram", "gaugehistogram"):
        merged.samples.extend(_merge_histogram([m for m, _ in members]))
        return merged
    if first.type in ("info", "stateset") or (first.type == "gauge" and _same(first.name)):
        combine = max
    else:
        combine = None  # sum
    values: dict[tuple, list] = {}
    for m, _ in members:
        for s in m.samples:
            if first.type == "summary" and "quantile" in s.labels:
                continue  # quantiles do not merge
            k = (s.name, _key(s.labels))
            slot = values.get(k)
            if slot is None:
                values[k] = [s.name, s.labels, s.value]
            elif s.name.endswith("_created"):
                slot[2] = min(slot[2], s.value)
            elif combine is max:
                slot[2] = max(slot[2], s.value)
            else:
                slot[2] += s.value
    merged.samples.extend(Sample(n, labels, v) for n, labels, v in values.values())
    return merged


def _le(s: Sample) -> float:
    v = s.labels.get("le", "+Inf")
    return math.inf if v in ("+Inf", "Inf") else float(v)


def _merge_histogram(members: list[Metric]) -> Iterable[Sample]:
    # per series (labels without le): each worker's cumulative buckets
    series: dict[tuple, dict] = {}
    order: list[tuple] = []
    for w, m in enumerate(members):
        for s in m.samples:
            base = {k: v for k, v in s.labels.items() if k != "le"}
            key = _key(base)
            entry = series.get(key)
            if entry is None:
                entry = series[key] = {"labels": base, "buckets": {}, "other": {}}
                order.append(key)
            if s.name.endswith("_bucket"):
                entry["buckets"].setdefault(w, []).append((_le(s), s.value, s.name))
                entry.setdefault("le_text", {}).setdefault(_le(s), s.labels.get("le", "+Inf"))
            else:
                o = entry["other"]
                if s.name in o:
                    o[s.name] = min(o[s.name], s.value) if s.name.endswith("_created") else o[s.name] + s.value
                else:
                    o[s.name] = s.value
    for key in order:
        entry = series[key]
        per_worker = entry["buckets"]
        bounds = sorted({le for bs in per_worker.values() for le, _, _ in bs})
        name = next((n for bs in per_worker.values() for _, _, n in bs), None)
        for le in bounds:
            total = 0.0
            for bs in per_worker.values():
                below = [v for b, v, _ in bs if b <= le]
                total += max(below) if below else 0.0
            label = entry["le_text"][le]
            yield Sample(name, {**entry["labels"], "le": label}, total)
        for n, v in entry["other"].items():
            yield Sample(n, entry["labels"], v)


class _Static:
    def __init__(self, fams: list[Metric]) -> None:
        self.fams = fams

    def collect(self) -> Iterable[Metric]:
        return iter(self.fams)


def _render(fams: list[Metric]) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Static(fams))
    return generate_latest(reg).decode("utf-8")
