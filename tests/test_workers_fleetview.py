"""The fleet view between a master and its workers, sans-IO: each process is
an LbtwistService on its own MemoryReactorClock (clocks with different
origins, as processes have), wired by calling the fleetview functions."""
from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from lbtwist.config import load_config
from lbtwist.pool import Health
from lbtwist.registry import Registry
from lbtwist.resilience.budget import RetryBudget
from lbtwist.resilience.ratelimit import RateLimiter
from lbtwist.resilience.wiring import runtime_resilience
from lbtwist.service import LbtwistService
from lbtwist.workers import fleetview
from lbtwist.workers.fleetview import OutcomeBatcher, apply_snapshot, feed_outcomes, snapshot, worker_config

A, B, C = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"

CONFIG = f"""
listeners: []
pools:
  - name: web
    algorithm: peak_ewma
    slow_start: 10s
    backends: [{{address: "{A}"}}, {{address: "{B}"}}, {{address: "{C}"}}]
    health:
      active: {{kind: tcp, interval: 1s, timeout: 500ms}}
      passive: {{consecutive_5xx: 5, base_ejection_time: 30s}}
    circuit_breaker: {{consecutive_failures: 4, open_for: 10s}}
"""


class Fleet:
    """A master and workers, each with its own clock; ``tick`` moves them all."""

    def __init__(self, workers: int = 2, text: str = CONFIG) -> None:
        self.reg = Registry.default(entry_points=False)
        cfg = load_config(text, self.reg).config
        # the master's deciding side (probes, detector, discovery) is the single
        # process's; role "master" would also spawn worker processes (lbtwist.workers.master)
        self.master = self._svc(cfg, "single", 0.0)
        self.workers = [self._svc(worker_config(cfg, workers), "worker", 1000.0 * (i + 1)) for i in range(workers)]
        self.batchers = [OutcomeBatcher(w.runtime) for w in self.workers]

    def _svc(self, cfg, role, origin):
        reactor = MemoryReactorClock()
        reactor.advance(origin)
        svc = LbtwistService(cfg, reactor, self.reg, role=role)
        svc.startService()
        return svc

    def tick(self, dt: float) -> None:
        for s in [self.master, *self.workers]:
            s.reactor.advance(dt)

    def push(self) -> dict:
        snap = json.loads(json.dumps(snapshot(self.master.runtime)))  # through JSON, as over AMP
        for w in self.workers:
            apply_snapshot(w.runtime, snap)
        return snap

    def report(self) -> None:
        for b in self.batchers:
            batch = b.take()
            if batch is not None:
                feed_outcomes(self.master.runtime, json.loads(json.dumps(batch)))

    def mpool(self):
        return self.master.runtime.pools["web"]

    def wpool(self, i: int):
        return self.workers[i].runtime.pools["web"]

    def stop(self) -> None:
        for s in [self.master, *self.workers]:
            s.stopService()


@pytest.fixture
def fleet():
    f = Fleet()
    yield f
    f.stop()


def test_workers_do_not_probe_or_eject_the_master_does(fleet):
    assert fleet.master.health.pools["web"].scheduler is not None
    assert fleet.master.health.pools["web"].detector is not None
    fleet.tick(2.0)  # probes start within the first interval (jittered)
    for w in fleet.workers:
        ph = w.health.pools["web"]
        assert ph.scheduler is None and ph.detector is None
        assert not w.reactor.tcpClients  # no probe connection from a worker
    assert fleet.master.reactor.tcpClients  # the master probes
    # a worker seeing failures does not eject by itself
    wp = fleet.wpool(0)
    b = wp.get(A)
    for _ in range(20):
        wp.on_start(b)
        wp.on_finish(b, 0.01, False, "5xx")
    assert b.ejected_until is None


def test_probe_results_and_slow_start_reach_workers_on_their_own_clocks(fleet):
    mp = fleet.mpool()
    for w in range(2):
        assert all(b.health is Health.UNKNOWN for b in fleet.wpool(w).backends())
    fleet.tick(3.0)
    mp.set_health(mp.get(A), Health.HEALTHY, "probe passed")
    mp.set_health(mp.get(B), Health.HEALTHY, "probe passed")
    mp.set_health(mp.get(C), Health.UNHEALTHY, "probe failed: refused")
    fleet.tick(0.05)  # transit
    fleet.push()
    fleet.tick(4.0)
    m_now = fleet.master.reactor.seconds()
    for w in range(2):
        wp = fleet.wpool(w)
        w_now = fleet.workers[w].reactor.seconds()
        assert [b.health for b in wp.backends()] == [Health.HEALTHY, Health.HEALTHY, Health.UNHEALTHY]
        assert wp.get(C).reason.startswith("unhealthy: master: unhealthy: probe failed")
        # the ramp started when the master let A in, not when the worker heard of it
        assert wp.get(A).ramp(w_now) == pytest.approx(mp.get(A).ramp(m_now), abs=0.006)
        assert wp.get(A).ramp(w_now) == pytest.approx(0.4, abs=0.006)


def test_a_snapshot_applied_twice_changes_nothing(fleet):
    mp = fleet.mpool()
    mp.set_health(mp.get(A), Health.HEALTHY, "probe passed")
    mp.eject(mp.get(B), fleet.master.reactor.seconds() + 30, "5 consecutive 5xx")
    fleet.tick(0.02)
    snap = fleet.push()
    wp = fleet.wpool(0)
    events = []
    wp.subscribe(lambda *a: events.append(a))
    before = (wp.version, [(b.health, b.ejected_until, b.joined_at, b.weight, b.reason) for b in wp.backends()])
    fleet.tick(0.5)  # the same snapshot, again, later (and a late copy of it)
    apply_snapshot(fleet.workers[0].runtime, snap)
    fleet.tick(0.5)
    apply_snapshot(fleet.workers[0].runtime, snap)
    after = (wp.version, [(b.health, b.ejected_until, b.joined_at, b.weight, b.reason) for b in wp.backends()])
    assert after == before and events == []
    # a newer snapshot of the same state changes nothing either
    fleet.push()
    assert (wp.version, events) == (before[0], [])


def _drain(mp, b):
    mp.set_draining(b, True, "admin drain")


@pytest.mark.parametrize(
    "change,check",
    [
        (lambda mp, b: mp.set_enabled(b, False, "admin disable"), lambda b, now: b.state(now) == "disabled"),
        (_drain, lambda b, now: b.draining),
        (lambda mp, b: mp.set_weight(b, 7.0, "admin weight"), lambda b, now: b.weight == 7.0),
        (lambda mp, b: mp.set_health(b, Health.UNHEALTHY, "probe failed"), lambda b, now: b.health is Health.UNHEALTHY),
        (lambda mp, b: mp.eject(b, mp.clock.seconds() + 30.0, "latency outlier"),
         lambda b, now: b.state(now) == "ejected" and 29.0 < b.ejected_until - now <= 30.0),
    ],
    ids=["disable", "drain", "weight", "unhealthy", "eject"],
)
def test_each_decision_of_the_master_reaches_every_worker(fleet, change, check):
    mp = fleet.mpool()
    for a in (A, B, C):
        mp.set_health(mp.get(a), Health.HEALTHY, "probe passed")
    fleet.push()
    change(mp, mp.get(A))
    fleet.push()
    for w in range(2):
        now = fleet.workers[w].reactor.seconds()
        b = fleet.wpool(w).get(A)
        assert check(b, now)
        assert fleet.wpool(w).get(B).state(now) in ("healthy", "slow_start")


def test_undo_of_the_master_reaches_workers(fleet):
    mp = fleet.mpool()
    a = mp.get(A)
    mp.set_health(a, Health.HEALTHY, "probe passed")
    mp.eject(a, mp.clock.seconds() + 30.0, "5 consecutive 5xx")
    mp.set_enabled(a, False, "admin")
    fleet.push()
    mp.unject(a, "ejection over")
    mp.set_enabled(a, True, "admin")
    fleet.tick(1.0)
    fleet.push()
    wb = fleet.wpool(0).get(A)
    assert wb.ejected_until is None and wb.enabled


def test_backend_set_follows_the_master_and_removal_drains_in_flight_work(fleet):
    from lbtwist.config.model import BackendConfig

    D = "127.0.0.1:9004"
    wanted = {a: BackendConfig(address=a) for a in (A, B, D)}  # C leaves, D joins (discovery, reload)
    fleet.master.sync_discovered("web", wanted, "discovery")
    wp = fleet.wpool(0)
    c = wp.get(C)
    wp.on_start(c)  # one request in flight on C in worker 0
    fleet.push()
    assert wp.get(D) is not None and wp.get(D).health is Health.UNKNOWN
    assert wp.get(C) is c and c.draining  # drains first
    assert fleet.wpool(1).get(C) is None  # nothing in flight there: removed at once
    wp.on_finish(c, 0.01, True)
    assert wp.get(C) is None
    fleet.push()  # the master's own drain finished too
    assert {b.address for b in wp.backends()} == {A, B, D}


def test_local_signals_stay_local(fleet):
    mp = fleet.mpool()
    for a in (A, B, C):
        mp.set_health(mp.get(a), Health.HEALTHY, "probe passed")
    fleet.push()
    wp = fleet.wpool(0)
    now = fleet.workers[0].reactor.seconds()
    b = wp.get(A)
    for _ in range(3):
        wp.on_start(b)
    wp.on_finish(b, 0.250, True)
    est = wp.latency_estimate(b, now)
    balancer = wp.balancer
    mp.set_weight(mp.get(B), 3.0, "admin")
    fleet.push()
    assert (b.active, b.total) == (2, 3)
    assert wp.balancer is balancer and wp.latency_estimate(b, now) == est
    assert fleet.wpool(1).get(A).active == 0


def test_failures_on_one_workers_traffic_eject_for_the_fleet(fleet):
    mp = fleet.mpool()
    for a in (A, B, C):
        mp.set_health(mp.get(a), Health.HEALTHY, "probe passed")
    fleet.push()
    # 3 consecutive 5xx on worker 0, then 2 on worker 1: 5 in a row for the fleet
    for w, n in ((0, 3), (1, 2)):
        wp = fleet.wpool(w)
        b = wp.get(A)
        for _ in range(n):
            wp.on_start(b)
            wp.on_finish(b, 0.01, False, "5xx")
        fleet.tick(0.01)
    fleet.report()
    assert mp.get(A).state(mp.clock.seconds()) == "ejected"
    assert "5 consecutive 5xx" in mp.get(A).reason
    fleet.push()
    for w in range(2):
        now = fleet.workers[w].reactor.seconds()
        wb = fleet.wpool(w).get(A)
        assert wb.state(now) == "ejected" and "5 consecutive 5xx" in wb.reason
        assert all(fleet.wpool(w).select(_ctx(now)) is not wb for _ in range(20))


def _ctx(now):
    from lbtwist.pool import PickContext

    return PickContext(now=now)


def test_the_order_of_outcomes_is_kept_an_ok_breaks_the_run(fleet):
    mp = fleet.mpool()
    mp.set_health(mp.get(A), Health.HEALTHY, "probe passed")
    fleet.push()
    wp = fleet.wpool(0)
    b = wp.get(A)
    for outcome in ["5xx"] * 4 + ["ok"] + ["5xx"] * 4:
        wp.on_start(b)
        wp.on_finish(b, 0.01, outcome == "ok", outcome)
    fleet.report()
    assert mp.get(A).ejected_until is None


def test_the_batch_is_bounded_and_take_starts_over(fleet):
    wp = fleet.wpool(0)
    b = wp.get(A)
    for i in range(100_000):
        wp.on_start(b)
        wp.on_finish(b, 0.001 * (i % 7), True, "ok")
    batcher = fleet.batchers[0]
    keep = fleet_keep = fleetview._keep(fleet.workers[0].runtime.pool_configs["web"])
    assert batcher.pending() == keep == fleet_keep
    batch = batcher.take()
    (entry,) = batch["backends"]
    assert len(entry["o"]) == keep and entry["dropped"] == 100_000 - keep
    assert len(json.dumps(batch)) < 20 * keep + 200
    assert batcher.take() is None and batcher.pending() == 0


def test_breaker_opened_by_one_worker_opens_for_the_fleet_once(fleet):
    mp = fleet.mpool()
    for a in (A, B, C):
        mp.set_health(mp.get(a), Health.HEALTHY, "probe passed")
    fleet.push()
    w0, w1 = (runtime_resilience(w.runtime).pool("web").breakers for w in fleet.workers)
    b0 = fleet.wpool(0).get(A)
    for _ in range(4):
        g = w0.on_start(b0, fleet.workers[0].reactor.seconds())
        w0.on_finish(b0, fleet.workers[0].reactor.seconds(), "5xx", 503, g)
    assert w0.state(b0, fleet.workers[0].reactor.seconds()).value == "open"
    opened0 = w0.last_opened(b0)
    fleet.tick(0.1)
    fleet.report()
    assert runtime_resilience(fleet.master.runtime).pool("web").breakers.state(
        mp.get(A), mp.clock.seconds()).value == "open"
    fleet.tick(0.05)
    fleet.push()
    fleet.push()
    b1 = fleet.wpool(1).get(A)
    now1 = fleet.workers[1].reactor.seconds()
    assert w1.state(b1, now1).value == "open" and not w1.allows(b1, now1)
    assert w1.last_opened(b1)[1] is True  # tripped by the fleet
    assert w1.opened_total == 0 and w0.opened_total == 1
    assert w0.last_opened(b0) == opened0  # its own open, not re-opened by the echo
    assert fleet.batchers[1].take() is None  # a trip is not reported back


def test_bad_messages_are_refused_with_a_clear_error(fleet):
    with pytest.raises(ValueError, match="not a version 1 fleet view message"):
        apply_snapshot(fleet.workers[0].runtime, {"pools": {}})
    bad = {"v": 1, "backends": [{"pool": "web", "address": A, "o": "k5", "age_ms": [1.0], "lat_us": [1, 2],
                                 "dropped": 0}], "breaker_opens": []}
    with pytest.raises(ValueError, match="2 outcomes, 1 ages, 2 latencies"):
        feed_outcomes(fleet.master.runtime, bad)


def test_chunks_round_trip_under_the_amp_limit(fleet):
    snap = snapshot(fleet.master.runtime)
    chunks = fleetview.encode_chunks(snap, limit=100)
    assert len(chunks) > 1 and all(len(c) <= 100 for c in chunks)
    assert fleetview.decode_chunks(chunks) == json.loads(json.dumps(snap))


# -- per-worker limits ---------------------------------------------------------------------

LIMITS = f"""
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    max_connections: 1000
    routes:
      - pool: web
        match: {{path_prefix: /}}
        rate_limit: {{rate: 10, burst: 5, key: route}}
        retry: {{min_retries_per_second: 3}}
pools:
  - name: web
    backends: [{{address: "{A}"}}]
    limits: {{max_connections: 100, max_pending: 10, max_requests: 101, max_retries: 3}}
    retry_budget: {{budget_percent: 20, min_retries_per_second: 4}}
"""


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_n_workers_together_admit_at_most_the_rate_limit(n):
    cfg = load_config(LIMITS, Registry.default(entry_points=False)).config
    route = cfg.listeners[0].routes[0]
    wcfg = worker_config(cfg, n).listeners[0].routes[0].rate_limit
    limiters = [RateLimiter.from_config(wcfg) for _ in range(n)]
    clock = Clock()
    admitted = 0
    seconds, step = 10.0, 0.001
    for i in range(int(seconds / step)):  # every worker is asked every millisecond
        for lim in limiters:
            admitted += lim.check("", clock.seconds()).allowed
        clock.advance(step)
    rl = route.rate_limit
    remainder = max(0.0, n * 1.0 - rl.burst)  # each worker's bucket holds at least 1
    assert admitted <= rl.rate * seconds + rl.burst + remainder + 1e-9
    assert admitted >= rl.rate * seconds  # and the split does not starve it


@pytest.mark.parametrize("n", [2, 3, 8])
def test_n_workers_together_stay_within_counts_and_retry_floors(n):
    cfg = load_config(LIMITS, Registry.default(entry_points=False)).config
    w = worker_config(cfg, n)
    lim, wlim = cfg.pools[0].limits, w.pools[0].limits
    for key in ("max_connections", "max_pending", "max_requests", "max_retries"):
        assert getattr(lim, key) <= n * getattr(wlim, key) <= getattr(lim, key) + n - 1
    assert cfg.listeners[0].max_connections <= n * w.listeners[0].max_connections <= 1000 + n - 1
    # the retry floor: with no requests at all, N budgets grant what one would
    pb = w.pools[0].retry_budget
    assert pb.budget_percent == 20
    budgets = [RetryBudget(pb.budget_percent, pb.min_retries_per_second, pb.window) for _ in range(n)]
    granted = sum(b.try_retry(0.5) for b in budgets for _ in range(1000))
    assert granted <= cfg.pools[0].retry_budget.min_retries_per_second * pb.window
    rr = w.listeners[0].routes[0].retry
    assert rr.min_retries_per_second == pytest.approx(3 / n)


def test_worker_config_refuses_a_bad_count():
    cfg = load_config(LIMITS, Registry.default(entry_points=False)).config
    assert worker_config(cfg, 1) is cfg
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="number of workers must be an integer >= 1"):
            worker_config(cfg, bad)


def test_a_new_worker_applies_the_masters_view_before_it_accepts(tmp_path):
    """The bug (worker-kill drill): a replacement worker started accepting
    with every backend still 'unknown' (active checks configured: backends
    wait for a probe) until the master's first snapshot arrived after its
    Ready, so its first requests got 503 "no backend". The master's view now
    comes with the worker's config and is applied before the listeners start."""
    from lbtwist.workers.child import Worker

    reg = Registry.default(entry_points=False)
    text = CONFIG.replace("listeners: []", 'listeners:\n  - {name: web, bind: "tcp:0:interface=127.0.0.1", mode: http, pool: web}')
    fleet = Fleet(text=text)
    master = fleet.master
    mp = master.runtime.pools["web"]
    for a in (A, B):
        mp.set_health(mp.get(a), Health.HEALTHY, "probe passed")
    payload = {"text": text, "source": "lbtwist.yaml", "workers": 2, "slot": 0, "sockets": {},
               "snapshot": json.loads(json.dumps(snapshot(master.runtime)))}
    reactor = MemoryReactorClock()
    worker = Worker(reactor)
    worker._reg = reg
    worker.on_config(json.dumps(payload).encode())
    try:
        assert reactor.tcpServers, "the worker listens"
        wp = worker.service.runtime.pools["web"]
        assert [b.health for b in wp.backends()] == [Health.HEALTHY, Health.HEALTHY, Health.UNKNOWN]
        assert wp.select(_ctx(reactor.seconds())) is not None  # a request finds a backend at once
    finally:
        worker.service.stopService()
        fleet.stop()


def test_a_backend_the_workers_balancers_avoid_is_ejected_by_the_master(fleet):
    """The bug (two-liars drill with workers): the latency rule's 'avoided by
    the balancer' branch asks the balancer's estimate; the master's balancer
    sees no traffic, so a slow backend that p2c stopped choosing was never
    ejected. Workers now send their estimates; the master uses the lowest
    fresh one (slow only if every worker sees it slow)."""
    mp = fleet.mpool()
    for a in (A, B, C):
        mp.set_health(mp.get(a), Health.HEALTHY, "probe passed")
    fleet.push()
    fleet.tick(11.0)  # past slow start
    fleet.push()
    for w in range(2):
        wp = fleet.wpool(w)
        for _ in range(30):
            for a, lat in ((A, 0.005), (B, 0.006), (C, 0.8)):
                b = wp.get(a)
                wp.on_start(b)
                wp.on_finish(b, lat, True, "ok")
    assert mp.latency_estimate(mp.get(C), mp.clock.seconds()) is None  # no traffic of its own
    fleet.report()
    now = mp.clock.seconds()
    est = mp.latency_estimate(mp.get(C), now)
    assert est is not None and est > 0.5
    assert mp.latency_estimate(mp.get(A), now) < 0.05
    fleet.master.health.pools["web"].detector._avoided_rule(list(mp.backends()), now)
    assert mp.get(C).state(now) == "ejected" and "avoided by the balancer" in mp.get(C).reason
    # estimates expire: a worker that stopped reporting does not speak for long
    fleet.tick(3.0)
    assert mp.latency_estimate(mp.get(A), mp.clock.seconds()) is None


def test_state_changes_are_logged_by_the_master_only(fleet):
    """A fleet-view change is logged once (by the master that decided it),
    not once more per worker applying it."""
    from twisted.logger import globalLogPublisher

    seen = []

    def obs(event):
        if event.get("log_format", "").startswith("pool {pool} backend {backend}:"):
            seen.append(event)

    globalLogPublisher.addObserver(obs)
    try:
        fleet.mpool().set_draining(fleet.mpool().get(A), True, "admin")
        fleet.push()
    finally:
        globalLogPublisher.removeObserver(obs)
    assert [e["backend"] for e in seen] == [A], [(e["backend"], e["reason"]) for e in seen]
    assert all(fleet.wpool(i).get(A).draining for i in range(2))  # the workers applied it all the same


def test_a_backend_joining_later_ramps_on_every_worker_as_in_the_master(fleet):
    """Cold start under workers: a backend the master lets in mid-run ramps
    from the master's join time in every worker, through the whole slow
    start, even for a worker whose first view came late (the spawn payload,
    seconds old) and whose later views are only pushed on change."""
    mp = fleet.mpool()
    for b in (A, B):
        mp.set_health(mp.get(b), Health.HEALTHY, "probe passed")
    snap = json.loads(json.dumps(snapshot(fleet.master.runtime)))
    fleet.tick(4.0)  # worker 0 starts slowly: its first view is 4 s old
    apply_snapshot(fleet.workers[0].runtime, snap)
    fleet.push()  # Ready: a fresh view
    fleet.tick(5.0)
    mp.set_health(mp.get(C), Health.HEALTHY, "first probe passed")  # the newcomer joins
    snap = json.loads(json.dumps(snapshot(fleet.master.runtime)))
    fleet.tick(0.3)  # a slow transit of the only push for this change
    for w in fleet.workers:
        apply_snapshot(w.runtime, snap)
    # (the ramp only: the master's probes on a memory reactor fail meanwhile)
    for _ in range(12):  # 12 s: through the 10 s slow start and past it
        m_now = fleet.master.reactor.seconds()
        want = mp.get(C).ramp(m_now)
        for w in range(2):
            got = fleet.wpool(w).get(C).ramp(fleet.workers[w].reactor.seconds())
            assert got == pytest.approx(want, abs=0.006), (w, m_now)
        fleet.tick(1.0)
    assert all(fleet.wpool(w).get(C).ramp(fleet.workers[w].reactor.seconds()) == 1.0 for w in range(2))


FOUR = [f"127.0.0.1:{9011 + i}" for i in range(4)]
FOUR_CONFIG = f"""
listeners: []
pools:
  - name: web
    backends: [{", ".join('{address: "%s"}' % a for a in FOUR)}]
"""


def _serve(fleet, w, address, outcome="ok", latency=0.003):
    wp = fleet.wpool(w)
    b = wp.get(address)
    wp.on_start(b)
    wp.on_finish(b, latency, outcome == "ok", outcome)


def _busy(fleet, seconds, skip=(), every=0.05):
    """Both workers serve every backend but ``skip`` (20 ok a second each),
    reporting to the master every 100 ms as the workers do; the master's
    detector ticks as its service schedules it."""
    for i in range(int(round(seconds / every))):
        fleet.tick(every)
        for w in range(2):
            for a in FOUR:
                if a not in skip:
                    _serve(fleet, w, a)
        if i % 2:
            fleet.report()


def test_two_liars_under_workers_a_starved_503_backend_is_ejected():
    """The two-liars drill under workers, as the master saw it (run a4:
    b8 4 consecutive 5xx from its two workers' reports, then no try for
    20 s; state healthy to the end). A busy backend turns to fast 503s; the
    workers' balancers give it 4 tries spread over 2 s, then avoid it. The
    last 10 tries the master holds for it still count 6 successes from
    before the fault (40% < 50%) and 4 in a row is under consecutive_5xx:
    it stayed in rotation. The master now judges an avoided backend by its
    failure run."""
    fleet = Fleet(text=FOUR_CONFIG)
    try:
        mp = fleet.mpool()
        liar = FOUR[3]
        fleet.push()
        _busy(fleet, 5.0)
        for w in (0, 1, 0, 1):
            _serve(fleet, w, liar, "5xx", latency=0.001)
            _busy(fleet, 0.5, skip={liar})
        _busy(fleet, 2.0, skip={liar})
        now = fleet.master.reactor.seconds()
        assert mp.get(liar).state(now) == "ejected"
        assert mp.get(liar).reason.startswith("ejected: its last 4 tries failed and the balancer has avoided it since")
        fleet.push()
        assert all(fleet.wpool(w).get(liar).state(fleet.workers[w].reactor.seconds()) == "ejected" for w in range(2))
    finally:
        fleet.stop()


def test_an_older_success_reported_after_newer_failures_does_not_hide_them():
    """Reports interleave: worker 1's batch with a success from just before
    the fault reaches the master after worker 0's batch with the first
    failures. The master orders a backend's tries by time: its newest try
    is still a failure (re-judged at each tick), and its failure run is the
    3 failures, not 0."""
    fleet = Fleet(text=FOUR_CONFIG)
    try:
        mp = fleet.mpool()
        liar = FOUR[3]
        fleet.push()
        _busy(fleet, 5.0)
        fleet.report()
        _serve(fleet, 1, liar)  # worker 1: a success just before the fault
        fleet.tick(0.01)
        for _ in range(3):
            _serve(fleet, 0, liar, "5xx", latency=0.001)
            fleet.tick(0.01)
        fleet.report()  # worker 0's batch first, then worker 1's older success
        det = fleet.master.health.pools["web"].detector
        assert det.snapshot(mp.get(liar), fleet.master.reactor.seconds())["consecutive_5xx"] == 0  # arrival order
        _busy(fleet, 3.0, skip={liar})
        assert mp.get(liar).state(fleet.master.reactor.seconds()) == "ejected"
        assert mp.get(liar).reason.startswith("ejected: its last 3 tries failed")
    finally:
        fleet.stop()
