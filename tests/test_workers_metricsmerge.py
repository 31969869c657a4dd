"""Merging the workers' /metrics into one, sans-IO."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock

from lbtwist.admin.live import Live
from lbtwist.admin.metrics import exposition, make_registry
from lbtwist.config import load_config
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService
from lbtwist.workers.metricsmerge import merge


def _samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


W1 = """\
# HELP lbtwist_backend_tries_total Work sent
# TYPE lbtwist_backend_tries_total counter
lbtwist_backend_tries_total{pool="web",backend="a",outcome="ok"} 10.0
lbtwist_backend_tries_total{pool="web",backend="a",outcome="5xx"} 1.0
# HELP lbtwist_backend_latency_seconds Latency
# TYPE lbtwist_backend_latency_seconds histogram
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="0.01"} 4.0
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="0.1"} 9.0
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="+Inf"} 11.0
lbtwist_backend_latency_seconds_sum{pool="web",backend="a"} 0.5
lbtwist_backend_latency_seconds_count{pool="web",backend="a"} 11.0
# HELP lbtwist_backend_active In flight
# TYPE lbtwist_backend_active gauge
lbtwist_backend_active{pool="web",backend="a"} 2.0
# HELP lbtwist_backend_state State
# TYPE lbtwist_backend_state gauge
lbtwist_backend_state{pool="web",backend="a",state="healthy"} 1.0
lbtwist_backend_state{pool="web",backend="a",state="ejected"} 0.0
# HELP lbtwist_backend_weight Weight
# TYPE lbtwist_backend_weight gauge
lbtwist_backend_weight{pool="web",backend="a"} 3.0
# HELP process_resident_memory_bytes RSS
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.0e+07
# HELP lbtwist_listener_connections_active Open connections
# TYPE lbtwist_listener_connections_active gauge
lbtwist_listener_connections_active{listener="web"} 5.0
"""

W2 = """\
# HELP lbtwist_backend_tries_total Work sent
# TYPE lbtwist_backend_tries_total counter
lbtwist_backend_tries_total{pool="web",backend="a",outcome="ok"} 5.0
lbtwist_backend_tries_total{pool="web",backend="b",outcome="ok"} 7.0
# HELP lbtwist_backend_latency_seconds Latency
# TYPE lbtwist_backend_latency_seconds histogram
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="0.01"} 1.0
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="0.05"} 2.0
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="0.1"} 3.0
lbtwist_backend_latency_seconds_bucket{pool="web",backend="a",le="+Inf"} 5.0
lbtwist_backend_latency_seconds_sum{pool="web",backend="a"} 1.25
lbtwist_backend_latency_seconds_count{pool="web",backend="a"} 5.0
# HELP lbtwist_backend_active In flight
# TYPE lbtwist_backend_active gauge
lbtwist_backend_active{pool="web",backend="a"} 1.0
# HELP lbtwist_backend_state State
# TYPE lbtwist_backend_state gauge
lbtwist_backend_state{pool="web",backend="a",state="healthy"} 1.0
lbtwist_backend_state{pool="web",backend="a",state="ejected"} 0.0
# HELP lbtwist_backend_weight Weight
# TYPE lbtwist_backend_weight gauge
lbtwist_backend_weight{pool="web",backend="a"} 3.0
# HELP process_resident_memory_bytes RSS
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 2.0e+07
# HELP lbtwist_listener_connections_active Open connections
# TYPE lbtwist_listener_connections_active gauge
lbtwist_listener_connections_active{listener="web"} 4.0
"""

WEB_A = (("backend", "a"), ("pool", "web"))


def _le(le: str) -> tuple:
    return (("backend", "a"), ("le", le), ("pool", "web"))


@pytest.mark.parametrize(
    "name,labels,value",
    [
        # counters: summed; a series only one worker has is kept
        ("lbtwist_backend_tries_total", (("backend", "a"), ("outcome", "ok"), ("pool", "web")), 15.0),
        ("lbtwist_backend_tries_total", (("backend", "a"), ("outcome", "5xx"), ("pool", "web")), 1.0),
        ("lbtwist_backend_tries_total", (("backend", "b"), ("outcome", "ok"), ("pool", "web")), 7.0),
        # histograms bucket-wise; worker 1 has no 0.05 bucket: it counts its 0.01 one there
        ("lbtwist_backend_latency_seconds_bucket", _le("0.01"), 5.0),
        ("lbtwist_backend_latency_seconds_bucket", _le("0.05"), 6.0),
        ("lbtwist_backend_latency_seconds_bucket", _le("0.1"), 12.0),
        ("lbtwist_backend_latency_seconds_bucket", _le("+Inf"), 16.0),
        ("lbtwist_backend_latency_seconds_sum", WEB_A, 1.75),
        ("lbtwist_backend_latency_seconds_count", WEB_A, 16.0),
        # gauges: in-flight work adds up; the fleet view is the same everywhere
        ("lbtwist_backend_active", WEB_A, 3.0),
        ("lbtwist_backend_state", WEB_A + (("state", "healthy"),), 1.0),
        ("lbtwist_backend_state", WEB_A + (("state", "ejected"),), 0.0),
        ("lbtwist_backend_weight", WEB_A, 3.0),
        # per-worker series keep a worker label
        ("process_resident_memory_bytes", (("worker", "1"),), 3.0e7),
        ("process_resident_memory_bytes", (("worker", "2"),), 2.0e7),
        ("lbtwist_listener_connections_active", (("listener", "web"), ("worker", "1")), 5.0),
        ("lbtwist_listener_connections_active", (("listener", "web"), ("worker", "2")), 4.0),
    ],
)
def test_merge_table(name, labels, value):
    got = _samples(merge([W1, W2], ["1", "2"]))
    assert got[(name, labels)] == pytest.approx(value)


def test_merged_text_keeps_types_and_has_no_unlabelled_per_worker_series():
    text = merge([W1, W2], ["1", "2"])
    types = _types(text)
    assert types["lbtwist_backend_tries"] == "counter"
    assert types["lbtwist_backend_latency_seconds"] == "histogram"
    assert types["lbtwist_backend_active"] == "gauge"
    got = _samples(text)
    assert ("process_resident_memory_bytes", ()) not in got
    # buckets stay cumulative
    les = [got[("lbtwist_backend_latency_seconds_bucket", _le(le))] for le in ("0.01", "0.05", "0.1", "+Inf")]
    assert les == sorted(les)


def test_master_adds_its_own_process_series_and_only_families_no_worker_has():
    master = """\
# HELP process_resident_memory_bytes RSS
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.5e+07
# HELP lbtwist_backend_tries_total Work sent
# TYPE lbtwist_backend_tries_total counter
lbtwist_backend_tries_total{pool="web",backend="a",outcome="ok"} 15.0
# HELP lbtwist_discovery_up Source up
# TYPE lbtwist_discovery_up gauge
lbtwist_discovery_up{pool="web",source="file",target="b.yaml"} 1.0
"""
    got = _samples(merge([W1, W2], ["1", "2"], master_text=master))
    assert got[("process_resident_memory_bytes", (("worker", "master"),))] == 1.5e7
    # the master's pools were fed the workers' outcomes: not counted twice
    assert got[("lbtwist_backend_tries_total", (("backend", "a"), ("outcome", "ok"), ("pool", "web")))] == 15.0
    assert got[("lbtwist_discovery_up", (("pool", "web"), ("source", "file"), ("target", "b.yaml")))] == 1.0


@pytest.mark.parametrize(
    "texts,labels,message",
    [
        ([W1], ["1", "2"], "1 texts but 2 worker labels"),
        ([W1, W2], ["1", "1"], "worker labels are not unique"),
        (["this is { not metrics"], ["1"], "metrics of worker 1: not Prometheus text format"),
        ([W1, W1.replace("# TYPE lbtwist_backend_active gauge", "# TYPE lbtwist_backend_active counter")],
         ["1", "2"], "lbtwist_backend_active has different types"),
    ],
)
def test_bad_input_is_named(texts, labels, message):
    with pytest.raises(ValueError, match=message):
        merge(texts, labels)


CONFIG = """
listeners: []
pools:
  - name: web
    backends: [{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]
"""


def _worker_text(n_ok: int, n_bad: int) -> str:
    reg = Registry.default(entry_points=False)
    reactor = MemoryReactorClock()
    svc = LbtwistService(load_config(CONFIG, reg).config, reactor, reg, role="worker")
    svc.startService()
    live = Live(svc.runtime, reactor)
    live.attach()
    pool = svc.runtime.pools["web"]
    b = pool.get("127.0.0.1:9001")
    for i in range(n_ok + n_bad):
        pool.on_start(b)
        pool.on_finish(b, 0.003 * (i % 5), i < n_ok, "ok" if i < n_ok else "5xx")
    text = exposition(make_registry(svc.runtime, live, reactor)).decode()
    svc.stopService()
    return text


def test_real_worker_expositions_merge():
    t1, t2 = _worker_text(20, 2), _worker_text(5, 0)
    merged = _samples(merge([t1, t2], ["1", "2"]))
    one, two = _samples(t1), _samples(t2)
    key = ("lbtwist_backend_tries_total", (("backend", "127.0.0.1:9001"), ("outcome", "ok"), ("pool", "web")))
    if key not in one:  # the label set as the exporter writes it
        key = next(k for k in one if k[0] == "lbtwist_backend_tries_total" and ("outcome", "ok") in k[1]
                   and any(v == "127.0.0.1:9001" for _, v in k[1]))
    assert merged[key] == one[key] + two[key] == 25.0
    counts = [k for k in one if k[0] == "lbtwist_backend_latency_seconds_count" and any(v == "127.0.0.1:9001" for _, v in k[1])]
    assert counts and merged[counts[0]] == one[counts[0]] + two[counts[0]]
    rss = [k for k in merged if k[0] == "process_resident_memory_bytes"]
    assert sorted(dict(k[1])["worker"] for k in rss) == ["1", "2"]
    state = [k for k in one if k[0] == "lbtwist_backend_in_rotation"]
    assert state and all(merged[k] == one[k] for k in state)  # not doubled
