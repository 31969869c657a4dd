"""The plugin registry: built-ins and third-party packages contribute algorithms,
probe kinds and routing rules through the same pluggy hooks.

pluggy's own ``load_setuptools_entrypoints`` neither catches a failing plugin nor
reports duplicate names, so the loop here does both and names the plugin.
"""
from __future__ import annotations

import difflib
import importlib.metadata
from typing import Any, Callable, Iterable, Mapping

import attrs
import pluggy
from zope.interface.verify import verifyObject

from lbtwist import hookspecs
from lbtwist.interfaces import IBalancer

ENTRY_POINT_GROUP = "lbtwist"

#: Modules holding the built-in hook implementations, registered like plugins.
BUILTIN_PLUGINS = (
    "lbtwist.balancers.builtin",
    "lbtwist.routing",
    "lbtwist.health.builtin",
)


class PluginError(Exception):
    """A plugin failed to load or register; the message names it."""


@attrs.frozen
class BalancerSpec:
    """``factory(options, *, clock, rng) -> IBalancer``; raises ValueError with
    a message naming the bad option when ``options`` are wrong."""

    name: str
    factory: Callable[..., Any]
    description: str = ""


@attrs.frozen
class ProbeSpec:
    """``factory(options, *, reactor) -> IHealthProbe``; raises ValueError on bad options."""

    name: str
    factory: Callable[..., Any]
    description: str = ""


@attrs.frozen
class RuleSpec:
    """``factory(value) -> IRouteMatcher`` for a ``match: {name: value}`` key;
    raises ValueError on a bad value."""

    name: str
    factory: Callable[..., Any]
    description: str = ""


@attrs.frozen
class DiscoverySpec:
    """``factory(options, *, reactor) -> source`` for ``pools[].discovery:
    [{plugin: name, options: {...}}]``: an object with ``kind``, ``target``,
    ``start(tracker)`` and ``stop()`` (L{lbtwist.discovery.base.Source}) that
    reports ``tracker.update(endpoints)`` / ``tracker.failed(reason)``.
    Raises ValueError with a message naming a bad option."""

    name: str
    factory: Callable[..., Any]
    description: str = ""


def suggest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry:
    """Resolved plugin contributions. Built once at config load: the hot path
    holds the objects the factories made and never calls a hook."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lbtwist")
        self.pm.add_hookspecs(hookspecs)
        self.balancers: dict[str, BalancerSpec] = {}
        self.probes: dict[str, ProbeSpec] = {}
        self.rules: dict[str, RuleSpec] = {}
        self.discovery: dict[str, DiscoverySpec] = {}
        #: name -> plugin label, to say where a duplicate came from.
        self._origin: dict[tuple[str, str], str] = {}
        #: plugin label -> " (dist NAME VERSION)" for plugins found by entry point.
        self._dist: dict[str, str] = {}

    @classmethod
    def default(cls, entry_points: bool = True) -> "Registry":
        reg = cls()
        import importlib

        for modname in BUILTIN_PLUGINS:
            reg.register(importlib.import_module(modname), modname)
        if entry_points:
            reg.load_entry_points()
        reg.collect()
        return reg

    def register(self, plugin: object, label: str) -> None:
        try:
            self.pm.register(plugin, name=label)
        except Exception as e:  # pluggy raises ValueError on duplicates, PluginValidationError on bad impls
            raise PluginError(f"{self.describe(label)}: cannot register: {e}") from None

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in importlib.metadata.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            label = ep.name
            dist_text = f" (dist {dist.name} {dist.version})" if dist else ""
            where = f"plugin {label!r}{dist_text}"
            if self.pm.get_plugin(label) is not None or self.pm.is_blocked(label):
                raise PluginError(
                    f"{where}: a plugin named {label!r} is already registered"
                    f"{self._dist.get(label, '')}"
                )
            self._dist[label] = dist_text
            try:
                obj = ep.load()
            except Exception as e:
                raise PluginError(f"{where}: failed to import {ep.value!r}: {type(e).__name__}: {e}") from None
            self.register(obj, label)

    def describe(self, label: str) -> str:
        """``plugin 'x' (dist lbtwist-x 1.0)``: how errors name a plugin."""
        return f"plugin {label!r}{self._dist.get(label, '')}"

    def collect(self) -> None:
        """Call every implementation on its own so errors name the plugin.
        Registration order (built-ins first): a duplicate blames the newcomer."""
        specced = [n for n in vars(hookspecs) if n.startswith("lbtwist_")]
        for name, caller in vars(self.pm.hook).items():
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    raise PluginError(
                        f"{self.describe(impl.plugin_name)}: unknown hook {name!r}"
                        f"{suggest(name, specced)}; lbtwist hooks: {', '.join(specced)}"
                    )
        for table in (self.balancers, self.probes, self.rules, self.discovery):
            table.clear()
        self._origin.clear()
        for hook, table, spec_type, what in (
            (self.pm.hook.lbtwist_balancers, self.balancers, BalancerSpec, "algorithm"),
            (self.pm.hook.lbtwist_health_probes, self.probes, ProbeSpec, "health probe kind"),
            (self.pm.hook.lbtwist_routing_rules, self.rules, RuleSpec, "routing rule"),
            (self.pm.hook.lbtwist_discovery, self.discovery, DiscoverySpec, "discovery source"),
        ):
            for impl in hook.get_hookimpls():
                label = impl.plugin_name
                where = self.describe(label)
                try:
                    specs = list(impl.function() or ())
                except Exception as e:
                    raise PluginError(
                        f"{where}: {impl.function.__name__} raised {type(e).__name__}: {e}"
                    ) from None
                for spec in specs:
                    if not isinstance(spec, spec_type):
                        raise PluginError(
                            f"{where}: {impl.function.__name__} returned {spec!r}, "
                            f"expected {spec_type.__name__}"
                        )
                    if spec.name in table:
                        raise PluginError(
                            f"{where}: duplicate {what} {spec.name!r} "
                            f"(already from {self.describe(self._origin[(what, spec.name)])})"
                        )
                    table[spec.name] = spec
                    self._origin[(what, spec.name)] = label

    def origin(self, what: str, name: str) -> str:
        return self._origin[(what, name)]

    def make_balancer(self, name: str, options: Mapping[str, Any], *, clock, rng):
        """Build an algorithm; KeyError/ValueError messages are user-facing."""
        try:
            spec = self.balancers[name]
        except KeyError:
            raise KeyError(
                f"unknown algorithm {name!r}{suggest(name, self.balancers)}; "
                f"registered: {', '.join(sorted(self.balancers))}"
            ) from None
        balancer = spec.factory(dict(options), clock=clock, rng=rng)
        try:
            verifyObject(IBalancer, balancer)
        except Exception as e:  # zope's Invalid subclasses: a plugin bug, named as such
            raise PluginError(
                f"{self.describe(self.origin('algorithm', name))}: algorithm {name!r} "
                f"built {balancer!r}, which does not provide IBalancer: {e}"
            ) from None
        return balancer

    def make_discovery(self, name: str, options: Mapping[str, Any], *, reactor: Any) -> Any:
        """Build a plugin discovery source; KeyError/ValueError messages are user-facing."""
        try:
            spec = self.discovery[name]
        except KeyError:
            raise KeyError(
                f"unknown discovery source {name!r}{suggest(name, self.discovery)}; "
                f"registered: {', '.join(sorted(self.discovery)) or '(none)'}"
            ) from None
        return spec.factory(dict(options), reactor=reactor)
