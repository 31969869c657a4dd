"""Request routing, sans-IO: routes are lists of matchers (built-in and plugin
kinds, all registered through the ``lbtwist_routing_rules`` hook), first match wins.

A route's ``match:`` block maps kind names to values; every condition must
hold. The built-in kinds are ``host`` (exact or ``*.example.com``),
``path_prefix``, ``path_regex``, ``method`` and ``headers``; a plugin adds a
kind by returning a L{RuleSpec} whose factory turns the YAML value into an
L{IRouteMatcher}. Factories run once, when the router is built, so bad values
are config errors and the per-request work is a few precompiled tests.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lbtwist import hookimpl
from lbtwist.interfaces import IRouteMatcher
from lbtwist.registry import RuleSpec, suggest


@attrs.frozen
class RequestHead:
    """What a matcher may look at. Built once per request by the L7 adapter."""

    method: str
    #: The raw request target as received (``/a/b?x=1``).
    target: str
    #: The path part of the target (percent-encoding kept).
    path: str
    #: Lower-cased host without port, from Host (or the absolute target).
    host: str
    #: (lower-case name, value) pairs, in order.
    headers: tuple[tuple[str, str], ...] = ()
    #: Client IP address.
    client: str = ""
    #: True when the client connection is TLS.
    tls: bool = False
    #: Negotiated TLS version (``"TLSv1.3"``), cipher and SNI (lower-case)
    #: of a TLS connection terminated by lbtwist; empty otherwise.
    tls_version: str = ""
    tls_cipher: str = ""
    sni: str = ""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


def host_without_port(host: str) -> str:
    """``"Example.COM:8080"`` -> ``"example.com"``; ``"[::1]:80"`` -> ``"[::1]"``."""
    host = host.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    colon = host.rfind(":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(".")


# -- built-in matchers -----------------------------------------------------------

_HOSTNAME = re.compile(r"(?:\*\.)?(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.?|\[[0-9a-f:.]+\]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _strings(kind: str, value: Any) -> list[str]:
    """A string or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{kind} must be a string or a list of strings, not {value!r}")


@implementer(IRouteMatcher)
class HostMatcher:
    """Host is one of the exact names, or ends with a wildcard's suffix
    (``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``,
    not ``example.com``). The request's port is ignored."""

    cost = 1

    def __init__(self, exact: Iterable[str], suffixes: Iterable[str]) -> None:
        self.exact = frozenset(exact)
        self.suffixes = tuple(suffixes)

    @classmethod
    def from_value(cls, value: Any) -> "HostMatcher":
        exact, suffixes = [], []
        for name in _strings("host", value):
            n = name.strip().lower().rstrip(".")
            if not n or not _HOSTNAME.fullmatch(n) or ":" in n and not n.startswith("["):
                raise ValueError(f"host: {name!r} is not a host name or *.wildcard (no port)")
            if n.startswith("*."):
                suffixes.append(n[1:])
            else:
                exact.append(n)
        return cls(exact, suffixes)

    def matches(self, request: RequestHead) -> bool:
        host = request.host
        if host in self.exact:
            return True
        for s in self.suffixes:
            if host.endswith(s) and len(host) > len(s):
                return True
        return False

    def __repr__(self) -> str:
        return f"<host {sorted(self.exact) + ['*' + s for s in self.suffixes]}>"


@implementer(IRouteMatcher)
class PathPrefixMatcher:
    """The path starts with one of the prefixes (case-sensitive, no decoding)."""

    cost = 1

    def __init__(self, prefixes: Iterable[str]) -> None:
        self.prefixes = tuple(prefixes)

    @classmethod
    def from_value(cls, value: Any) -> "PathPrefixMatcher":
        prefixes = _strings("path_prefix", value)
        for p in prefixes:
            if not p.startswith("/"):
                raise ValueError(f"path_prefix: {p!r} must start with '/'")
        return cls(prefixes)

    def matches(self, request: RequestHead) -> bool:
        return request.path.startswith(self.prefixes)

    def __repr__(self) -> str:
        return f"<path_prefix {list(self.prefixes)}>"


@implementer(IRouteMatcher)
class PathRegexMatcher:
    """``re.search`` on the path: anchor with ``^`` for a prefix match."""

    cost = 3

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    @classmethod
    def from_value(cls, value: Any) -> "PathRegexMatcher":
        if not isinstance(value, str) or not value:
            raise ValueError(f"path_regex must be a non-empty regular expression string, not {value!r}")
        try:
            return cls(value)
        except re.error as e:
            raise ValueError(f"path_regex {value!r}: {e}") from None

    def matches(self, request: RequestHead) -> bool:
        return self.pattern.search(request.path) is not None

    def __repr__(self) -> str:
        return f"<path_regex {self.pattern.pattern!r}>"


@implementer(IRouteMatcher)
class MethodMatcher:
    """The method is one of the listed ones (upper case, exact)."""

    cost = 0

    def __init__(self, methods: Iterable[str]) -> None:
        self.methods = frozenset(methods)

    @classmethod
    def from_value(cls, value: Any) -> "MethodMatcher":
        methods = []
        for m in _strings("method", value):
            m = m.strip().upper()
            if not _TOKEN.fullmatch(m):
                raise ValueError(f"method: {m!r} is not an HTTP method")
            methods.append(m)
        return cls(methods)

    def matches(self, request: RequestHead) -> bool:
        return request.method in self.methods

    def __repr__(self) -> str:
        return f"<method {sorted(self.methods)}>"


@implementer(IRouteMatcher)
class HeadersMatcher:
    """Every listed header is present with the given value. A value is a
    string (exact, case-sensitive), a list of strings (any of them), or
    ``true``/``false`` (present/absent whatever the value)."""

    cost = 2

    def __init__(self, required: Mapping[str, Any]) -> None:
        self.required = tuple(required.items())

    @classmethod
    def from_value(cls, value: Any) -> "HeadersMatcher":
        if not isinstance(value, Mapping) or not value:
            raise ValueError(f"headers must be a mapping of header name to value, e.g. {{x-canary: '1'}}, not {value!r}")
        required: dict[str, Any] = {}
        for name, v in value.items():
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ValueError(f"headers: {name!r} is not a header name")
            if isinstance(v, bool):
                required[name.lower()] = v
            elif isinstance(v, (int, float)):
                required[name.lower()] = frozenset([str(v)])
            else:
                required[name.lower()] = frozenset(_strings(f"headers.{name}", v))
        return cls(required)

    def matches(self, request: RequestHead) -> bool:
        for name, want in self.required:
            got = request.header(name)
            if want is True:
                if got is None:
                    return False
            elif want is False:
                if got is not None:
                    return False
            elif got is None or got not in want:
                return False
        return True

    def __repr__(self) -> str:
        return f"<headers {dict(self.required)!r}>"


@implementer(IRouteMatcher)
class SniMatcher:
    """The TLS server name the client sent is one of these (exact or
    ``*.example.com``, as for ``host``); never matches plain connections or
    clients sending no SNI. Unlike Host, the client cannot change it per request."""

    cost = 1

    def __init__(self, hosts: HostMatcher) -> None:
        self.hosts = hosts

    @classmethod
    def from_value(cls, value: Any) -> "SniMatcher":
        try:
            return cls(HostMatcher.from_value(value))
        except ValueError as e:
            raise ValueError(str(e).replace("host", "sni", 1)) from None

    def matches(self, request: RequestHead) -> bool:
        sni = request.sni
        if not sni:
            return False
        h = self.hosts
        return sni in h.exact or any(sni.endswith(s) and len(sni) > len(s) for s in h.suffixes)

    def __repr__(self) -> str:
        return f"<sni {sorted(self.hosts.exact) + ['*' + s for s in self.hosts.suffixes]}>"


_TLS_VERSIONS = {"1.2": "TLSv1.2", "1.3": "TLSv1.3", "tlsv1.2": "TLSv1.2", "tlsv1.3": "TLSv1.3"}


@implementer(IRouteMatcher)
class TlsVersionMatcher:
    """The client's TLS connection negotiated one of these versions
    (``"1.2"``, ``"1.3"``); never matches plain connections."""

    cost = 0

    def __init__(self, versions: Iterable[str]) -> None:
        self.versions = frozenset(versions)

    @classmethod
    def from_value(cls, value: Any) -> "TlsVersionMatcher":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = f"{value:.1f}"
        out = []
        for v in _strings("tls_version", value):
            name = _TLS_VERSIONS.get(v.strip().lower())
            if name is None:
                raise ValueError(f"tls_version: {v!r} is not \"1.2\" or \"1.3\"")
            out.append(name)
        return cls(out)

    def matches(self, request: RequestHead) -> bool:
        return request.tls_version in self.versions

    def __repr__(self) -> str:
        return f"<tls_version {sorted(self.versions)}>"


BUILTIN_RULES = (
    RuleSpec("host", HostMatcher.from_value, "Host is one of these names; '*.example.com' matches subdomains"),
    RuleSpec("path_prefix", PathPrefixMatcher.from_value, "path starts with this (or one of these)"),
    RuleSpec("path_regex", PathRegexMatcher.from_value, "regular expression searched in the path"),
    RuleSpec("method", MethodMatcher.from_value, "request method is this (or one of these)"),
    RuleSpec("headers", HeadersMatcher.from_value, "headers present with these values"),
    RuleSpec("sni", SniMatcher.from_value, "TLS server name (SNI) is one of these names; '*.example.com' matches subdomains"),
    RuleSpec("tls_version", TlsVersionMatcher.from_value, 'negotiated TLS version is this (or one of these): "1.2", "1.3"'),
)


@hookimpl
def lbtwist_routing_rules() -> list[RuleSpec]:
    return list(BUILTIN_RULES)


# -- the router --------------------------------------------------------------------


@attrs.frozen
class Route:
    """Matchers plus what the adapter attached (``target``: pool, timeouts, rewrites)."""

    name: str
    matchers: tuple[Any, ...]
    target: Any

    def matches(self, request: RequestHead) -> bool:
        for m in self.matchers:
            if not m.matches(request):
                return False
        return True


#: Label of the route taken by requests that match no route (the listener's pool).
DEFAULT_ROUTE = "default"


def route_labels(routes: Sequence[Any]) -> list[str]:
    """The label of each route in logs, metrics and the admin API: its
    ``name`` when set, else its pool's name; a label already taken (by a
    named route, an earlier route or ``default``) gets ``~2``, ``~3``...
    Unlike the route's index, this survives inserting or reordering routes
    to other pools."""
    taken = {DEFAULT_ROUTE} | {n for r in routes if (n := getattr(r, "name", None))}
    out = []
    for r in routes:
        name = getattr(r, "name", None)
        if not name:
            base = str(getattr(r, "pool", "") or "route")
            name, k = base, 2
            while name in taken:
                name, k = f"{base}~{k}", k + 1
            taken.add(name)
        out.append(name)
    return out


class Router:
    """First matching route wins; ``default`` (a Route, or None) catches the rest."""

    def __init__(self, routes: Sequence[Route], default: Route | None = None) -> None:
        self.routes = tuple(routes)
        self.default = default

    @property
    def needs_request(self) -> bool:
        """False when every request goes to the default: the adapter may skip
        building a RequestHead."""
        return bool(self.routes)

    def route(self, request: RequestHead | None) -> Route | None:
        if request is not None:
            for r in self.routes:
                if r.matches(request):
                    return r
        return self.default

    @classmethod
    def build(
        cls,
        routes: Sequence[Any],
        rules: Mapping[str, RuleSpec],
        *,
        make_target: Callable[[Any, str], Any],
        default: Any = None,
        where: str = "routes",
    ) -> "Router":
        """Routes from config (objects with ``.match``, e.g. RouteConfig).
        ``make_target(route_cfg, name)`` builds each route's payload; ``default``
        is the payload for requests no route matches (None: no default).
        Raises ValueError naming the route and key on a bad ``match:``."""
        built = []
        for i, (rcfg, name) in enumerate(zip(routes, route_labels(routes))):
            matchers = []
            match = getattr(rcfg, "match", None) or {}
            if not isinstance(match, Mapping):
                raise ValueError(f"{where}[{i}].match: must be a mapping of match kinds, not {match!r}")
            for kind, value in match.items():
                spec = rules.get(kind)
                if spec is None:
                    raise ValueError(
                        f"{where}[{i}].match: unknown match kind {kind!r}{suggest(kind, rules)}; "
                        f"known: {', '.join(sorted(rules))}"
                    )
                try:
                    m = spec.factory(value)
                except ValueError as e:
                    raise ValueError(f"{where}[{i}].match.{kind}: {e}") from None
                try:
                    verifyObject(IRouteMatcher, m)
                except Exception as e:
                    raise ValueError(f"{where}[{i}].match.{kind}: the matcher does not provide IRouteMatcher: {e}") from None
                matchers.append(m)
            # Cheap tests first; plugin kinds (no cost attribute) last.
            matchers.sort(key=lambda m: getattr(m, "cost", 10))
            built.append(Route(name, tuple(matchers), make_target(rcfg, name)))
        default_route = Route(DEFAULT_ROUTE, (), default) if default is not None else None
        return cls(built, default_route)
