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
    max_streams: int = _f(100, "protocol h2: requests one connection carries at once (also capped by the backend's SETTINGS_MAX_CONCURRENT_STREAMS)")


@attrs.frozen(kw_only=True)
class ActiveHealthConfig:
    """Active probes: catch a dead backend within ``interval x unhealthy_threshold + timeout``."""

    kind: str = _f("tcp", "probe kind from the registry: tcp (connect), http, or a plugin kind")
    interval: Duration = _f(Duration(5.0), "time between two probes of one backend (jittered downwards, never longer)")
    timeout: Duration = _f(Duration(2.0), "a probe not answered within this fails; must be below interval")
    unhealthy_threshold: int = _f(3, "consecutive failed probes that take a healthy backend out")
    healthy_threshold: int = _f(2, "consecutive passing probes that bring an unhealthy backend back")
    jitter: float = _f(0.1, "each interval is shortened by a random fraction up to this, so probes drift apart")
    stagger: Duration = _f(Duration(1.0), "first probes of a pool's backends are spread over this window (capped at interval)")
    assume_healthy: bool = _f(False, "new backends take traffic before their first probe instead of starting 'unknown'")
    path: str = _f("/healthz", "http: request path (with query)")
    method: str = _f("GET", "http: request method")
    host: str | None = _f(None, "http: Host header (defaults to the backend address)")
    expected_statuses: str = _f("200-399", "http: passing statuses, comma-separated codes and ranges")
    body_match: str | None = _f(None, "http: regular expression the first 64 KiB of the body must contain")
    options: dict[str, Any] = _f(factory=dict, doc="extra options for plugin probe kinds")


@attrs.frozen(kw_only=True)
class LatencyOutlierConfig:
    """Eject a backend whose recent latency is far above the rest of its pool (the gray failure)."""

    enabled: bool = _f(True, "evaluate the latency rule")
    factor: float = _f(5.0, "eject when the backend's recent mean latency exceeds this many times the median of the others")
    min_latency: Duration = _f(Duration(0.1), "never eject for latency below this (fast pools are noisy in ratio)")
    min_requests: int = _f(3, "recent requests (decayed over window) a backend needs before it is judged; low, because the algorithm starves a slow backend of evidence")
    window: Duration = _f(Duration(10.0), "time constant of the decaying latency mean")
    balancer_estimate: bool = _f(True, "also judge each backend by the median of its last min_requests results against the others', when the algorithm's own latency estimate (peak EWMA) agrees it is slow: a backend the algorithm avoids gets too few samples to move its decayed mean")


@attrs.frozen(kw_only=True)
class FailureRateOutlierConfig:
    """Eject a backend whose recent tries fail far more often than its peers' (Envoy's failure percentage)."""

    enabled: bool = _f(True, "evaluate the failure-rate rule")
    threshold: float = _f(50.0, "eject when at least this percentage of the backend's recent tries failed (5xx or gateway), while the median backend still in rotation fails under half of it")
    min_requests: int = _f(3, "recent tries a backend needs before it is judged; low, because a load-aware algorithm stops sending work to a failing backend after its first failures")
    request_volume: int = _f(10, "the rule looks at the backend's last this many tries ...")
    window: Duration = _f(Duration(60.0), "... that are not older than this, counting only time in rotation (a returning backend is judged on its record)")


@attrs.frozen(kw_only=True)
class PassiveHealthConfig:
    """Outlier detection on live traffic: catches what a shallow probe misses."""

    enabled: bool = _f(True, "watch live traffic and eject outliers")
    consecutive_5xx: int = _f(5, "eject after this many 5xx answers in a row (0: off)")
    consecutive_gateway_failures: int = _f(5, "eject after this many connect failures, resets or timeouts in a row (0: off)")
    base_ejection_time: Duration = _f(Duration(30.0), "first ejection lasts this; each repeat adds it again")
    max_ejection_time: Duration = _f(Duration(300.0), "cap on one ejection's length")
    max_ejection_percent: float = _f(50.0, "never eject more than this share of a pool at once (at least one backend of two or more)")
    interval: Duration = _f(Duration(1.0), "how often the latency rule is evaluated and ejection multipliers decay")
    latency: LatencyOutlierConfig = _f(factory=LatencyOutlierConfig, doc="the latency outlier rule")
    failure_rate: FailureRateOutlierConfig = _f(factory=FailureRateOutlierConfig, doc="the failure-rate outlier rule")


@attrs.frozen(kw_only=True)
class HealthConfig:
    active: ActiveHealthConfig | None = _f(None, "active probes; omitted means backends are assumed healthy")
    passive: PassiveHealthConfig = _f(factory=PassiveHealthConfig, doc="passive outlier detection (on by default)")
    panic_threshold: float = _f(50.0, "percent of healthy backends below which the pool routes across all of them (0: never)")


@attrs.frozen(kw_only=True)
class CircuitBreakerConfig:
    """Per-backend circuit breaker (lbtwist.resilience.breaker)."""

    consecutive_failures: int = _f(10, "open a backend's breaker after this many failures in a row (0: breakers off); above passive outlier detection's 5 so the two do not react to the same failures")
    open_for: Duration = _f(Duration(10.0), "an open breaker keeps its backend out this long, then half-opens")
    half_open_requests: int = _f(3, "trial requests let through when half-open; all must succeed to close")
    failure_statuses: list[int] = _f(factory=lambda: [502, 503, 504], doc="response statuses counted as failures (connect failures, resets and timeouts always are)")
    max_retry_after: Duration = _f(Duration(30.0), "cap on how long a backend's Retry-After on 503 keeps it out (0: ignore Retry-After)")


@attrs.frozen(kw_only=True)
class PoolLimitsConfig:
    """Envoy-style per-pool limits: over one, 503 at once naming it (lbtwist.resilience.limits)."""

    max_connections: int = _f(1024, "open connections to the pool's backends")
    max_pending: int = _f(256, "requests waiting for a backend connection")
    max_requests: int = _f(1024, "requests in flight to the pool, retries included")
    max_retries: int = _f(3, "retries in flight to the pool at once (0: no retries)")


@attrs.frozen(kw_only=True)
class RetryBudgetConfig:
    """A retry budget: retries <= budget_percent of requests over window, plus a floor."""

    budget_percent: float = _f(10.0, "retries allowed as a percentage of requests over the window")
    min_retries_per_second: float = _f(3.0, "retries always allowed per second, so a quiet route can retry")
    window: Duration = _f(Duration(10.0), "sliding window over which requests and retries are counted")


#: TLS 1.2 default: forward-secret AEAD suites only, for ECDSA and RSA
#: certificates, strongest first (the server's order wins: prefer_server_ciphers).
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
)
#: TLS 1.3 default: the three standard AEAD suites, strongest first.
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
#: Key-exchange groups, preferred first.
TLS_GROUPS = "X25519:P-256:P-384"


@attrs.frozen(kw_only=True)
class CertificateConfig:
    """One certificate of a terminating listener (lbtwist.tls)."""

    cert: str = _f(doc="PEM file: the certificate, then its intermediates")
    key: str | None = _f(None, "PEM file with the unencrypted private key (omitted: the key is in the cert file)")
    names: list[str] = _f(factory=list, doc="SNI names served, exact or *.wildcard (default: the certificate's DNS subjectAltNames)")
    default: bool = _f(False, "serve it to clients sending no SNI or an unknown name (default: the first certificate)")
    ocsp: str | None = _f(None, "DER OCSP response file to staple (re-read on reload); with ocsp_fetch, also where fetched responses are written")
    ocsp_fetch: bool = _f(False, "fetch and refresh the OCSP response from the responder (the certificate's AIA URL, or ocsp_responder)")
    ocsp_responder: str | None = _f(None, "http:// OCSP responder URL to use instead of the certificate's AIA one (ocsp_fetch)")
    ocsp_issuer: str | None = _f(None, "PEM file with the issuer certificate, when it is not in the cert file (ocsp_fetch)")
    ocsp_timeout: Duration = _f(Duration(10.0), "a responder that has not answered within this fails the fetch (ocsp_fetch)")
    ocsp_refresh_min: Duration = _f(Duration(300.0), "refresh no sooner than this after a fetch; also the first retry delay, capped at 60s (ocsp_fetch)")
    ocsp_refresh_max: Duration = _f(Duration(43200.0), "refresh at least this often, and retry no less often (ocsp_fetch)")


@attrs.frozen(kw_only=True)
class SessionTicketsConfig:
    """Stateless resumption; keys rotate by keeping the last few front contexts (lbtwist.tls.tickets)."""

    enabled: bool = _f(True, "issue and accept session tickets (off: TLS 1.3 resumes through the session cache)")
    rotate: Duration = _f(Duration(12 * 3600.0), "start issuing tickets with a new key this often (0: never)")
    keep: int = _f(2, "ticket keys accepted at once, the current one included (tickets survive keep-1 rotations)")
    prepare: int = _f(0, "future keys made at start-up, so workers forked later share them for this many rotations")
    lifetime: Duration = _f(Duration(7200.0), "how long a ticket resumes; sent to clients as the ticket lifetime hint (at most 7 days)")


@attrs.frozen(kw_only=True)
class SessionCacheConfig:
    """Stateful resumption (session ids; TLS 1.3 when tickets are off)."""

    size: int = _f(20000, "sessions cached per certificate (0: no cache); OpenSSL's fixed limit is 20480")
    timeout: Duration = _f(Duration(300.0), "how long a session stays resumable, cached or in a ticket")


@attrs.frozen(kw_only=True)
class HSTSConfig:
    """HTTP Strict Transport Security (RFC 6797), added on TLS listeners only."""

    max_age: Duration = _f(Duration(31536000.0), "browsers use only HTTPS for the site this long after a response")
    include_subdomains: bool = _f(False, "the policy covers every subdomain too")
    preload: bool = _f(False, "ask to be listed in browsers' preload lists (needs include_subdomains and max_age >= 1 year)")


@attrs.frozen(kw_only=True)
class ListenerTLSConfig:
    """TLS termination on a listener (lbtwist.tls.context)."""

    certificates: list[CertificateConfig] = _f(factory=list, doc="certificates chosen by SNI; the first (or the one marked default) otherwise")
    min_version: str = _f("1.2", 'lowest TLS version accepted: "1.2" or "1.3"')
    ciphers: str = _f(TLS12_CIPHERS, "TLS 1.2 cipher list (OpenSSL syntax)")
    ciphersuites: str = _f(TLS13_CIPHERSUITES, "TLS 1.3 cipher suites (OpenSSL syntax)")
    groups: str = _f(TLS_GROUPS, "key-exchange groups, preferred first (OpenSSL syntax)")
    prefer_server_ciphers: bool = _f(True, "choose by the server's order of ciphers and groups, not the client's")
    alpn: list[str] | None = _f(None, "ALPN protocols, preferred first (default: http/1.1 on http listeners, none on tcp)")
    session_tickets: SessionTicketsConfig = _f(factory=SessionTicketsConfig, doc="ticket resumption and key rotation")
    session_cache: SessionCacheConfig = _f(factory=SessionCacheConfig, doc="session-id resumption")
    handshake_timeout: Duration = _f(Duration(10.0), "close a connection whose handshake has not finished within this")
    hsts: HSTSConfig | None = _f(None, "send Strict-Transport-Security on every response of this (http) listener")


@attrs.frozen(kw_only=True)
class PoolTLSConfig:
    """TLS to a pool's backends (lbtwist.tls.client); probes use it too."""

    ca: str | None = _f(None, "PEM CA bundle backend certificates must chain to (default: the system trust store)")
    server_name: str | None = _f(None, "name to send as SNI and verify in the certificate (default: the backend host)")
    cert: str | None = _f(None, "PEM client certificate for mTLS")
    key: str | None = _f(None, "PEM key of the client certificate (omitted: in the cert file)")
    min_version: str = _f("1.2", 'lowest TLS version accepted: "1.2" or "1.3"')
    alpn: list[str] = _f(factory=list, doc="ALPN protocols to offer (none by default)")
    session_reuse: bool = _f(True, "resume TLS sessions per backend to save handshakes")


@attrs.frozen(kw_only=True)
class TLSPassthroughConfig:
    """Route TLS by SNI without terminating it (tcp listeners, lbtwist.tls.passthrough)."""

    routes: dict[str, str] = _f(factory=dict, doc="server name (exact or *.wildcard) -> pool")
    default: str | None = _f(None, "pool for no SNI or an unrouted name (default: the listener's pool; none: close)")
    client_hello_timeout: Duration = _f(Duration(10.0), "close a connection whose ClientHello has not arrived within this")


@attrs.frozen(kw_only=True)
class DnsDiscoveryConfig:
    """Backends from DNS, re-resolved at the record TTL clamped to [refresh_min, refresh_max]."""

    name: str = _f(doc="the name to resolve, e.g. _http._tcp.app.example (SRV) or app.example (A/AAAA)")
    type: Literal["SRV", "A", "AAAA"] = _f("SRV", "record type: SRV gives ports, weights and priorities; A/AAAA need port")
    port: int | None = _f(None, "A/AAAA: backend port")
    resolver: str | None = _f(None, "host:port of the DNS server; default: the system's (/etc/resolv.conf)")
    refresh: Duration = _f(Duration(5.0), "retry interval after a failure")
    refresh_min: Duration = _f(Duration(1.0), "never re-resolve sooner than this, whatever the TTL")
    refresh_max: Duration = _f(Duration(60.0), "re-resolve at least this often, whatever the TTL")
    timeout: Duration = _f(Duration(2.0), "a query not answered within this fails")


@attrs.frozen(kw_only=True)
class DiscoveryConfig:
    """One discovery source of a pool: exactly one of dns, file, plugin."""

    dns: DnsDiscoveryConfig | None = _f(None, "backends from DNS")
    file: str | None = _f(None, "path of a YAML/JSON list of backends (same shape as backends), watched")
    poll_interval: Duration = _f(Duration(1.0), "file: how often the file is checked (inotify makes changes seen sooner)")
    plugin: str | None = _f(None, "a discovery source from a plugin (lbtwist_discovery hook)")
    options: dict[str, Any] = _f(factory=dict, doc="plugin: its options")
    max_shrink: float = _f(50.0, "an answer removing more than this percentage of the source's backends at once is held until the next answer confirms it")


@attrs.frozen(kw_only=True)
class PoolConfig:
    name: str = _f(doc="pool name referenced by listeners and routes")
    algorithm: str = _f("p2c", "a name from the algorithm registry")
    algorithm_options: dict[str, Any] = _f(factory=dict, doc="passed to the algorithm")
    backends: list[BackendConfig] = _f(factory=list, doc="the servers")
    discovery: list[DiscoveryConfig] = _f(factory=list, doc="sources adding backends at run time (DNS, a file, plugins)")
    connect_timeout: Duration = _f(Duration(3.0), "give up a backend connect after this")
    connect_attempts: int = _f(3, "L4: backends tried for one client connection before refusing it")
    connection_pool: ConnectionPoolConfig = _f(factory=ConnectionPoolConfig, doc="L7 backend connection reuse")
    protocol: Literal["http1", "h2"] = _f("http1", "L7: HTTP/1.1 keep-alive connections, or HTTP/2 (h2c without tls, ALPN h2 with tls) multiplexing many requests per connection; gRPC backends need h2")
    slow_start: Duration = _f(Duration(0.0), "ramp a joining backend's weight over this time")
    drain_timeout: Duration = _f(Duration(30.0), "how long in-flight work on a draining backend may run")
    health: HealthConfig = _f(factory=HealthConfig, doc="active probes, passive outlier detection, panic threshold")
    circuit_breaker: CircuitBreakerConfig = _f(factory=CircuitBreakerConfig, doc="per-backend circuit breakers")
    limits: PoolLimitsConfig = _f(factory=PoolLimitsConfig, doc="per-pool connection, pending, request and retry limits")
    retry_budget: RetryBudgetConfig | None = _f(None, "pool-wide retry budget across all routes (on top of each route's)")
    tls: PoolTLSConfig | None = _f(None, "re-encrypt to the backends with TLS, verifying their certificates")


@attrs.frozen(kw_only=True)
class HeaderRewrite:
    add: dict[str, str] = _f(factory=dict, doc="append these headers")
    set: dict[str, str] = _f(factory=dict, doc="replace these headers")
    remove: list[str] = _f(factory=list, doc="delete these headers")


@attrs.frozen(kw_only=True)
class BackoffConfig:
    """Wait before retry n: uniform in [0, min(max, base * 2**(n-1))] (full jitter)."""

    base: Duration = _f(Duration(0.025), "backoff before the first retry is drawn from [0, base]")
    max: Duration = _f(Duration(0.25), "cap on the backoff ceiling")


@attrs.frozen(kw_only=True)
class RetryConfig:
    """Per-route retries (lbtwist.resilience.retry); the defaults retry connect
    failures and resets of idempotent requests once, inside a 10% budget."""

    retry_on: list[str | int] = _f(factory=lambda: ["connect-failure", "reset"], doc="connect-failure, reset, timeout, gateway-error (502/503/504), 5xx, or status codes")
    max_attempts: int = _f(2, "tries in all, the first included (1: no retries)")
    per_try_timeout: Duration | None = _f(None, "response head must start within this on each try; defaults to the route timeout")
    backoff: BackoffConfig = _f(factory=BackoffConfig, doc="jittered exponential backoff between tries")
    budget_percent: float = _f(10.0, "retries allowed as a percentage of the route's requests over budget_window")
    min_retries_per_second: float = _f(3.0, "retries always allowed per second, so a quiet route can retry")
    budget_window: Duration = _f(Duration(10.0), "sliding window of the retry budget")
    max_replay_body: Size = _f(Size(64 * 1024), "request body bytes kept for replay; a longer body is never retried")
    idempotency_header: str | None = _f("idempotency-key", "requests carrying this header are retryable whatever their method")
    connect_failure_any_method: bool = _f(False, "also retry connect failures of non-idempotent requests (no byte was sent)")


@attrs.frozen(kw_only=True)
class RateLimitConfig:
    """Per-route token buckets (lbtwist.resilience.ratelimit): over the limit, 429 with Retry-After."""

    rate: float = _f(doc="tokens (requests) added per second")
    burst: float | None = _f(None, "bucket size: requests allowed at once after a quiet spell; defaults to rate")
    key: str = _f("client", "client (address), route (one bucket), or header:NAME")
    max_keys: int = _f(100_000, "buckets kept at most; the least recently used is dropped beyond")
    scope: Literal["local", "fleet"] = _f("local", "local: each instance keeps its own buckets; fleet: the buckets live in the fleet's Redis (top-level fleet block), so the limit holds across all instances")


@attrs.frozen(kw_only=True)
class RouteConfig:
    name: str | None = _f(None, "label in logs, metrics and the admin API; unique within the listener (default: the pool's name)")
    match: dict[str, Any] = _f(factory=dict, doc="conditions, all must hold: host, path_prefix, path_regex, method, headers, plugin kinds")
    pool: str = _f(doc="pool that serves matching requests")
    timeout: Duration | None = _f(None, "whole-request timeout (response head must start within it); defaults to the listener's")
    request_headers: HeaderRewrite = _f(factory=HeaderRewrite, doc="rewrite requests before forwarding")
    response_headers: HeaderRewrite = _f(factory=HeaderRewrite, doc="rewrite responses before returning")
    max_body_size: Size | None = _f(None, "413 above this request body size; defaults to the listener's")
    buffering: Literal["stream", "request", "response", "both"] = _f("stream", "buffer whole bodies instead of streaming")
    hash_key: str | None = _f(None, "key for hashing algorithms: source | header:NAME | cookie:NAME")
    retry: RetryConfig = _f(factory=RetryConfig, doc="when and how often to retry (defaults apply when omitted)")
    rate_limit: RateLimitConfig | None = _f(None, "token-bucket rate limit; omitted means none")


@attrs.frozen(kw_only=True)
class Http2Config:
    """HTTP/2 from clients (ALPN ``h2`` on TLS listeners, h2c prior knowledge with ``http2: true``)."""

    max_concurrent_streams: int = _f(100, "streams one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); one more is a protocol error")
    max_header_list_size: Size = _f(Size(32768), "decoded header list of one request above this ends the connection (SETTINGS_MAX_HEADER_LIST_SIZE; HPACK bombs, CONTINUATION floods)")
    initial_window_size: Size = _f(Size(262144), "request body bytes a stream may send before lbtwist's backend side consumed them (per-stream flow-control window)")
    connection_window_size: Size = _f(Size(1048576), "request body bytes all streams of a connection may have unconsumed at once")
    max_resets: int = _f(200, "rapid reset (CVE-2023-44487): streams a client may reset in a burst before GOAWAY ENHANCE_YOUR_CALM")
    resets_per_second: float = _f(50.0, "rapid reset: the reset allowance refills at this rate")
    max_control_frames: int = _f(200, "SETTINGS and PING frames a client may send in a burst before GOAWAY ENHANCE_YOUR_CALM (floods of frames lbtwist must answer)")
    control_frames_per_second: float = _f(50.0, "the control frame allowance refills at this rate")
    max_age: Duration | None = _f(None, "send GOAWAY to an h2 client connection this old (in-flight streams finish), so long-lived clients reconnect and rebalance")


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
    request_timeout: Duration = _f(Duration(15.0), "default route timeout: response head must start within it (below drain_timeout, so a drain never cuts a request that could still finish)")
    forwarded: Literal["x-forwarded", "forwarded", "both", "none"] = _f("x-forwarded", "which forwarding headers to set")
    request_id_header: str = _f("x-request-id", "generated when absent, passed through when present")
    sticky_cookie: str | None = _f(None, "pin clients to a backend with this cookie (set by lbtwist)")
    h2: Http2Config = _f(factory=Http2Config, doc="HTTP/2 client connection limits")


@attrs.frozen(kw_only=True)
class ProxyProtocolConfig:
    """PROXY protocol (HAProxy v1/v2) on a ``mode: tcp`` listener."""

    accept: bool = _f(False, "clients are proxies that open with a PROXY header; the client address is taken from it, a connection without a valid header is closed")
    send: Literal["none", "v1", "v2"] = _f("none", "open each backend connection with a PROXY header carrying the client address")
    header_timeout: Duration = _f(Duration(5.0), "accept: close a connection whose header has not fully arrived within this")


@attrs.frozen(kw_only=True)
class ListenerConfig:
    name: str = _f(doc="listener name")
    bind: str = _f(doc="a Twisted server endpoint description, e.g. tcp:8080:interface=127.0.0.1")
    mode: Literal["tcp", "udp", "http"] = _f("tcp", "tcp relay, udp relay or http reverse proxy")
    pool: str | None = _f(None, "default pool (required unless routes cover every request)")
    routes: list[RouteConfig] = _f(factory=list, doc="http: first match wins, else the default pool")
    max_connections: int = _f(10000, "refuse connections above this many at once")
    max_connections_per_client: int = _f(0, "refuse a client address's connections above this many at once (0: no cap)")
    backlog: int | None = _f(None, "listen queue length; default: the kernel's net.core.somaxconn (4096 when unreadable)")
    idle_timeout: Duration | None = _f(None, "close an idle connection/flow (tcp default 1h, udp 30s)")
    hash_key: str = _f("source", "key for hashing algorithms at L4: source (client address)")
    proxy_protocol: ProxyProtocolConfig = _f(factory=ProxyProtocolConfig, doc="tcp: PROXY protocol from clients and/or to backends")
    http: HttpConfig = _f(factory=HttpConfig, doc="http-mode limits and timeouts")
    tls: ListenerTLSConfig | None = _f(None, "terminate TLS (http and tcp listeners)")
    tls_passthrough: TLSPassthroughConfig | None = _f(None, "tcp: route TLS by SNI to pools without terminating it")
    http2: bool = _f(False, "http listeners without tls: also accept HTTP/2 with prior knowledge (h2c), told apart from HTTP/1.1 by the connection preface")


@attrs.frozen(kw_only=True)
class AdminConfig:
    bind: str = _f("tcp:9900:interface=127.0.0.1", "admin API endpoint")
    token: str | None = _f(None, "bearer token required on every admin request (prefer token_file); mandatory when bind is not loopback")
    token_file: str | None = _f(None, "file holding the bearer token (first line); read at start and reload")
    header_timeout: Duration = _f(Duration(5.0), "a request (head and its at most 64 KiB body) must arrive within this of a new connection or of its first byte: a trickling client is closed (408)")
    idle_timeout: Duration = _f(Duration(60.0), "close a keep-alive admin connection idle this long between requests")
    max_connections: int = _f(64, "admin connections open at once; above it a connection that has not yet sent an authorized request is closed to make room, else the new one is refused (503)")
    max_connections_per_client: int = _f(8, "admin connections open at once from one client address, with the same rule as max_connections")


@attrs.frozen(kw_only=True)
class AccessLogConfig:
    """Structured access log: one JSON line per request (L7) or connection/flow (L4)."""

    path: str = _f("stdout", "stdout, stderr, or a file appended to")
    state_events: bool = _f(True, "also write backend state changes (health, ejections, drains) as JSON lines")
    flush_interval: Duration = _f(Duration(1.0), "buffered lines are written at least this often (0: every line)")


@attrs.frozen(kw_only=True)
class DeploymentConfig:
    """How this balancer is deployed; lbtwist cannot see it, ``lbtwist check`` asks."""

    instances: int = _f(1, "balancer instances serving the same traffic")
    failover: str | None = _f(None, "how traffic moves off a dead instance: e.g. 'keepalived VIP', 'anycast', 'DNS'")


@attrs.frozen(kw_only=True)
class FleetTLSConfig:
    """TLS to Redis (lbtwist.fleet): verify the server, optionally present a client certificate."""

    ca: str | None = _f(None, "PEM file of the CA(s) that sign Redis's certificate (default: the system trust store)")
    cert: str | None = _f(None, "PEM client certificate, for Redis's tls-auth-clients (needs key)")
    key: str | None = _f(None, "PEM private key of cert")
    server_name: str | None = _f(None, "name Redis's certificate must carry (default: the host in redis)")


@attrs.frozen(kw_only=True)
class FleetConfig:
    """State shared by the instances of a fleet through Redis (lbtwist.fleet):
    fleet-scope rate limits and passive ejections. Redis being down, slow or
    wrong never blocks a request longer than ``timeout``: lbtwist falls back
    to local limits and local ejections until it is back."""

    redis: str = _f(doc="tcp:HOST:PORT, unix:PATH, redis://[USER:PASSWORD@]HOST[:PORT][/DB] or rediss://... (TLS)")
    name: str = _f(doc="fleet name: instances with the same name share state; Redis keys start with lbtwist:NAME:")
    username: str | None = _f(None, "Redis ACL user (AUTH username password); default: the default user")
    password: str | None = _f(None, "Redis password (prefer password_file)")
    password_file: str | None = _f(None, "file holding the Redis password (first line); read at start")
    db: int = _f(0, "Redis database number (SELECT)")
    tls: FleetTLSConfig | None = _f(None, "TLS to Redis (also turned on by a rediss:// address)")
    timeout: Duration = _f(Duration(0.05), "longest a request waits on Redis; a call not answered within it falls back to the local decision and marks Redis down")
    connect_timeout: Duration = _f(Duration(1.0), "a connection (with AUTH, SELECT, script loading and subscribing) must be ready within this")
    heartbeat: Duration = _f(Duration(1.0), "PING both connections this often, so a frozen Redis is noticed while idle")
    reconnect_max: Duration = _f(Duration(5.0), "cap on the (jittered, doubling from 100ms) wait between reconnect attempts")
    lease_max: int = _f(16, "fleet rate limits: tokens one instance may lease from the shared bucket per key at once (1: one Redis call per request)")
    lease_time: Duration = _f(Duration(0.25), "fleet rate limits: leased tokens not spent within this are dropped; bounds over-admission to the rate times this")
    share_ejections: bool = _f(True, "publish this instance's passive ejections and apply the other instances' ones")


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
    access_log: AccessLogConfig | None = _f(None, "JSON access log; omitted means none")
    deployment: DeploymentConfig | None = _f(None, "balancer instances and failover, for lbtwist check")
    fleet: FleetConfig | None = _f(None, "state shared with the other instances through Redis; omitted means none")
    workers: int | Literal["auto"] = _f("auto", "data-plane processes: 'auto' (one per CPU lbtwist may run on) or a number; 1 is one process with no master")
