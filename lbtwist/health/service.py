# -*- test-case-name: tests.test_health_service -*-
"""The Twisted service that runs health for every pool of a Runtime: active
probe loops, passive outlier detection and its timer, draining.

It follows pool membership by itself: a backend added with
C{pool.add_backend} (hot reload, admin API) gets a probe loop, a removed one
loses it, so reload code only changes pools.
"""
from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from lbtwist.config.model import HealthConfig
from lbtwist.health.builtin import make_probe
from lbtwist.health.drain import drain_backend
from lbtwist.health.outlier import OutlierDetector
from lbtwist.health.scheduler import ProbeScheduler
from lbtwist.interfaces import IHealthProbe
from lbtwist.pool import Backend, Pool

log = Logger(namespace="lbtwist.health")


class PoolHealth:
    """Active and passive health for one pool."""

    def __init__(
        self,
        pool: Pool,
        cfg: HealthConfig,
        *,
        reactor: Any,
        probe: IHealthProbe | None = None,
        rng: random.Random | None = None,
        ejections: Any = None,
        decide: bool = True,
    ) -> None:
        self.pool = pool
        #: lbtwist.fleet.ejections.FleetEjections: shares this pool's passive
        #: ejections with the fleet while running (None: they stay local).
        self.ejections = ejections
        self.cfg = cfg
        self.clock = reactor
        #: False in a worker process (runtime.role "worker"): no probes, no
        #: passive ejection here; the master decides both for the fleet
        #: (lbtwist.workers.fleetview) and the worker applies its snapshots.
        self.decide = decide
        self.scheduler: ProbeScheduler | None = None
        if cfg.active is not None and decide:
            if probe is None:
                raise ValueError(f"pool {pool.name}: active health configured but no probe given")
            self.scheduler = ProbeScheduler(pool, probe, cfg.active, reactor, rng)
        self.detector = OutlierDetector(pool, cfg.passive) if cfg.passive.enabled and decide else None
        self._tick_call: IDelayedCall | None = None
        self.running = False

    def start(self) -> None:
        self.running = True
        self.pool.subscribe(self._on_change)
        if self.detector is not None:
            self.pool.observe_outcomes(self.detector.on_outcome)
            if self.ejections is not None:
                self.ejections.attach(self.detector)
            self._tick()
        if self.scheduler is not None:
            self.scheduler.start()

    def stop(self) -> None:
        self.running = False
        self.pool.unsubscribe(self._on_change)
        if self.detector is not None:
            self.pool.unobserve_outcomes(self.detector.on_outcome)
            if self.ejections is not None:
                self.ejections.detach(self.detector)
        if self._tick_call is not None and self._tick_call.active():
            self._tick_call.cancel()
        self._tick_call = None
        if self.scheduler is not None:
            self.scheduler.stop()

    def _on_change(self, pool: Pool, backend: Backend | None, state: str, reason: str) -> None:
        if backend is None:
            return
        if state == "added":
            if self.scheduler is not None:
                self.scheduler.add(backend)
        elif state == "removed":
            if self.scheduler is not None:
                self.scheduler.remove(backend)
            if self.detector is not None:
                self.detector.forget(backend)

    def _tick(self) -> None:
        self._tick_call = None
        if not self.running or self.detector is None:
            return
        now = self.clock.seconds()
        try:
            nxt = self.detector.tick(now)
        except Exception:
            log.failure("pool {pool}: outlier detection tick failed", pool=self.pool.name)
            nxt = now + self.cfg.passive.interval
        self._tick_call = self.clock.callLater(max(0.0, nxt - now), self._tick)

    def probe_state(self, backend: Backend, now: float) -> dict[str, Any] | None:
        """The ``probe`` provider section: the last active probe of ``backend``
        (None without active checks or before its first result)."""
        got = self.scheduler.last_result(backend) if self.scheduler is not None else None
        if got is None:
            return None
        result, at, n = got
        return {
            "ok": result.ok,
            "latency": None if result.latency is None else round(result.latency, 6),
            "reason": result.reason,
            "age_s": round(max(0.0, now - at), 3),
            "probes_total": n,
        }

    def outlier_state(self, backend: Backend, now: float) -> dict[str, Any] | None:
        """The ``outlier`` provider section: passive detection's counters for
        ``backend`` (None when passive detection is off). ``ejection_multiplier``
        grows per ejection and decays with good behaviour (the ejection count
        itself is ``lbtwist_backend_ejections_total``); ``recent_tries``,
        ``recent_failure_percent`` (None without tries) and ``failure_run``
        are the failure-rate rule's inputs."""
        if self.detector is None:
            return None
        snap = self.detector.snapshot(backend, now)
        return {
            "consecutive_5xx": snap["consecutive_5xx"],
            "consecutive_gateway_failures": snap["consecutive_gateway_failures"],
            "recent_latency": snap["recent_latency"],
            "recent_requests": snap["recent_requests"],
            "recent_tries": snap["recent_tries"],
            "recent_failure_percent": snap["recent_failure_percent"],
            "failure_run": snap["failure_run"],
            "ejection_multiplier": snap["ejections"],
        }

    def status(self) -> dict[str, Any]:
        """Per-backend health as plain data, for the admin API and metrics."""
        now = self.clock.seconds()
        out = []
        for b in self.pool.backends():
            entry: dict[str, Any] = {
                "address": b.address,
                "state": b.state(now),
                "health": b.health.value,
                "reason": b.reason,
                "changed_at": b.changed_at,
                "ejected_until": b.ejected_until if b.ejected_until is not None and b.ejected_until > now else None,
                "draining": b.draining,
                "effective_weight": b.effective_weight(now),
                "active": b.active,
            }
            loop = self.scheduler.loops.get(b) if self.scheduler is not None else None
            if loop is not None and loop.last is not None:
                entry["last_probe"] = {"ok": loop.last.ok, "reason": loop.last.reason,
                                       "latency": loop.last.latency, "at": loop.last_at}
            if self.detector is not None:
                entry["passive"] = self.detector.snapshot(b, now)
            out.append(entry)
        return {"pool": self.pool.name, "panic": self.pool.panic, "backends": out}


def l4_pools(config: Any) -> set[str]:
    """Pools behind a ``tcp``/``udp`` listener."""
    return {
        lst.pool for lst in getattr(config, "listeners", ())
        if lst.mode in ("tcp", "udp") and lst.pool is not None
    }


def without_latency_rule(cfg: HealthConfig, pool_name: str) -> HealthConfig:
    """L4 listeners report a connection's (or flow's) whole lifetime as its
    latency: a backend serving long-lived connections is not slow, so the
    latency rule is off for pools they use; the failure rules stay on."""
    if not cfg.passive.latency.enabled:
        return cfg
    log.info("pool {pool}: latency outlier rule off (an L4 listener uses the pool; "
             "connection lifetimes are not latencies)", pool=pool_name)
    latency = attrs.evolve(cfg.passive.latency, enabled=False)
    return attrs.evolve(cfg, passive=attrs.evolve(cfg.passive, latency=latency))


def pool_health_config(config: Any, pool_name: str, cfg: HealthConfig) -> HealthConfig:
    """The health settings a pool runs with under ``config``: its own, with
    the latency rule off when a tcp/udp listener uses it (start and reload
    both come here)."""
    if pool_name in l4_pools(config):
        return without_latency_rule(cfg, pool_name)
    return cfg


class HealthService(Service):
    """Health checking for all pools of ``runtime``. Probes come from the
    registry (``runtime.registry``) by the kind named in each pool's config."""

    name = "health"

    def __init__(self, runtime: Any, *, rng: random.Random | None = None) -> None:
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.rng = rng or random.Random()
        self.pools: dict[str, PoolHealth] = {}

    def startService(self) -> None:
        super().startService()
        # the admin API and /metrics show probes and passive detection per backend
        table = getattr(self.runtime, "backend_state", None)
        if table is not None:
            table.setdefault("probe", self.probe_state)
            table.setdefault("outlier", self.outlier_state)
        for name, pool in self.runtime.pools.items():
            pcfg = self.runtime.pool_configs.get(name)
            cfg = pcfg.health if pcfg is not None else HealthConfig()
            self.add_pool(pool, pool_health_config(self.runtime.config, name, cfg))

    def stopService(self) -> defer.Deferred:
        super().stopService()
        table = getattr(self.runtime, "backend_state", None)
        if table is not None:
            for name, fn in (("probe", self.probe_state), ("outlier", self.outlier_state)):
                if table.get(name) == fn:
                    del table[name]
        for ph in self.pools.values():
            ph.stop()
        self.pools.clear()
        return defer.succeed(None)

    def add_pool(self, pool: Pool, cfg: HealthConfig, probe: IHealthProbe | None = None) -> PoolHealth:
        """Start health for ``pool`` (a new pool on reload). ``probe`` overrides
        the one the registry would build (tests inject fakes here)."""
        return self.install(self.prepare_pool(pool, cfg, probe))

    def prepare_pool(self, pool: Pool, cfg: HealthConfig, probe: IHealthProbe | None = None) -> PoolHealth:
        """Build health for ``pool`` (probe plugins included, which may raise)
        without starting it or replacing the running one: L{install} does."""
        decide = getattr(self.runtime, "role", "single") != "worker"
        if cfg.active is not None and probe is None and decide:
            probe = make_probe(self.runtime.registry, cfg.active, reactor=self.reactor)
            if getattr(self.runtime, "tls", None) is not None:  # a pool with tls: probes use it too
                from lbtwist.health.probes import use_pool_tls

                probe = use_pool_tls(probe, lambda: self.runtime.tls.backend_tls(pool.name))
        fleet = getattr(self.runtime, "fleet", None)  # shared ejections: where the detector runs only
        return PoolHealth(pool, cfg, reactor=self.reactor, probe=probe, rng=self.rng, decide=decide,
                          ejections=fleet.ejections if fleet is not None and decide else None)

    def install(self, ph: PoolHealth) -> PoolHealth:
        """Replace the pool's running health with ``ph`` (from L{prepare_pool})."""
        self.remove_pool(ph.pool.name)
        self.pools[ph.pool.name] = ph
        if self.running:
            ph.start()
        return ph

    def running_config(self, name: str) -> HealthConfig | None:
        """The health settings pool ``name`` runs with now (None: no health)."""
        ph = self.pools.get(name)
        return ph.cfg if ph is not None else None

    def probe_state(self, pool: Pool, backend: Backend) -> dict[str, Any] | None:
        """State provider ``probe`` (runtime.backend_state)."""
        ph = self.pools.get(pool.name)
        return ph.probe_state(backend, self.reactor.seconds()) if ph is not None and ph.pool is pool else None

    def outlier_state(self, pool: Pool, backend: Backend) -> dict[str, Any] | None:
        """State provider ``outlier`` (runtime.backend_state)."""
        ph = self.pools.get(pool.name)
        return ph.outlier_state(backend, self.reactor.seconds()) if ph is not None and ph.pool is pool else None

    def remove_pool(self, name: str) -> None:
        ph = self.pools.pop(name, None)
        if ph is not None:
            ph.stop()

    def add_backend(self, pool_name: str, backend: Backend, reason: str = "added") -> None:
        """Add a backend at runtime; it is probed (and kept out until its first
        pass, unless ``assume_healthy``) because the pool announces it."""
        self.runtime.pools[pool_name].add_backend(backend, reason)

    def drain(self, pool_name: str, address: str, reason: str = "drain requested") -> defer.Deferred:
        """Drain a backend; fires with "drained", "expired" or "undrained"."""
        pool = self.runtime.pools[pool_name]
        backend = pool.get(address)
        if backend is None:
            return defer.fail(KeyError(f"pool {pool_name}: no backend {address}"))
        return drain_backend(pool, backend, self.reactor, reason)

    def remove_backend(self, pool_name: str, address: str, reason: str = "removed from config") -> defer.Deferred:
        """Drain, then remove (config removal): in-flight work gets up to the
        pool's ``drain_timeout`` to finish."""
        pool = self.runtime.pools[pool_name]
        d = self.drain(pool_name, address, reason)

        def remove(how: str) -> str:
            b = pool.get(address)
            if b is not None:
                pool.remove_backend(b, f"{reason} ({how})")
            return how

        return d.addCallback(remove)

    def status(self) -> dict[str, Any]:
        return {name: ph.status() for name, ph in self.pools.items()}
