"""A scripted Redis for sans-IO tests of lbtwist.fleet: each connection is a
StringTransport whose writes are parsed (commands are RESP arrays) and
answered at once by ``FakeRedis.answer``, or not at all while ``frozen``
(a SIGSTOPped server), or with ``garbage`` bytes."""
from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport

from lbtwist.fleet.resp import RespParser


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def reply(v: Any) -> bytes:
    if v is None:
        return b"$-1\r\n"
    if isinstance(v, int):
        return b":%d\r\n" % v
    if isinstance(v, str):
        return b"+" + v.encode() + b"\r\n"
    if isinstance(v, bytes):
        return bulk(v)
    if isinstance(v, list):
        return b"*%d\r\n" % len(v) + b"".join(reply(x) for x in v)
    raise TypeError(v)


class _Transport(StringTransport):
    def __init__(self, server: "FakeRedis", proto: Any) -> None:
        super().__init__()
        self.server = server
        self.proto = proto
        self.parser = RespParser()
        self.aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        for cmd in self.parser.feed(data):
            self.server.commands.append(cmd)
            if self.server.garbage is not None:
                self.proto.dataReceived(self.server.garbage)
                return
            if self.server.frozen:
                continue
            out = self.server.answer(self, [c.decode() for c in cmd])
            if out is not None:
                self.proto.dataReceived(out)

    def abortConnection(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.server.conns.remove(self)
            from twisted.python.failure import Failure
            from twisted.internet.error import ConnectionAborted

            self.proto.connectionLost(Failure(ConnectionAborted()))

    loseConnection = abortConnection


class FakeRedis:
    def __init__(self) -> None:
        self.conns: list[_Transport] = []
        self.commands: list[list[bytes]] = []
        self.frozen = False
        self.down = False
        self.garbage: bytes | None = None
        self.password: str | None = None
        #: sha -> python function(keys, args) -> reply value
        self.scripts: dict[str, Any] = {}
        self.handlers: dict[str, Any] = {}
        self.subscribers: dict[str, list[_Transport]] = {}

    def connect(self, proto: Any) -> defer.Deferred:
        if self.down:
            return defer.fail(ConnectionRefusedError())
        t = _Transport(self, proto)
        self.conns.append(t)
        proto.makeConnection(t)
        return defer.succeed(proto)

    def publish(self, channel: str, data: bytes) -> int:
        subs = [t for t in self.subscribers.get(channel, []) if not t.aborted]
        for t in subs:
            t.proto.dataReceived(reply([b"message", channel.encode(), data]))
        return len(subs)

    def answer(self, t: _Transport, cmd: list[str]) -> bytes | None:
        name = cmd[0].upper()
        if name in self.handlers:
            return reply(self.handlers[name](cmd))
        if name == "PING":
            return reply([b"pong", b""]) if t in sum(self.subscribers.values(), []) else reply("PONG")
        if name == "AUTH":
            return reply("OK") if cmd[-1] == self.password else b"-WRONGPASS invalid password\r\n"
        if name == "SELECT":
            return reply("OK")
        if name == "SCRIPT":
            return reply(hashlib.sha1(cmd[2].encode()).hexdigest().encode())
        if name == "SUBSCRIBE":
            self.subscribers.setdefault(cmd[1], []).append(t)
            return reply([b"subscribe", cmd[1].encode(), 1])
        if name == "EVALSHA":
            fn = self.scripts.get(cmd[1])
            if fn is None:
                return b"-NOSCRIPT No matching script\r\n"
            n = int(cmd[2])
            return reply(fn(cmd[3:3 + n], cmd[3 + n:]))
        return b"-ERR unknown command\r\n"
