"""The typed configuration model. YAML is loaded into these frozen attrs classes
by L{lbtwist.config.loader}, which walks the fields generically: adding a key
means adding a field here (and a row in docs/configuration.md).

Conventions the loader understands, by field type:
  - ``Duration`` (float seconds): YAML ``250ms``, ``5s``, ``1m``, ``1h``
  - ``Size`` (int bytes): YAML ``512``, ``64k``/``64KiB``, ``1m``/``1MiB``, ``1g``
  - nested attrs classes, ``list[...]``, ``dict[str, ...]``, ``Literal[...]``,
    ``X | None``, plain ``str``/``int``/``float``/``bool`` and ``Any``.
Cross-field checks (unknown pool, duplicate names, timeouts that do not
descend...) live in L{lbtwist.config.validate}.
"""
from __future__ import annotations

from typing import Any, Literal, NewType

import attrs

Duration = NewType("Duration", float)
Size = NewType("Size", int)


def _f(default: Any = attrs.NOTHING, doc: str = "", factory: Any = None) -> Any:
    meta = {"doc": doc}
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)


@attrs.frozen(kw_only=True)
class BackendConfig:
    address: str = _f(doc="host:port of the server")
    weight: float = _f(1.0, "relative share of traffic; 0 takes no new work")
    name: str | None = _f(None, "label for logs and metrics (defaults to the address)")


@attrs.frozen(kw_only=True)
class ConnectionPoolConfig:
    """L7 keep-alive connections to each backend."""

    max_per_backend: int = _f(256, "cap on open connections to one backend")
    idle_timeout: Duration = _f(Duration(4.0), "close an idle pooled connection after this; keep it below the backend's keep-alive timeout")
    max_age: Duration = _f(Duration(300.0), "retire a connection after this age, so new backends receive traffic")
    max_requests: int = _f(10000, "retire a connection after this many requests")


@attrs.frozen(kw_only=True)
class PoolConfig:
    name: str = _f(doc="pool name referenced by listeners and routes")
    algorithm: str = _f("p2c", "a name from the algorithm registry")
    algorithm_options: dict[str, Any] = _f(factory=dict, doc="passed to the algorithm")
    backends: list[BackendConfig] = _f(factory=list, doc="the servers")
    connect_timeout: Duration = _f(Duration(3.0), "give up a backend connect after this")
    connect_attempts: int = _f(3, "L4: backends tried for one client connection before refusing it")
    connection_pool: ConnectionPoolConfig = _f(factory=ConnectionPoolConfig, doc="L7 backend connection reuse")
    slow_start: Duration = _f(Duration(0.0), "ramp a joining backend's weight over this time")
    drain_timeout: Duration = _f(Duration(30.0), "how long in-flight work on a draining backend may run")
    panic_threshold: float = _f(50.0, "percent of healthy backends below which the pool routes to all")


@attrs.frozen(kw_only=True)
class HeaderRewrite:
    add: dict[str, str] = _f(factory=dict, doc="append these headers")
    set: dict[str, str] = _f(factory=dict, doc="replace these headers")
    remove: list[str] = _f(factory=list, doc="delete these headers")


@attrs.frozen(kw_only=True)
class RouteConfig:
    match: dict[str, Any] = _f(factory=dict, doc="conditions, all must hold: host, path_prefix, path_regex, method, headers, plugin kinds")
    pool: str = _f(doc="pool that serves matching requests")
    timeout: Duration | None = _f(None, "whole-request timeout (response head must start within it); defaults to the listener's")
    request_headers: HeaderRewrite = _f(factory=HeaderRewrite, doc="rewrite requests before forwarding")
    response_headers: HeaderRewrite = _f(factory=HeaderRewrite, doc="rewrite responses before returning")
    max_body_size: Size | None = _f(None, "413 above this request body size; defaults to the listener's")
    buffering: Literal["stream", "request", "response", "both"] = _f("stream", "buffer whole bodies instead of streaming")
    hash_key: str | None = _f(None, "key for hashing algorithms: source | header:NAME | cookie:NAME")


@attrs.frozen(kw_only=True)
class HttpConfig:
    """Client-side HTTP/1.1 limits and timeouts for ``mode: http`` listeners."""

    max_request_line: Size = _f(Size(8192), "414 above this request-line length")
    max_header_size: Size = _f(Size(32768), "431 above this header block size")
    max_headers: int = _f(100, "431 above this header count")
    max_body_size: Size = _f(Size(1 << 30), "413 above this request body size (0: unlimited)")
    header_timeout: Duration = _f(Duration(10.0), "time to receive the whole header block (slowloris)")
    body_timeout: Duration = _f(Duration(60.0), "idle time allowed between request body reads")
    keepalive_timeout: Duration = _f(Duration(60.0), "close an idle client connection after this")
    request_timeout: Duration = _f(Duration(60.0), "default route timeout: response head must start within it")
    forwarded: Literal["x-forwarded", "forwarded", "both", "none"] = _f("x-forwarded", "which forwarding headers to set")
    request_id_header: str = _f("x-request-id", "generated when absent, passed through when present")
    sticky_cookie: str | None = _f(None, "pin clients to a backend with this cookie (set by lbtwist)")


@attrs.frozen(kw_only=True)
class ListenerConfig:
    name: str = _f(doc="listener name")
    bind: str = _f(doc="a Twisted server endpoint description, e.g. tcp:8080:interface=127.0.0.1")
    mode: Literal["tcp", "udp", "http"] = _f("tcp", "tcp relay, udp relay or http reverse proxy")
    pool: str | None = _f(None, "default pool (required unless routes cover every request)")
    routes: list[RouteConfig] = _f(factory=list, doc="http: first match wins, else the default pool")
    max_connections: int = _f(10000, "refuse connections above this many at once")
    idle_timeout: Duration | None = _f(None, "close an idle connection/flow (tcp default 1h, udp 30s)")
    hash_key: str = _f("source", "key for hashing algorithms at L4: source (client address)")
    http: HttpConfig = _f(factory=HttpConfig, doc="http-mode limits and timeouts")


@attrs.frozen(kw_only=True)
class AdminConfig:
    bind: str = _f("tcp:9900:interface=127.0.0.1", "admin API endpoint")


@attrs.frozen(kw_only=True)
class DemoConfig:
    """Backends started inside the balancer process so ``make run`` serves at once."""

    http: list[str] = _f(factory=list, doc="endpoint descriptions of demo HTTP servers")
    tcp_echo: list[str] = _f(factory=list, doc="endpoint descriptions of demo TCP echo servers")


@attrs.frozen(kw_only=True)
class Config:
    listeners: list[ListenerConfig] = _f(factory=list, doc="what lbtwist listens on")
    pools: list[PoolConfig] = _f(factory=list, doc="backend pools")
    admin: AdminConfig | None = _f(None, "admin API; omitted means no admin listener")
    demo: DemoConfig | None = _f(None, "demo backends in-process (for trying lbtwist out)")
