"""``mode: http`` listeners: the service the lead's tree starts, and the
factory every client connection of the listener shares (config resolved once:
router, forwarding policy, limits, sticky cookie, connection pools)."""
from __future__ import annotations

import random
import time
from typing import Any, Callable

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from lbtwist.config.model import ConnectionPoolConfig, ListenerConfig
from lbtwist.l7.affinity import StickyCookie
from lbtwist.l7.client import HttpProxyProtocol
from lbtwist.l7.connpool import ConnectionPools
from lbtwist.l7.errors import error_page, page_body_size
from lbtwist.l7.h2 import settings as h2_settings
from lbtwist.l7.h2.connection import H2ServerProtocol
from lbtwist.l7.h2.negotiate import ProtocolChooser
from lbtwist.l7.headers import ForwardingPolicy, RequestIds, hsts_value
from lbtwist.l7.plan import HashKey, RoutePlan
from lbtwist.l7.timers import ExchangeTimers, TimerHeap
from lbtwist.listener import ListenerService, PerClientLimit, RefusalLog
from lbtwist.pool import join_address
from lbtwist.resilience.wiring import runtime_resilience
from lbtwist.routing import DEFAULT_ROUTE, Router
from lbtwist.traffic import TrafficRecord

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

    hash_key = HashKey.parse(cfg.hash_key)  # inherited by routes without their own

    def kept(rcfg: Any, name: str) -> Any:
        if resilience is None:
            return None
        return resilience.route(cfg.name, name, rcfg, http.request_timeout)

    default = (RoutePlan.build(None, DEFAULT_ROUTE, cfg.pool, http, hash_key, kept(None, DEFAULT_ROUTE))
               if cfg.pool else None)
    return Router.build(
        cfg.routes,
        registry.rules,
        make_target=lambda rcfg, name: RoutePlan.build(rcfg, name, rcfg.pool, http, hash_key, kept(rcfg, name)),
        default=default,
        where=f"listener {cfg.name}: routes",
    )


#: The whole answer to a connection refused at a cap, built once.
OVERLOADED = error_page(503, "too many connections to this listener")
PER_CLIENT = error_page(429, "too many connections from this client")


class _Refusal(Protocol):
    """A refused connection: the canned answer, then close. No parser, no
    timer, no producer: cheaper than any accepted connection."""

    __slots__ = ("answer",)

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        t = self.transport
        t.write(self.answer)
        t.loseConnection()


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
        #: Open connections per client address (cap 0: off).
        self.clients = PerClientLimit(cfg.max_connections_per_client)
        #: Client deadlines (header, keep-alive, body, write) of this listener's connections.
        self.timers = TimerHeap(self.clock)
        self.refusals = RefusalLog(self.clock)
        h2_settings.check(cfg.http.h2)
        #: HTTP/2 from clients: ALPN h2 on TLS, h2c prior knowledge on plain ``http2: true``.
        self.h2c = bool(cfg.http2) and cfg.tls is None
        if cfg.tls is not None:
            from lbtwist.tls.context import listener_alpn  # pyOpenSSL: only with TLS

            self.h2 = self.h2c or "h2" in listener_alpn(cfg)
        else:
            self.h2 = self.h2c
        #: Apply fastio's eager write to client connections (benchmarks turn it off).
        self.eager = True
        self.active = 0
        #: Connections accepted / refused (over max_connections) since start; kept across reloads.
        self.total = 0
        self.refused = 0
        self.service: ListenerService | None = None

    def register_routes(self) -> None:
        """Publish this listener's routes (retry counters for the admin API,
        and the state a later reload keeps for unchanged routes)."""
        self.resilience.set_routes(self.name, {
            r.name: r.target.resilience
            for r in (*self.router.routes, *((self.router.default,) if self.router.default else ()))
            if getattr(r.target, "resilience", None) is not None
        })

    def buildProtocol(self, addr: Any) -> Protocol:
        """A proxy connection, or the canned refusal at a connection cap
        (decided here, before any per-connection state is built)."""
        host = getattr(addr, "host", "?")
        page = self.over_cap(host)
        if page is not None:
            self.refuse(host, join_address(host, getattr(addr, "port", None)), page)
            return _Refusal(page)
        if self.h2:
            return ProtocolChooser(self, self.h2c, HttpProxyProtocol, H2ServerProtocol)
        p = HttpProxyProtocol(self)
        p.factory = self
        return p

    def exchange_timers(self, exchange: Any) -> ExchangeTimers:
        """The reactor timers of one exchange (queue wait, retry backoff)."""
        return ExchangeTimers(self.clock, exchange)

    def await_rate_decision(self, exchange: Any, pending: Any) -> None:
        """The reactor side of a late rate decision (the machine's RATE_WAIT):
        ``pending`` (a Deferred from the fleet limiter, which fires within its
        timeout) comes back as ``exchange.rate_decided(decision)``; a failure
        is logged and comes back as None (the machine answers 503)."""

        def failed(f: Any) -> None:
            log.failure("route rate limit decision failed", f)
            exchange.rate_decided(None)

        pending.addCallbacks(exchange.rate_decided, failed)

    def note_rejection(self, status: int, reason: str, client: str) -> None:
        """A request refused before it reached a pool (bad head, header timeout)."""
        self.refusals.note(f"listener {self.name}: {status} {reason}", client)

    def over_cap(self, host: str) -> bytes | None:
        """The canned refusal when a connection from ``host`` would go over
        max_connections or max_connections_per_client; None when admitted."""
        if self.active >= self.max_connections:
            return OVERLOADED
        clients = self.clients
        if clients.cap and clients.open_from(host) >= clients.cap:
            return PER_CLIENT
        return None

    def refuse(self, host: str, client: str, page: bytes) -> None:
        """Count, log (once per interval) and access-log a connection refused
        at a cap; ``client`` is host:port as the access log shows it."""
        why = (f"max_connections={self.max_connections}" if page is OVERLOADED
               else f"max_connections_per_client={self.clients.cap}")
        self.refused += 1
        self.refusals.note(f"listener {self.name}: refused at {why}", host)
        hub = self.runtime.traffic
        if hub.subscribers:  # logged like a refused L4 connection
            hub.publish(TrafficRecord(kind="http", listener=self.name, start=time.time(), duration=0.0,
                                      client=client, status=int(page[9:12]), bytes_out=page_body_size(page),
                                      outcome="rejected", error=f"at {why}"))

    def track(self, proto: HttpProxyProtocol) -> bytes | None:
        """Count a new connection, or refuse it (connections made without
        L{buildProtocol}, e.g. behind a TLS wrapper that built it earlier):
        None when admitted, else the answer to send before closing."""
        page = self.over_cap(proto.client_ip_str)
        if page is not None or not self.clients.admit(proto.client_ip_str):
            page = page or PER_CLIENT
            self.refuse(proto.client_ip_str, proto.client_addr, page)
            return page
        self.active += 1
        self.total += 1
        proto.tracked = True
        if self.service is not None:
            self.service.track(proto)
        return None

    def untrack(self, proto: HttpProxyProtocol) -> None:
        if proto.tracked:
            proto.tracked = False
            self.active -= 1
            self.clients.release(proto.client_ip_str)
            if self.service is not None:
                self.service.untrack(proto)


class HttpListenerService(ListenerService):
    """A ListenerService whose drain waits as long as its pools' drain_timeout."""

    def __init__(self, cfg: ListenerConfig, runtime: Any) -> None:
        self.proxy = HttpProxyFactory(cfg, runtime, register=False)
        super().__init__(cfg.name, cfg.bind, self.proxy, runtime.reactor, backlog=cfg.backlog)
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
        keep = {"active", "total", "refused", "service", "ids", "connection_pools", "eager",
                "clients", "timers", "refusals"}

        def commit() -> None:
            for name, value in vars(fresh).items():
                if name not in keep:
                    setattr(self.proxy, name, value)
            self.proxy.clients.cap = cfg.max_connections_per_client
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
