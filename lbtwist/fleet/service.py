# -*- test-case-name: tests.test_fleet_service -*-
"""The fleet wired into a runtime: one L{FleetLink}, the routes' fleet rate
limiters, shared ejections, and what the admin API (``GET /api/fleet``, a
``fleet`` field in ``/api/pools``) and /metrics (``lbtwist_fleet_*``) show.

Set as ``runtime.fleet`` before the health service and listeners start; the
parts that decide find it there: routes with ``rate_limit.scope: fleet``
(wherever requests are served) and pools' outlier detectors (wherever
passive health runs). The ``fleet`` block is read at start; a reload that
changes it is logged and takes effect at the next restart.
"""
from __future__ import annotations

import weakref
from typing import Any

from twisted.application.service import Service

from lbtwist.fleet.ejections import FleetEjections
from lbtwist.fleet.link import FleetLink
from lbtwist.fleet.ratelimit import LEASE_SCRIPT, FleetRateLimiter
from lbtwist.fleet.settings import FleetSettings


class FleetService(Service):
    name = "fleet"

    def __init__(self, settings: FleetSettings, reactor: Any, *, link: FleetLink | None = None,
                 origin: str | None = None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.link = link or FleetLink(settings, reactor)
        self.link.add_script("lease", LEASE_SCRIPT)
        self.ejections = FleetEjections(self.link, reactor, settings.prefix, origin) if settings.share_ejections else None
        #: "listener/route" -> the running FleetRateLimiter (weakly: a route a
        #: reload removed leaves the admin API with it)
        self.limiters: weakref.WeakValueDictionary[str, FleetRateLimiter] = weakref.WeakValueDictionary()

    @classmethod
    def from_config(cls, cfg: Any, reactor: Any) -> "FleetService":
        return cls(FleetSettings.from_config(cfg), reactor)

    def startService(self) -> None:
        super().startService()
        self.link.start()

    def stopService(self) -> Any:
        super().stopService()
        self.link.stop()

    def rate_limiter(self, local: Any, listener: str, route: str) -> FleetRateLimiter:
        """The fleet-scope limiter of a route, over its local limiter (same
        rate, burst and key; the fallback while Redis is unusable)."""
        label = f"{listener}/{route}"
        lim = FleetRateLimiter(local, self.link, f"{self.settings.prefix}rl:{label}:", self.reactor,
                               lease_max=self.settings.lease_max, lease_time=self.settings.lease_time,
                               timeout=self.settings.timeout)
        self.limiters[label] = lim
        return lim

    def status(self) -> dict[str, Any]:
        out = self.link.status()
        out["rate_limits"] = {label: lim.status() for label, lim in sorted(self.limiters.items())}
        out["ejections"] = self.ejections.status() if self.ejections is not None else None
        return out
