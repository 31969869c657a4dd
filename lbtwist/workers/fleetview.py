# -*- test-case-name: tests.test_workers_fleetview -*-
"""One view of the backends across a master and its worker processes, sans-IO.

The master decides (active probes, passive ejection, drain, disable, weight,
slow start, discovery, breaker opens); workers serve traffic and apply what
the master decided. What moves between them is plain JSON-able data:

- L{snapshot} (master -> every worker): per pool, the backend set and each
  backend's decided state. L{apply_snapshot} applies it in a worker,
  idempotently, through the same paths the service itself uses.
- L{OutcomeBatcher} (worker -> master): the passive outcomes the worker's
  pools saw, bounded per backend, and breaker opens seen by the worker's own
  traffic. L{feed_outcomes} feeds them to the master's pools, whose outlier
  detectors eject for the whole fleet (reaching the workers through the
  next snapshot).

Per-request signals stay local to each worker and are never touched here:
active counts (least connections), the balancer's peak-EWMA state, breaker
trials. That is how power-of-two-choices in N workers avoids the herd.

Times: every process reads its own reactor clock. A snapshot carries the
master's clock reading ``now`` and backend times as master times; a worker
maps them to its clock with an offset ``local - master`` it learns as the
smallest ``local_now - snap["now"]`` seen (the difference of the clocks'
origins plus the shortest transit; a snapshot delivered late never moves it).
Applying one snapshot twice thus maps every time to the same local time.
Batches from workers carry ages (seconds before the batch was taken).
"""
from __future__ import annotations

import json
import math
import uuid
from collections import deque
from typing import Any, Iterable

import attrs

from lbtwist.config.model import BackendConfig, Config
from lbtwist.pool import OUTCOMES, Backend, Health, Pool

#: Snapshot and batch format version (a field of both).
VERSION = 1

#: Times within this of each other are the same time (clock mapping jitter).
SAME_TIME = 0.05

#: Outcome letters in a batch (one character per sample).
_LETTER = {"ok": "k", "5xx": "5", "gateway": "g", "cancelled": "c"}
_OUTCOME = {v: k for k, v in _LETTER.items()}
assert set(_LETTER) == set(OUTCOMES)

#: Samples kept per backend between two takes: at least this many ...
MIN_KEEP = 32
#: ... and at most this many.
MAX_KEEP = 1024


def _age(now: float, at: float) -> float | None:
    return None if at is None or math.isinf(at) else round(now - at, 6)


# -- master -> workers ------------------------------------------------------------------


def snapshot(runtime: Any) -> dict:
    """The fleet view the master decided, as JSON-able data (see module doc)."""
    now = runtime.reactor.seconds()
    resilience = getattr(runtime, "resilience", None)
    known = resilience.known() if resilience is not None else {}
    pools: dict[str, Any] = {}
    for name, pool in runtime.pools.items():
        pres = known.get(name)
        out = []
        for b in pool.backends():
            ejected = b.ejected_until is not None and b.ejected_until > now
            opened = pres.breakers.last_opened(b) if pres is not None else None
            out.append({
                "address": b.address,
                "name": b.name,
                "weight": b.weight,
                "health": b.health.value,
                "enabled": b.enabled,
                "draining": b.draining,
                "joined_at": None if math.isinf(b.joined_at) else b.joined_at,
                "ejected_until": b.ejected_until if ejected else None,
                "reason": b.reason,
                "breaker_opened_at": None if opened is None else opened[0],
            })
        pools[name] = {"backends": out}
    return {"v": VERSION, "now": now, "pools": pools}


@attrs.define
class _Clocks:
    """A worker's mapping from the master's clock to its own."""

    offset: float | None = None

    def learn(self, local_now: float, master_now: float) -> float:
        d = local_now - master_now
        if self.offset is None or d < self.offset:
            self.offset = d
        return self.offset


def _clocks(runtime: Any) -> _Clocks:
    c = getattr(runtime, "fleet_clocks", None)
    if c is None:
        c = _Clocks()
        runtime.fleet_clocks = c
    return c


def _check(snap: Any, what: str) -> None:
    if not isinstance(snap, dict) or snap.get("v") != VERSION:
        raise ValueError(f"{what}: not a version {VERSION} fleet view message: {str(snap)[:80]!r}")


def apply_snapshot(runtime: Any, snap: dict) -> None:
    """Apply the master's L{snapshot} in a worker. Backends are added and
    removed through ``runtime.sync_backends`` (the service's backend diff:
    removed ones drain first); state changes go through the pool's methods
    (logged once, subscribers told). Local signals (active counts, the
    balancer's state, breaker trials) are left alone. Idempotent. Pools the
    worker does not have are skipped (a reload adds them first)."""
    _check(snap, "apply_snapshot")
    sync = getattr(runtime, "sync_backends", None)
    if sync is None:
        raise RuntimeError("apply_snapshot: runtime.sync_backends is not set (LbtwistService sets it)")
    local_now = runtime.reactor.seconds()
    offset = _clocks(runtime).learn(local_now, float(snap["now"]))
    resilience = getattr(runtime, "resilience", None)
    for name, ps in snap["pools"].items():
        pool = runtime.pools.get(name)
        if pool is None:
            continue
        entries = ps["backends"]
        wanted = {
            e["address"]: BackendConfig(address=e["address"], weight=float(e["weight"]), name=e.get("name"))
            for e in entries
        }
        sync(name, wanted, "fleet view")
        pres = resilience.known().get(name) if resilience is not None else None
        for e in entries:
            b = pool.get(e["address"])
            if b is not None:
                _apply_backend(runtime, pool, b, e, offset, local_now, pres)


def _apply_backend(runtime: Any, pool: Pool, b: Backend, e: dict, offset: float,
                   now: float, pres: Any) -> None:
    why = f"master: {e.get('reason') or 'fleet view'}"
    if b.enabled != bool(e["enabled"]):
        pool.set_enabled(b, bool(e["enabled"]), why)
    if b.draining != bool(e["draining"]):
        if e["draining"]:
            from lbtwist.health.drain import drain_backend

            # the local timer: in-flight work here gets drain_timeout too
            drain_backend(pool, b, runtime.reactor, why)
        else:
            pool.set_draining(b, False, why)
    health = Health(e["health"])
    if b.health is not health:
        pool.set_health(b, health, why)
    until = e.get("ejected_until")
    if until is None:
        if b.ejected_until is not None:
            pool.unject(b, why)
    else:
        local = float(until) + offset
        if b.ejected_until is None or abs(b.ejected_until - local) > SAME_TIME:
            pool.eject(b, local, why)
    joined = e.get("joined_at")
    local_joined = float("-inf") if joined is None else float(joined) + offset
    if not (b.joined_at == local_joined or abs(b.joined_at - local_joined) <= SAME_TIME):
        b.joined_at = local_joined  # slow start ramps from when the master let it in
    opened = e.get("breaker_opened_at")
    if opened is not None and pres is not None:
        pres.breakers.trip(b, float(opened) + offset, now, "opened by the fleet (another worker's traffic)")


# -- workers -> master -------------------------------------------------------------------


def _keep(pcfg: Any) -> int:
    """Samples per backend a batch keeps: enough for every passive rule."""
    passive = getattr(getattr(pcfg, "health", None), "passive", None)
    if passive is None:
        return MIN_KEEP
    need = max(passive.consecutive_5xx, passive.consecutive_gateway_failures,
               passive.failure_rate.request_volume, passive.latency.min_requests)
    return max(MIN_KEEP, min(MAX_KEEP, 2 * need))


@attrs.define
class _Acc:
    keep: int
    #: (time, latency, outcome), oldest first, at most ``keep``
    samples: deque = attrs.Factory(deque)
    #: samples pushed out of the ring since the last take (only counted)
    dropped: int = 0


class OutcomeBatcher:
    """In a worker: collects what its pools' outcome observers see (the
    outlier detector's input) and the breaker opens of its own traffic, for
    the master. Per backend it keeps the newest samples only (see L{_keep}:
    every rule of the detector looks at recent samples; older ones between
    two takes are counted as ``dropped``), so memory and batch size are
    bounded whatever the request rate. Call L{take} periodically (100 ms)."""

    def __init__(self, runtime: Any, ident: str | None = None) -> None:
        self.runtime = runtime
        #: names this worker's latency estimates in the master (one per process)
        self.ident = ident or uuid.uuid4().hex[:12]
        self._accs: dict[tuple[str, str], _Acc] = {}
        #: id(pool) -> (pool, observer)
        self._attached: dict[int, tuple[Pool, Any]] = {}
        #: (pool, address) -> breaker open time already reported
        self._reported: dict[tuple[str, str], float] = {}
        self.attach()

    def attach(self) -> None:
        """Follow the runtime's pools (called by L{take}; call it after a reload too)."""
        current = {id(p): p for p in self.runtime.pools.values()}
        for key in [k for k in self._attached if k not in current]:
            pool, obs = self._attached.pop(key)
            pool.unobserve_outcomes(obs)
        for key, pool in current.items():
            if key not in self._attached:
                obs = self._observer(pool.name)
                pool.observe_outcomes(obs)
                self._attached[key] = (pool, obs)

    def detach(self) -> None:
        for pool, obs in self._attached.values():
            pool.unobserve_outcomes(obs)
        self._attached.clear()

    def _observer(self, pool_name: str) -> Any:
        accs = self._accs

        def observe(backend: Backend, now: float, latency: float, outcome: str) -> None:
            key = (pool_name, backend.address)
            acc = accs.get(key)
            if acc is None:
                acc = accs[key] = _Acc(keep=_keep(self.runtime.pool_configs.get(pool_name)))
            s = acc.samples
            s.append((now, latency, outcome))
            if len(s) > acc.keep:
                s.popleft()
                acc.dropped += 1

        return observe

    def pending(self) -> int:
        """Samples held now."""
        return sum(len(a.samples) for a in self._accs.values())

    def take(self) -> dict | None:
        """The batch since the last take (None when there is nothing), and start a new one."""
        self.attach()
        now = self.runtime.reactor.seconds()
        backends = []
        for (pool, address), acc in self._accs.items():
            if not acc.samples and not acc.dropped:
                continue
            backends.append({
                "pool": pool,
                "address": address,
                "o": "".join(_LETTER[o] for _, _, o in acc.samples),
                "age_ms": [round((now - t) * 1000.0, 1) for t, _, _ in acc.samples],
                "lat_us": [int(round(lat * 1e6)) for _, lat, _ in acc.samples],
                "dropped": acc.dropped,
            })
        self._accs.clear()
        opens = self._breaker_opens(now)
        if not backends and not opens:
            return None
        return {"v": VERSION, "worker": self.ident, "backends": backends, "breaker_opens": opens,
                "estimates": self._estimates(now)}

    def _estimates(self, now: float) -> list[dict]:
        """The balancer's latency estimate of each backend (peak EWMA), which
        the master's latency rule consults for a backend the balancers avoid."""
        out = []
        for name, pool in self.runtime.pools.items():
            for b in pool.backends():
                est = pool.latency_estimate(b, now)
                if est is not None:
                    out.append({"pool": name, "address": b.address, "s": round(est, 6)})
        return out

    def _breaker_opens(self, now: float) -> list[dict]:
        resilience = getattr(self.runtime, "resilience", None)
        if resilience is None:
            return []
        out = []
        known = resilience.known()
        live = set()
        for name, pool in self.runtime.pools.items():
            pres = known.get(name)
            if pres is None:
                continue
            for b in pool.backends():
                got = pres.breakers.last_opened(b)
                if got is None:
                    continue
                key = (name, b.address)
                live.add(key)
                at, tripped = got
                if tripped or self._reported.get(key) == at:
                    continue  # the fleet's own open, or told already
                self._reported[key] = at
                out.append({"pool": name, "address": b.address, "age": round(now - at, 6)})
        for key in [k for k in self._reported if k not in live]:
            del self._reported[key]
        return out


def feed_outcomes(runtime: Any, batch: dict) -> None:
    """In the master: feed a worker's batch (L{OutcomeBatcher.take}) to the
    master's pools, in order, so their outcome observers (the outlier
    detectors, the live view) judge the fleet's traffic; breaker opens seen
    by a worker open the master's breaker (and so every worker's, through
    the next snapshot). Backends the master no longer has are skipped."""
    _check(batch, "feed_outcomes")
    now = runtime.reactor.seconds()
    for e in batch["backends"]:
        pool = runtime.pools.get(e["pool"])
        b = pool.get(e["address"]) if pool is not None else None
        if b is None:
            continue
        letters, ages, lats = e["o"], e["age_ms"], e["lat_us"]
        if not (len(letters) == len(ages) == len(lats)):
            raise ValueError(f"feed_outcomes: pool {e['pool']} backend {e['address']}: "
                             f"{len(letters)} outcomes, {len(ages)} ages, {len(lats)} latencies")
        for letter, age, lat in zip(letters, ages, lats):
            outcome = _OUTCOME.get(letter)
            if outcome is None:
                raise ValueError(f"feed_outcomes: unknown outcome letter {letter!r}")
            pool.report_outcome(b, now - age / 1000.0, lat / 1e6, outcome)
    source = str(batch.get("worker") or "?")
    for e in batch.get("estimates") or ():
        pool = runtime.pools.get(e["pool"])
        b = pool.get(e["address"]) if pool is not None else None
        if b is not None:
            pool.remote_estimate(b, source, float(e["s"]), now)
    opens = batch.get("breaker_opens") or ()
    if opens:
        from lbtwist.resilience.wiring import runtime_resilience

        rr = runtime_resilience(runtime)
        for o in opens:
            pool = runtime.pools.get(o["pool"])
            b = pool.get(o["address"]) if pool is not None else None
            pres = rr.pool(o["pool"]) if b is not None else None
            if pres is not None:
                pres.breakers.trip(b, now - float(o["age"]), now, "opened by a worker's traffic")


# -- transport helpers -------------------------------------------------------------------


def encode_chunks(obj: Any, limit: int = 60_000) -> list[str]:
    """JSON of ``obj`` cut into strings of at most ``limit`` characters (AMP
    values are limited to 64 KiB); L{decode_chunks} joins them."""
    if limit < 1:
        raise ValueError("limit must be >= 1")
    text = json.dumps(obj, separators=(",", ":"))
    return [text[i:i + limit] for i in range(0, len(text), limit)] or [""]


def decode_chunks(chunks: Iterable[str]) -> Any:
    return json.loads("".join(chunks))


# -- per-worker limits -------------------------------------------------------------------


def split_count(limit: int, n: int) -> int:
    """A count limit one of ``n`` workers enforces: ceil(limit / n), so the
    fleet admits at most ``limit + n - 1`` (0 stays 0)."""
    return -(-int(limit) // n)


def split_rate_limit(rl: Any, n: int) -> Any:
    """A route ``rate_limit`` as one of ``n`` workers keeps it locally:
    rate / n, burst / n (at least 1)."""
    burst = rl.rate if rl.burst is None else rl.burst
    return attrs.evolve(rl, rate=rl.rate / n, burst=max(1.0, burst / n))


def worker_config(config: Config, n: int) -> Config:
    """The config each of ``n`` workers runs with: every limit that counts
    absolute units split so that the workers together stay at the
    configured limit (docs/operations.md, "Workers: shared limits"):

    - route ``rate_limit``: rate / n, burst / n (at least 1: the remainder,
      at most n - 1 requests over ``burst`` fleet-wide after a quiet spell);
      a ``scope: fleet`` one stays whole (its bucket is the one in Redis;
      its fallback while Redis is unusable is split, by the worker's
      L{lbtwist.fleet.service.FleetService});
    - retry budgets (route ``retry`` and pool ``retry_budget``): the
      percentage is a share of the requests each worker sees and stays; the
      floor ``min_retries_per_second`` is divided by n;
    - pool ``limits`` (max_connections, max_pending, max_requests,
      max_retries) and listener ``max_connections``: ceil(limit / n) each,
      so at most n - 1 over the limit fleet-wide.

    Listeners with TLS session tickets get the master's prepared ticket
    keys count (L{lbtwist.workers.forked.fleet_tls_config}).

    ``max_connections_per_client`` stays whole (a client's connections do
    not spread evenly over the workers). ``n`` 1 returns ``config`` itself."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"worker_config: the number of workers must be an integer >= 1, not {n!r}")
    if n == 1:
        return config

    def route(r: Any) -> Any:
        retry = attrs.evolve(r.retry, min_retries_per_second=r.retry.min_retries_per_second / n)
        rl = r.rate_limit
        if rl is not None and rl.scope != "fleet":  # a fleet-scope bucket is one in Redis: whole
            rl = split_rate_limit(rl, n)
        return attrs.evolve(r, retry=retry, rate_limit=rl)

    from lbtwist.workers.forked import fleet_tls_config

    # a listener with session tickets runs on the master's prepared keys (forked workers):
    # the same prepared count here, so a reload's settings match the ones it was built with
    listeners = [
        attrs.evolve(fleet_tls_config(l), routes=[route(r) for r in l.routes],
                     max_connections=split_count(l.max_connections, n))
        for l in config.listeners
    ]
    pools = []
    for p in config.pools:
        lim = p.limits
        limits = attrs.evolve(
            lim,
            max_connections=split_count(lim.max_connections, n),
            max_pending=split_count(lim.max_pending, n),
            max_requests=split_count(lim.max_requests, n),
            max_retries=split_count(lim.max_retries, n),
        )
        rb = p.retry_budget
        if rb is not None:
            rb = attrs.evolve(rb, min_retries_per_second=rb.min_retries_per_second / n)
        pools.append(attrs.evolve(p, limits=limits, retry_budget=rb))
    return attrs.evolve(config, listeners=listeners, pools=pools)
