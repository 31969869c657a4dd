"""The AMP commands between the master and its workers, and the pipe bridge
they run over.

AMP values are at most 64 KiB (``amp.MAX_VALUE_LENGTH``), so anything larger
(the config text, a fleet-view snapshot, a worker's /metrics text) moves as
``Put`` parts of one ``kind``: the receiver joins the parts and acts when the
last one arrives; the answer to the last part is the ack (it fires after the
receiver applied it, which is how an admin change waits for every worker).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols import amp

__all__ = ["Bridge", "Fetch", "Parts", "Ping", "Put", "Ready", "Rotate", "chunks", "put_all"]

#: bytes per Put part, below amp.MAX_VALUE_LENGTH with room for the other keys
PART = 60_000

#: master <-> child pipe fds in the child: it reads commands on 3, writes on 4
CHILD_IN, CHILD_OUT = 3, 4


class Ping(amp.Command):
    """Master -> worker heartbeat; the answer carries the worker's figures."""

    arguments: list = []
    response = [
        (b"pid", amp.Integer()),
        (b"requests", amp.Integer()),
        (b"connections", amp.Integer()),
        (b"started", amp.Float()),
        (b"rss_bytes", amp.Integer()),
        (b"pss_bytes", amp.Integer()),
        (b"uss_bytes", amp.Integer()),
    ]


class Put(amp.Command):
    """One part of a ``kind`` of payload (either way): config, snapshot,
    outcomes, tickets. ``more`` False: the last part; its answer is the ack."""

    arguments = [
        (b"kind", amp.Unicode()),
        (b"part", amp.String()),
        (b"more", amp.Boolean()),
    ]
    response: list = []
    errors = {ValueError: b"BAD_VALUE"}


class Fetch(amp.Command):
    """Master -> worker: a part of a text the worker renders (``kind``
    "metrics"), from ``offset`` (0 renders it afresh)."""

    arguments = [(b"kind", amp.Unicode()), (b"offset", amp.Integer())]
    response = [(b"part", amp.String()), (b"more", amp.Boolean())]


class Ready(amp.Command):
    """Worker -> master: listening, serving."""

    arguments = [(b"pid", amp.Integer())]
    response: list = []


class Rotate(amp.Command):
    """Master -> worker: issue session tickets with prepared generation
    ``generation`` from now on (every worker rotates together)."""

    arguments = [(b"generation", amp.Integer())]
    response: list = []


def chunks(data: bytes, size: int = PART) -> Iterator[tuple[bytes, bool]]:
    """(part, more) pairs; one empty part for empty data."""
    if not data:
        yield b"", False
        return
    for i in range(0, len(data), size):
        yield data[i:i + size], i + size < len(data)


def put_all(proto: amp.AMP, kind: str, data: bytes) -> defer.Deferred:
    """Send ``data`` as Put parts in order; fires with the last answer."""
    d: defer.Deferred = defer.succeed(None)
    for part, more in chunks(data):
        d.addCallback(lambda _, p=part, m=more: proto.callRemote(Put, kind=kind, part=p, more=m))
    return d


class Parts:
    """The receiving side of Put: joins parts per kind."""

    def __init__(self, handlers: dict[str, Callable[[bytes], Any]]) -> None:
        self.handlers = handlers
        self._buf: dict[str, list[bytes]] = {}

    def put(self, kind: str, part: bytes, more: bool) -> Any:
        if kind not in self.handlers:
            raise ValueError(f"unknown payload kind {kind!r}")
        self._buf.setdefault(kind, []).append(part)
        if more:
            return {}
        data = b"".join(self._buf.pop(kind))
        d = defer.maybeDeferred(self.handlers[kind], data)
        return d.addCallback(lambda _: {})


class Bridge(ProcessProtocol):
    """Runs an AMP protocol over two of a child process's pipes (the master's
    side): AMP needs a transport with getPeer/getHost, which the process
    transport lacks (team notes, scaling-facts section 2)."""

    def __init__(self, proto: amp.AMP, out_fd: int, in_fd: int, on_end: Callable[[Any], None]) -> None:
        self.amp = proto
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.on_end = on_end

    def connectionMade(self) -> None:
        self.amp.makeConnection(self)

    # the transport AMP sees
    def write(self, data: bytes) -> None:
        self.transport.writeToChild(self.out_fd, data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        self.transport.closeChildFD(self.out_fd)

    def getPeer(self) -> str:
        return "worker-pipe"

    getHost = getPeer

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == self.in_fd:
            self.amp.dataReceived(data)

    def childConnectionLost(self, fd: int) -> None:
        pass

    def processEnded(self, reason: Any) -> None:
        try:
            self.amp.connectionLost(reason)
        finally:
            self.on_end(reason)
