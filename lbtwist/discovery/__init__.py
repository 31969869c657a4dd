"""Backend discovery: pools whose backends come and go without a reload.

One module per source (L{dns}, L{file}; plugins through the
``lbtwist_discovery`` hook), the guard every source goes through (L{base}),
and the glue applying the result with the reload's backend diff (L{apply}).
"""
from __future__ import annotations

from typing import Any

from lbtwist.discovery.apply import PoolDiscovery, Sync
from lbtwist.discovery.base import DEFAULT_MAX_SHRINK, Endpoint, SourceTracker, select_priority


def build_source(cfg: Any, reactor: Any, registry: Any, *, inotify: bool = True) -> Any:
    """The source for one ``pools[].discovery`` item (validated already)."""
    if cfg.dns is not None:
        from lbtwist.discovery.dns import DnsSource

        return DnsSource(cfg.dns, reactor)
    if cfg.file is not None:
        from lbtwist.discovery.file import FileSource

        return FileSource(cfg.file, reactor, poll_interval=cfg.poll_interval, inotify=inotify)
    if cfg.plugin is not None:
        return registry.make_discovery(cfg.plugin, cfg.options, reactor=reactor)
    raise ValueError("discovery: one of dns, file or plugin is required")


def pool_discovery(pcfg: Any, pool: Any, reactor: Any, registry: Any, sync: Sync) -> PoolDiscovery | None:
    """A PoolDiscovery for a pool with ``discovery:`` (None without)."""
    if not pcfg.discovery:
        return None
    sources = [build_source(c, reactor, registry) for c in pcfg.discovery]
    return PoolDiscovery(pool, pcfg.backends, sources, reactor, sync,
                         max_shrink=[c.max_shrink for c in pcfg.discovery])


__all__ = ["DEFAULT_MAX_SHRINK", "Endpoint", "PoolDiscovery", "SourceTracker", "build_source",
           "pool_discovery", "select_priority"]
