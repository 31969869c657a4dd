"""``mode: http`` listeners: the service the lead's tree starts, and the
factory every client connection of the listener shares (config resolved once:
router, forwarding policy, limits, sticky cookie, connection pools)."""
from __future__ import annotations

import random
from typing import Any, Callable

from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from lbtwist.config.model import ConnectionPoolConfig, ListenerConfig
from lbtwist.l7.affinity import StickyCookie
from lbtwist.l7.client import HttpProxyProtocol
from lbtwist.l7.connpool import ConnectionPools
from lbtwist.l7.headers import ForwardingPolicy, RequestIds, hsts_value
from lbtwist.l7.plan import RoutePlan
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


def build_router(cfg: ListenerConfig, registry: Any, resilience: Any = None) -> Router:
    """Routes of ``cfg`` with their plans; ValueError names a bad route.
    ``resilience`` (a RuntimeResilience): routes whose settings did not
    change keep their retry budget and rate-limit buckets from it."""
    http = cfg.http

    def kept(rcfg: Any, name: str) -> Any:
        if resilience is None:
            return None
        return resilience.route(cfg.name, name, rcfg, http.request_timeout)

    default = RoutePlan.build(None, "default", cfg.pool, http, kept(None, "default")) if cfg.pool else None
    return Router.build(
        cfg.routes,
        registry.rules,
        make_target=lambda rcfg, name: RoutePlan.build(rcfg, name, rcfg.pool, http, kept(rcfg, name)),
        default=default,
        where=f"listener {cfg.name}: routes",
    )


class HttpProxyFactory(ServerFactory):
    """Shared by the client connections of one listener."""

    noisy = False

    def __init__(self, cfg: ListenerConfig, runtime: Any, router: Router | None = None,
                 register: bool = True) -> None:
        """``register``: publish the routes' retry state now (the listener
        service passes False and publishes once it runs, so a reload that is
        refused leaves the running routes published)."""
        self.listener = cfg
        self.name = cfg.name
        self.runtime = runtime
        self.clock = runtime.reactor
        self.http = cfg.http
        #: Pools' breakers/limits/budgets; this listener's routes report retries there.
        self.resilience = runtime_resilience(runtime)
        self.router = router if router is not None else build_router(cfg, runtime.registry, self.resilience)
        #: The route every request takes when there are no match rules (skips routing).
        self.fixed_route = self.router.default if not self.router.routes else None
        hsts = cfg.tls.hsts if cfg.tls is not None else None  # TLS listeners only (RFC 6797 8.1)
        self.forwarding = ForwardingPolicy(
            mode=cfg.http.forwarded,
            request_id_header=cfg.http.request_id_header.lower().encode(),
            hsts=hsts_value(hsts) if hsts is not None else None,
        )
        self.ids = RequestIds()
        self.sticky = StickyCookie(cfg.http.sticky_cookie) if cfg.http.sticky_cookie else None
        self.connection_pools = connection_pools(runtime)
        if register:
            self.register_routes()
        self.rng = random.Random()
        self.default_connection_pool = ConnectionPoolConfig()
        self.max_connections = cfg.max_connections
        #: Apply fastio's eager write to client connections (benchmarks turn it off).
        self.eager = True
        self.active = 0
        self.service: ListenerService | None = None

    def register_routes(self) -> None:
        """Publish this listener's routes (retry counters for the admin API,
        and the state a later reload keeps for unchanged routes)."""
        self.resilience.set_routes(self.name, {
            r.name: r.target.resilience
            for r in (*self.router.routes, *((self.router.default,) if self.router.default else ()))
            if getattr(r.target, "resilience", None) is not None
        })

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
        self.proxy = HttpProxyFactory(cfg, runtime, register=False)
        super().__init__(cfg.name, cfg.bind, self.proxy, runtime.reactor)
        self.proxy.service = self
        self.cfg = cfg
        self.runtime = runtime

    def startService(self) -> None:
        self.proxy.register_routes()
        super().startService()

    def prepare_reconfigure(self, cfg: ListenerConfig) -> Callable[[], None]:
        """Build everything ``cfg`` needs (raises ValueError on a bad route)
        without changing the running listener; the callable returned
        switches to it (a reload calls it once every part is ready)."""
        fresh = HttpProxyFactory(cfg, self.runtime, register=False)
        keep = {"active", "service", "ids", "connection_pools", "eager"}

        def commit() -> None:
            for name, value in vars(fresh).items():
                if name not in keep:
                    setattr(self.proxy, name, value)
            self.cfg = cfg
            self.proxy.register_routes()

        return commit

    def reconfigure(self, cfg: ListenerConfig) -> None:
        """Hot reload with the same bind: new routes and settings for the
        next requests; live connections (and their TLS sessions) stay."""
        self.prepare_reconfigure(cfg)()

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
