"""Cross-field checks on a loaded L{Config}, run before anything starts.

The loader knows types; these checks know meaning: names that must be unique,
references that must resolve, binds that must parse and not collide, plugin
names and options the registry must accept. Each check is a small function
taking a L{CheckContext} and yielding L{Problem}s (errors or warnings);
register a new one with ``@check`` (later features add theirs the same way).
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterable, Iterator

import attrs
from twisted.internet.task import Clock

from lbtwist.config.binds import BindKey, bind_key, check_stream_bind, parse_udp_bind
from lbtwist.config.model import Config
from lbtwist.config.names import HASH_KEY_SYNTAX, TOKEN as _TOKEN, parse_hash_key
from lbtwist.config.problems import Positions, Problem, index_path, is_under, key_path, line_of, num
from lbtwist.pool import MAX_WEIGHT, split_address
from lbtwist.registry import Registry, suggest

__all__ = ["CHECKS", "HASH_KEY_SYNTAX", "CheckContext", "check", "parse_hash_key", "parse_udp_bind", "validate"]


@attrs.define
class CheckContext:
    """What a check reads, plus helpers that place a problem on its line."""

    config: Config
    positions: Positions
    #: None when the plugins could not be loaded: registry checks are skipped.
    registry: Registry | None
    source: str | None = None
    #: Paths whose value the loader rejected (and replaced by a stand-in).
    rejected: tuple[str, ...] = ()

    def error(self, path: str, message: str) -> Problem:
        return Problem("error", path, message, self.source, line_of(self.positions, path))

    def warning(self, path: str, message: str) -> Problem:
        return Problem("warning", path, message, self.source, line_of(self.positions, path))

    def given(self, path: str) -> bool:
        """Was ``path`` written in the file (rather than left to its default)?"""
        return path in self.positions

    def was_rejected(self, path: str) -> bool:
        """Did the loader reject the value at ``path`` or an enclosing one? Its
        problem is already reported; a check should not draw conclusions from it."""
        return any(is_under(path, b) for b in self.rejected)

    def where(self, path: str) -> str:
        line = line_of(self.positions, path)
        return f"{path}, line {line}" if line is not None else path


Check = Callable[[CheckContext], Iterable[Problem]]

#: Run in order by L{validate}.
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    """Register ``fn`` as a validation check."""
    CHECKS.append(fn)
    return fn


def validate(
    config: Config,
    positions: Positions,
    registry: Registry | None,
    *,
    source: str | None = None,
    checks: Iterable[Check] | None = None,
    rejected: Iterable[str] = (),
) -> list[Problem]:
    """Every problem the checks find, errors and warnings. Problems at or
    under a ``rejected`` path (already reported by the loader) are dropped."""
    ctx = CheckContext(config, positions, registry, source, tuple(rejected))
    problems: list[Problem] = []
    for fn in CHECKS if checks is None else checks:
        problems.extend(
            p for p in fn(ctx) if not any(is_under(p.path, b) for b in ctx.rejected)
        )
    return problems


def _listeners(cfg: Config) -> Iterator[tuple[str, Any]]:
    for i, lst in enumerate(cfg.listeners):
        yield index_path("listeners", i), lst


def _pools(cfg: Config) -> Iterator[tuple[str, Any]]:
    for i, pool in enumerate(cfg.pools):
        yield index_path("pools", i), pool


def _routes(cfg: Config) -> Iterator[tuple[str, Any, Any]]:
    for lpath, lst in _listeners(cfg):
        for j, route in enumerate(lst.routes):
            yield index_path(key_path(lpath, "routes"), j), route, lst


# -- names and references -------------------------------------------------------


def _duplicates(ctx: CheckContext, items: Iterable[tuple[str, str]], what: str) -> Iterator[Problem]:
    first: dict[str, str] = {}
    for path, name in items:
        if name in first:
            yield ctx.error(path, f"duplicate {what} {name!r} (first at {ctx.where(first[name])})")
        else:
            first[name] = path


@check
def unique_names(ctx: CheckContext) -> Iterator[Problem]:
    yield from _duplicates(ctx, ((key_path(p, "name"), l.name) for p, l in _listeners(ctx.config)), "listener name")
    yield from _duplicates(ctx, ((key_path(p, "name"), pl.name) for p, pl in _pools(ctx.config)), "pool name")


@check
def route_names(ctx: CheckContext) -> Iterator[Problem]:
    """Route names label logs and metrics: unique within their listener, not empty, and not
    the label of the listener's own default route."""
    from lbtwist.routing import DEFAULT_ROUTE

    for lpath, lst in _listeners(ctx.config):
        named = []
        for j, route in enumerate(lst.routes):
            name = getattr(route, "name", None)
            if name is None:
                continue
            npath = key_path(index_path(key_path(lpath, "routes"), j), "name")
            if not name.strip():
                yield ctx.error(npath, "a route name must not be empty (omit it to label the route by its pool)")
            elif name == DEFAULT_ROUTE:
                yield ctx.error(npath, f"{DEFAULT_ROUTE!r} is reserved for requests that match no route; pick another name")
            else:
                named.append((npath, name))
        yield from _duplicates(ctx, named, "route name")


@check
def pool_references(ctx: CheckContext) -> Iterator[Problem]:
    """Listeners and routes name pools that exist; L4 listeners name one at all."""
    pools = [p.name for p in ctx.config.pools]
    # a pool list or name the loader rejected: "unknown pool" would be a guess
    unsure = ctx.was_rejected("pools") or any(
        ctx.was_rejected(key_path(p, "name")) for p, _ in _pools(ctx.config)
    )
    used: set[str] = set()
    dangling = False

    def ref(path: str, name: str) -> Iterator[Problem]:
        nonlocal dangling
        used.add(name)
        if name not in pools:
            dangling = True
            if unsure:
                return
            hint = suggest(name, pools) or (
                f"; defined pools: {', '.join(pools)}" if pools else "; no pools are defined"
            )
            yield ctx.error(path, f"unknown pool {name!r}{hint}")

    for lpath, lst in _listeners(ctx.config):
        if ctx.was_rejected(key_path(lpath, "pool")):
            dangling = True
        elif lst.pool is not None:
            yield from ref(key_path(lpath, "pool"), lst.pool)
        elif lst.mode != "http":
            if lst.tls_passthrough is None:  # passthrough may route every name itself
                yield ctx.error(key_path(lpath, "pool"), f"a {lst.mode} listener needs a pool")
        elif not lst.routes:
            yield ctx.error(key_path(lpath, "pool"), "an http listener needs a pool or routes")
        elif not any(not r.match for r in lst.routes):
            yield ctx.warning(
                key_path(lpath, "pool"),
                "no default pool: requests that match no route get an error response",
            )
        tp = lst.tls_passthrough
        if tp is not None:
            tpath = key_path(lpath, "tls_passthrough")
            for server_name, pool_name in tp.routes.items():
                yield from ref(key_path(key_path(tpath, "routes"), server_name), pool_name)
            if tp.default is not None:
                yield from ref(key_path(tpath, "default"), tp.default)
    for rpath, route, _ in _routes(ctx.config):
        if ctx.was_rejected(key_path(rpath, "pool")):
            dangling = True
        else:
            yield from ref(key_path(rpath, "pool"), route.pool)
    for ppath, pool in _pools(ctx.config):
        if pool.name not in used and not dangling:  # a typo'd reference explains it already
            yield ctx.warning(key_path(ppath, "name"), f"pool {pool.name!r} is not used by any listener or route")


@check
def listener_modes(ctx: CheckContext) -> Iterator[Problem]:
    """Settings that only mean something in another mode are mistakes, not no-ops."""
    for lpath, lst in _listeners(ctx.config):
        if lst.mode != "http":
            if lst.routes:
                yield ctx.error(key_path(lpath, "routes"), f"routes need mode: http (this listener is {lst.mode})")
            if ctx.given(key_path(lpath, "http")):
                yield ctx.warning(key_path(lpath, "http"), f"ignored: http settings apply to mode: http, not {lst.mode}")
        if lst.mode != "tcp":
            # udp refuses to start with it; http would parse a PROXY line as a request
            pp, ppath = lst.proxy_protocol, key_path(lpath, "proxy_protocol")
            for key, on in (("accept", pp.accept), ("send", pp.send != "none")):
                if on:
                    yield ctx.error(key_path(ppath, key), f"PROXY protocol needs mode: tcp (this listener is {lst.mode})")
        if lst.mode == "udp" and lst.idle_timeout is not None and lst.idle_timeout <= 0:
            yield ctx.error(
                key_path(lpath, "idle_timeout"),
                "must be above 0 for mode udp: a UDP flow has no close, only its idle timeout ends it",
            )


@check
def listener_http2(ctx: CheckContext) -> Iterator[Problem]:
    """``http2`` and ``http.h2`` limits (the values the runtime accepts, one definition)."""
    from lbtwist.l7.h2.settings import problems

    for lpath, lst in _listeners(ctx.config):
        hp = key_path(lpath, "http2")
        if lst.http2 and lst.mode != "http":
            yield ctx.error(hp, f"HTTP/2 needs mode: http (this listener is {lst.mode})")
        elif lst.http2 and lst.tls is not None:
            yield ctx.warning(hp, "ignored with tls: HTTP/2 is negotiated by ALPN (tls.alpn, h2 by default)")
        h2path = key_path(key_path(lpath, "http"), "h2")
        for key, msg in problems(lst.http.h2):
            yield ctx.error(key_path(h2path, key), msg)


@check
def pool_h2_streams(ctx: CheckContext) -> Iterator[Problem]:
    """``connection_pool.max_streams`` of HTTP/2 pools."""
    for ppath, pool in _pools(ctx.config):
        n = pool.connection_pool.max_streams
        if n < 1:
            yield ctx.error(key_path(key_path(ppath, "connection_pool"), "max_streams"), f"must be at least 1 (got {n})")


@check
def listener_connection_caps(ctx: CheckContext) -> Iterator[Problem]:
    """``backlog`` and ``max_connections_per_client`` within sense."""
    from lbtwist.config.binds import split_description

    for lpath, lst in _listeners(ctx.config):
        if lst.backlog is not None:
            bp = key_path(lpath, "backlog")
            if lst.backlog < 1:
                yield ctx.error(bp, f"must be at least 1 (got {lst.backlog})")
            elif lst.mode == "udp":
                yield ctx.warning(bp, "ignored: a udp listener has no listen queue")
            elif "backlog" in split_description(lst.bind)[2]:
                yield ctx.error(bp, f"set the listen queue in one place: bind {lst.bind!r} has its own backlog=")
        per = lst.max_connections_per_client
        pp = key_path(lpath, "max_connections_per_client")
        if per < 0:
            yield ctx.error(pp, f"must be 0 (no cap) or above (got {per})")
        elif per and lst.mode == "udp":
            yield ctx.warning(pp, "ignored: udp flows are not capped per client")
        elif per > lst.max_connections:
            yield ctx.warning(pp, f"{per} is above max_connections ({lst.max_connections}): it never applies")


# -- backends -----------------------------------------------------------------


@check
def backends(ctx: CheckContext) -> Iterator[Problem]:
    for ppath, pool in _pools(ctx.config):
        bpath = key_path(ppath, "backends")
        if not pool.backends:
            if not ctx.was_rejected(ppath) and not pool.discovery:
                yield ctx.warning(bpath, f"pool {pool.name!r} has no backends: its traffic fails until some are added")
            continue
        first: dict[tuple[str, int], str] = {}
        for i, b in enumerate(pool.backends):
            apath = key_path(index_path(bpath, i), "address")
            try:
                host, port = split_address(b.address)
            except ValueError as e:
                yield ctx.error(apath, str(e))
                continue
            k = (host.lower(), port)
            if k in first:
                yield ctx.error(apath, f"duplicate backend {b.address!r} in pool {pool.name!r} (first at {ctx.where(first[k])})")
            else:
                first[k] = apath
        for i, b in enumerate(pool.backends):
            if b.weight > MAX_WEIGHT:  # not finite: non_negative says so
                yield ctx.error(
                    key_path(index_path(bpath, i), "weight"),
                    f"must be between 0 and {num(MAX_WEIGHT)}, got {num(b.weight)}",
                )
        if all(b.weight == 0 for b in pool.backends):
            yield ctx.warning(bpath, f"every backend of pool {pool.name!r} has weight 0: it takes no new work")


@check
def non_negative(ctx: CheckContext) -> Iterator[Problem]:
    """No count, weight, size or time in the model is meaningful below zero
    (a field that is may opt out with ``metadata={"signed": True}``), nor
    infinite or NaN (YAML's ``.inf`` and ``.nan`` are floats)."""

    def walk(obj: Any, path: str) -> Iterator[Problem]:
        for f in attrs.fields(type(obj)):
            value = getattr(obj, f.name)
            p = key_path(path, f.name)
            if attrs.has(type(value)):
                yield from walk(value, p)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if attrs.has(type(item)):
                        yield from walk(item, index_path(p, i))
            elif isinstance(value, float) and not math.isfinite(value):  # YAML .inf, .nan
                yield ctx.error(p, f"must be a finite number (got {num(value)})")
            elif (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value < 0
                and not f.metadata.get("signed")
            ):
                yield ctx.error(p, f"must not be negative (got {num(value)})")

    yield from walk(ctx.config, "")


# -- binds --------------------------------------------------------------------


def _stream_binds(cfg: Config) -> Iterator[tuple[str, str]]:
    if cfg.admin is not None:
        yield "admin.bind", cfg.admin.bind
    if cfg.demo is not None:
        for i, b in enumerate(cfg.demo.http):
            yield index_path("demo.http", i), b
        for i, b in enumerate(cfg.demo.tcp_echo):
            yield index_path("demo.tcp_echo", i), b


@check
def binds(ctx: CheckContext) -> Iterator[Problem]:
    """Every bind parses (without binding) and no two want the same socket."""
    taken: list[tuple[BindKey, str]] = []
    entries = [(key_path(p, "bind"), lst.bind, lst.mode == "udp") for p, lst in _listeners(ctx.config)]
    entries += [(p, b, False) for p, b in _stream_binds(ctx.config)]
    for path, bind, udp in entries:
        try:
            if udp:
                parse_udp_bind(bind)
            else:
                check_stream_bind(bind)
        except ValueError as e:
            yield ctx.error(path, str(e))
            continue
        k = bind_key(bind, udp)
        if k is None:
            continue
        if k.proto != "unix" and not 0 <= int(k.where) <= 65535:
            yield ctx.error(path, f"bad endpoint description {bind!r}: port {k.where} out of range 0-65535")
            continue
        for other, opath in taken:
            if k.conflicts(other):
                what = k.proto.upper() + (f" port {k.where}" if k.proto != "unix" else f" socket {k.where}")
                yield ctx.error(path, f"{bind!r} collides with {ctx.where(opath)}: both bind {what}")
                break
        taken.append((k, path))


# -- plugins ------------------------------------------------------------------


@check
def algorithms(ctx: CheckContext) -> Iterator[Problem]:
    """The algorithm is registered and accepts its options (built once, on a
    throwaway clock, exactly as the runtime will build it)."""
    if ctx.registry is None:
        return
    reg = ctx.registry
    for ppath, pool in _pools(ctx.config):
        if pool.algorithm not in reg.balancers:
            yield ctx.error(
                key_path(ppath, "algorithm"),
                f"unknown algorithm {pool.algorithm!r}{suggest(pool.algorithm, reg.balancers)}; "
                f"registered: {', '.join(sorted(reg.balancers)) or '(none)'}",
            )
            continue
        try:
            reg.make_balancer(pool.algorithm, pool.algorithm_options, clock=Clock(), rng=random.Random(0))
        except ValueError as e:
            yield ctx.error(key_path(ppath, "algorithm_options"), str(e))
        except Exception as e:  # a plugin bug still deserves one clear line
            yield ctx.error(
                key_path(ppath, "algorithm_options"),
                f"{pool.algorithm}: cannot be built with these options: {type(e).__name__}: {e}",
            )


@check
def route_matches(ctx: CheckContext) -> Iterator[Problem]:
    """Every ``match:`` key is a registered rule whose factory accepts the value."""
    if ctx.registry is None:
        return
    rules = ctx.registry.rules
    for rpath, route, _ in _routes(ctx.config):
        mpath = key_path(rpath, "match")
        for name, value in route.match.items():
            path = key_path(mpath, name)
            spec = rules.get(name)
            if spec is None:
                yield ctx.error(
                    path,
                    f"unknown match rule {name!r}{suggest(name, rules)}; "
                    f"registered: {', '.join(sorted(rules)) or '(none)'}",
                )
                continue
            try:
                spec.factory(value)
            except ValueError as e:
                yield ctx.error(path, str(e))
            except Exception as e:
                yield ctx.error(path, f"rule {name!r} rejects {value!r}: {type(e).__name__}: {e}")


# -- HTTP names and hash keys -----------------------------------------------------


@check
def hash_keys(ctx: CheckContext) -> Iterator[Problem]:
    for lpath, lst in _listeners(ctx.config):
        path = key_path(lpath, "hash_key")
        try:
            kind, _ = parse_hash_key(lst.hash_key)
        except ValueError as e:
            yield ctx.error(path, str(e))
            continue
        if kind != "source" and lst.mode != "http":
            yield ctx.error(path, f"{kind} hash keys need mode: http; a {lst.mode} listener can hash only on source")
    for rpath, route, _ in _routes(ctx.config):
        if route.hash_key is not None:
            try:
                parse_hash_key(route.hash_key)
            except ValueError as e:
                yield ctx.error(key_path(rpath, "hash_key"), str(e))


@check
def header_names(ctx: CheckContext) -> Iterator[Problem]:
    """Header and cookie names lbtwist writes must be tokens, and header values
    free of CR, LF and NUL, or it would emit malformed HTTP that some backend
    parses differently (request smuggling, response splitting)."""

    from lbtwist.l7.headers import check_header_value

    def bad(path: str, name: str, what: str = "header") -> Iterator[Problem]:
        if not _TOKEN.match(name):
            yield ctx.error(path, f"{name!r} is not a valid {what} name")

    for lpath, lst in _listeners(ctx.config):
        hpath = key_path(lpath, "http")
        yield from bad(key_path(hpath, "request_id_header"), lst.http.request_id_header)
        if lst.http.sticky_cookie is not None:
            yield from bad(key_path(hpath, "sticky_cookie"), lst.http.sticky_cookie, "cookie")
    for rpath, route, _ in _routes(ctx.config):
        for side in ("request_headers", "response_headers"):
            rw = getattr(route, side)
            spath = key_path(rpath, side)
            for op in ("add", "set"):
                for name, value in getattr(rw, op).items():
                    path = key_path(key_path(spath, op), name)
                    yield from bad(path, name)
                    try:
                        check_header_value(value)
                    except ValueError as e:
                        yield ctx.error(path, str(e))
            for i, name in enumerate(rw.remove):
                yield from bad(index_path(key_path(spath, "remove"), i), name)


# -- resilience: retries, breakers, limits, rate limits, descending timeouts ------


@check
def resilience_settings(ctx: CheckContext) -> Iterator[Problem]:
    """Retry, rate-limit, breaker and limit blocks make sense on their own."""
    from lbtwist.resilience.ratelimit import parse_key
    from lbtwist.resilience.retry import parse_retry_on

    for rpath, route, _ in _routes(ctx.config):
        r, rp = route.retry, key_path(rpath, "retry")
        try:
            parse_retry_on(r.retry_on)
        except ValueError as e:
            yield ctx.error(key_path(rp, "retry_on"), str(e))
        if r.max_attempts < 1:
            yield ctx.error(key_path(rp, "max_attempts"), "must be at least 1 (1 means no retries)")
        if r.per_try_timeout == 0:
            yield ctx.error(key_path(rp, "per_try_timeout"), "must be above 0 (omit it to use the route timeout)")
        if r.backoff.base > r.backoff.max:
            yield ctx.error(
                key_path(rp, "backoff"),
                f"base ({num(r.backoff.base)}s) is above max ({num(r.backoff.max)}s)",
            )
        if r.budget_window == 0:
            yield ctx.error(key_path(rp, "budget_window"), "must be above 0")
        if r.idempotency_header is not None and not _TOKEN.match(r.idempotency_header):
            yield ctx.error(key_path(rp, "idempotency_header"), f"{r.idempotency_header!r} is not a valid header name")
        rl, lp = route.rate_limit, key_path(rpath, "rate_limit")
        if rl is not None:
            if rl.rate <= 0 and ctx.given(key_path(lp, "rate")):
                yield ctx.error(key_path(lp, "rate"), "must be above 0 (omit rate_limit for no limit)")
            if rl.burst is not None and rl.burst < 1:
                yield ctx.error(key_path(lp, "burst"), "must be at least 1, or no request could ever pass")
            elif rl.burst is None and 0 < rl.rate < 1:  # the bucket size defaults to the rate
                yield ctx.error(
                    key_path(lp, "rate"),
                    f"without a burst the bucket holds {num(rl.rate)} tokens and no request could ever "
                    "pass: set burst to at least 1",
                )
            if rl.max_keys < 1:
                yield ctx.error(key_path(lp, "max_keys"), "must be at least 1")
            try:
                kind, name = parse_key(rl.key)
            except ValueError as e:
                yield ctx.error(key_path(lp, "key"), str(e))
            else:
                if name is not None and not _TOKEN.match(name):
                    yield ctx.error(key_path(lp, "key"), f"{name!r} is not a valid header name")
    for ppath, pool in _pools(ctx.config):
        cb, cp = pool.circuit_breaker, key_path(ppath, "circuit_breaker")
        if cb.consecutive_failures > 0:
            if cb.open_for == 0:
                yield ctx.error(key_path(cp, "open_for"), "must be above 0 (set consecutive_failures: 0 to turn breakers off)")
            if cb.half_open_requests < 1:
                yield ctx.error(key_path(cp, "half_open_requests"), "must be at least 1, or an open breaker never closes")
        for i, status in enumerate(cb.failure_statuses):
            if not 100 <= status <= 599:
                yield ctx.error(index_path(key_path(cp, "failure_statuses"), i), f"{status} is not an HTTP status")
        lp = key_path(ppath, "limits")
        for name in ("max_connections", "max_requests"):
            if getattr(pool.limits, name) == 0:
                yield ctx.error(key_path(lp, name), "is 0: the pool could never serve a request")
        if pool.retry_budget is not None and pool.retry_budget.window == 0:
            yield ctx.error(key_path(key_path(ppath, "retry_budget"), "window"), "must be above 0")


def _route_timeout(ctx: CheckContext, rpath: str, route: Any, lpath: str, lst: Any) -> tuple[float, str]:
    """The route's effective whole-request timeout and the key it comes from."""
    if route is not None and route.timeout is not None:
        return route.timeout, key_path(rpath, "timeout")
    return lst.http.request_timeout, key_path(key_path(lpath, "http"), "request_timeout")


@check
def descending_timeouts(ctx: CheckContext) -> Iterator[Problem]:
    """Timeouts must descend down the stack (client idle > route timeout >
    per-try timeout x tries > connect timeout; probe timeout < interval), or an
    outer layer gives up (or retries) while an inner one is still working.
    Errors where the setting cannot work, warnings where it might be meant."""
    from lbtwist.resilience.retry import Failure, parse_retry_on

    pools = {p.name: p for p in ctx.config.pools}
    for lpath, lst in _listeners(ctx.config):
        if lst.mode != "http":
            continue
        entries = [(index_path(key_path(lpath, "routes"), j), r) for j, r in enumerate(lst.routes)]
        if lst.pool is not None:
            entries.append((lpath, None))  # the default route: default retry settings
        longest: tuple[float, str] | None = None
        for rpath, route in entries:
            timeout, tpath = _route_timeout(ctx, rpath, route, lpath, lst)
            if timeout <= 0:
                continue
            if longest is None or timeout > longest[0]:
                longest = (timeout, tpath)
            pool = pools.get(route.pool if route is not None else lst.pool)
            retry = route.retry if route is not None else None
            try:
                kinds, statuses = parse_retry_on(retry.retry_on) if retry is not None else (
                    frozenset({Failure.CONNECT_FAILURE, Failure.RESET}), frozenset())
            except ValueError:
                kinds, statuses = frozenset(), frozenset()  # reported by resilience_settings
            attempts = retry.max_attempts if retry is not None else 2
            per_try = retry.per_try_timeout if retry is not None else None
            rp = key_path(rpath, "retry")
            ptpath = key_path(rp, "per_try_timeout")
            if per_try:
                if per_try >= timeout:
                    if Failure.TIMEOUT in kinds and attempts > 1:
                        yield ctx.error(
                            ptpath,
                            f"per_try_timeout ({num(per_try)}s) is not below the route timeout "
                            f"({tpath} = {num(timeout)}s): a try can never time out before the whole "
                            "request does, so 'timeout' retries can never happen",
                        )
                    else:
                        yield ctx.warning(
                            ptpath,
                            f"per_try_timeout ({num(per_try)}s) is not below the route timeout "
                            f"({tpath} = {num(timeout)}s), so it has no effect",
                        )
                elif attempts > 1 and Failure.TIMEOUT in kinds:
                    worst = per_try * attempts + retry.backoff.max * (attempts - 1)
                    if worst > timeout:
                        yield ctx.warning(
                            ptpath,
                            f"per_try_timeout ({num(per_try)}s) x max_attempts ({attempts}) plus backoff "
                            f"({num(worst)}s in all) exceeds the route timeout ({tpath} = {num(timeout)}s): "
                            "the last tries are cut short",
                        )
            elif retry is not None and Failure.TIMEOUT in kinds and attempts > 1:
                yield ctx.warning(
                    key_path(rp, "retry_on"),
                    f"'timeout' is retried but no per_try_timeout is set, so the only timeout is "
                    f"the route's ({tpath} = {num(timeout)}s) and a timed-out request is never retried",
                )
            if pool is None:
                continue
            ppath = index_path("pools", ctx.config.pools.index(pool))
            ctpath = key_path(ppath, "connect_timeout")
            per_try_cuts = bool(per_try) and per_try < timeout
            window, wpath = (per_try, ptpath) if per_try_cuts else (timeout, tpath)
            # a hung connect cut by a per-try timeout is still retried as a timeout
            cut_and_retried = per_try_cuts and Failure.TIMEOUT in kinds and attempts > 1
            if pool.connect_timeout >= window and not cut_and_retried:
                retried = Failure.CONNECT_FAILURE in kinds and attempts > 1
                yield ctx.warning(
                    ctpath,
                    f"connect_timeout ({num(pool.connect_timeout)}s) is not below {wpath} "
                    f"({num(window)}s): a backend that does not answer SYNs uses the whole "
                    + ("try, so its connect failure is never retried" if retried else "time"),
                )
            if retry is not None and attempts > 1 and (kinds or statuses) and pool.limits.max_retries == 0:
                yield ctx.warning(
                    key_path(key_path(ppath, "limits"), "max_retries"),
                    f"is 0, so the retries asked for by {rp} never happen",
                )
        if longest is not None and lst.idle_timeout is not None and 0 < lst.idle_timeout <= longest[0]:
            timeout, tpath = longest
            yield ctx.warning(
                key_path(lpath, "idle_timeout"),
                f"idle_timeout ({num(lst.idle_timeout)}s) is not above the route timeout "
                f"({tpath} = {num(timeout)}s): the client connection may be closed as idle "
                "while its request is still being served",
            )
    for ppath, pool in _pools(ctx.config):
        active = pool.health.active
        if active is not None and active.interval > 0 and active.timeout >= active.interval:
            hp = key_path(key_path(ppath, "health"), "active")
            yield ctx.warning(
                key_path(hp, "timeout"),
                f"probe timeout ({num(active.timeout)}s) is not below the interval "
                f"({num(active.interval)}s): a hanging backend is probed less often than configured",
            )


# -- health -------------------------------------------------------------------


@check
def health_settings(ctx: CheckContext) -> Iterator[Problem]:
    """Health blocks that cannot work: a probe timeout not below its interval
    (probes would overlap and the detection bound breaks), thresholds below 1,
    an unknown probe kind or options its factory rejects, ejection settings
    that never eject or never return, percentages outside 0-100."""
    from lbtwist.health.builtin import make_probe

    for ppath, pool in _pools(ctx.config):
        hp = key_path(ppath, "health")
        h = pool.health
        if not 0 <= h.panic_threshold <= 100:
            yield ctx.error(key_path(hp, "panic_threshold"), f"{num(h.panic_threshold)} is not a percentage (0-100)")
        a, ap = h.active, key_path(hp, "active")
        if a is not None:
            if a.interval <= 0:
                yield ctx.error(key_path(ap, "interval"), "must be above 0")
            if a.timeout <= 0:
                yield ctx.error(key_path(ap, "timeout"), "must be above 0")
            elif a.timeout >= a.interval:
                yield ctx.error(
                    key_path(ap, "timeout"),
                    f"probe timeout ({num(a.timeout)}s) must be below the interval ({num(a.interval)}s)",
                )
            for name in ("unhealthy_threshold", "healthy_threshold"):
                if getattr(a, name) < 1:
                    yield ctx.error(key_path(ap, name), "must be at least 1")
            if not 0 <= a.jitter < 1:
                yield ctx.error(key_path(ap, "jitter"), f"{num(a.jitter)} must be a fraction in [0, 1)")
            if ctx.registry is not None and a.timeout > 0:
                try:
                    make_probe(ctx.registry, a, reactor=Clock())
                except KeyError as e:
                    yield ctx.error(key_path(ap, "kind"), e.args[0])
                except ValueError as e:
                    yield ctx.error(ap, str(e))
                except Exception as e:  # a plugin bug still deserves one clear line
                    yield ctx.error(ap, f"probe {a.kind!r} cannot be built: {type(e).__name__}: {e}")
        p, pp = h.passive, key_path(hp, "passive")
        if p.enabled:
            if p.base_ejection_time <= 0:
                yield ctx.error(key_path(pp, "base_ejection_time"), "must be above 0 (set enabled: false to turn ejection off)")
            elif p.max_ejection_time < p.base_ejection_time:
                yield ctx.error(
                    key_path(pp, "max_ejection_time"),
                    f"({num(p.max_ejection_time)}s) is below base_ejection_time ({num(p.base_ejection_time)}s)",
                )
            if not 0 <= p.max_ejection_percent <= 100:
                yield ctx.error(key_path(pp, "max_ejection_percent"), f"{num(p.max_ejection_percent)} is not a percentage (0-100)")
            if p.interval <= 0:
                yield ctx.error(key_path(pp, "interval"), "must be above 0")
            lat, lp = p.latency, key_path(pp, "latency")
            if lat.enabled:
                if lat.factor <= 1:
                    yield ctx.error(key_path(lp, "factor"), f"{num(lat.factor)} must be above 1, or normal backends are outliers")
                if lat.window <= 0:
                    yield ctx.error(key_path(lp, "window"), "must be above 0")
            fr, fp = p.failure_rate, key_path(pp, "failure_rate")
            if fr.enabled:
                if not 0 < fr.threshold <= 100:
                    yield ctx.error(key_path(fp, "threshold"), f"{fr.threshold:g} is not a percentage above 0 (0-100]")
                if fr.min_requests < 1:
                    yield ctx.error(key_path(fp, "min_requests"), "must be at least 1")
                elif fr.request_volume < fr.min_requests:
                    yield ctx.error(key_path(fp, "request_volume"),
                                    f"({fr.request_volume}) is below min_requests ({fr.min_requests}): no backend could be judged")
                if fr.window <= 0:
                    yield ctx.error(key_path(fp, "window"), "must be above 0")


# -- TLS ----------------------------------------------------------------------------


@check
def tls_settings(ctx: CheckContext) -> Iterator[Problem]:
    """TLS blocks: certificate and key files (missing, unreadable, expired,
    mismatched: each named), names, versions, ciphers, resumption settings."""
    import time

    listeners = list(_listeners(ctx.config))
    pools = list(_pools(ctx.config))
    if not any(l.tls is not None or l.tls_passthrough is not None for _, l in listeners) and \
            not any(p.tls is not None for _, p in pools):
        return  # no TLS: pyOpenSSL and cryptography stay unimported (a worker's memory)
    from lbtwist.tls.checks import check_listener_tls, check_passthrough, check_pool_tls

    def place(base: str, found: Iterable[tuple[str, str, str]]) -> Iterator[Problem]:
        for rel, severity, message in found:
            path = f"{base}.{rel}" if rel else base  # rel is "key.sub[0]..." under base
            yield ctx.error(path, message) if severity == "error" else ctx.warning(path, message)

    now = time.time()
    for lpath, lst in listeners:
        if lst.tls is not None:
            if lst.tls_passthrough is not None:
                yield ctx.error(key_path(lpath, "tls"), "tls and tls_passthrough exclude each other: terminate or pass through")
            yield from place(key_path(lpath, "tls"), check_listener_tls(lst.tls, lst.mode, now))
        if lst.tls_passthrough is not None:
            yield from place(key_path(lpath, "tls_passthrough"),
                             check_passthrough(lst.tls_passthrough, lst.mode, lst.pool is not None))
    for ppath, pool in pools:
        if pool.tls is not None:
            yield from place(key_path(ppath, "tls"), check_pool_tls(pool.tls, now))


# -- admin ----------------------------------------------------------------------------


@check
def admin_access(ctx: CheckContext) -> Iterator[Problem]:
    """An admin listener reachable from other machines needs a token."""
    if ctx.config.admin is None:
        return
    from lbtwist.admin.auth import admin_config_problems

    for path, message in admin_config_problems(ctx.config.admin):
        yield ctx.error(path, message)


# -- discovery ------------------------------------------------------------------


@check
def discovery_sources(ctx: CheckContext) -> Iterator[Problem]:
    """Each ``pools[].discovery`` item names exactly one source, complete."""
    for ppath, pool in _pools(ctx.config):
        for i, d in enumerate(pool.discovery):
            dpath = index_path(key_path(ppath, "discovery"), i)
            given = [k for k in ("dns", "file", "plugin") if getattr(d, k) is not None]
            if len(given) != 1:
                what = ", ".join(given) if given else "none"
                yield ctx.error(dpath, f"a discovery source takes exactly one of dns, file, plugin (got {what})")
                continue
            if not 0 <= d.max_shrink <= 100:
                yield ctx.error(key_path(dpath, "max_shrink"), f"{d.max_shrink:g} is a percentage: 0-100")
            if d.options and d.plugin is None:
                yield ctx.error(key_path(dpath, "options"), "options only apply to a plugin source")
            if d.dns is not None:
                yield from _dns_problems(ctx, key_path(dpath, "dns"), d.dns)
            elif d.file is not None:
                if not d.file:
                    yield ctx.error(key_path(dpath, "file"), "an empty path")
                if d.poll_interval <= 0:
                    yield ctx.error(key_path(dpath, "poll_interval"), "must be above 0")
            elif ctx.registry is not None:
                reg = ctx.registry
                ppath_ = key_path(dpath, "plugin")
                if d.plugin not in reg.discovery:
                    yield ctx.error(
                        ppath_,
                        f"unknown discovery source {d.plugin!r}{suggest(d.plugin, reg.discovery)}; "
                        f"registered: {', '.join(sorted(reg.discovery)) or '(none)'}",
                    )
                    continue
                try:
                    reg.make_discovery(d.plugin, d.options, reactor=Clock())
                except ValueError as e:
                    yield ctx.error(key_path(dpath, "options"), str(e))
                except Exception as e:
                    yield ctx.error(key_path(dpath, "options"),
                                    f"{d.plugin}: cannot be built with these options: {type(e).__name__}: {e}")


def _dns_problems(ctx: CheckContext, path: str, d: Any) -> Iterator[Problem]:
    if not d.name:
        yield ctx.error(key_path(path, "name"), "an empty name")
    if d.type == "SRV" and d.port is not None:
        yield ctx.error(key_path(path, "port"), "SRV records carry their ports; port only applies to A/AAAA")
    if d.type != "SRV" and d.port is None:
        yield ctx.error(path, f"type {d.type} needs port: the backends' port")
    if d.port is not None and not 0 < d.port < 65536:
        yield ctx.error(key_path(path, "port"), f"{d.port} is not a port (1-65535)")
    if d.resolver is not None:
        try:
            split_address(d.resolver)
        except ValueError:
            yield ctx.error(key_path(path, "resolver"), f"{d.resolver!r} is not host:port")
    if d.refresh_min > d.refresh_max:
        yield ctx.error(key_path(path, "refresh_min"), f"{d.refresh_min:g}s is above refresh_max {d.refresh_max:g}s")
    for k in ("refresh", "refresh_max", "timeout"):
        if getattr(d, k) <= 0:
            yield ctx.error(key_path(path, k), "must be above 0")


# -- fleet: state shared through Redis ----------------------------------------------


@check
def fleet_settings(ctx: CheckContext) -> Iterator[Problem]:
    """The fleet block parses (the runtime uses the same parser), and a
    fleet-scope rate limit has a fleet to share its buckets with."""
    from lbtwist.fleet.settings import problems

    fleet = ctx.config.fleet
    if fleet is not None and not ctx.was_rejected("fleet"):
        for key, message in problems(fleet):
            path = "fleet"
            for part in key.split("."):
                path = key_path(path, part)
            yield ctx.error(path, message)
    for rpath, route, _ in _routes(ctx.config):
        rl = route.rate_limit
        if rl is not None and rl.scope == "fleet" and fleet is None:
            yield ctx.error(key_path(key_path(rpath, "rate_limit"), "scope"),
                            "fleet needs a top-level fleet block (fleet: {redis: ..., name: ...}); or use scope: local")


# -- workers --------------------------------------------------------------------


@check
def workers(ctx: CheckContext) -> Iterator[Problem]:
    """``workers`` parses (the runtime's own parser), and with more than one
    worker every listener binds a socket the master can open for its workers
    (tcp, tcp6, udp; see lbtwist.workers.sockets)."""
    from lbtwist.workers.count import worker_count
    from lbtwist.workers.sockets import shareable

    if ctx.was_rejected("workers"):
        return
    try:
        n = worker_count(ctx.config.workers)
    except ValueError as e:
        yield ctx.error("workers", str(e))
        return
    if n == 1:
        return
    for p, lst in _listeners(ctx.config):
        if ctx.was_rejected(key_path(p, "bind")):
            continue
        try:  # a bind that does not parse is the binds check's error
            parse_udp_bind(lst.bind) if lst.mode == "udp" else check_stream_bind(lst.bind)
        except ValueError:
            continue
        why = shareable(lst.bind, lst.mode == "udp")
        if why is not None:
            yield ctx.error(key_path(p, "bind"), f"{why} with workers: {ctx.config.workers} (set workers: 1 for this bind)")
