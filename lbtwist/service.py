"""The top of the service tree: builds pools and listeners from a validated
config and stops them in order (stop accepting and drain first, then the rest),
which Twisted's MultiService does not do by itself."""
from __future__ import annotations

import random
import signal
from typing import Any, Callable, Mapping

import attrs

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from lbtwist.config.model import BackendConfig, Config, ListenerConfig, PoolConfig
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
        log_changes=runtime.role != "worker",  # a worker applies the master's (logged) decisions
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


def _about(listener: str, e: Exception) -> str:
    """``listener NAME: problem``, once (most messages name it already)."""
    text = str(e)
    return text if text.startswith(f"listener {listener}") else f"listener {listener}: {text}"


@attrs.define
class _ListenerPlan:
    """A reload's listeners, ready to switch (L{LbtwistService._prepare_listeners})."""

    #: (running service, its new config, the callable that applies it)
    kept: list[tuple[Any, ListenerConfig, Callable[[], None]]] = attrs.Factory(list)
    #: running services that stop accepting and drain
    retired: list[Any] = attrs.Factory(list)
    #: (new service, retired service whose socket it takes over, or None: bound already)
    fresh: list[tuple[Any, Any]] = attrs.Factory(list)


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
        role: str = "single",
        sockets: Mapping[str, int] | None = None,
        tls_servers: Mapping[str, Any] | None = None,
        workers: int = 1,
    ) -> None:
        super().__init__()
        if role not in ("single", "master", "worker"):
            raise ValueError(f"role must be single, master or worker, not {role!r}")
        self.setName("lbtwist")
        self.reactor = reactor
        self.config_path = config_path
        self.install_signals = install_signals
        #: role "worker": how many workers the instance runs (their shares of a limit)
        self.worker_count = workers
        self._loader = loader
        self._old_handlers: dict[int, Any] = {}
        self.runtime = Runtime(reactor=reactor, registry=registry, config=config, role=role)
        self.runtime.sync_backends = self.sync_discovered
        self.listeners: MultiService = MultiService()
        self.listeners.setName("listeners")
        self.health: Any = None  # HealthService, set in _build
        #: (pool, address) of backends draining toward removal
        self._removing: set[tuple[str, str]] = set()
        #: pool name -> lbtwist.discovery.PoolDiscovery (shared with the runtime: admin, metrics)
        self.discovery: dict[str, Any] = self.runtime.discovery
        #: role "worker": bind text -> listening socket fd the master passed down
        self.sockets: dict[str, int] = dict(sockets or {})
        #: role "master": the lbtwist.workers.master.Fleet (reload goes through it)
        self.fleet: Any = None
        if tls_servers:  # a forked worker: the listeners' TLS the master built (shared ticket keys)
            from lbtwist.tls.wiring import runtime_tls

            runtime_tls(self.runtime).inherited.update(tls_servers)
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
            self._set_discovery(pcfg)
        rt.pool_state.setdefault("discovery", self._discovery_state)
        if config.demo is not None and rt.role != "worker":
            from lbtwist.demo import demo_service

            demo_service(config.demo, self.reactor).setServiceParent(self)
        if config.access_log is not None:
            from lbtwist.accesslog import access_log_service

            access_log_service(config.access_log, rt).setServiceParent(self)
        if config.fleet is not None:
            from lbtwist.fleet.service import FleetService

            rt.fleet = FleetService.from_config(config.fleet, self.reactor, role=rt.role, workers=self.worker_count)
            rt.fleet.setServiceParent(self)
        self.health = self._health_service()
        self.health.setServiceParent(self)
        admin = self._admin_service(config)
        if admin is not None:
            admin.setServiceParent(self)
        if rt.role != "master":  # a master's workers listen
            for lcfg in config.listeners:
                self._new_listener(lcfg).setServiceParent(self.listeners)
        self.listeners.setServiceParent(self)
        prepared = self._prepare_ocsp(config)
        if prepared is not None:
            self._commit_ocsp(prepared)

    # -- OCSP fetching (lbtwist.tls.ocspfetch) -----------------------------------

    def _prepare_ocsp(self, config: Config, reloading: bool = False) -> Any:
        """The fetch settings of ``config`` (None: nothing to fetch, and no
        fetcher runs). A worker never fetches: its master pushes responses.
        Raises TLSConfigError (ReloadError when ``reloading``) naming the
        listener, certificate and key. TLS modules are imported only when
        there is something to fetch: a worker without TLS never loads
        pyOpenSSL."""
        rt = self.runtime
        if rt.role == "worker":
            return None
        wanted = any(c.ocsp_fetch for l in config.listeners if l.tls is not None for c in l.tls.certificates)
        if not wanted and getattr(rt, "ocsp", None) is None:
            return None
        from lbtwist.tls.context import TLSConfigError
        from lbtwist.tls.ocspfetch import OCSPService

        svc = getattr(rt, "ocsp", None)
        if svc is None:
            svc = OCSPService(rt)
            svc.setServiceParent(self)
        try:
            return svc.prepare(config)
        except TLSConfigError as e:
            if not reloading:
                raise
            raise ReloadError(f"TLS: {e}") from None

    def _commit_ocsp(self, prepared: Any) -> None:
        self.runtime.ocsp.commit(prepared)

    def _new_listener(self, lcfg: ListenerConfig) -> IService:
        """build_listener, on the socket the master passed down in a worker."""
        svc = build_listener(lcfg, self.runtime)
        fd = self.sockets.get(lcfg.bind)
        if fd is not None:
            svc.inherit_socket(fd)
        return svc

    # -- discovery -----------------------------------------------------------

    def _set_discovery(self, pcfg: PoolConfig | None, name: str | None = None, *, start: bool = True) -> Any:
        """(Re)build the discovery of a pool (stopping the old one, whose
        backends the new one carries until its sources answered); started now
        when the service runs and ``start``, else in startService (or by the
        caller). ``pcfg`` None: the pool is gone. Returns the new one or None."""
        name = pcfg.name if pcfg is not None else name
        old = self.discovery.pop(name, None)
        if old is not None:
            old.stop()
        if pcfg is None or not pcfg.discovery or self.runtime.role == "worker":
            return None  # a worker gets its backends from the master's fleet view
        from lbtwist.discovery import pool_discovery

        disc = pool_discovery(pcfg, self.runtime.pools[name], self.reactor, self.runtime.registry,
                              self.sync_discovered)
        if old is not None:
            disc.seed(old.endpoints())
        self.discovery[name] = disc
        if self.running and start:
            disc.start()
        return disc

    def _discovery_state(self, pool: Pool) -> dict | None:
        disc = self.discovery.get(pool.name)
        return disc.status() if disc is not None else None

    def _health_service(self) -> IService:
        from lbtwist.health.service import HealthService

        return HealthService(self.runtime)

    def _admin_service(self, config: Config) -> IService | None:
        if config.admin is None or self.runtime.role == "worker":
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
        for disc in self.discovery.values():
            disc.start()
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
        if self.fleet is not None:  # the master: validate, then every worker
            return self.fleet.reload()
        loader = self._loader
        if loader is None:
            from lbtwist.config import load_config as loader
        try:
            loaded = loader(self.config_path, self.runtime.registry)
        except Exception as e:  # ConfigError: str() is one line per problem
            return defer.fail(ReloadError(str(e)))
        return defer.maybeDeferred(self.apply, loaded.config)

    def apply(self, new: Config) -> defer.Deferred:
        """Apply a validated config as a diff, all or nothing.

        Everything that can fail comes first and changes nothing that runs:
        certificates, balancer and probe plugins, routes, and binding every
        new port. Only when all of it succeeded are pools and listeners
        switched (and ``runtime.config`` replaced). A refused reload raises
        L{ReloadError} naming the problem; the running listeners, pools and
        ``/api/config`` stay exactly as they were. Removed backends and
        retired listeners drain in the background."""
        rt = self.runtime
        old = rt.config
        tls_state, backend_tls = self._prepare_tls(new)
        ocsp = self._prepare_ocsp(new, reloading=True)
        tls_saved = tls_state.listener_snapshot() if tls_state is not None else None
        bound: list[Any] = []  # ports this attempt opened: closed again if it is refused
        try:
            pools = self._prepare_pools(new)
            listeners = self._prepare_listeners(old, new, bound)
        except Exception as e:
            for svc in bound:
                svc.stop_accepting().addErrback(lambda f: log.failure("lbtwist: closing a port of a refused reload", f))
            if tls_state is not None and tls_saved is not None:
                tls_state.restore_listeners(tls_saved)
            if isinstance(e, ReloadError):
                raise
            if not isinstance(e, (ValueError, KeyError, CannotListenError)):
                log.failure("lbtwist: preparing the new configuration failed")
            text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError's str() quotes
            raise ReloadError(str(text) or type(e).__name__) from None
        # -- switch: nothing below is expected to fail -------------------------
        log.info("lbtwist: applying new configuration")
        if new.fleet != old.fleet:
            log.warn("lbtwist: the fleet block changed; it is read at start: restart to apply it")
        if tls_state is not None:
            tls_state.set_pools(backend_tls)
        waits = self._commit_pools(new, pools)
        rt.config = new
        waits += self._commit_listeners(new, listeners, tls_state)
        if ocsp is not None:
            self._commit_ocsp(ocsp)
        # drains finish in the background; the reload is done: every port is bound
        for w in waits:
            w.addErrback(lambda f: log.failure("lbtwist: drain after reload", f))
        log.info("lbtwist: configuration applied")
        return defer.succeed(None)

    def _prepare_tls(self, new: Config) -> tuple[Any, Any]:
        """Read every certificate of ``new`` (listeners and pools) before
        anything switches: (RuntimeTLS or None, the pools' BackendTLS)."""
        rt = self.runtime
        if rt.tls is None and not any(p.tls is not None for p in new.pools) and not any(
            l.tls is not None or l.tls_passthrough is not None for l in new.listeners
        ):
            return None, None
        from lbtwist.tls.context import TLSConfigError
        from lbtwist.tls.wiring import runtime_tls

        tls_state = runtime_tls(rt)
        try:
            tls_state.check_listeners(new)
            return tls_state, tls_state.prepare_pools(new.pools)
        except TLSConfigError as e:
            raise ReloadError(f"TLS: {e}") from None

    def _prepare_pools(self, new: Config) -> dict[str, tuple[Any, Any]]:
        """Per pool of ``new``: (Pool to add, or the new balancer of a kept
        pool whose algorithm changed, or None; its new PoolHealth or None
        when its health settings are unchanged). Builds plugins (balancers,
        probes), which may raise; registers nothing."""
        rt = self.runtime
        from lbtwist.health.service import pool_health_config

        out: dict[str, tuple[Any, Any]] = {}
        for pcfg in new.pools:
            name = pcfg.name
            health = pool_health_config(new, name, pcfg.health)
            pool = rt.pools.get(name)
            if pool is None:
                pool = build_pool(pcfg, rt)
                out[name] = (pool, self.health.prepare_pool(pool, health))
                continue
            oldc = rt.pool_configs[name]
            balancer = None
            if (oldc.algorithm, oldc.algorithm_options) != (pcfg.algorithm, pcfg.algorithm_options):
                balancer = rt.registry.make_balancer(
                    pcfg.algorithm, pcfg.algorithm_options, clock=rt.reactor, rng=pool.rng
                )
            ph = None
            if self.health.running_config(name) != health:
                ph = self.health.prepare_pool(pool, health)
            out[name] = (balancer, ph)
        return out

    def _commit_pools(self, new: Config, prepared: dict[str, tuple[Any, Any]]) -> list[defer.Deferred]:
        rt = self.runtime
        waits: list[defer.Deferred] = []
        for pcfg in new.pools:
            name = pcfg.name
            first, ph = prepared[name]
            if name not in rt.pools:
                rt.pools[name] = first
                first.subscribe(self._on_pool_state)
                rt.pool_configs[name] = pcfg
                self.health.install(ph)
                self._set_discovery(pcfg)
                log.info("lbtwist: pool {pool} added", pool=name)
            else:
                fresh = None
                if rt.pool_configs[name].discovery != pcfg.discovery:
                    # new sources start once the pool has its new config
                    fresh = self._set_discovery(pcfg, start=False)
                waits += self._reconfigure_pool(rt.pools[name], pcfg, first, ph)
                if fresh is not None and self.running:
                    fresh.start()
        # pools no longer named anywhere: stop health, keep objects for in-flight work
        names = {p.name for p in new.pools}
        for name in [n for n in rt.pools if n not in names]:
            self._set_discovery(None, name)
            self.health.remove_pool(name)
            del rt.pools[name]
            del rt.pool_configs[name]
            log.info("lbtwist: pool {pool} removed", pool=name)
        return waits

    def _reconfigure_pool(self, pool: Pool, new: PoolConfig, balancer: Any, health: Any) -> list[defer.Deferred]:
        """Change a kept pool in place (its backends keep their state);
        ``balancer`` and ``health`` come from L{_prepare_pools}."""
        rt = self.runtime
        waits: list[defer.Deferred] = []
        if balancer is not None:
            pool.balancer = balancer
            pool.version += 1
        pool.slow_start = new.slow_start
        pool.drain_timeout = new.drain_timeout
        pool.panic_threshold = new.health.panic_threshold
        for b in pool.backends():
            b.slow_start = new.slow_start
        rt.pool_configs[pool.name] = new
        disc = self.discovery.get(pool.name)
        if rt.role == "worker":
            pass  # the backend set (static and discovered) comes with the master's fleet view
        elif disc is not None:
            disc.set_static(new.backends)
            wanted = disc.wanted()
        else:
            wanted = {b.address: b for b in new.backends}
        if rt.role != "worker":
            waits += self._sync_backends(pool, wanted, "config")
        if health is not None:
            self.health.install(health)
        pool.version += 1
        return waits

    def _sync_backends(self, pool: Pool, wanted: Mapping[str, BackendConfig], why: str) -> list[defer.Deferred]:
        """The backend diff, for a reload and for discovery: backends not in
        ``wanted`` drain (in-flight work gets up to drain_timeout) and are
        removed; new ones are added in the initial health state (probes and
        slow start let them in); kept ones keep their state, weight updated."""
        waits: list[defer.Deferred] = []
        for b in pool.backends():
            bc = wanted.get(b.address)
            if bc is None:
                key = (pool.name, b.address)
                if key not in self._removing:  # a second diff during the drain does not drain twice
                    self._removing.add(key)
                    d = self.health.remove_backend(pool.name, b.address, f"removed from {why}")
                    d.addBoth(self._removed, key)
                    waits.append(d)
            elif bc.weight != b.weight:
                pool.set_weight(b, bc.weight, f"weight changed in {why}")
        initial = _initial_health(self.runtime.pool_configs[pool.name])
        for address, bc in wanted.items():
            if pool.get(address) is None:
                b = Backend(address=bc.address, weight=bc.weight, name=bc.name)
                b.health = initial
                b.joined_at = self.runtime.reactor.seconds()
                pool.add_backend(b, f"added by {why}")
        return waits

    def _removed(self, result: Any, key: tuple[str, str]) -> Any:
        self._removing.discard(key)
        disc = self.discovery.get(key[0])
        if disc is not None and key[1] in disc.wanted():
            # discovery brought it back while it drained: add it again, fresh
            self.sync_discovered(key[0], disc.wanted(), "discovery (back while draining)")
        return result

    def sync_discovered(self, pool_name: str, wanted: Mapping[str, BackendConfig], why: str) -> None:
        """Discovery's entry into L{_sync_backends} (drains finish in the background)."""
        pool = self.runtime.pools.get(pool_name)
        if pool is None:
            return
        for w in self._sync_backends(pool, wanted, why):
            w.addErrback(lambda f: log.failure("lbtwist: drain after a discovery change", f))

    def _prepare_listeners(self, old: Config, new: Config, bound: list[Any]) -> "_ListenerPlan":
        """Sort the running listeners into kept (same socket: reconfigured in
        place) and retired; build the new ones and give each a socket: the
        one of a retired listener with the same bind text (handed over, never
        closed), else a freshly bound port (appended to ``bound``)."""
        rt = self.runtime
        old_l = {l.name: l for l in old.listeners}
        new_l = {l.name: l for l in new.listeners}
        plan = _ListenerPlan()
        if rt.role == "master":  # its workers listen (lbtwist.workers.master.Fleet.reload)
            return plan
        for svc in list(self.listeners):
            lcfg = new_l.get(svc.name)
            if lcfg is not None and _same_socket(old_l.get(svc.name), lcfg) and hasattr(svc, "prepare_reconfigure"):
                try:
                    plan.kept.append((svc, lcfg, svc.prepare_reconfigure(lcfg)))
                except ValueError as e:
                    raise ReloadError(_about(svc.name, e)) from None
            else:
                plan.retired.append(svc)
        donors = {
            old_l[svc.name].bind: svc for svc in plan.retired
            if svc.name in old_l and svc.address is not None
        }
        kept = {svc.name for svc, _, _ in plan.kept}
        for lcfg in new.listeners:
            if lcfg.name in kept:
                continue
            try:
                svc = self._new_listener(lcfg)
            except ValueError as e:
                raise ReloadError(_about(lcfg.name, e)) from None
            donor = donors.get(lcfg.bind)
            if donor is not None and getattr(donor, "port_kind", None) == getattr(svc, "port_kind", None):
                del donors[lcfg.bind]
                plan.fresh.append((svc, donor))
                continue
            try:
                svc.bind_port()
            except CannotListenError as e:
                raise ReloadError(self._bind_problem(lcfg, e)) from None
            bound.append(svc)
            plan.fresh.append((svc, None))
        return plan

    def _bind_problem(self, lcfg: ListenerConfig, e: CannotListenError) -> str:
        msg = f"listener {lcfg.name}: cannot bind {lcfg.bind!r}: {e.socketError}"
        holder = next(
            (s.name for s in self.listeners
             if getattr(s.address, "port", None) == e.port and s.name != lcfg.name),
            None,
        )
        if holder is not None:
            msg += (f" (listener {holder!r} of the running config holds port {e.port}; a listener "
                    "takes over another's socket only with the same bind text; else move them "
                    "in two reloads)")
        return msg + "; nothing was changed"

    def _commit_listeners(self, new: Config, plan: "_ListenerPlan", tls_state: Any) -> list[defer.Deferred]:
        waits: list[defer.Deferred] = []
        for svc, lcfg, commit in plan.kept:
            commit()
            if tls_state is not None:
                try:
                    tls_state.reconfigure_listener(svc, lcfg)
                except Exception as e:  # files changed since the check: keep the old certs
                    log.error("lbtwist: listener {name}: TLS reload failed, keeping the old certificates: {e}",
                              name=svc.name, e=e)
        # hand-overs first: the socket passes to the new service, never closed
        for svc, donor in plan.fresh:
            if donor is not None:
                svc.adopt_port(donor)
                log.info("lbtwist: listener {name} takes over the socket of {old} ({bind})",
                         name=svc.name, old=donor.name, bind=svc.address)
        names = {l.name for l in new.listeners}
        resilience = self.runtime.resilience
        for svc in plan.retired:
            if tls_state is not None:
                tls_state.forget_listener(svc.name, svc)
            if svc.name not in names and resilience is not None:
                resilience.forget_listener(svc.name)
            # released now (unless handed over); its connections drain in the background
            svc.stop_accepting().addErrback(lambda f: log.failure("lbtwist: closing a retired port", f))
            waits.append(defer.maybeDeferred(svc.disownServiceParent))
            log.info("lbtwist: listener {name} retired", name=svc.name)
        for svc, _ in plan.fresh:
            svc.setServiceParent(self.listeners)
            log.info("lbtwist: listener {name} added", name=svc.name)
        return waits

    def stopService(self) -> defer.Deferred:
        self._restore_signal_handlers()
        for disc in self.discovery.values():
            disc.stop()
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
