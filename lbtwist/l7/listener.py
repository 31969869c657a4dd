"""``mode: http`` listeners: the service the lead's tree starts, and the
factory every client connection of the listener shares (config resolved once:
router, forwarding policy, limits, sticky cookie, connection pools)."""
from __future__ import annotations

import random
from typing import Any

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from lbtwist.config.model import ConnectionPoolConfig, ListenerConfig
from lbtwist.l7.affinity import StickyCookie
from lbtwist.l7.client import HttpProxyProtocol
from lbtwist.l7.connpool import ConnectionPools
from lbtwist.l7.headers import ForwardingPolicy, RequestIds
from lbtwist.l7.plan import HashKey, RoutePlan
from lbtwist.listener import ListenerService
from lbtwist.resilience.wiring import runtime_resilience
from lbtwist.routing import Router

log = Logger(namespace="lbtwist.l7")


def connection_pools(runtime: Any) -> ConnectionPools:
    """The runtime's shared backend connection pools (created on first use)."""
    pools = getattr(runtime, "connection_pools", None)
    if pools is None:
        pools = ConnectionPools(runtime.reactor)
        runtime.connection_pools = pools
        pools.tls_lookup = lambda name: runtime.tls.backend_tls(name) if getattr(runtime, "tls", None) is not None else None
    return pools


def build_router(cfg: ListenerConfig, registry: Any) -> Router:
    """Routes of ``cfg`` with their plans; ValueError names a bad route."""
    http = cfg.http
    hash_key = HashKey.parse(cfg.hash_key)  # inherited by routes without their own
    default = RoutePlan.build(None, "default", cfg.pool, http, hash_key) if cfg.pool else None
    return Router.build(
        cfg.routes,
        registry.rules,
        make_target=lambda rcfg, name: RoutePlan.build(rcfg, name, rcfg.pool, http, hash_key),
        default=default,
        where=f"listener {cfg.name}: routes",
    )


class HttpProxyFactory(ServerFactory):
    """Shared by the client connections of one listener."""

    noisy = False

    def __init__(self, cfg: ListenerConfig, runtime: Any, router: Router | None = None) -> None:
        self.listener = cfg
        self.name = cfg.name
        self.runtime = runtime
        self.clock = runtime.reactor
        self.http = cfg.http
        self.router = router if router is not None else build_router(cfg, runtime.registry)
        #: The route every request takes when there are no match rules (skips routing).
        self.fixed_route = self.router.default if not self.router.routes else None
        self.forwarding = ForwardingPolicy(
            mode=cfg.http.forwarded,
            request_id_header=cfg.http.request_id_header.lower().encode(),
        )
        self.ids = RequestIds()
        self.sticky = StickyCookie(cfg.http.sticky_cookie) if cfg.http.sticky_cookie else None
        self.connection_pools = connection_pools(runtime)
        #: Pools' breakers/limits/budgets; this listener's routes report retries there.
        self.resilience = runtime_resilience(runtime)
        self.resilience.routes[cfg.name] = {
            r.name: r.target.resilience
            for r in (*self.router.routes, *((self.router.default,) if self.router.default else ()))
            if getattr(r.target, "resilience", None) is not None
        }
        self.rng = random.Random()
        self.default_connection_pool = ConnectionPoolConfig()
        self.max_connections = cfg.max_connections
        #: Apply fastio's eager write to client connections (benchmarks turn it off).
        self.eager = True
        self.active = 0
        self.service: ListenerService | None = None

    def buildProtocol(self, addr: Any) -> HttpProxyProtocol:
        p = HttpProxyProtocol(self)
        p.factory = self
        return p

    def track(self, proto: HttpProxyProtocol) -> bool:
        """Count a new connection; False when over max_connections."""
        if self.active >= self.max_connections:
            log.warn("listener {name}: {n} connections, refusing more", name=self.name, n=self.active)
            return False
        self.active += 1
        proto._tracked = True
        if self.service is not None:
            self.service.track(proto)
        return True

    def untrack(self, proto: HttpProxyProtocol) -> None:
        if getattr(proto, "_tracked", False):
            proto._tracked = False
            self.active -= 1
            if self.service is not None:
                self.service.untrack(proto)


class HttpListenerService(ListenerService):
    """A ListenerService whose drain waits as long as its pools' drain_timeout."""

    def __init__(self, cfg: ListenerConfig, runtime: Any) -> None:
        self.proxy = HttpProxyFactory(cfg, runtime)
        super().__init__(cfg.name, cfg.bind, self.proxy, runtime.reactor)
        self.proxy.service = self
        self.cfg = cfg
        self.runtime = runtime

    def reconfigure(self, cfg: ListenerConfig) -> None:
        """Hot reload with the same bind: new routes and settings for the
        next requests; live connections (and their TLS sessions) stay."""
        fresh = HttpProxyFactory(cfg, self.runtime)  # raises on a bad route before anything changes
        keep = {"active", "service", "ids", "connection_pools", "eager"}
        for name, value in vars(fresh).items():
            if name not in keep:
                setattr(self.proxy, name, value)
        self.cfg = cfg

    def drain_timeout(self) -> float:
        names = {self.cfg.pool} | {r.pool for r in self.cfg.routes}
        timeouts = [self.runtime.pool_configs[n].drain_timeout for n in names if n in self.runtime.pool_configs]
        return max(timeouts) if timeouts else 30.0

    def stopService(self, drain_timeout: float | None = None) -> Any:
        if drain_timeout is None:
            drain_timeout = self.drain_timeout()
        return super().stopService(drain_timeout)


def http_listener(cfg: ListenerConfig, runtime: Any) -> HttpListenerService:
    """The service for a ``mode: http`` listener (the lead's service tree calls this)."""
    return HttpListenerService(cfg, runtime)
