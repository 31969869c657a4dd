"""Test kit for the L7 proxy: a runtime built by hand, an in-memory harness
(MemoryReactorClock + StringTransport, deterministic), and real-socket
helpers (an origin server with scripted behaviours, a raw client, a response
splitter that does not share code with lbtwist's parser)."""
from __future__ import annotations

import random
from typing import Any, Callable, Iterable

import httptools
from twisted.internet import defer, error as terror, protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from lbtwist.config.model import (
    BackendConfig,
    Config,
    ConnectionPoolConfig,
    HttpConfig,
    ListenerConfig,
    PoolConfig,
)
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime


@implementer(IBalancer)
class RoundRobin:
    """The simplest balancer: candidates in turn (tests only)."""

    def __init__(self) -> None:
        self.i = 0

    def pick(self, candidates, ctx):
        free = [b for b in candidates if b not in ctx.exclude] or None
        if not free:
            return None
        b = free[self.i % len(free)]
        self.i += 1
        return b

    def on_start(self, backend, now):
        pass

    def on_finish(self, backend, now, latency, ok):
        pass


_REGISTRY: Registry | None = None


def registry() -> Registry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry.default(entry_points=True)
    return _REGISTRY


def make_runtime(
    reactor: Any,
    pools: dict[str, list[str]],
    listener: ListenerConfig,
    *,
    connection_pool: ConnectionPoolConfig | None = None,
    connect_timeout: float = 3.0,
    balancer: Callable[[], Any] = RoundRobin,
) -> Runtime:
    pcfgs = [
        PoolConfig(
            name=name,
            backends=[BackendConfig(address=a) for a in addrs],
            connection_pool=connection_pool or ConnectionPoolConfig(),
            connect_timeout=connect_timeout,
        )
        for name, addrs in pools.items()
    ]
    cfg = Config(listeners=[listener], pools=pcfgs)
    rt = Runtime(reactor=reactor, registry=registry(), config=cfg)
    for p in pcfgs:
        rt.pools[p.name] = Pool(p.name, [Backend(b.address) for b in p.backends], balancer(), reactor,
                                rng=random.Random(7))
        rt.pool_configs[p.name] = p
    return rt


def listener_config(pool: str | None = "app", *, routes: Iterable[Any] = (), **http: Any) -> ListenerConfig:
    return ListenerConfig(
        name="web", bind="tcp:0:interface=127.0.0.1", mode="http", pool=pool,
        routes=list(routes), http=HttpConfig(**http),
    )


# -- in-memory harness ----------------------------------------------------------------


class MemBackend:
    """One in-memory backend connection the proxy opened."""

    def __init__(self, proto: Any, transport: StringTransport, host: str, port: int) -> None:
        self.proto = proto
        self.transport = transport
        self.address = f"{host}:{port}"

    def sent(self) -> bytes:
        return self.transport.value()

    def clear(self) -> None:
        self.transport.clear()

    def reply(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def close(self, clean: bool = True) -> None:
        self.transport.disconnecting = True
        self.proto.connectionLost(Failure(terror.ConnectionDone() if clean else terror.ConnectionLost()))


class MemHarness:
    """The proxy on a MemoryReactorClock: clients and backends are
    StringTransports driven by hand; time moves only with ``advance``."""

    def __init__(self, pools: dict[str, list[str]] | None = None, *, listener: ListenerConfig | None = None,
                 **kw: Any) -> None:
        from lbtwist.l7.listener import HttpProxyFactory

        self.reactor = MemoryReactorClock()
        self.listener = listener or listener_config()
        self.runtime = make_runtime(self.reactor, pools or {"app": ["10.0.0.1:80"]}, self.listener, **kw)
        self.factory = HttpProxyFactory(self.listener, self.runtime)
        self._connected = 0

    def client(self, peer: str = "192.0.2.7") -> tuple[Any, StringTransport]:
        from twisted.internet.address import IPv4Address

        addr = IPv4Address("TCP", peer, 40000)
        proto = self.factory.buildProtocol(addr)  # as the reactor does: refusals are decided here
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        return proto, t

    def pending_connects(self) -> int:
        return len(self.reactor.tcpClients) - self._connected

    def accept(self) -> MemBackend:
        """Complete the oldest pending backend connect."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[self._connected]
        self._connected += 1
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        return MemBackend(proto, t, host, port)

    def refuse(self, exc: Exception | None = None) -> None:
        """Fail the oldest pending backend connect."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[self._connected]
        self._connected += 1
        factory.clientConnectionFailed(None, Failure(exc or terror.ConnectionRefusedError()))

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)


# -- real sockets ------------------------------------------------------------------------


class OriginRequest:
    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.version = ""

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def ok(body: bytes = b"ok", status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    h = b"".join(b"%s: %s\r\n" % hv for hv in headers)
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), h, body)


class _OriginProtocol(protocol.Protocol):
    """HTTP/1.1 origin: httptools parses requests; ``handler(req, proto)``
    returns bytes to send, or None after acting on ``proto`` itself."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.live.add(self)
        self._new_parser()

    def _new_parser(self) -> None:
        self.req = OriginRequest()
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.req.body += body
        self.factory.body_bytes += len(body)

    def on_message_complete(self) -> None:
        req = self.req
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        self.factory.requests.append(req)
        self.req = OriginRequest()
        if self.parser.should_upgrade():
            return  # upgraded() answers
        out = self.factory.handler(req, self)
        if out is not None:
            self.transport.write(out)

    def dataReceived(self, data: bytes) -> None:
        self.factory.raw += data
        if self.factory.raw_mode is not None:
            self.factory.raw_mode(self, data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded(data[e.args[0]:] if e.args else b"")
        except httptools.HttpParserError:
            self.transport.loseConnection()

    def upgraded(self, rest: bytes) -> None:
        req = self.factory.requests[-1]
        self.factory.handler(req, self)
        self.factory.raw_mode = self.factory.on_upgrade
        if rest:
            self.factory.raw_mode(self, rest)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.live.discard(self)


class Origin(protocol.ServerFactory):
    """A scripted origin on 127.0.0.1:0 that counts what it sees."""

    protocol = _OriginProtocol
    noisy = False

    def __init__(self, handler: Callable[[OriginRequest, Any], bytes | None] | None = None) -> None:
        self.handler = handler or (lambda req, p: ok(b"ok " + req.url))
        self.connections = 0
        self.requests: list[OriginRequest] = []
        self.raw = b""
        self.body_bytes = 0
        self.live: set[Any] = set()
        self.raw_mode: Any = None
        self.on_upgrade: Any = None
        self.port: Any = None

    def listen(self, reactor: Any) -> "Origin":
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        for p in list(self.live):
            p.transport.abortConnection()
        await self.port.stopListening()


class Echo(protocol.Protocol):
    """Sends back what it receives (a TCP backend for relays)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class RawClient(protocol.Protocol):
    """Writes raw bytes, collects everything received."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], defer.Deferred]] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def _check(self) -> None:
        for w in list(self._waiters):
            pred, d = w
            if pred(self.data):
                self._waiters.remove(w)
                d.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        for pred, d in self._waiters:
            if not d.called:
                d.callback(self.data)
        self._waiters = []
        if not self.done.called:
            self.done.callback(self.data)

    def wait(self, pred: Callable[[bytes], bool], reactor: Any, timeout: float = 5.0) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if pred(self.data) or self.lost:
            d.callback(self.data)
            return d
        self._waiters.append((pred, d))
        return d.addTimeout(timeout, reactor)

    def closed(self, reactor: Any, timeout: float = 5.0) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.done.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        return d.addTimeout(timeout, reactor)


async def connect(reactor: Any, port: int) -> RawClient:
    cc = protocol.ClientCreator(reactor, RawClient)
    d = cc.connectTCP("127.0.0.1", port, timeout=5)
    return await d.addTimeout(5, reactor)


async def raw_request(reactor: Any, port: int, data: bytes, *, count: int = 1, timeout: float = 5.0,
                      head_request: bool = False) -> tuple[list["Resp"], RawClient]:
    """Send ``data``, wait for ``count`` complete responses (or close)."""
    c = await connect(reactor, port)
    c.transport.write(data)
    await c.wait(lambda d: len(split_responses(d, head_request)) >= count, reactor, timeout)
    return split_responses(c.data, head_request), c


class Resp:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def __repr__(self) -> str:
        return f"<Resp {self.status} {self.body[:60]!r}>"


class _Splitter:
    def __init__(self) -> None:
        self.out: list[Resp] = []
        self.cur = Resp()
        self.parser: Any = None

    def on_header(self, n: bytes, v: bytes) -> None:
        self.cur.headers.append((n, v))

    def on_headers_complete(self) -> None:
        self.cur.status = self.parser.get_status_code()

    def on_body(self, b: bytes) -> None:
        self.cur.body += b

    def on_message_complete(self) -> None:
        self.cur.complete = True
        self.out.append(self.cur)
        self.cur = Resp()


def split_responses(data: bytes, head_request: bool = False) -> list[Resp]:
    """Complete responses in ``data`` (a test-side parser, independent of lbtwist's)."""
    if head_request:
        out = []
        for block in data.split(b"\r\n\r\n")[:-1]:
            r = Resp()
            lines = block.split(b"\r\n")
            r.status = int(lines[0].split(b" ")[1])
            r.headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]  # type: ignore[misc]
            r.complete = True
            out.append(r)
        return out
    s = _Splitter()
    s.parser = httptools.HttpResponseParser(s)
    try:
        s.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    return s.out
