"""Where the data planes find a pool's resilience objects, and how their state
reaches the admin API and /metrics.

One L{RuntimeResilience} per runtime (``runtime.resilience``). It builds a
pool's L{PoolResilience} on first use and keeps it across reloads as long as
the pool's ``circuit_breaker``, ``limits`` and ``retry_budget`` keys are
unchanged (breaker state, slots held and budget history survive a reload
that did not touch them). It also registers the state providers once.
"""
from __future__ import annotations

from typing import Any

from lbtwist.resilience.build import PoolResilience, RouteResilience, settings_of
from lbtwist.resilience.limits import Limit


def _keys(pcfg: Any) -> tuple:
    return (pcfg.circuit_breaker, pcfg.limits, pcfg.retry_budget)


class RuntimeResilience:
    """Per-pool resilience of one runtime, plus the routes that report retries."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self._pools: dict[str, tuple[tuple, PoolResilience]] = {}
        #: listener name -> {route name: RouteResilience}, for the listener provider.
        self.routes: dict[str, dict[str, RouteResilience]] = {}

    def pool(self, name: str) -> PoolResilience | None:
        """The pool's resilience (None when the pool has no config)."""
        pcfg = self.runtime.pool_configs.get(name)
        if pcfg is None:
            return None
        got = self._pools.get(name)
        if got is not None:
            old_keys, pres = got
            # the per-request case, without building a key tuple: same config objects
            if (old_keys[0] is pcfg.circuit_breaker and old_keys[1] is pcfg.limits
                    and old_keys[2] is pcfg.retry_budget):
                return pres
        keys = _keys(pcfg)
        if got is not None:
            if old_keys == keys:
                self._pools[name] = (keys, pres)
                return pres
            if old_keys[1] != keys[1] and old_keys[0] == keys[0] and old_keys[2] == keys[2]:
                # only the limits changed: keep the slots held, new maxima
                from lbtwist.resilience.limits import LimitSettings

                pres.limits.reconfigure(LimitSettings.from_config(pcfg.limits))
                self._pools[name] = (keys, pres)
                return pres
        pres = PoolResilience.from_config(pcfg)
        self._pools[name] = (keys, pres)
        return pres

    # -- routes ---------------------------------------------------------------------------

    def route(self, listener: str, name: str, rcfg: Any | None, default_timeout: float | None) -> RouteResilience:
        """Route ``name`` of ``listener``: the running one when its settings
        are unchanged (retry budget history and rate-limit buckets carry over
        a reload, so reloading does not lift limits), else a new one. Changes
        nothing: the listener publishes its routes with L{set_routes}."""
        old = self.routes.get(listener, {}).get(name)
        if old is not None and old.settings == settings_of(rcfg, default_timeout):
            return old
        return RouteResilience.from_config(rcfg, default_timeout=default_timeout, name=name,
                                           fleet=self.runtime.fleet, listener=listener)

    def set_routes(self, listener: str, routes: dict[str, RouteResilience]) -> None:
        """The routes ``listener`` now serves with."""
        self.routes[listener] = dict(routes)

    def forget_listener(self, listener: str) -> None:
        """A reload removed ``listener``: a later one of that name starts afresh."""
        self.routes.pop(listener, None)

    def known(self) -> dict[str, PoolResilience]:
        return {n: p for n, (_, p) in self._pools.items()}

    # -- state providers ------------------------------------------------------------------

    def backend_state(self, pool: Any, backend: Any) -> dict | None:
        got = self._pools.get(pool.name)
        if got is None:
            return None
        breakers = got[1].breakers
        if not breakers.enabled and backend not in breakers._breakers:
            return None
        now = self.runtime.reactor.seconds()
        state = breakers.state(backend, now)
        b = breakers._breakers.get(backend)
        held = max(0.0, b.held_until - now) if b is not None else 0.0
        return {
            "state": state.value if hasattr(state, "value") else str(state),
            "failures": b.failures if b is not None else 0,
            "opened_total": b.opened_total if b is not None else 0,
            "held_seconds": round(held, 3),
        }

    def pool_state(self, pool: Any) -> dict | None:
        got = self._pools.get(pool.name)
        if got is None:
            return None
        pres = got[1]
        lim = pres.limits
        out: dict[str, Any] = {
            "breakers_opened_total": pres.breakers.opened_total,
            "retry_after_holds_total": pres.breakers.holds_total,
        }
        for kind in Limit:
            out[f"{kind.value}_in_use"] = lim.in_use(kind)
            out[f"{kind.value}_refused_total"] = lim.refused[kind]
        if pres.budget is not None:
            snap = pres.budget.snapshot(self.runtime.reactor.seconds())
            out["budget_requests"] = snap.requests
            out["budget_retries"] = snap.retries
            out["budget_allowance"] = round(snap.allowance, 3)
            out["budget_exhausted_total"] = pres.budget.exhausted
        return out

    def listener_state(self, listener: str) -> dict | None:
        """The ``retries`` section: listener-wide sums, and one entry per route
        under ``by_route`` keyed by the route's label (its name, else its pool)."""
        routes = self.routes.get(listener)
        if not routes:
            return None
        now = self.runtime.reactor.seconds()
        by_route: dict[str, Any] = {}
        retries = exhausted = 0
        for name, rr in routes.items():
            b = rr.budget
            entry: dict[str, Any] = {
                "requests_total": b.requests_total,
                "retries_total": b.retries_total,
                "budget_exhausted_total": b.exhausted,
                "budget_allowance": round(b.allowance(now), 3),
            }
            for reason, n in rr.stats.decisions.items():
                entry[f"decision_{reason.replace('-', '_')}_total"] = n
            if rr.rate_limiter is not None:
                entry["rate_limited_total"] = rr.rate_limiter.limited
            retries += b.retries_total
            exhausted += b.exhausted
            by_route[name] = entry
        return {
            "retries_all_routes_total": retries,
            "budget_exhausted_all_routes_total": exhausted,
            "by_route": by_route,
        }


def runtime_resilience(runtime: Any) -> RuntimeResilience:
    """The runtime's L{RuntimeResilience}, created (and its providers
    registered) on first use."""
    rr = getattr(runtime, "resilience", None)
    if rr is None:
        rr = RuntimeResilience(runtime)
        runtime.resilience = rr
        for attr, fn in (("backend_state", rr.backend_state), ("pool_state", rr.pool_state),
                         ("listener_state", rr.listener_state)):
            table = getattr(runtime, attr, None)
            if table is not None:
                table.setdefault("breaker" if attr == "backend_state" else
                                 "resilience" if attr == "pool_state" else "retries", fn)
    return rr
