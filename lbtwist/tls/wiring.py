"""How the service tree uses lbtwist.tls: one L{ServerTLS} per terminating
listener, an SNI router per passthrough listener, one L{BackendTLS} per pool
with ``tls:``, and the admin state providers that show their counters.

The state lives on ``runtime.tls`` (a L{RuntimeTLS}) so connection pools, the
L4 relay and health probes find a pool's TLS by the pool's name, and a reload
swaps it in one place. Everything that reads files is built before anything
is switched, so a bad certificate refuses the reload and the old one stays.
"""
from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from lbtwist.config.model import Config, ListenerConfig, PoolConfig
from lbtwist.tls.client import BackendTLS
from lbtwist.tls.context import ServerTLS, TLSConfigError
from lbtwist.tls.passthrough import PassthroughStats, passthrough_factory, router_for_listener
from lbtwist.tls.server import wrap_server_factory
from lbtwist.tls.sni import SNIRouter

__all__ = ["RuntimeTLS", "SwitchableRouter", "add_listener_tls", "runtime_tls"]

log = Logger(namespace="lbtwist.tls.wiring")


@attrs.define
class SwitchableRouter:
    """A passthrough listener's router, replaced in place by a reload (the
    listening factory keeps the same object)."""

    current: SNIRouter

    def route(self, server_name: str | None) -> str | None:
        return self.current.route(server_name)


class RuntimeTLS:
    """TLS state of a running balancer, by listener and pool name."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.servers: dict[str, ServerTLS] = {}
        self.passthrough: dict[str, PassthroughStats] = {}
        self.backends: dict[str, BackendTLS] = {}
        self._backend_cfgs: dict[str, Any] = {}
        #: listener name -> ServerTLS built before this process was forked
        #: (lbtwist.workers.forked): used once, by the first listener of that name
        self.inherited: dict[str, ServerTLS] = {}
        runtime.listener_state.setdefault("tls", self._listener_state)
        runtime.backend_state.setdefault("tls", self._backend_state)

    # -- pools ------------------------------------------------------------------

    def backend_tls(self, pool_name: str) -> BackendTLS | None:
        """The pool's client TLS, or None for plain TCP backends."""
        return self.backends.get(pool_name)

    def prepare_pools(self, pools: list[PoolConfig]) -> dict[str, BackendTLS]:
        """Build the BackendTLS of every pool with ``tls:`` (unchanged ones
        are kept, with their sessions). Raises TLSConfigError naming the pool
        and file; nothing is switched yet."""
        out: dict[str, BackendTLS] = {}
        for p in pools:
            if p.tls is None:
                continue
            old = self.backends.get(p.name)
            if old is not None and self._backend_cfgs.get(p.name) == p.tls:
                out[p.name] = old
                continue
            try:
                out[p.name] = BackendTLS(p.tls)
            except TLSConfigError as e:
                raise TLSConfigError(f"pool {p.name}: tls: {e}") from None
        return out

    def set_pools(self, prepared: dict[str, BackendTLS]) -> None:
        self.backends = dict(prepared)
        self._backend_cfgs = {name: b.config for name, b in prepared.items()}

    # -- listeners ----------------------------------------------------------------

    def check_listeners(self, config: Config) -> None:
        """Build (and throw away) the ServerTLS of every listener of ``config``:
        raises TLSConfigError naming the listener and the file."""
        clock = self.runtime.reactor
        for lcfg in config.listeners:
            if lcfg.tls is None:
                continue
            try:
                ServerTLS.for_listener(lcfg, clock)
            except TLSConfigError as e:
                raise TLSConfigError(f"listener {lcfg.name}: tls: {e}") from None

    def reconfigure_listener(self, svc: Any, lcfg: ListenerConfig) -> None:
        """A listener kept by a reload: re-read its certificates (sessions keep
        resuming) and take its new passthrough routes."""
        tls = getattr(svc, "tls", None)
        if tls is not None and lcfg.tls is not None:
            tls.reload(lcfg.tls)
        router = getattr(svc, "sni_router", None)
        if router is not None and lcfg.tls_passthrough is not None:
            router.current = router_for_listener(lcfg)

    def listener_snapshot(self) -> tuple[dict, dict]:
        """The listeners' TLS state as it is (a reload that builds new
        listeners and is then refused puts it back with L{restore_listeners})."""
        return dict(self.servers), dict(self.passthrough)

    def restore_listeners(self, snapshot: tuple[dict, dict]) -> None:
        self.servers, self.passthrough = dict(snapshot[0]), dict(snapshot[1])

    def forget_listener(self, name: str, svc: Any) -> None:
        if self.servers.get(name) is getattr(svc, "tls", None):
            self.servers.pop(name, None)

    # -- state providers (docs/operations.md, "State providers") --------------------

    def _listener_state(self, name: str) -> dict[str, Any] | None:
        tls = self.servers.get(name)
        if tls is not None:
            return tls.stats.as_dict()
        st = self.passthrough.get(name)
        if st is not None:
            return {"passthrough_routed": dict(st.routed), "passthrough_unrouted": st.unrouted,
                    "not_tls": st.not_tls, "client_hello_timeouts": st.timeouts}
        return None

    def _backend_state(self, pool: Any, backend: Any) -> dict[str, Any] | None:
        btls = self.backends.get(pool.name)
        if btls is None:
            return None
        c = btls.creator_for(backend.host, key=backend.address)
        s = c.stats
        return {"handshakes_total": s.handshakes, "resumed_total": s.resumed,
                "verify_failures_total": s.verify_failures, "last_verify_error": s.last_verify_error}


def runtime_tls(runtime: Any) -> RuntimeTLS:
    """The runtime's TLS state (created on first use)."""
    rt = getattr(runtime, "tls", None)
    if rt is None:
        rt = RuntimeTLS(runtime)
        runtime.tls = rt
    return rt


def add_listener_tls(svc: Any, cfg: ListenerConfig, runtime: Any) -> Any:
    """Terminate TLS in front of (or route TLS by SNI into) a freshly built
    listener service, before it starts listening. The ServerTLS is built here,
    before any fork, and started/stopped with the service."""
    state = runtime_tls(runtime)
    reactor = runtime.reactor
    if cfg.tls is not None:
        tls = state.inherited.pop(cfg.name, None)
        if tls is None or tls.config != attrs.evolve(cfg.tls, session_tickets=attrs.evolve(
                cfg.tls.session_tickets, prepare=tls.config.session_tickets.prepare)):
            tls = ServerTLS.for_listener(cfg, reactor)
        else:
            tls.clock = reactor
        svc.tls = tls
        svc.factory = wrap_server_factory(svc.factory, tls, reactor)
        state.servers[cfg.name] = tls
    elif cfg.tls_passthrough is not None:
        relay = getattr(svc, "relay", None)
        if relay is None:
            raise ValueError(f"listener {cfg.name}: tls_passthrough needs mode tcp")
        router = SwitchableRouter(router_for_listener(cfg))
        stats = PassthroughStats()
        svc.sni_router = router
        svc.factory = passthrough_factory(
            router,  # type: ignore[arg-type]
            lambda pool, addr, hello: relay.build_for_pool(pool, addr),
            reactor,
            timeout=cfg.tls_passthrough.client_hello_timeout,
            stats=stats,
            wrapped=relay,
        )
        state.passthrough[cfg.name] = stats
    return svc
