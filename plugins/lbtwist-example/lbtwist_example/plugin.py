"""The hook implementations lbtwist calls, found through the ``lbtwist``
entry point ``example = lbtwist_example.plugin``.

A plugin only returns specs; lbtwist calls the factories once at config load
and keeps the objects they make, so nothing here runs per request except
``pick`` and ``matches``.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl, urlsplit

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from lbtwist import hookimpl
from lbtwist.health import ProbeResult
from lbtwist.health.probes import client_endpoint, describe_failure
from lbtwist.interfaces import IBalancer, IHealthProbe, IRouteMatcher
from lbtwist.registry import BalancerSpec, ProbeSpec, RuleSpec

# -- algorithm: ordered_failover ----------------------------------------------


@implementer(IBalancer)
class OrderedFailover:
    """All work to the first usable backend in config order.

    The pool passes candidates in config order, already filtered to usable
    ones (healthy, not draining, not ejected), so "first eligible" is the
    primary while it is up and the next standby otherwise. A backend tried
    already for this work (``ctx.exclude``) or weighted 0 is passed over.
    """

    def pick(self, candidates: Sequence[Any], ctx: Any) -> Any:
        exclude = ctx.exclude
        for b in candidates:
            if b.weight > 0 and not (exclude and b in exclude):
                return b
        return None

    def on_start(self, backend: Any, now: float) -> None:
        pass

    def on_finish(self, backend: Any, now: float, latency: float, ok: bool) -> None:
        pass


def make_ordered_failover(options: dict[str, Any], *, clock: Any = None, rng: Any = None) -> OrderedFailover:
    if options:
        name = next(iter(options))
        raise ValueError(f"ordered_failover: unknown option {name!r}; ordered_failover takes no options")
    return OrderedFailover()


@hookimpl
def lbtwist_balancers() -> Iterable[BalancerSpec]:
    return [
        BalancerSpec(
            "ordered_failover",
            make_ordered_failover,
            "first usable backend in config order (active/passive failover)",
        )
    ]


# -- route match: query_param --------------------------------------------------


@implementer(IRouteMatcher)
class QueryParamMatcher:
    """Holds when the query string has every ``name=value`` pair required."""

    def __init__(self, required: dict[str, str]) -> None:
        self.required = required

    def matches(self, request: Any) -> bool:
        query = urlsplit(request.target).query
        if not query:
            return False
        found: dict[str, set[str]] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name in self.required:
                found.setdefault(name, set()).add(value)
        return all(v in found.get(k, ()) for k, v in self.required.items())

    def __repr__(self) -> str:
        return f"<query_param {self.required!r}>"


def make_query_param(value: Any) -> QueryParamMatcher:
    """``{name: value, ...}``; values may be strings or numbers (YAML ``page: 2``)."""
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"query_param must be a mapping of parameter name to value, e.g. {{beta: '1'}}, not {value!r}"
        )
    required: dict[str, str] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"query_param: parameter names must be non-empty strings, not {name!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"query_param: value of {name!r} must be a string or a number, not {v!r}")
        required[name] = str(v)
    return QueryParamMatcher(required)


@hookimpl
def lbtwist_routing_rules() -> Iterable[RuleSpec]:
    return [RuleSpec("query_param", make_query_param, "query string has name=value (every pair listed)")]


# -- health probe kind: tcp_banner ---------------------------------------------


class _Banner(Protocol):
    """Optionally sends a greeting, then reads until ``expect`` shows up."""

    def __init__(self, send: bytes, expect: bytes, limit: int) -> None:
        self.send = send
        self.expect = expect
        self.limit = limit
        self.buf = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if self.expect in self.buf:
            self._finish(True, "banner matched")
            self.transport.loseConnection()
        elif len(self.buf) >= self.limit:
            self._finish(False, f"no {self.expect.decode(errors='replace')!r} in the first {self.limit} bytes")
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self._finish(False, f"closed before {self.expect.decode(errors='replace')!r} (got {self.buf[:40]!r})")

    def _finish(self, ok: bool, reason: str) -> None:
        if not self.done.called:
            self.done.callback((ok, reason))


@implementer(IHealthProbe)
class TcpBannerProbe:
    """Passes when the backend, once connected (and sent ``send``), answers
    with bytes containing ``expect`` within ``timeout``: a process that
    accepts connections but is wedged (SMTP, SSH, Redis ``PING``) fails."""

    LIMIT = 4096

    def __init__(self, reactor: Any, timeout: float, expect: bytes, send: bytes = b"") -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.expect = expect
        self.send = send

    def probe(self, backend: Any) -> defer.Deferred:
        start = self.reactor.seconds()
        protos: list[_Banner] = []

        def build() -> _Banner:
            p = _Banner(self.send, self.expect, self.LIMIT)
            protos.append(p)
            return p

        def cancel(_: defer.Deferred) -> None:
            if protos and protos[0].transport is not None:
                protos[0].transport.abortConnection()
            connecting.cancel()

        result: defer.Deferred = defer.Deferred(canceller=cancel)
        ep = client_endpoint(self.reactor, backend.host, backend.port, self.timeout)
        factory = Factory.forProtocol(build)
        factory.noisy = False  # no "Starting/Stopping factory" log lines per probe
        connecting = ep.connect(factory)
        connecting.addCallback(lambda proto: proto.done)
        connecting.addCallbacks(
            lambda v: result.called or result.callback(ProbeResult(v[0], v[1], self.reactor.seconds() - start)),
            lambda f: result.called or result.errback(f),
        )
        result.addTimeout(self.timeout, self.reactor)
        result.addErrback(lambda f: ProbeResult(False, describe_failure(f, self.timeout)))
        return result


def make_tcp_banner(options: dict[str, Any], *, reactor: Any) -> TcpBannerProbe:
    """Options: ``expect`` (required text), ``send`` (text, escapes like
    ``\\r\\n`` allowed), ``timeout`` (seconds, given by lbtwist)."""
    unknown = sorted(set(options) - {"expect", "send", "timeout"})
    if unknown:
        raise ValueError(f"tcp_banner: unknown option(s) {', '.join(map(repr, unknown))}; takes expect, send")
    expect = options.get("expect")
    if not isinstance(expect, str) or not expect:
        raise ValueError(f"tcp_banner: 'expect' must be a non-empty string, not {expect!r}")
    send = options.get("send", "")
    if not isinstance(send, str):
        raise ValueError(f"tcp_banner: 'send' must be a string, not {send!r}")
    timeout = options.get("timeout", 2.0)
    return TcpBannerProbe(
        reactor,
        float(timeout),
        expect.encode("utf-8"),
        send.encode("utf-8").decode("unicode_escape").encode("latin-1"),
    )


@hookimpl
def lbtwist_health_probes() -> Iterable[ProbeSpec]:
    return [
        ProbeSpec(
            "tcp_banner",
            make_tcp_banner,
            "connect, optionally send a line, pass when the answer contains 'expect'",
        )
    ]


# -- discovery source: http_json -----------------------------------------------


class HttpJsonSource:
    """Backends from an HTTP endpoint answering a JSON list in the shape of
    ``backends`` (a minimal service registry, or a cloud API behind a small
    adapter), fetched every ``interval``. A failed fetch, a non-2xx status or
    a bad body is reported as a failure: lbtwist keeps the last known set."""

    kind = "http_json"

    def __init__(self, reactor: Any, url: str, interval: float, timeout: float) -> None:
        self.reactor = reactor
        self.url = url
        self.target = url
        self.interval = interval
        self.timeout = timeout
        self._loop: Any = None
        self._tracker: Any = None
        self._inflight: defer.Deferred | None = None

    def start(self, tracker: Any) -> None:
        from twisted.internet import task

        self._tracker = tracker
        self._loop = task.LoopingCall(self.fetch)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._inflight is not None:
            self._inflight.cancel()

    def fetch(self) -> defer.Deferred | None:
        if self._inflight is not None:
            return None  # the previous fetch is still running
        from twisted.web.client import Agent, readBody

        from lbtwist.discovery.file import parse_backends

        async def go() -> None:
            response = await Agent(self.reactor, connectTimeout=self.timeout).request(b"GET", self.url.encode())
            body = await readBody(response)
            if not 200 <= response.code < 300:
                raise ValueError(f"HTTP {response.code}")
            self._tracker.update(parse_backends(body.decode("utf-8"), self.url))

        d = defer.ensureDeferred(go())
        d.addTimeout(self.timeout, self.reactor)
        self._inflight = d

        def failed(f: Any) -> None:
            if not f.check(defer.CancelledError) or self._loop is None or self._loop.running:
                self._tracker.failed(f"{type(f.value).__name__}: {f.getErrorMessage()}")

        def done(result: Any) -> None:
            self._inflight = None

        d.addErrback(failed)
        d.addBoth(done)
        return d


def make_http_json(options: dict[str, Any], *, reactor: Any) -> HttpJsonSource:
    """Options: ``url`` (http:// or https://, required), ``interval`` and
    ``timeout`` (seconds; defaults 5 and 2)."""
    unknown = sorted(set(options) - {"url", "interval", "timeout"})
    if unknown:
        raise ValueError(f"http_json: unknown option(s) {', '.join(map(repr, unknown))}; takes url, interval, timeout")
    url = options.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"http_json: 'url' must be an http:// or https:// URL, not {url!r}")
    values = {}
    for name, default in (("interval", 5.0), ("timeout", 2.0)):
        v = options.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"http_json: {name!r} must be a number of seconds above 0, not {v!r}")
        values[name] = float(v)
    return HttpJsonSource(reactor, url, values["interval"], values["timeout"])


@hookimpl
def lbtwist_discovery() -> Iterable[Any]:
    from lbtwist.registry import DiscoverySpec

    return [DiscoverySpec("http_json", make_http_json, "backends from an HTTP endpoint answering a JSON list")]
