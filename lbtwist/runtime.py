"""What a running balancer's parts share: the reactor, the pools, the registry.
Passed in everywhere instead of module-level globals."""
from __future__ import annotations

from typing import Any

import attrs

from lbtwist.config.model import Config, PoolConfig
from lbtwist.pool import Pool
from lbtwist.registry import Registry


@attrs.define
class Runtime:
    #: Provides IReactorTime, IReactorTCP, IReactorUDP (a MemoryReactorClock in tests).
    reactor: Any
    registry: Registry
    config: Config
    pools: dict[str, Pool] = attrs.Factory(dict)
    pool_configs: dict[str, PoolConfig] = attrs.Factory(dict)

    def clock_seconds(self) -> float:
        return self.reactor.seconds()
