"""Transport speed levers that reach into Twisted internals, kept in this one
module so a Twisted upgrade has one place to re-check (tests/test_l4_fastio.py
pins every internal relied on here).

Why each lever exists (measured, see the performance notes):

  - **Eager write.** ``FileDescriptor.write`` only appends to a buffer and asks
    the reactor for a writability event, so every write costs an extra loop
    pass and two epoll changes. When nothing is buffered the socket is almost
    always writable, so sending at once and buffering only the unsent tail
    nearly doubles small-message relay rates.
  - **Read size.** TCP transports read ``bufferSize`` (64 KiB) per event and
    use the same number as the threshold at which they pause their producer.
    A bulk relay moves twice the bytes per event with 1 MiB.
  - **Lean dispatch.** The epoll reactor wraps each event in
    ``log.callWithLogger`` (a log-context push per event); a reactor that
    dispatches directly, still catching and logging errors, spends that time
    on the relay instead. Opt-in, installed by the process entry point.
  - **Batched sends.** Under the lean reactor, small writes made while one
    poll pass's events are dispatched are held per transport and sent at the
    end of the pass (still one ``send()`` per transport, in order). The peers
    then get their data in one burst instead of one send per event, so a
    sleeping peer is woken once per pass rather than once per message: the
    kernel's wake-up work is most of a small message's send cost (measured:
    about 30% less system time per proxied HTTP request). Anything that
    depends on the transport's buffer (close, half-close, writeSequence, a
    large write) sends what is held first; an abort drops it, as Twisted
    drops its own buffer.
  - **Inline read.** A plain read event then still runs three Twisted frames
    (``_doReadOrWrite``, ``doRead``, ``_dataReceived``) before the protocol
    sees the bytes, twice per proxied request. The lean reactor runs their
    code in its poll loop for accelerated transports whose read path is
    Twisted's own.
"""
from __future__ import annotations

import sys
from typing import Any

import twisted
from twisted.internet import tcp

#: Twisted major versions whose internals this module was checked against.
CHECKED_TWISTED_MAJOR = (26,)

#: Read size for L4 relay transports (and their producer pause threshold).
L4_READ_SIZE = 1 << 20

_eager_classes: dict[type, type] = {}

#: Eager classes whose read path is exactly Twisted's ``tcp.Connection`` one,
#: so the lean reactor may run it inline (checked once, when the class is made).
_inline_read_classes: set[type] = set()


#: Writes up to this size are held for the end of a poll pass (larger ones
#: are sent at once, so a batch holds at most this much per transport).
#: 0 turns batching off (benchmarks compare both).
BATCH_MAX = 64 * 1024


class _WriteBatch:
    """Transports holding small writes until the lean reactor's poll pass ends."""

    __slots__ = ("active", "held")

    def __init__(self) -> None:
        #: True while a lean reactor dispatches one poll pass's events.
        self.active = False
        self.held: list[Any] = []

    def flush(self) -> None:
        """Send everything held, transport by transport (called at the end of a pass)."""
        self.active = False
        held = self.held
        while held:
            batch = held[:]
            del held[:]
            for t in batch:
                try:
                    t._send_held()
                except Exception:
                    from twisted.python import log

                    log.err(None, "lbtwist.fastio: sending held data failed")


_batch = _WriteBatch()


class _EagerWriteMixin:
    """``write`` that calls ``send()`` at once when nothing is queued (or,
    under the lean reactor, at the end of the poll pass: see the module
    docstring).

    Falls back to Twisted's buffered path for the unsent tail, while anything
    is buffered (ordering), during TLS, and once a close or half-close was
    requested (so Twisted's own shutdown sequencing stays in charge)."""

    #: Small writes held for the end of the poll pass (a list while some are).
    _held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if type(data) is bytes and len(data) <= BATCH_MAX:
                held.append(data)
                return
            self._send_held()
        elif _batch.active and type(data) is bytes and len(data) <= BATCH_MAX:
            # The transport's state (buffered data, closing, TLS) is judged when
            # the held data is sent: _send() takes Twisted's path when it must,
            # and close/half-close send what is held first.
            self._held = [data]
            _batch.held.append(self)
            return
        self._send(data)

    def _send_held(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._send(held[0] if len(held) == 1 else b"".join(held))

    def writeSequence(self, iovec: Any) -> None:
        self._send_held()  # keep the order of held data
        super().writeSequence(iovec)  # type: ignore[misc]

    def loseConnection(self) -> None:
        self._send_held()
        super().loseConnection()  # type: ignore[misc]

    def abortConnection(self) -> None:
        self._held = None  # dropped, like Twisted's own buffer
        super().abortConnection()  # type: ignore[misc]

    def _send(self, data: bytes) -> None:
        if (
            self._tempDataLen
            or self.dataBuffer
            or not self.connected
            or self.disconnecting
            or self._writeDisconnecting
            or self._writeDisconnected
            or self.TLS
            or type(data) is not bytes
        ):
            return super().write(data)  # type: ignore[misc]
        try:
            sent = self.socket.send(data)
        except OSError:
            # EAGAIN, EINTR, or a real error: the buffered path retries from
            # doWrite, which also turns real errors into connectionLost.
            sent = 0
        if sent < len(data):
            super().write(data[sent:] if sent else data)  # type: ignore[misc]

    def loseWriteConnection(self) -> None:
        """Half-close at once when nothing is buffered, instead of waiting a
        loop pass for a writability event only to call shutdown() then. Runs
        exactly what ``doWrite`` would have run at that point."""
        self._send_held()
        if (
            self._tempDataLen
            or self.dataBuffer
            or not self.connected
            or self.disconnecting
            or self._writeDisconnected
            or self.TLS
            or self.producer is not None
        ):
            return super().loseWriteConnection()  # type: ignore[misc]
        self._writeDisconnecting = True
        self._writeDisconnected = True
        self._closeWriteConnection()


def _eager_class(cls: type) -> type:
    eager = _eager_classes.get(cls)
    if eager is None:
        eager = type(f"Eager{cls.__name__}", (_EagerWriteMixin, cls), {})
        _eager_classes[cls] = eager
        if (
            eager.doRead is tcp.Connection.doRead  # type: ignore[attr-defined]
            and eager._dataReceived is tcp.Connection._dataReceived  # type: ignore[attr-defined]
        ):
            _inline_read_classes.add(eager)
    return eager


def accelerate(transport: Any, *, eager: bool = True, read_size: int | None = None) -> bool:
    """Apply the levers to a connected plain TCP transport (``tcp.Server`` or
    ``tcp.Client``). Returns False and changes nothing for any other transport
    (TLS, test doubles, unknown reactors), so callers may always call it."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return False
    if eager and not isinstance(transport, _EagerWriteMixin):
        # Same instance layout (a subclass adding only a method), so the class
        # swap is safe; it keeps every other attribute and reactor registration.
        transport.__class__ = _eager_class(type(transport))
    if read_size:
        transport.bufferSize = read_size
    return True


def is_accelerated(transport: Any) -> bool:
    return isinstance(transport, _EagerWriteMixin)


# -- lean reactor ------------------------------------------------------------


def lean_reactor_class() -> type:
    """An epoll reactor whose poll loop calls the dispatcher directly.

    ``_doReadOrWrite`` already catches and logs every exception from a
    selectable and disconnects it; the only thing skipped is the per-event
    log-context push (so errors are logged without the selectable's prefix).

    A plain read event (``EPOLLIN`` alone) on an accelerated transport whose
    read path is Twisted's own runs that path inline: ``_doReadOrWrite`` with
    ``tcp.Connection.doRead`` and ``_dataReceived`` folded in, statement for
    statement (pinned in tests/test_l4_fastio.py). Everything else goes
    through ``_doReadOrWrite``."""
    from select import EPOLLIN

    from twisted.internet import epollreactor, posixbase
    from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
    from twisted.python import log

    inline_read = _inline_read_classes
    no_filedesc = posixbase._NO_FILEDESC
    would_block = tcp.EWOULDBLOCK

    class LeanEPollReactor(epollreactor.EPollReactor):
        def doPoll(self, timeout: float | None) -> None:
            if timeout is None:
                timeout = -1
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except InterruptedError:
                return
            batch = _batch
            batch.active = True
            try:
                self._dispatch(events)
            finally:
                batch.flush()

        def _dispatch(self, events: list[tuple[int, int]]) -> None:
            selectables = self._selectables
            dispatch = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                if event != EPOLLIN or type(selectable) not in inline_read or selectable.TLS:
                    dispatch(selectable, fd, event)
                    continue
                inRead = False
                try:
                    if selectable.fileno() == -1:
                        # Closed earlier in this pass: never read it.
                        why = no_filedesc
                    else:
                        try:
                            data = selectable.socket.recv(selectable.bufferSize)
                        except OSError as se:
                            if se.args[0] == would_block:
                                continue
                            why = CONNECTION_LOST
                        else:
                            if data:
                                # Outside the OSError handler, as in Twisted.
                                selectable.protocol.dataReceived(data)
                                continue
                            why = CONNECTION_DONE
                        inRead = True
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()
                if why:
                    self._disconnectSelectable(selectable, why, inRead)

        doIteration = doPoll

    return LeanEPollReactor


def install_lean_reactor() -> Any:
    """Install the lean reactor as the global one. For process entry points
    only (before anything imports ``twisted.internet.reactor``)."""
    from twisted.internet.main import installReactor

    reactor = lean_reactor_class()()
    installReactor(reactor)
    return reactor


def install() -> None:
    """For a twistd reactor plugin (``twisted.application.reactors.Reactor(
    "lbtwist-lean", "lbtwist.fastio", ...)``), whose installer calls the
    module's ``install()``: then ``twistd --reactor=lbtwist-lean lbtwist ...``."""
    install_lean_reactor()


def twisted_supported() -> bool:
    return int(twisted.__version__.split(".")[0]) in CHECKED_TWISTED_MAJOR


def hold_until_pass_end(obj: Any) -> bool:
    """For layered transports (TLS) that batch like the eager TCP one: when a
    lean reactor is dispatching a poll pass, queue ``obj._send_held()`` for
    the end of the pass (before the TCP transports' own held data is sent,
    so what it writes then goes out in the same pass) and return True; else
    return False and queue nothing."""
    if _batch.active:
        _batch.held.append(obj)
        return True
    return False
