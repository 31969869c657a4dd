"""The top of the service tree: builds pools and listeners from a validated
config and stops them in order (stop accepting and drain first, then the rest),
which Twisted's MultiService does not do by itself."""
from __future__ import annotations

import random
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.logger import Logger

from lbtwist.config.model import Config, ListenerConfig, PoolConfig
from lbtwist.pool import Backend, Health, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime

log = Logger(namespace="lbtwist.service")


def build_pool(cfg: PoolConfig, runtime: Runtime, rng: random.Random | None = None) -> Pool:
    """One Pool from its config; the algorithm comes from the registry."""
    rng = rng or random.Random()
    balancer = runtime.registry.make_balancer(
        cfg.algorithm, cfg.algorithm_options, clock=runtime.reactor, rng=rng
    )
    health_cfg = getattr(cfg, "health", None)
    panic = getattr(health_cfg, "panic_threshold", None)
    if panic is None:
        panic = getattr(cfg, "panic_threshold", 50.0)
    backends = [
        Backend(address=b.address, weight=b.weight, name=b.name) for b in cfg.backends
    ]
    pool = Pool(
        cfg.name,
        backends,
        balancer,
        runtime.reactor,
        slow_start=cfg.slow_start,
        panic_threshold=panic,
        rng=rng,
    )
    initial = _initial_health(cfg)
    for b in backends:
        b.health = initial
    return pool


def _initial_health(cfg: PoolConfig) -> Health:
    """Backends start 'unknown' (out until a probe passes) only when an active
    check exists to let them in; otherwise they are assumed healthy."""
    health_cfg = getattr(cfg, "health", None)
    active = getattr(health_cfg, "active", None)
    if active is None:
        return Health.HEALTHY
    if getattr(health_cfg, "assume_healthy", False) or getattr(active, "assume_healthy", False):
        return Health.HEALTHY
    return Health.UNKNOWN


def build_listener(cfg: ListenerConfig, runtime: Runtime) -> IService:
    if cfg.mode == "tcp":
        from lbtwist.l4.tcp import tcp_listener

        return tcp_listener(cfg, runtime)
    if cfg.mode == "udp":
        from lbtwist.l4.udp import udp_listener

        return udp_listener(cfg, runtime)
    if cfg.mode == "http":
        from lbtwist.l7.listener import http_listener

        return http_listener(cfg, runtime)
    raise ValueError(f"listener {cfg.name}: unknown mode {cfg.mode!r}")


class LbtwistService(MultiService):
    """Owns a Runtime. Children: demo backends, health, admin, listeners."""

    def __init__(self, config: Config, reactor: Any, registry: Registry) -> None:
        super().__init__()
        self.setName("lbtwist")
        self.reactor = reactor
        self.runtime = Runtime(reactor=reactor, registry=registry, config=config)
        self.listeners: MultiService = MultiService()
        self.listeners.setName("listeners")
        self._build(config)

    def _build(self, config: Config) -> None:
        rt = self.runtime
        for pcfg in config.pools:
            rt.pools[pcfg.name] = build_pool(pcfg, rt)
            rt.pool_configs[pcfg.name] = pcfg
        if config.demo is not None:
            from lbtwist.demo import demo_service

            demo_service(config.demo, self.reactor).setServiceParent(self)
        health = self._health_service()
        if health is not None:
            health.setServiceParent(self)
        admin = self._admin_service(config)
        if admin is not None:
            admin.setServiceParent(self)
        for lcfg in config.listeners:
            build_listener(lcfg, rt).setServiceParent(self.listeners)
        self.listeners.setServiceParent(self)

    def _health_service(self) -> IService | None:
        try:
            from lbtwist.health.service import HealthService
        except ImportError:
            return None
        return HealthService(self.runtime)

    def _admin_service(self, config: Config) -> IService | None:
        if config.admin is None:
            return None
        try:
            from lbtwist.admin import admin_service
        except ImportError:
            return None
        return admin_service(config.admin, self.runtime)

    def stopService(self) -> defer.Deferred:
        """Listeners first (stop accepting, drain in-flight work), then the
        rest concurrently: health checks, admin, demo backends."""
        self.running = 0
        log.info("lbtwist: stopping; draining listeners")
        d = defer.maybeDeferred(self.listeners.stopService)

        def rest(_: object) -> defer.Deferred:
            others = [s for s in reversed(list(self)) if s is not self.listeners]
            return defer.DeferredList(
                [defer.maybeDeferred(s.stopService) for s in others], consumeErrors=True
            )

        d.addBoth(rest)
        d.addCallback(lambda _: log.info("lbtwist: stopped"))
        return d
