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
    about 30% less system time per proxied HTTP request). A transport holds
    at most ``BATCH_MAX`` bytes (more is sent at once), and what it holds
    counts as buffered for Twisted's producer logic: a streaming producer is
    paused when held plus buffered bytes pass ``bufferSize``, and resumed once
    they are sent, as Twisted does for its own buffer. Anything that
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


#: Bytes a transport holds for the end of a poll pass: a write that would
#: take it past this sends what is held at once (with that write when it is
#: small). 0 turns batching off (benchmarks compare both).
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
    #: Their total size (at most BATCH_MAX).
    _held_len = 0

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if type(data) is bytes and len(data) <= BATCH_MAX:
                n = self._held_len + len(data)
                held.append(data)
                if n > BATCH_MAX:
                    self._send_held()  # this write with them: one send, in order
                    return
                self._held_len = n
                if self.producer is not None:
                    self._maybe_pause_held()
                return
            self._send_held()
        elif _batch.active and type(data) is bytes and len(data) <= BATCH_MAX:
            # The transport's state (buffered data, closing, TLS) is judged when
            # the held data is sent: _send() takes Twisted's path when it must,
            # and close/half-close send what is held first.
            self._held = [data]
            self._held_len = len(data)
            _batch.held.append(self)
            if self.producer is not None:
                self._maybe_pause_held()
            return
        self._send(data)

    def held_size(self) -> int:
        """Bytes held for the end of the poll pass."""
        return self._held_len

    def _isSendBufferFull(self) -> bool:
        # Twisted's test, with held bytes counted as buffered (it pauses the
        # producer from write() when this is true).
        return len(self.dataBuffer) + self._tempDataLen + self._held_len > self.bufferSize  # type: ignore[attr-defined]

    def _maybe_pause_held(self) -> None:
        """Pause a streaming producer once held + buffered bytes pass bufferSize
        (what Twisted's write does for its own buffer)."""
        if self.streamingProducer and not self.producerPaused and self._isSendBufferFull():  # type: ignore[attr-defined]
            self.producerPaused = True
            self.producer.pauseProducing()  # type: ignore[attr-defined]

    def _send_held(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._held_len = 0
            self._send(held[0] if len(held) == 1 else b"".join(held))
            if (
                self.producerPaused  # type: ignore[attr-defined]
                and not self.dataBuffer  # type: ignore[attr-defined]
                and not self._tempDataLen  # type: ignore[attr-defined]
                and self.producer is not None  # type: ignore[attr-defined]
                and self.streamingProducer  # type: ignore[attr-defined]
                and not self.disconnecting  # type: ignore[attr-defined]
            ):
                # All sent at once: no write event will come to resume the
                # producer (Twisted's doWrite would, on draining its buffer).
                self.producerPaused = False
                self.producer.resumeProducing()  # type: ignore[attr-defined]

    def writeSequence(self, iovec: Any) -> None:
        self._send_held()  # keep the order of held data
        super().writeSequence(iovec)  # type: ignore[misc]

    def loseConnection(self) -> None:
        self._send_held()
        super().loseConnection()  # type: ignore[misc]

    def abortConnection(self) -> None:
        self._held = None  # dropped, like Twisted's own buffer
        self._held_len = 0
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


def install_supported_reactor(warn: Any = None) -> bool:
    """Install the lean reactor if this Twisted is one its internals were
    checked against (L{twisted_supported}); else Twisted's default reactor,
    saying so in one line on ``warn`` (stderr by default). Returns True when
    the lean reactor was installed. Every entry point installs through this
    (``python -m lbtwist.l4/.l7 --lean-reactor``, ``twistd lbtwist``,
    ``twistd --reactor=lbtwist-lean``, the test suite), so an unchecked
    Twisted never runs code that reaches into its internals by default."""
    if twisted_supported():
        install_lean_reactor()
        return True
    from twisted.internet import default

    print(
        f"lbtwist: Twisted {twisted.__version__} is not a version lbtwist.fastio was checked against "
        f"(major {', '.join(map(str, CHECKED_TWISTED_MAJOR)) or 'none'}); using Twisted's default reactor, "
        "not the lean one",
        file=warn if warn is not None else sys.stderr,
        flush=True,
    )
    default.install()
    return False


def install() -> None:
    """For a twistd reactor plugin (``twisted.application.reactors.Reactor(
    "lbtwist-lean", "lbtwist.fastio", ...)``), whose installer calls the
    module's ``install()``: then ``twistd --reactor=lbtwist-lean lbtwist ...``."""
    install_supported_reactor()


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
