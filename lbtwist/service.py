"""The top of the service tree: builds pools and listeners from a validated
config and stops them in order (stop accepting and drain first, then the rest),
which Twisted's MultiService does not do by itself."""
from __future__ import annotations

import random
import signal
from typing import Any, Callable

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
        drain_timeout=cfg.drain_timeout,
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
    """The listener service for ``cfg``, TLS (termination or passthrough)
    wrapped around its factory before it listens."""
    svc = _listener_service(cfg, runtime)
    if cfg.tls is not None or cfg.tls_passthrough is not None:
        from lbtwist.tls.wiring import add_listener_tls

        add_listener_tls(svc, cfg, runtime)
    return svc


def _listener_service(cfg: ListenerConfig, runtime: Runtime) -> IService:
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


def serve_one_listener(reactor: Any, lcfg: ListenerConfig, pcfg: PoolConfig, registry: Registry) -> tuple[IService, defer.Deferred]:
    """One listener over one pool, without a config file or the service tree:
    for the standalone ``python -m lbtwist.l4`` / ``lbtwist.l7`` processes that
    benchmarks and process-level tests run. Prints ``LISTENING <port>`` once
    bound; the Deferred never fires (the process runs until a signal)."""
    rt = Runtime(reactor=reactor, registry=registry, config=Config(listeners=[lcfg], pools=[pcfg]))
    rt.pools[pcfg.name] = build_pool(pcfg, rt)
    rt.pool_configs[pcfg.name] = pcfg
    svc = _listener_service(lcfg, rt)
    svc.privilegedStartService()
    svc.startService()
    print(f"LISTENING {svc.address.port}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    return svc, defer.Deferred()


class ReloadError(Exception):
    """The new config was refused; the message lists its problems."""


def _same_socket(old: ListenerConfig | None, new: ListenerConfig) -> bool:
    """Can the running listener take ``new`` in place (same socket, same mode)?"""
    return (
        old is not None
        and (old.bind, old.mode) == (new.bind, new.mode)
        # TLS on/off or passthrough on/off changes the listening factory
        and (old.tls is None) == (new.tls is None)
        and (old.tls_passthrough is None) == (new.tls_passthrough is None)
    )


class LbtwistService(MultiService):
    """Owns a Runtime. Children: demo backends, health, admin, listeners."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        registry: Registry,
        *,
        config_path: str | None = None,
        install_signals: bool = False,
        loader: Callable[[str, Registry], Any] | None = None,
    ) -> None:
        super().__init__()
        self.setName("lbtwist")
        self.reactor = reactor
        self.config_path = config_path
        self.install_signals = install_signals
        self._loader = loader
        self._old_handlers: dict[int, Any] = {}
        self.runtime = Runtime(reactor=reactor, registry=registry, config=config)
        self.listeners: MultiService = MultiService()
        self.listeners.setName("listeners")
        self.health: Any = None  # HealthService, set in _build
        self._build(config)

    def _build(self, config: Config) -> None:
        rt = self.runtime
        if any(p.tls is not None for p in config.pools):
            from lbtwist.tls.wiring import runtime_tls

            tls_state = runtime_tls(rt)
            tls_state.set_pools(tls_state.prepare_pools(config.pools))
        for pcfg in config.pools:
            rt.pools[pcfg.name] = build_pool(pcfg, rt)
            rt.pools[pcfg.name].subscribe(self._on_pool_state)
            rt.pool_configs[pcfg.name] = pcfg
        if config.demo is not None:
            from lbtwist.demo import demo_service

            demo_service(config.demo, self.reactor).setServiceParent(self)
        if config.access_log is not None:
            from lbtwist.accesslog import access_log_service

            access_log_service(config.access_log, rt).setServiceParent(self)
        self.health = self._health_service()
        self.health.setServiceParent(self)
        admin = self._admin_service(config)
        if admin is not None:
            admin.setServiceParent(self)
        for lcfg in config.listeners:
            build_listener(lcfg, rt).setServiceParent(self.listeners)
        self.listeners.setServiceParent(self)

    def _health_service(self) -> IService:
        from lbtwist.health.service import HealthService

        return HealthService(self.runtime)

    def _admin_service(self, config: Config) -> IService | None:
        if config.admin is None:
            return None
        from lbtwist.admin import admin_service

        return admin_service(config.admin, self.runtime, reload=self.reload)

    def _on_pool_state(self, pool: Pool, backend: Backend | None, state: str, reason: str) -> None:
        """A drain that ran out of time: L4 relays still on that backend are
        cut (L7 connection pools cut their own connections)."""
        if state != "drain-expired" or backend is None:
            return
        for svc in self.listeners:
            cut = getattr(svc, "cut_backend", None)
            if cut is not None:
                n = cut(backend)
                if n:
                    log.warn("listener {name}: cut {n} connections to {backend} ({reason})",
                             name=svc.name, n=n, backend=backend.address, reason=reason)

    # -- signals -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.install_signals:
            self.reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        """SIGHUP reloads; SIGTERM drains and exits 0 (Twisted's own handler
        would re-raise the signal after shutdown, exiting -15)."""
        def on_hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._reload_logged)

        def on_term(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._terminate)

        for sig, handler in ((signal.SIGHUP, on_hup), (signal.SIGTERM, on_term)):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _terminate(self) -> None:
        log.info("lbtwist: SIGTERM received; stop accepting, drain, exit")
        if self.reactor.running:
            self.reactor.stop()

    def _reload_logged(self) -> None:
        d = defer.maybeDeferred(self.reload)
        d.addErrback(lambda f: log.error("lbtwist: reload failed, keeping the running config:\n{err}", err=f.getErrorMessage()))

    # -- hot reload ----------------------------------------------------------

    def reload(self) -> defer.Deferred:
        """Re-read the config file; validate it whole; apply it as a diff.
        A bad file leaves the running config untouched and fails the Deferred
        with the problems (one per line)."""
        if self.config_path is None:
            return defer.fail(RuntimeError("no config file to reload (built-in config)"))
        loader = self._loader
        if loader is None:
            from lbtwist.config import load_config as loader
        try:
            loaded = loader(self.config_path, self.runtime.registry)
        except Exception as e:  # ConfigError: str() is one line per problem
            return defer.fail(ReloadError(str(e)))
        return defer.maybeDeferred(self.apply, loaded.config)

    def apply(self, new: Config) -> defer.Deferred:
        """Apply a validated config: pools first (so listeners find them),
        then listeners; removed backends drain, removed listeners drain."""
        rt = self.runtime
        old = rt.config
        tls_state = None
        if rt.tls is not None or any(p.tls is not None for p in new.pools) or any(
            l.tls is not None or l.tls_passthrough is not None for l in new.listeners
        ):
            from lbtwist.tls.context import TLSConfigError
            from lbtwist.tls.wiring import runtime_tls

            tls_state = runtime_tls(rt)
            try:  # read every certificate before switching anything
                tls_state.check_listeners(new)
                backend_tls = tls_state.prepare_pools(new.pools)
            except TLSConfigError as e:
                raise ReloadError(f"TLS: {e}") from None
            tls_state.set_pools(backend_tls)
        log.info("lbtwist: applying new configuration")
        waits: list[defer.Deferred] = []
        # pools: add, change in place, and remember which to drop
        new_pools = {p.name: p for p in new.pools}
        for name, pcfg in new_pools.items():
            if name in rt.pools:
                waits += self._reconfigure_pool(rt.pools[name], rt.pool_configs[name], pcfg)
            else:
                rt.pools[name] = build_pool(pcfg, rt)
                rt.pools[name].subscribe(self._on_pool_state)
                rt.pool_configs[name] = pcfg
                self.health.add_pool(rt.pools[name], pcfg.health)
                log.info("lbtwist: pool {pool} added", pool=name)
        rt.config = new
        # listeners
        old_l = {l.name: l for l in old.listeners}
        new_l = {l.name: l for l in new.listeners}
        current = {svc.name: svc for svc in self.listeners}
        released: list[defer.Deferred] = []
        for name, svc in current.items():
            lcfg = new_l.get(name)
            if lcfg is not None and _same_socket(old_l.get(name), lcfg) and hasattr(svc, "reconfigure"):
                svc.reconfigure(lcfg)
                if tls_state is not None:
                    try:
                        tls_state.reconfigure_listener(svc, lcfg)
                    except Exception as e:  # files changed since the check: keep the old certs
                        log.error("lbtwist: listener {name}: TLS reload failed, keeping the old certificates: {e}", name=name, e=e)
                continue
            if tls_state is not None:
                tls_state.forget_listener(name, svc)
            # removed or rebound: release the socket now, drain in the background
            released.append(svc.stop_accepting())
            waits.append(defer.maybeDeferred(svc.disownServiceParent))
            log.info("lbtwist: listener {name} retired", name=name)

        def add_listeners(_: object) -> None:
            for name, lcfg in new_l.items():
                svc = current.get(name)
                if svc is not None and svc.parent is self.listeners:
                    continue
                build_listener(lcfg, rt).setServiceParent(self.listeners)
                log.info("lbtwist: listener {name} added", name=name)

        bound = defer.gatherResults(released, consumeErrors=True).addCallback(add_listeners)
        # pools no longer named anywhere: stop health, keep objects for in-flight work
        for name in [n for n in rt.pools if n not in new_pools]:
            self.health.remove_pool(name)
            del rt.pools[name]
            del rt.pool_configs[name]
            log.info("lbtwist: pool {pool} removed", pool=name)
        # drains finish in the background; the reload is done once new listeners are bound
        for w in waits:
            w.addErrback(lambda f: log.failure("lbtwist: drain after reload", f))
        bound.addCallback(lambda _: log.info("lbtwist: configuration applied"))
        return bound

    def _reconfigure_pool(self, pool: Pool, old: PoolConfig, new: PoolConfig) -> list[defer.Deferred]:
        rt = self.runtime
        waits: list[defer.Deferred] = []
        if (old.algorithm, old.algorithm_options) != (new.algorithm, new.algorithm_options):
            pool.balancer = rt.registry.make_balancer(
                new.algorithm, new.algorithm_options, clock=rt.reactor, rng=pool.rng
            )
            pool.version += 1
        pool.slow_start = new.slow_start
        pool.drain_timeout = new.drain_timeout
        pool.panic_threshold = new.health.panic_threshold
        wanted = {b.address: b for b in new.backends}
        for b in pool.backends():
            b.slow_start = new.slow_start
            bc = wanted.get(b.address)
            if bc is None:
                # drain first: in-flight work gets up to drain_timeout, then removal
                waits.append(self.health.remove_backend(pool.name, b.address, "removed from config"))
            elif bc.weight != b.weight:
                pool.set_weight(b, bc.weight, "weight changed in config")
        initial = _initial_health(new)
        for address, bc in wanted.items():
            if pool.get(address) is None:
                b = Backend(address=bc.address, weight=bc.weight, name=bc.name)
                b.health = initial
                b.joined_at = rt.reactor.seconds()
                pool.add_backend(b, "added by reload")
        if old.health != new.health:
            self.health.add_pool(pool, new.health)
        rt.pool_configs[pool.name] = new
        pool.version += 1
        return waits

    def stopService(self) -> defer.Deferred:
        self._restore_signal_handlers()
        return self._stop_in_order()

    def _stop_in_order(self) -> defer.Deferred:
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
