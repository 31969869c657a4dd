# -*- test-case-name: tests.test_health_probes -*-
"""The built-in probe kinds: ``tcp`` (a connect) and ``http`` (one request via
treq). Each probe answers with a L{ProbeResult} and never errbacks, so the
scheduler treats every failure the same way, with a reason fit for a log line.

A probe opens a fresh connection each time (no keep-alive): reusing a
connection would prove only that an old socket still works, not that the
backend accepts new ones.
"""
from __future__ import annotations

import functools
import re
import types
from typing import Any, Callable, Mapping

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import classImplements, implementer

from lbtwist.health import ProbeResult
from lbtwist.interfaces import IHealthProbe
from lbtwist.pool import Backend, join_address

#: The body an ``http`` probe reads at most (for ``body_match``); the rest is dropped.
BODY_LIMIT = 64 * 1024

#: Keys the built-in kinds understand (``timeout`` is always given).
TCP_KEYS = frozenset({"timeout"})
HTTP_KEYS = frozenset({"timeout", "path", "method", "host", "expected_statuses", "body_match"})


def describe_failure(failure: Failure, timeout: float) -> str:
    """A short reason for a failed probe, the same words for every kind."""
    if failure.check(defer.TimeoutError, error.TimeoutError, defer.CancelledError,
                     error.ConnectingCancelledError):
        return f"timed out after {timeout:g}s"
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(error.DNSLookupError):
        return "DNS lookup failed"
    if failure.check(error.ConnectionLost, error.ConnectionDone):
        return "connection closed early"
    # twisted.web's ResponseFailed / ResponseNeverReceived wrap a list of reasons
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        inner = reasons[0]
        if isinstance(inner, Failure) and inner.check(defer.CancelledError):
            return f"timed out after {timeout:g}s"
        if isinstance(inner, Failure) and inner.check(error.ConnectionLost, error.ConnectionDone):
            return "connection closed without a complete response"
        if isinstance(inner, Failure):
            return f"{type(failure.value).__name__}: {inner.getErrorMessage()}"
    msg = failure.getErrorMessage()
    return f"{failure.type.__name__}: {msg}" if msg else failure.type.__name__


def _timeout_option(options: Mapping[str, Any]) -> float:
    t = options.get("timeout", 2.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {t!r}")
    return float(t)


def client_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """An IP literal connects directly; a name goes through HostnameEndpoint."""
    # imported here: twisted.internet.endpoints imports pyOpenSSL, which a
    # worker process (no probes) never needs
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint

    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def _guard(d: defer.Deferred, reactor: Any, timeout: float) -> defer.Deferred:
    """Bound ``d`` by ``timeout`` and turn any failure into a failed result."""
    d.addTimeout(timeout, reactor)
    d.addErrback(lambda f: ProbeResult(False, describe_failure(f, timeout), None))
    return d


@implementer(IHealthProbe)
class TcpProbe:
    """Passes when a TCP connection to the backend opens within ``timeout``."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        #: ``() -> BackendTLS | None``: the pool's TLS (see L{use_pool_tls}).
        self.tls_lookup: Callable[[], Any] | None = None

    def probe(self, backend: Backend) -> defer.Deferred:
        start = self.reactor.seconds()
        btls = self.tls_lookup() if self.tls_lookup is not None else None
        if btls is not None:
            return self._probe_tls(backend, btls, start)
        try:
            ep = client_endpoint(self.reactor, backend.host, backend.port, self.timeout)
            factory = Factory.forProtocol(Protocol)
            factory.noisy = False  # no "Starting factory" log line per probe
            d = ep.connect(factory)
        except Exception:
            d = defer.fail()

        def connected(proto: Protocol) -> ProbeResult:
            proto.transport.loseConnection()
            return ProbeResult(True, "connected", self.reactor.seconds() - start)

        d.addCallback(connected)
        return _guard(d, self.reactor, self.timeout)

    def _probe_tls(self, backend: Backend, btls: Any, start: float) -> defer.Deferred:
        """A TLS pool: pass only on a completed, verified handshake."""
        from lbtwist.tls.client import probe_tls

        try:
            ep = client_endpoint(self.reactor, backend.host, backend.port, self.timeout)
            creator = btls.creator_for(backend.host, key=backend.address)
            d = probe_tls(ep, creator, self.reactor, self.timeout)
        except Exception:
            d = defer.fail()
        d.addCallback(lambda _: ProbeResult(True, "TLS handshake verified", self.reactor.seconds() - start))
        return _guard(d, self.reactor, self.timeout)


def parse_statuses(spec: str | int) -> Callable[[int], bool]:
    """``"200-399,404"`` -> a predicate on status codes. Raises ValueError."""
    ranges: list[tuple[int, int]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"expected_statuses: {part!r} is not a status or a range like 200-399") from None
        if not (100 <= a <= b <= 599):
            raise ValueError(f"expected_statuses: {part!r} is outside 100-599 or reversed")
        ranges.append((a, b))
    if not ranges:
        raise ValueError("expected_statuses: no status given")
    frozen = tuple(ranges)
    return lambda code: any(a <= code <= b for a, b in frozen)


class _BoundedBody(Protocol):
    """Reads a response body up to ``limit`` bytes, then stops the transport.
    Cancelling the Deferred (a probe timeout) also stops it, so a backend that
    trickles its body cannot hold a probe connection open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.stopped = False
        self.done: defer.Deferred = defer.Deferred(canceller=self._cancel)

    def _cancel(self, d: defer.Deferred) -> None:
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        room = self.limit - self.size
        self.chunks.append(data[:room])
        self.size += min(len(data), room)
        if self.size >= self.limit:
            self.stopped = True
            self.transport.stopProducing()
            self._finish(None)

    def connectionLost(self, reason: Failure) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason.check(ResponseDone, PotentialDataLoss) or self.stopped:
            self._finish(None)
        else:
            self._finish(reason)

    def _finish(self, failure: Failure | None) -> None:
        if self.done.called:
            return
        if failure is None:
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(failure)


@functools.cache
def _web() -> Any:
    """twisted.web's HTTP client (and with it twisted.web.http, h2, hpack),
    imported when the first HTTP probe is built: only the process that
    probes (the master, or ``workers: 1``) needs it; a worker never loads it
    (start-up time and memory, docs/operations.md "Memory")."""
    from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
    from twisted.web.iweb import IAgentEndpointFactory

    class _QuietFactory(_HTTP11ClientFactory):
        noisy = False

    class QuietPool(HTTPConnectionPool):
        """Agent's connection factory logs two lines per connection; a probe
        connects every few seconds per backend, which would drown the log."""

        _factory = _QuietFactory

    classImplements(_EndpointFactory, IAgentEndpointFactory)
    return types.SimpleNamespace(Agent=Agent, QuietPool=QuietPool)


class _EndpointFactory:
    """Agent's default HostnameEndpoint resolves even IP literals in a thread
    and reports a refused connect only after its 0.3 s attempt delay; probes
    connect to IP literals directly so "connection refused" arrives at once."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.tls_lookup: Callable[[], Any] | None = None

    def endpointForURI(self, uri: Any) -> Any:
        if uri.scheme != b"http":
            from twisted.web.error import SchemeNotSupported

            raise SchemeNotSupported(f"health probes speak http, not {uri.scheme!r}")
        host = url_host_to_ip(uri.host.decode("ascii"))
        ep = client_endpoint(self.reactor, host, uri.port, self.timeout)
        btls = self.tls_lookup() if self.tls_lookup is not None else None
        if btls is None:
            return ep
        address = join_address(host, uri.port)
        from lbtwist.tls.client import TLSClientEndpoint

        return TLSClientEndpoint(ep, btls.creator_for(host, key=address), self.reactor)


def use_pool_tls(probe: Any, lookup: Callable[[], Any]) -> Any:
    """Make a built-in probe speak TLS when ``lookup()`` gives the pool's
    L{lbtwist.tls.client.BackendTLS} (looked up at each probe, so a reload
    that changes the pool's TLS applies at once): ``tcp`` passes on a verified
    handshake, ``http`` sends its request over TLS. Other probes are returned
    unchanged (a plugin probe handles TLS itself)."""
    if isinstance(probe, TcpProbe):
        probe.tls_lookup = lookup
    elif isinstance(probe, HttpProbe) and probe.endpoints is not None:
        probe.endpoints.tls_lookup = lookup
    return probe


#: treq parses URLs with hyperlink, which cannot encode IPv6 literals, so an
#: IPv6 backend is named ``v6-<address with ':' as 'x'>.lbtwist.invalid`` in
#: the URL and mapped back here (the Host header still carries the address).
_V6_PREFIX, _V6_SUFFIX = "v6-", ".lbtwist.invalid"


def ip_to_url_host(host: str) -> str:
    if ":" in host:
        return f"{_V6_PREFIX}{host.replace(':', 'x')}{_V6_SUFFIX}"
    return host


def url_host_to_ip(host: str) -> str:
    if host.startswith(_V6_PREFIX) and host.endswith(_V6_SUFFIX):
        return host[len(_V6_PREFIX):-len(_V6_SUFFIX)].replace("x", ":")
    return host


@implementer(IHealthProbe)
def _unsafe(text: str) -> bool:
    """Would ``text`` break the request line or a header (space, CR, LF, other controls)?"""
    return any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text)


class HttpProbe:
    """Passes when ``method path`` answers an expected status (and, with
    ``body_match``, a body matching the regex) within ``timeout``.

    ``http_client`` is anything with treq's ``request(method, url, headers=,
    allow_redirects=)``: a L{treq.HTTPClient} in production, a
    L{treq.testing.StubTreq} in tests."""

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        *,
        path: str = "/healthz",
        method: str = "GET",
        host: str | None = None,
        expected_statuses: str = "200-399",
        body_match: str | None = None,
        http_client: Any = None,
    ) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        if _unsafe(path):
            raise ValueError(f"path must hold no spaces or control characters, got {path!r}")
        if host is not None and (not isinstance(host, str) or not host or _unsafe(host)):
            raise ValueError(f"host must be a host name (and port), got {host!r}")
        if not isinstance(method, str) or not method.isalpha():
            raise ValueError(f"method must be an HTTP method name, got {method!r}")
        self.reactor = reactor
        self.timeout = timeout
        self.path = path
        self.method = method.upper()
        self.host = host
        self.status_ok = parse_statuses(expected_statuses)
        self.expected = str(expected_statuses)
        try:
            self.body_re = re.compile(body_match.encode()) if body_match else None
        except re.error as e:
            raise ValueError(f"body_match: bad regular expression {body_match!r}: {e}") from None
        #: The agent's endpoints (None with an injected http_client).
        self.endpoints: _EndpointFactory | None = None
        if http_client is None:
            self.endpoints = _EndpointFactory(reactor, timeout)
        #: built at the first probe: config validation builds probes to check
        #: their options, and treq/twisted.web (with pyOpenSSL) need not be
        #: imported by a process that never probes (a worker)
        self._client = http_client

    @property
    def client(self) -> Any:
        if self._client is None:
            from treq.client import HTTPClient

            # persistent=False: every probe tests a new connection, see module doc
            web = _web()
            pool = web.QuietPool(self.reactor, persistent=False)
            agent = web.Agent.usingEndpointFactory(self.reactor, self.endpoints, pool=pool)
            self._client = HTTPClient(agent)
        return self._client

    def url(self, backend: Backend) -> str:
        return f"http://{ip_to_url_host(backend.host)}:{backend.port}{self.path}"

    def probe(self, backend: Backend) -> defer.Deferred:
        start = self.reactor.seconds()
        # no Connection header: the non-persistent pool sends "Connection: close"
        headers = {"Host": self.host or backend.address, "User-Agent": "lbtwist-health"}
        try:
            d = self.client.request(self.method, self.url(backend), headers=headers, allow_redirects=False)
        except Exception:
            d = defer.fail()
        d.addCallback(self._judge, start)
        return _guard(d, self.reactor, self.timeout)

    def _judge(self, response: Any, start: float) -> defer.Deferred:
        body = _BoundedBody(BODY_LIMIT)
        response.deliverBody(body)

        def verdict(data: bytes) -> ProbeResult:
            latency = self.reactor.seconds() - start
            code = response.code
            if not self.status_ok(code):
                return ProbeResult(False, f"status {code} (expected {self.expected})", latency)
            if self.body_re is not None and not self.body_re.search(data):
                return ProbeResult(False, f"status {code} but body does not match {self.body_re.pattern.decode()!r}", latency)
            return ProbeResult(True, f"status {code}", latency)

        return body.done.addCallback(verdict)


def _check_keys(kind: str, options: Mapping[str, Any], known: frozenset) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{kind} probe: unknown option(s) {', '.join(map(repr, unknown))}")


def tcp_factory(options: Mapping[str, Any], *, reactor: Any) -> TcpProbe:
    _check_keys("tcp", options, TCP_KEYS)
    return TcpProbe(reactor, _timeout_option(options))


def http_factory(options: Mapping[str, Any], *, reactor: Any, http_client: Any = None) -> HttpProbe:
    _check_keys("http", options, HTTP_KEYS)
    kw = {k: options[k] for k in ("path", "method", "host", "expected_statuses", "body_match") if k in options}
    return HttpProbe(reactor, _timeout_option(options), http_client=http_client, **kw)
