"""Plugin hooks. Each returns specs; the registry calls every implementation on
its own so a failing or duplicate plugin can be named in the error."""
from __future__ import annotations

from typing import Iterable

import pluggy

hookspec = pluggy.HookspecMarker("lbtwist")


@hookspec
def lbtwist_balancers() -> Iterable["lbtwist.registry.BalancerSpec"]:  # type: ignore[name-defined]
    """Balancing algorithms this plugin offers."""


@hookspec
def lbtwist_health_probes() -> Iterable["lbtwist.registry.ProbeSpec"]:  # type: ignore[name-defined]
    """Active health-probe kinds this plugin offers."""


@hookspec
def lbtwist_routing_rules() -> Iterable["lbtwist.registry.RuleSpec"]:  # type: ignore[name-defined]
    """Route match kinds (keys under a route's ``match:``) this plugin offers."""


@hookspec
def lbtwist_discovery() -> Iterable["lbtwist.registry.DiscoverySpec"]:  # type: ignore[name-defined]
    """Backend discovery sources (``pools[].discovery: [{plugin: NAME}]``) this
    plugin offers: Consul, Kubernetes EndpointSlices, a cloud API..."""
