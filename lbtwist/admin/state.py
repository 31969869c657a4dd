"""The admin API's JSON views of pools, backends, listeners and the config,
built from the runtime, the live figures and the parts' state providers.

Providers (``runtime.backend_state`` / ``pool_state`` / ``listener_state``)
add a section each under their own name; one that raises shows an ``error``
instead of breaking the page an operator needs most when things go wrong.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import attrs
from twisted.logger import Logger

from lbtwist.admin.live import Live
from lbtwist.admin.window import spread
from lbtwist.pool import Backend, Health, Pool

log = Logger(namespace="lbtwist.admin.state")

#: Seconds the rate, error-rate and percentile figures cover.
WINDOW = 10
#: Keys of the JSON config view whose values are secrets.
SECRET_KEYS = frozenset({"token", "password", "secret", "key_passphrase"})
#: A password inside a URL (``redis://user:PASSWORD@host``).
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:)[^@/]*@")


def _r(x: float | None, nd: int = 3) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(x, nd)


#: Providers whose failure was logged and that have not succeeded since (the
#: dashboard polls every second: one traceback per outage, not per poll).
_failing: set[str] = set()


def call_provider(name: str, fn: Callable[..., Any], *args: Any) -> Mapping | None:
    try:
        out = fn(*args)
    except Exception as e:  # a broken part must not take the admin API down with it
        if name not in _failing:
            _failing.add(name)
            log.failure("state provider {name} failed (logged once until it recovers)", name=name)
        return {"error": f"{type(e).__name__}: {e}"}
    _failing.discard(name)
    return out


def provided(providers: Mapping[str, Callable[..., Any]], *args: Any) -> dict[str, Mapping]:
    out = {}
    for name, fn in list(providers.items()):
        v = call_provider(name, fn, *args)
        if v is not None:
            out[name] = v
    return out


@attrs.define
class StateView:
    runtime: Any
    live: Live
    clock: Any
    started: float = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock.seconds()

    # -- backends -------------------------------------------------------------

    def backend(self, pool: Pool, b: Backend, now: float, history: bool = True,
                in_rotation: frozenset | set | None = None) -> dict:
        bl = self.live.backend(pool.name, b.address)
        ramp = b.ramp(now)
        ejected = b.ejected_until is not None and b.ejected_until > now
        if in_rotation is None:
            in_rotation = set(pool.candidates(now))
        out: dict[str, Any] = {
            "address": b.address,
            "name": b.name or b.address,
            "pool": pool.name,
            "state": b.state(now),
            "health": b.health.value,
            "enabled": b.enabled,
            "draining": b.draining,
            "ejected": ejected,
            "ejected_remaining_s": _r(b.ejected_until - now) if ejected else None,
            "in_rotation": b in in_rotation,
            "weight": b.weight,
            "effective_weight": _r(b.weight * ramp),
            "slow_start": {
                "active": ramp < 1.0,
                "progress": _r(ramp),
                "remaining_s": _r(max(0.0, b.slow_start - (now - b.joined_at))) if ramp < 1.0 else 0.0,
            },
            "active": b.active,
            "total": b.total,
            "ejections": bl.ejections,
            "outcomes": dict(bl.outcomes),
            "responses": dict(bl.responses),
            "last_change": getattr(b, "reason", "") or None,
            "last_change_ago_s": _r(now - b.changed_at) if getattr(b, "changed_at", None) is not None else None,
            "stats": bl.meter.window(now, WINDOW).as_json(),
        }
        if history:
            out["history"] = bl.meter.series(now)
        for name, section in provided(self.runtime.backend_state, pool, b).items():
            out.setdefault(name, section)
        return out

    # -- pools ----------------------------------------------------------------

    def pool(self, pool: Pool, now: float, history: bool = True) -> dict:
        cfg = self.runtime.pool_configs.get(pool.name)
        backends = pool.backends()
        rotation = set(pool.candidates(now))
        views = [self.backend(pool, b, now, history, rotation) for b in backends]
        # per unit of effective weight: a backend in slow start is meant to take less
        loads = [
            v["stats"]["rps"] / b.effective_weight(now)
            for v, b in zip(views, backends)
            if v["in_rotation"] and b.effective_weight(now) > 0
        ]
        pl = self.live.pool(pool.name)
        out: dict[str, Any] = {
            "name": pool.name,
            "algorithm": getattr(cfg, "algorithm", None),
            "panic": pool.panic,
            "backends_total": len(backends),
            "backends_healthy": sum(1 for b in backends if b.health is Health.HEALTHY),
            "backends_in_rotation": len(rotation),
            "load_spread": _r(spread(loads)),
            "retries": pl.retries,
            "responses": dict(pl.responses),
            "stats": pl.meter.window(now, WINDOW).as_json(),
            "backends": views,
        }
        if history:
            out["history"] = pl.meter.series(now)
        for name, section in provided(self.runtime.pool_state, pool).items():
            out.setdefault(name, section)
        return out

    # -- listeners ------------------------------------------------------------

    def listeners(self, now: float) -> list[dict]:
        out = []
        cfg = self.runtime.config
        names = [lc.name for lc in getattr(cfg, "listeners", []) or []]
        for extra in self.live.listeners:
            if extra not in names:
                names.append(extra)
        by_name = {lc.name: lc for lc in getattr(cfg, "listeners", []) or []}
        for name in names:
            lc = by_name.get(name)
            ll = self.live.listener(name)
            v: dict[str, Any] = {
                "name": name,
                "mode": getattr(lc, "mode", None),
                "bind": getattr(lc, "bind", None),
                "pool": getattr(lc, "pool", None),
                "finished": dict(ll.by_kind),
                "bytes_in": ll.bytes_in,
                "bytes_out": ll.bytes_out,
                "rejected": ll.rejected,
                "responses": dict(ll.responses),
                "stats": ll.meter.window(now, WINDOW).as_json(),
            }
            for pname, section in provided(self.runtime.listener_state, name).items():
                v.setdefault(pname, section)
            out.append(v)
        return out

    # -- the whole picture ----------------------------------------------------

    def overview(self, history: bool = True) -> dict:
        self.live.sync()
        now = self.clock.seconds()
        return {
            "now": now,
            "uptime_s": _r(now - self.started),
            "window_s": WINDOW,
            "pools": [self.pool(p, now, history) for p in self.runtime.pools.values()],
            "listeners": self.listeners(now),
            "fleet": fleet_summary(self.runtime),
        }


def fleet_summary(runtime: Any) -> dict | None:
    """The fleet's mode in the overview (``GET /api/fleet`` has the details)."""
    fleet = getattr(runtime, "fleet", None)
    if fleet is None:
        return None
    st = fleet.link.status()
    return {k: st[k] for k in ("redis", "name", "mode", "redis_up", "since_s", "last_error")}


def config_json(config: Any) -> Any:
    """The running config as plain JSON, secrets replaced by ``"***"``."""

    def walk(v: Any) -> Any:
        if attrs.has(type(v)):
            return {
                f.name: ("***" if f.name in SECRET_KEYS and getattr(v, f.name) is not None else walk(getattr(v, f.name)))
                for f in attrs.fields(type(v))
            }
        if isinstance(v, dict):
            return {str(k): ("***" if k in SECRET_KEYS and x is not None else walk(x)) for k, x in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return [walk(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, str):
            return _URL_PASSWORD.sub(r"\1***@", v)
        if v is None or isinstance(v, (int, float, bool)):
            return v
        return str(v)

    return walk(config)
