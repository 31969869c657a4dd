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
                 origin: str | None = None, role: str = "single", workers: int = 1) -> None:
        self.settings = settings
        self.reactor = reactor
        #: the process's runtime.role: with workers, every process has its own
        #: link; a worker's limiters decide its requests (so the fleet limit
        #: holds across every process of every instance), the master alone
        #: shares ejections (its detector decides them; the workers get them
        #: in the fleet view, lbtwist.workers.fleetview).
        self.role = role
        #: how many workers this instance runs (a worker's local fallback
        #: limit is its share: lbtwist.workers.fleetview.split_rate_limit)
        self.workers = workers
        self.link = link or FleetLink(settings, reactor)
        self.link.add_script("lease", LEASE_SCRIPT)
        self.ejections = (FleetEjections(self.link, reactor, settings.prefix, origin)
                          if settings.share_ejections and role != "worker" else None)
        #: "listener/route" -> the running FleetRateLimiter (weakly: a route a
        #: reload removed leaves the admin API with it)
        self.limiters: weakref.WeakValueDictionary[str, FleetRateLimiter] = weakref.WeakValueDictionary()

    @classmethod
    def from_config(cls, cfg: Any, reactor: Any, role: str = "single", workers: int = 1) -> "FleetService":
        return cls(FleetSettings.from_config(cfg), reactor, role=role, workers=workers)

    def startService(self) -> None:
        super().startService()
        self.link.start()

    def stopService(self) -> Any:
        super().stopService()
        self.link.stop()

    def rate_limiter(self, local: Any, listener: str, route: str, cfg: Any = None) -> FleetRateLimiter:
        """The fleet-scope limiter of a route, over its local limiter (same
        rate, burst and key; the fallback while Redis is unusable). In one of
        N workers the fallback is the worker's share of ``cfg`` (the route's
        rate_limit), so the instance stays at the limit while Redis is out."""
        label = f"{listener}/{route}"
        if self.workers > 1 and cfg is not None:
            from lbtwist.resilience.ratelimit import RateLimiter
            from lbtwist.workers.fleetview import split_rate_limit

            fallback = RateLimiter.from_config(split_rate_limit(cfg, self.workers), name=local.name)
            lim = FleetRateLimiter(local, self.link, f"{self.settings.prefix}rl:{label}:", self.reactor,
                                   lease_max=self.settings.lease_max, lease_time=self.settings.lease_time,
                                   timeout=self.settings.timeout, fallback=fallback)
            self.limiters[label] = lim
            return lim
        lim = FleetRateLimiter(local, self.link, f"{self.settings.prefix}rl:{label}:", self.reactor,
                               lease_max=self.settings.lease_max, lease_time=self.settings.lease_time,
                               timeout=self.settings.timeout)
        self.limiters[label] = lim
        return lim

    def status(self) -> dict[str, Any]:
        out = self.link.status()
        if self.role == "master":  # the workers decide: their counters are in the merged /metrics
            out["rate_limits"] = {}
            out["rate_limits_decided_by"] = "workers (lbtwist_fleet_rate_decisions_total in /metrics)"
        else:
            out["rate_limits"] = {label: lim.status() for label, lim in sorted(self.limiters.items())}
        out["ejections"] = self.ejections.status() if self.ejections is not None else None
        return out
