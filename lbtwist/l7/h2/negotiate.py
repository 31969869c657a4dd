"""Which protocol a client connection speaks, decided at its first bytes:
HTTP/2 when TLS negotiated ALPN ``h2``, or (``http2: true`` on a plain
listener) when the bytes open with the HTTP/2 connection preface (h2c with
prior knowledge, RFC 9113 3.3); HTTP/1.1 otherwise, on the same port.

The chosen protocol is connected to the same transport and every later
event is passed straight to it."""
from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@implementer(IHalfCloseableProtocol)
class ProtocolChooser(Protocol):
    def __init__(self, factory: Any, h2c: bool, http1: Any, http2: Any) -> None:
        self.ctx = factory
        self.h2c = h2c
        self.http1 = http1
        self.http2 = http2
        self.chosen: Any = None
        self._buf = b""
        self._timer: Any = None

    def connectionMade(self) -> None:
        # A connection that sends nothing is closed like an HTTP/1.1 one
        # whose header never arrives.
        self._timer = self.ctx.clock.callLater(self.ctx.http.header_timeout, self._silent)

    def _silent(self) -> None:
        self._timer = None
        if self.chosen is None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        chosen = self.chosen
        if chosen is not None:
            chosen.dataReceived(data)
            return
        buf = self._buf + data
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            cls = self.http2
        elif self.h2c and PREFACE.startswith(buf[:len(PREFACE)]):
            if len(buf) < len(PREFACE):
                self._buf = buf  # could still be the preface
                return
            cls = self.http2
        else:
            cls = self.http1
        self._buf = b""
        self._choose(cls, buf)

    def _choose(self, cls: Any, data: bytes) -> None:
        t, self._timer = self._timer, None
        if t is not None and t.active():
            t.cancel()
        p = cls(self.ctx)
        p.factory = self.ctx
        self.chosen = p
        p.makeConnection(self.transport)
        if data and not getattr(p, "closed", False):
            p.dataReceived(data)

    def readConnectionLost(self) -> None:
        chosen = self.chosen
        if chosen is None:
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(chosen):
            chosen.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        chosen = self.chosen
        if chosen is not None and IHalfCloseableProtocol.providedBy(chosen):
            chosen.writeConnectionLost()

    def connectionLost(self, reason: Any = None) -> None:
        t, self._timer = self._timer, None
        if t is not None and t.active():
            t.cancel()
        if self.chosen is not None:
            self.chosen.connectionLost(reason)
