"""What a running balancer's parts share: the reactor, the pools, the registry.
Passed in everywhere instead of module-level globals."""
from __future__ import annotations

from typing import Any

import attrs

from lbtwist.config.model import Config, PoolConfig
from lbtwist.pool import Pool
from lbtwist.registry import Registry
from lbtwist.traffic import TrafficHub


@attrs.define
class Runtime:
    #: Provides IReactorTime, IReactorTCP, IReactorUDP (a MemoryReactorClock in tests).
    reactor: Any
    registry: Registry
    config: Config
    pools: dict[str, Pool] = attrs.Factory(dict)
    pool_configs: dict[str, PoolConfig] = attrs.Factory(dict)
    #: Finished requests/connections: the data plane publishes, logs and metrics subscribe.
    traffic: TrafficHub = attrs.Factory(TrafficHub)
    #: lbtwist.l7.connpool.ConnectionPools: backend keep-alive connections
    #: shared by every http listener (created by the first one; draining a
    #: backend closes its idle connections through it).
    connection_pools: Any = None
    #: Extra state shown by the admin API and exported by /metrics, pulled at
    #: each poll or scrape (cheap, must not raise). One callable per part,
    #: under a short name (docs/operations.md, "State providers"):
    #:   backend_state["breaker"] = fn(pool, backend) -> dict | None
    #:   pool_state["retry_budget"] = fn(pool) -> dict | None
    #:   listener_state["tls"] = fn(listener_name) -> dict | None
    backend_state: dict[str, Any] = attrs.Factory(dict)
    pool_state: dict[str, Any] = attrs.Factory(dict)
    listener_state: dict[str, Any] = attrs.Factory(dict)
    #: lbtwist.tls.wiring.RuntimeTLS: ServerTLS per terminating listener,
    #: BackendTLS per pool with ``tls:`` (created by the first TLS user).
    tls: Any = None
    #: lbtwist.tls.ocspfetch.OCSPService: OCSP fetchers (not in workers).
    ocsp: Any = None
    #: lbtwist.resilience.wiring.RuntimeResilience: each pool's breakers,
    #: limits and budget (created by the first L4/L7 listener).
    resilience: Any = None
    #: pool name -> lbtwist.discovery.PoolDiscovery, for pools with ``discovery:``.
    discovery: dict[str, Any] = attrs.Factory(dict)
    #: lbtwist.fleet.service.FleetService when the config has a ``fleet:``
    #: block: fleet rate limits and shared ejections through Redis.
    fleet: Any = None
    #: role "master": lbtwist.workers.master.Fleet (GET /api/workers, the
    #: workers' /metrics, admin changes acknowledged by every worker).
    workers: Any = None
    #: "single" (one process), "master" (decides the fleet view for worker
    #: processes) or "worker" (serves traffic; probes, passive ejection and
    #: discovery are decided by the master: lbtwist.workers.fleetview).
    role: str = "single"
    #: ``fn(pool_name, wanted: {address: BackendConfig}, why)``: the service's
    #: backend diff (LbtwistService.sync_discovered), for the fleet view.
    sync_backends: Any = None
    #: A worker's master-to-local clock mapping (lbtwist.workers.fleetview).
    fleet_clocks: Any = None

    def clock_seconds(self) -> float:
        return self.reactor.seconds()
