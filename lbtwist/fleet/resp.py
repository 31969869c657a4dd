# -*- test-case-name: tests.test_fleet_resp -*-
"""RESP2, the Redis wire protocol: a strict sans-IO parser and a small
Twisted protocol that pairs replies with calls in order.

Strict on purpose: a byte that is not RESP (a wrong type marker, a length
that is not a number, a bulk string without its CRLF, a reply nobody asked
for) is a L{ProtocolError}; the caller drops the connection and treats
Redis as down, exactly as if it were unreachable. Sizes are capped, so a
peer that streams nonsense cannot make us buffer it without end.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

MAX_LINE = 64 * 1024
MAX_BULK = 8 * 1024 * 1024
MAX_ITEMS = 1 << 20
MAX_DEPTH = 8


class ProtocolError(Exception):
    """The peer does not speak RESP (or not the part we asked for)."""


class ReplyError(Exception):
    """Redis answered ``-ERR ...`` (a well-formed error reply)."""


class _Incomplete(Exception):
    pass


def encode(*args: Any) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a).encode()
        elif not isinstance(a, bytes):
            raise TypeError(f"cannot send {type(a).__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RespParser:
    """Feed bytes, get whole replies: bytes (simple and bulk strings), int,
    None, list, or L{ReplyError} instances."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[Any]:
        self.buf += data
        out = []
        pos = 0
        while pos < len(self.buf):
            try:
                value, pos2 = self._one(pos, 0)
            except _Incomplete:
                break
            out.append(value)
            pos = pos2
        self.buf = self.buf[pos:]
        return out

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self.buf.find(b"\r\n", pos)
        if end < 0:
            if len(self.buf) - pos > MAX_LINE:
                raise ProtocolError("reply line too long")
            raise _Incomplete()
        if end - pos > MAX_LINE:
            raise ProtocolError("reply line too long")
        return self.buf[pos:end], end + 2

    def _int(self, text: bytes) -> int:
        t = text[1:] if text[:1] == b"-" else text
        if not t or not t.isdigit():
            raise ProtocolError(f"not an integer: {text[:40]!r}")
        return int(text)

    def _one(self, pos: int, depth: int) -> tuple[Any, int]:
        if depth > MAX_DEPTH:
            raise ProtocolError("replies nested too deep")
        if pos >= len(self.buf):
            raise _Incomplete()
        kind = self.buf[pos:pos + 1]
        if kind not in b"+-:$*":  # known at the first byte: no need to wait for a line
            raise ProtocolError(f"not a RESP reply: {self.buf[pos:pos + 40]!r}")
        line, nxt = self._line(pos + 1)
        if kind == b"+":
            return line, nxt
        if kind == b"-":
            return ReplyError(line.decode("utf-8", "replace")), nxt
        if kind == b":":
            return self._int(line), nxt
        if kind == b"$":
            n = self._int(line)
            if n == -1:
                return None, nxt
            if n < 0 or n > MAX_BULK:
                raise ProtocolError(f"bad bulk length {n}")
            if len(self.buf) < nxt + n + 2:
                raise _Incomplete()
            if self.buf[nxt + n:nxt + n + 2] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            return self.buf[nxt:nxt + n], nxt + n + 2
        if kind == b"*":
            n = self._int(line)
            if n == -1:
                return None, nxt
            if n < 0 or n > MAX_ITEMS:
                raise ProtocolError(f"bad array length {n}")
            items = []
            for _ in range(n):
                v, nxt = self._one(nxt, depth + 1)
                items.append(v)
            return items, nxt
        raise AssertionError("unreachable")


class RespProtocol(protocol.Protocol):
    """Calls answered in order. ``on_push(reply) -> bool`` may claim a reply
    first (pub/sub messages arrive between replies); an unclaimed reply with
    no call waiting is garbage. ``on_lost(reason)`` runs once when the
    connection ends or turns out not to be Redis."""

    def __init__(self, on_push: Callable[[Any], bool] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.parser = RespParser()
        self.pending: deque[defer.Deferred] = deque()
        self.on_push = on_push
        self.on_lost = on_lost
        self.connected_ = False
        self._lost = False

    def connectionMade(self) -> None:
        self.connected_ = True

    def call(self, *args: Any) -> defer.Deferred:
        if not self.connected_ or self._lost:
            return defer.fail(ConnectionLost("not connected to Redis"))
        d = defer.Deferred()
        self.pending.append(d)
        self.transport.write(encode(*args))
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ProtocolError as e:
            self._broken(f"garbage from Redis: {e}")
            return
        for r in replies:
            if self.on_push is not None and self.on_push(r):
                continue
            if not self.pending:
                self._broken(f"garbage from Redis: a reply nobody asked for ({str(r)[:40]})")
                return
            d = self.pending.popleft()
            if d.called:  # timed out: the connection is being dropped anyway
                continue
            if isinstance(r, ReplyError):
                d.errback(r)
            else:
                d.callback(r)

    def _broken(self, why: str) -> None:
        self._fail_all(ProtocolError(why), why)
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        """Drop the connection now (timeouts, shutdown)."""
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def _fail_all(self, exc: Exception, why: str) -> None:
        first = not self._lost
        self._lost = True
        while self.pending:
            d = self.pending.popleft()
            if not d.called:
                d.errback(Failure(exc))
        if first and self.on_lost is not None:
            self.on_lost(why)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected_ = False
        self._fail_all(ConnectionLost(f"Redis connection lost: {reason.getErrorMessage()}"),
                       f"connection lost ({reason.getErrorMessage()})")
