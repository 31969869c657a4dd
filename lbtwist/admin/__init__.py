"""The admin listener: JSON API, Prometheus /metrics and the live dashboard.

``admin_service(admin_cfg, runtime, reload=None)`` is all the rest of lbtwist
needs; the pieces live in L{lbtwist.admin.api} (HTTP), L{lbtwist.admin.state}
(JSON views), L{lbtwist.admin.metrics} (Prometheus), L{lbtwist.admin.live} and
L{lbtwist.admin.window} (live figures), L{lbtwist.admin.auth} (who may call).
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import IService
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import server

from lbtwist.admin.api import AdminResource
from lbtwist.admin.auth import Guard, admin_config_problems, bind_is_loopback, read_token
from lbtwist.admin.channel import AdminChannel, AdminRequest, ConnectionGate, limit_problems
from lbtwist.admin.live import Live
from lbtwist.admin.metrics import make_registry
from lbtwist.admin.state import StateView
from lbtwist.listener import ListenerService

__all__ = ["admin_service", "AdminService", "admin_config_problems"]

log = Logger(namespace="lbtwist.admin")


class _QuietSite(server.Site):
    """The dashboard polls every second: per-request lines would drown the log.
    Operator actions are logged where they happen (Pool state changes)."""

    noisy = False
    protocol = AdminChannel
    requestFactory = AdminRequest
    service: "AdminService | None" = None

    def log(self, request: Any) -> None:
        pass


class AdminService(ListenerService):
    """Binds ``admin.bind`` and follows the runtime's pools while running."""

    def __init__(self, admin_cfg: Any, runtime: Any, reload: Callable[[], Any] | None = None,
                 process_metrics: bool = True) -> None:
        problems = admin_config_problems(admin_cfg)
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        self.runtime = runtime
        clock = runtime.reactor
        self.live = Live(runtime, clock)
        self.view = StateView(runtime, self.live, clock)
        self.registry = make_registry(runtime, self.live, clock, process=process_metrics)
        self.admin_cfg = admin_cfg
        self.guard = Guard(read_token(admin_cfg), bind_is_loopback(admin_cfg.bind))
        self.resource = AdminResource(runtime, self.view, self.registry, self.guard, reload)
        #: Who may keep an admin connection open (admin.max_connections...).
        self.gate = ConnectionGate(admin_cfg.max_connections, admin_cfg.max_connections_per_client, clock)
        site = _QuietSite(self.resource, reactor=runtime.reactor, timeout=admin_cfg.idle_timeout)
        super().__init__("admin", admin_cfg.bind, site, runtime.reactor)
        site.service = self
        self._sync = task.LoopingCall(self._safe_sync)
        self._sync.clock = clock

    def _safe_sync(self) -> None:
        try:
            self.live.sync()
            self.follow_admin_config()
        except Exception:
            log.failure("admin: following the runtime failed")

    def follow_admin_config(self) -> None:
        """After a reload, take a new token (or token file contents) without
        rebinding. A token that cannot be read keeps the old one; a new bind
        needs a restart (the listening socket is not moved)."""
        new = getattr(getattr(self.runtime, "config", None), "admin", None)
        if new is None or new == self.admin_cfg:
            return
        if any(limit_problems(new)):
            return  # a reload validates first: this config never gets here
        old, self.admin_cfg = self.admin_cfg, new
        # the connection limits and timeouts apply at once (idle_timeout to new connections)
        self.gate.configure(new.max_connections, new.max_connections_per_client)
        self.factory.timeOut = new.idle_timeout
        if new.bind != old.bind:
            log.warn("admin: admin.bind changed to {bind!r}; still listening on {old!r} until restart",
                     bind=new.bind, old=old.bind)
        loopback = bind_is_loopback(old.bind)
        try:
            token = read_token(new)
        except ValueError as e:
            log.error("admin: keeping the previous token: {err}", err=str(e))
            return
        if token is None and not loopback:
            log.error("admin: a token is required on {bind!r}; keeping the previous one", bind=old.bind)
            return
        if token != self.guard.token:
            self.guard.set_token(token)
            log.info("admin: token {what}", what="changed" if token else "removed")

    def _listener_connections(self, name: str) -> dict | None:
        """Open connections of the listener service called ``name``, found
        next to us in the service tree (a reload may replace it: looked up
        per call). Used unless a part registered its own "connections"."""
        group = getattr(self.parent, "listeners", None)
        try:
            svc = group.getServiceNamed(name) if group is not None else None
        except KeyError:
            return None
        if svc is None:
            return None
        out: dict = {"active": len(getattr(svc, "connections", ()))}
        factory = getattr(svc, "relay", None) or getattr(svc, "factory", None)
        for attr, key in (("total", "accepted_total"), ("refused", "refused_total")):
            v = getattr(factory, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                out[key] = v
        return out

    def startService(self) -> None:
        self.live.attach()
        self.runtime.listener_state.setdefault("connections", self._listener_connections)
        super().startService()
        # a reload may rebuild pools: attach to the new ones within a second
        self._sync.start(1.0, now=False)

    def stopService(self, drain_timeout: float = 1.0) -> defer.Deferred:
        if self._sync.running:
            self._sync.stop()
        self.live.detach()
        if self.runtime.listener_state.get("connections") == self._listener_connections:
            del self.runtime.listener_state["connections"]
        return super().stopService(drain_timeout)


def admin_service(admin_cfg: Any, runtime: Any, reload: Callable[[], Any] | None = None) -> IService:
    """The admin listener for ``runtime``. ``reload()`` (returning a Deferred
    or a value, raising or failing when the new config is refused) backs
    ``POST /api/reload``; without it that endpoint answers 501."""
    return AdminService(admin_cfg, runtime, reload)
