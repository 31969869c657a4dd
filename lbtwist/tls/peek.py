"""Read a connection's ClientHello before deciding who handles the connection.

The adapter behind both TLS termination (the hello picks the certificate slot
and the ticket-key generation, L{lbtwist.tls.server}) and SNI passthrough (the
hello picks the pool, L{lbtwist.tls.passthrough}). It buffers the first bytes
until L{parse_client_hello} decides, asks ``decide`` for the protocol that
takes over, connects that protocol to the same transport and hands it every
byte buffered so far. From then on reads go straight to the new protocol (the
peeker's ``dataReceived`` is replaced by the inner one's: no extra call per
read).
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from lbtwist.tls.clienthello import (
    MAX_CLIENT_HELLO,
    NEED_MORE,
    ClientHello,
    NotTLS,
    bytes_needed,
    parse_client_hello,
)

__all__ = ["ClientHelloPeekFactory", "ClientHelloPeeker", "Decide"]

log = Logger(namespace="lbtwist.tls.peek")

#: ``decide(result, addr)``: given the parsed hello (or L{NotTLS}) and the
#: client address, return the protocol that takes the connection over, or
#: None to close it. Called once per connection, at most.
Decide = Callable[[ClientHello | NotTLS, IAddress], IProtocol | None]


class ClientHelloPeeker(Protocol):
    """One connection until its ClientHello is read; then a forwarder."""

    def __init__(
        self,
        decide: Decide,
        addr: IAddress,
        clock: IReactorTime,
        timeout: float,
        max_size: int = MAX_CLIENT_HELLO,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        self._decide = decide
        self._addr = addr
        self._clock = clock
        self._timeout = timeout
        self._max = max_size
        self._on_timeout = on_timeout
        self._buf = bytearray()
        self._next = 1  # parse again once this many bytes are buffered
        self._timer: IDelayedCall | None = None
        self.inner: IProtocol | None = None
        self.result: ClientHello | NotTLS | None = None

    def connectionMade(self) -> None:
        if self._timeout > 0:
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.inner is None:
            if self._on_timeout is not None:
                self._on_timeout()
            self.transport.abortConnection()

    def _cancel(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:  # only until the instance attribute below takes over
            self.inner.dataReceived(data)
            return
        if self.result is not None:
            return  # refused; closing
        buf = self._buf
        buf += data
        if len(buf) < self._next:
            return
        res = parse_client_hello(buf, self._max)
        if res is NEED_MORE:
            if len(buf) > self._max + 5 * 16:
                res = NotTLS("ClientHello larger than the limit")
            else:
                self._next = bytes_needed(buf)
                return
        self._cancel()
        self.result = res  # type: ignore[assignment]
        try:
            inner = self._decide(res, self._addr)  # type: ignore[arg-type]
        except Exception:
            log.failure("choosing a protocol from the ClientHello failed")
            inner = None
        if inner is None:
            self._buf = bytearray()
            self.transport.abortConnection()
            return
        self._hand_over(inner)

    def _hand_over(self, inner: IProtocol) -> None:
        self.inner = inner
        if IHalfCloseableProtocol.providedBy(inner):
            directlyProvides(self, IHalfCloseableProtocol)
        buffered, self._buf = bytes(self._buf), bytearray()
        try:
            inner.makeConnection(self.transport)
        except Exception:
            log.failure("starting the protocol chosen from the ClientHello failed")
            self.inner = None
            self.transport.abortConnection()
            return
        self.dataReceived = inner.dataReceived  # type: ignore[method-assign]
        if buffered and self.connected:
            inner.dataReceived(buffered)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._cancel()
        self.connected = 0
        if self.inner is not None:
            self.inner.connectionLost(reason)

    # Forwarded when the inner protocol wants half-close (we then provide the interface).
    def readConnectionLost(self) -> None:
        self.inner.readConnectionLost()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.inner.writeConnectionLost()  # type: ignore[union-attr]


class ClientHelloPeekFactory(Factory):
    """Builds a L{ClientHelloPeeker} per connection.

    @param wrapped: a factory whose ``doStart``/``doStop`` should follow this
        one's (the factory that ``decide`` builds protocols from), or None.
    """

    noisy = False

    def __init__(
        self,
        decide: Decide,
        clock: IReactorTime,
        timeout: float = 10.0,
        wrapped: Any = None,
        max_size: int = MAX_CLIENT_HELLO,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        self.decide = decide
        self.clock = clock
        self.timeout = timeout
        self.wrapped = wrapped
        self.max_size = max_size
        self.on_timeout = on_timeout

    def doStart(self) -> None:
        super().doStart()
        if self.wrapped is not None:
            self.wrapped.doStart()

    def doStop(self) -> None:
        if self.wrapped is not None:
            self.wrapped.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress) -> ClientHelloPeeker:
        p = ClientHelloPeeker(self.decide, addr, self.clock, self.timeout, self.max_size, self.on_timeout)
        p.factory = self
        return p

    def logPrefix(self) -> str:
        w = self.wrapped
        inner = w.logPrefix() if w is not None and hasattr(w, "logPrefix") else "?"
        return f"{inner} (ClientHello)"
