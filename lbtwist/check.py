"""``lbtwist check CONFIG``: validate a config exactly as ``twistd lbtwist``
does, then review it against the field guide's operational checklist.

Validation finds configs that cannot run; the review finds configs that run
but amplify failures: retries without brakes, health checks that flap or see
nothing, round robin in front of uneven work, sticky sessions cut on drain,
one balancer with nothing to fail over to. Each finding names the keys, says
the risk in one line and the fix in another. Exit status: 0 clean, 1 warnings,
2 errors.

Checks read optional parts of the model with ``getattr`` defaults, so the
review keeps working while the model grows.
"""
from __future__ import annotations

import os
import stat
import sys
from typing import Any, Iterator, TextIO

import attrs

from lbtwist.config.model import CircuitBreakerConfig
from lbtwist.config.problems import Positions, index_path, key_path, line_of, num

#: Algorithms that ignore how busy each backend is.
LOAD_BLIND = {"round_robin", "weighted_round_robin", "random"}
#: Algorithms that pin a key to a backend (stickiness by hashing).
HASHING = {"ring_hash", "maglev"}


@attrs.frozen
class Finding:
    id: str
    #: The first key is where the finding is placed (its line); the others are involved.
    keys: tuple[str, ...]
    risk: str
    fix: str
    severity: str = "warning"
    source: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.source or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        others = f" (with {', '.join(self.keys[1:])})" if len(self.keys) > 1 else ""
        return f"{where}: {self.severity}: {self.keys[0]}{others} [{self.id}]: {self.risk}\n    fix: {self.fix}"


def _g(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if obj is None:
            return default
        obj = getattr(obj, n, None)
    return default if obj is None else obj


def _pools(cfg: Any) -> Iterator[tuple[str, Any]]:
    for i, p in enumerate(_g(cfg, "pools", default=[])):
        yield index_path("pools", i), p


def _routes_by_pool(cfg: Any) -> dict[str, list[tuple[str, Any, Any, Any]]]:
    """pool name -> [(route path, route or None for a listener's default, listener path, listener)]."""
    out: dict[str, list] = {}
    for i, lst in enumerate(_g(cfg, "listeners", default=[])):
        lpath = index_path("listeners", i)
        for j, r in enumerate(_g(lst, "routes", default=[])):
            out.setdefault(r.pool, []).append((index_path(key_path(lpath, "routes"), j), r, lpath, lst))
        if _g(lst, "pool"):
            out.setdefault(lst.pool, []).append((lpath, None, lpath, lst))
    return out


# -- the checklist -------------------------------------------------------------


def review(cfg: Any) -> list[Finding]:
    """Every finding for ``cfg`` (without lines: see L{place})."""
    out: list[Finding] = []
    for fn in (_retries, _breakers, _active_health, _passive_health, _algorithms,
               _slow_start, _sticky, _drain_vs_timeouts, _failover, _admin):
        out.extend(fn(cfg))
    return out


def _retries(cfg: Any) -> Iterator[Finding]:
    routes = _routes_by_pool(cfg)
    seen: set[str] = set()
    for pool_name, entries in routes.items():
        for rpath, route, lpath, lst in entries:
            if route is None or _g(lst, "mode") != "http":
                continue
            retry = _g(route, "retry")
            attempts = _g(retry, "max_attempts", default=1)
            if retry is None or attempts <= 1 or not _g(retry, "retry_on", default=()):
                continue
            rp = key_path(rpath, "retry")
            pct = _g(retry, "budget_percent", default=10.0)
            if pct > 20 and rp not in seen:
                seen.add(rp)
                yield Finding(
                    "retry-budget", (key_path(rp, "budget_percent"), key_path(rp, "max_attempts")),
                    f"a {num(pct)}% retry budget lets retries add {num(pct)}% load to a fleet that is already failing: "
                    "that is how one slow node becomes a retry storm",
                    "keep budget_percent at 10 (or less); the budget is the brake that bounds the multiplier",
                )
            backoff = _g(retry, "backoff")
            if backoff is not None and _g(backoff, "max", default=0.0) <= 0:
                yield Finding(
                    "retry-backoff", (key_path(key_path(rp, "backoff"), "max"),),
                    "retries go out immediately and in lockstep, hammering a recovering backend in waves",
                    "set backoff: {base: 25ms, max: 250ms} (full jitter is applied)",
                )


def _breakers(cfg: Any) -> Iterator[Finding]:
    for ppath, pool in _pools(cfg):
        cb = _g(pool, "circuit_breaker")
        if cb is not None and _g(cb, "consecutive_failures", default=0) == 0:
            yield Finding(
                "no-breaker", (key_path(key_path(ppath, "circuit_breaker"), "consecutive_failures"),),
                "circuit breakers are off: a failing backend keeps receiving its share (and the retries) "
                "instead of getting room to recover",
                f"set circuit_breaker.consecutive_failures to {CircuitBreakerConfig().consecutive_failures} (the default)",
            )


def _active_health(cfg: Any) -> Iterator[Finding]:
    http_pools = _http_pools(cfg)
    for ppath, pool in _pools(cfg):
        hp = key_path(ppath, "health")
        active = _g(pool, "health", "active")
        if active is None:
            yield Finding(
                "no-active-health", (key_path(hp, "active"),),
                "no active health checks: a dead backend is found only by failing live requests, "
                "and a returning one only by luck",
                "add health.active: {kind: http, path: /your/real/endpoint, interval: 5s, timeout: 2s, "
                "unhealthy_threshold: 3, healthy_threshold: 2}",
            )
            continue
        ap = key_path(hp, "active")
        interval = _g(active, "interval", default=5.0)
        timeout = _g(active, "timeout", default=2.0)
        if 0 < interval and interval / 2 < timeout < interval:
            yield Finding(
                "probe-timeout", (key_path(ap, "timeout"), key_path(ap, "interval")),
                f"probe timeout {num(timeout)}s is not well under the interval {num(interval)}s: a hanging "
                "backend's probes nearly overlap and detection is slower than the interval suggests",
                f"keep the timeout under half the interval (e.g. interval 5s, timeout 2s)",
            )
        unhealthy = _g(active, "unhealthy_threshold", default=3)
        if unhealthy == 1 and interval <= 10:
            yield Finding(
                "flapping", (key_path(ap, "unhealthy_threshold"), key_path(ap, "interval")),
                f"one failed probe every {num(interval)}s takes a backend out: a single lost packet or GC "
                "pause flaps it (a sawtooth of healthy backends)",
                "set unhealthy_threshold: 3 (and healthy_threshold: 2)",
            )
        if _g(active, "healthy_threshold", default=2) == 1 and interval <= 10:
            yield Finding(
                "flapping", (key_path(ap, "healthy_threshold"),),
                "one passing probe brings a backend back: a half-dead node bounces in and out",
                "set healthy_threshold: 2",
            )
        if _g(pool, "name") in http_pools and _g(active, "kind") == "tcp":
            yield Finding(
                "shallow-probe", (key_path(ap, "kind"),),
                "a TCP connect probe on an HTTP pool passes while the application answers 500 "
                "(the lying health check)",
                "use kind: http with a path that exercises the real request path (not a static /healthz)",
            )


def _http_pools(cfg: Any) -> set[str]:
    return {
        name for name, entries in _routes_by_pool(cfg).items()
        if any(_g(lst, "mode") == "http" for _, _, _, lst in entries)
    }


def _passive_health(cfg: Any) -> Iterator[Finding]:
    for ppath, pool in _pools(cfg):
        passive = _g(pool, "health", "passive")
        if passive is None:
            continue
        pp = key_path(key_path(ppath, "health"), "passive")
        off = not _g(passive, "enabled", default=True)
        blind = (
            _g(passive, "consecutive_5xx", default=0) == 0
            and _g(passive, "consecutive_gateway_failures", default=0) == 0
            and not _g(passive, "latency", "enabled", default=False)
            and not _g(passive, "failure_rate", "enabled", default=False)
        )
        if off or blind:
            key = key_path(pp, "enabled") if off else key_path(pp, "consecutive_5xx")
            yield Finding(
                "no-passive-health", (key,),
                "no passive outlier detection: a backend that passes its probes but fails real "
                "requests (a gray failure) keeps its share of traffic",
                "enable health.passive (consecutive_5xx: 5, consecutive_gateway_failures: 5)",
            )


def _algorithms(cfg: Any) -> Iterator[Finding]:
    http_pools = _http_pools(cfg)
    for ppath, pool in _pools(cfg):
        algo = _g(pool, "algorithm", default="")
        if algo in LOAD_BLIND and len(_g(pool, "backends", default=[])) > 1:
            better = "p2c (or peak_ewma)" if _g(pool, "name") in http_pools else "least_connections (or p2c)"
            yield Finding(
                "load-blind", (key_path(ppath, "algorithm"),),
                f"{algo} ignores how busy each backend is: a slow backend keeps its full share and "
                "its queue grows until it times out",
                f"use algorithm: {better} unless every request costs the same",
            )


def _slow_start(cfg: Any) -> Iterator[Finding]:
    for ppath, pool in _pools(cfg):
        if _g(pool, "algorithm") == "least_connections" and not _g(pool, "slow_start", default=0.0):
            yield Finding(
                "no-slow-start", (key_path(ppath, "slow_start"), key_path(ppath, "algorithm")),
                "least_connections sends every new connection to a backend that just joined (it has "
                "none), flooding a cold process",
                "set slow_start: 30s so a joining backend ramps up",
            )


def _sticky(cfg: Any) -> Iterator[Finding]:
    pools = {p.name: (pp, p) for pp, p in _pools(cfg)}
    for pool_name, entries in _routes_by_pool(cfg).items():
        if pool_name not in pools:
            continue
        ppath, pool = pools[pool_name]
        why = None
        for rpath, route, lpath, lst in entries:
            cookie = _g(lst, "http", "sticky_cookie")
            if cookie and _g(lst, "mode") == "http":
                why = key_path(key_path(lpath, "http"), "sticky_cookie")
                break
            # a route without its own hash_key hashes on its listener's
            own = _g(route, "hash_key")
            hk, hpath = (own, rpath) if own is not None else (_g(lst, "hash_key", default="source"), lpath)
            if _g(pool, "algorithm") in HASHING and _hash_kind(hk) != "source":
                why = key_path(hpath, "hash_key")
                break
        if why is None:
            continue
        drain = _g(pool, "drain_timeout", default=30.0)
        if drain < 30:
            yield Finding(
                "sticky-drain", (key_path(ppath, "drain_timeout"), why),
                f"sessions are pinned to backends but a drain lasts only {num(drain)}s: pinned users lose "
                "their session state when a backend is drained for a deploy",
                "set drain_timeout to 30-60s (better: keep session state outside the backends)",
            )


def _hash_kind(text: str) -> str:
    """``source``, ``header`` or ``cookie``, parsed as the runtime does."""
    from lbtwist.config.names import parse_hash_key

    try:
        return parse_hash_key(text)[0]
    except ValueError:  # refused by validation before the review runs
        return "source"


def _drain_vs_timeouts(cfg: Any) -> Iterator[Finding]:
    pools = {p.name: (pp, p) for pp, p in _pools(cfg)}
    for pool_name, entries in _routes_by_pool(cfg).items():
        if pool_name not in pools:
            continue
        ppath, pool = pools[pool_name]
        longest = None
        for rpath, route, lpath, lst in entries:
            if _g(lst, "mode") != "http":
                continue
            t = _g(route, "timeout")
            tpath = key_path(rpath, "timeout")
            if t is None:
                t = _g(lst, "http", "request_timeout", default=15.0)
                tpath = key_path(key_path(lpath, "http"), "request_timeout")
            if longest is None or t > longest[0]:
                longest = (t, tpath)
        drain = _g(pool, "drain_timeout", default=30.0)
        if longest is not None and 0 < drain < longest[0]:
            yield Finding(
                "drain-shorter-than-requests", (key_path(ppath, "drain_timeout"), longest[1]),
                f"drain_timeout {num(drain)}s is shorter than a request may take ({num(longest[0])}s): "
                "draining a backend for a deploy cuts requests that would have finished",
                f"set drain_timeout to at least {num(longest[0])}s, or shorten the request timeout",
            )


def _failover(cfg: Any) -> Iterator[Finding]:
    dep = _g(cfg, "deployment")
    instances = _g(dep, "instances", default=1)
    failover = _g(dep, "failover")
    if dep is None or instances < 2 or not failover:
        key = "deployment" if dep is None else (
            "deployment.instances" if instances < 2 else "deployment.failover")
        yield Finding(
            "single-instance", (key,),
            "one balancer in the critical path: when it dies, every backend is unreachable however healthy",
            "run at least two instances with health-checked failover (keepalived VIP, anycast or DNS) and "
            "declare it: deployment: {instances: 2, failover: \"keepalived VIP\"} (docs/ha.md: a tested keepalived pair)",
        )


def _admin(cfg: Any) -> Iterator[Finding]:
    admin = _g(cfg, "admin")
    if admin is None:
        return
    from lbtwist.admin.auth import admin_config_problems

    for key, msg in admin_config_problems(admin):
        yield Finding("admin-exposed", (key,), msg, "bind admin to 127.0.0.1, or set admin.token_file",
                      severity="error")
    if _g(admin, "token"):
        yield Finding(
            "admin-token-inline", ("admin.token",),
            "the admin token is written in the config, which is copied, diffed and shown in reviews",
            "put it in a file readable only by lbtwist and set admin.token_file",
        )
    path = _g(admin, "token_file")
    if path:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return  # admin_config_problems reported it
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            yield Finding(
                "admin-token-readable", ("admin.token_file",),
                f"{path} is readable by other users, who can then drain every backend",
                f"chmod 600 {path}",
            )


# -- running it ------------------------------------------------------------------


def place(findings: list[Finding], positions: Positions, source: str | None) -> list[Finding]:
    """Give findings their file and line; sorted by line."""
    placed = [attrs.evolve(f, source=source, line=line_of(positions, f.keys[0])) for f in findings]
    return sorted(placed, key=lambda f: (f.severity != "error", f.line is None, f.line or 0))


def run(path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Validate and review ``path``; print; return the exit status."""
    from lbtwist.config import ConfigError, load_config
    from lbtwist.registry import PluginError, Registry

    try:
        loaded = load_config(path, Registry.default())
    except PluginError as e:
        print(f"lbtwist: {e}", file=err)
        return 2
    except ConfigError as e:
        print(str(e), file=err)
        n = len(e.errors)
        print(f"{path}: {n} error{'s' * (n != 1)}: twistd lbtwist would refuse this config", file=err)
        return 2
    findings = place(review(loaded.config), loaded.positions, getattr(loaded, "source", path))
    for w in loaded.warnings:
        print(str(w), file=out)
    for f in findings:
        print(str(f), file=out)
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(loaded.warnings) + len(findings) - errors
    if errors:
        print(f"{path}: {errors} error(s), {warnings} warning(s)", file=out)
        return 2
    if warnings:
        print(f"{path}: valid, {warnings} warning(s) from the operational review", file=out)
        return 1
    print(f"{path}: ok (valid, no findings)", file=out)
    return 0
