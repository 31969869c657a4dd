"""The seams between lbtwist's parts. Several implementations exist (or will) for
each, so each is an interface; plugins ``@implementer`` them and the registry
checks them with ``verifyObject``."""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IBalancer(Interface):
    """A balancing algorithm: sans-IO, fed candidates, events and times."""

    def pick(candidates, ctx):
        """Choose one of ``candidates`` (a tuple of L{lbtwist.pool.Backend}) for
        the work described by ``ctx`` (L{lbtwist.pool.PickContext}).

        ``candidates`` is the same tuple object until the pool's membership or
        state changes, so algorithms may cache tables keyed on its identity.
        Must not return a backend in ``ctx.exclude`` unless every candidate is
        excluded (then return None). Returns None only when nothing fits."""

    def on_start(backend, now):
        """Work was sent to ``backend`` at ``now`` (seconds, the pool's clock)."""

    def on_finish(backend, now, latency, ok):
        """Work on ``backend`` ended at ``now`` after ``latency`` seconds;
        ``ok`` is False for a gateway failure or 5xx."""


class IPoolState(Interface):
    """What the data plane reads and reports about a pool. One interface, so a
    worker process can later read it over AMP from a master instead."""

    name = Attribute("The pool's name.")

    def select(ctx):
        """Pick a backend for ``ctx`` among the usable ones, or None."""

    def backends():
        """All backends, usable or not (a tuple)."""

    def get(address):
        """The backend with this ``host:port`` address, or None."""

    def on_start(backend):
        """Work began on ``backend``: counts it and tells the balancer."""

    def on_finish(backend, latency, ok):
        """Work on ``backend`` ended: counts it and tells the balancer."""


class IHealthProbe(Interface):
    """An active health check kind (tcp, http, plugin kinds)."""

    def probe(backend):
        """Check ``backend`` once. Returns a Deferred firing with a
        L{lbtwist.health.ProbeResult}; it must not errback."""


class IRouteMatcher(Interface):
    """One condition of a route's ``match:`` block."""

    def matches(request):
        """True if this L{lbtwist.routing.RequestHead} satisfies the condition.
        Called per request: keep it cheap (precompile in the factory)."""
