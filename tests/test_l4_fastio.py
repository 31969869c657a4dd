"""Pins the Twisted internals lbtwist.fastio relies on, and the levers' behaviour
on real sockets. A Twisted upgrade that breaks an assumption fails here first."""
import contextlib
import errno
import inspect
import re
import select
import socket

import pytest_twisted
import twisted
from twisted.internet import _newtls, abstract, defer, epollreactor, error, posixbase, protocol, reactor, task, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from lbtwist import fastio


def test_twisted_internals_still_as_assumed():
    assert fastio.twisted_supported(), f"fastio was checked against Twisted {fastio.CHECKED_TWISTED_MAJOR}, not {twisted.__version__}"
    fd = abstract.FileDescriptor
    # The buffered write path and the state the eager path inspects.
    for name in ("dataBuffer", "offset", "_writeDisconnecting", "_writeDisconnected", "disconnecting", "bufferSize"):
        assert hasattr(fd, name), name
    src = inspect.getsource(fd.write)
    assert "_tempDataBuffer.append" in src and "_tempDataLen" in src and "startWriting" in src
    assert "self.dataBuffer = b\"\"" in inspect.getsource(fd.doWrite)
    # Read size: one recv of bufferSize per read event; pause threshold is bufferSize too.
    assert "self.socket.recv(self.bufferSize)" in inspect.getsource(tcp.Connection.doRead)
    assert "> self.bufferSize" in inspect.getsource(fd._isSendBufferFull)
    # Held bytes in the producer logic: write() pauses through _isSendBufferFull
    # (which fastio overrides); doWrite resumes a paused streaming producer on draining.
    assert "self._isSendBufferFull()" in inspect.getsource(fd._maybePauseProducer)
    assert "self._maybePauseProducer()" in inspect.getsource(fd.write)
    assert (
        "if self.producer is not None and ( (not self.streamingProducer) or self.producerPaused ): "
        "self.producerPaused = False self.producer.resumeProducing()"
    ) in _flat(fd.doWrite)
    assert hasattr(tcp.Connection, "TLS")
    # Lean reactor: the dispatcher catches and logs errors itself.
    src = inspect.getsource(posixbase._PollLikeMixin._doReadOrWrite)
    assert "except BaseException" in src and "log.err()" in src
    assert "log.callWithLogger" in inspect.getsource(epollreactor.EPollReactor.doPoll)
    init = inspect.getsource(epollreactor.EPollReactor.__init__)
    assert "self._poller" in init and "self._selectables" in init
    # Inline read: the lean poll loop folds these three in, statement for statement.
    assert (
        "why = None inRead = False if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):"
        in _flat(posixbase._PollLikeMixin._doReadOrWrite)
    )
    assert (
        "else: try: if selectable.fileno() == -1: why = _NO_FILEDESC else: if event & self._POLL_IN: "
        "why = selectable.doRead() inRead = True if not why and event & self._POLL_OUT: "
        "why = selectable.doWrite() inRead = False except BaseException: why = sys.exc_info()[1] log.err() "
        "if why: self._disconnectSelectable(selectable, why, inRead)"
    ) in _flat(posixbase._PollLikeMixin._doReadOrWrite)
    assert (
        "try: data = self.socket.recv(self.bufferSize) except OSError as se: if se.args[0] == EWOULDBLOCK: "
        "return None else: return main.CONNECTION_LOST return self._dataReceived(data)"
    ) in _flat(tcp.Connection.doRead)
    assert (
        "if not data: return main.CONNECTION_DONE self.protocol.dataReceived(data) return None"
    ) in _flat(tcp.Connection._dataReceived)
    er = epollreactor.EPollReactor
    assert er._POLL_IN == select.EPOLLIN and not er._POLL_DISCONNECTED & select.EPOLLIN
    assert er._disconnectSelectable is posixbase._DisconnectSelectableMixin._disconnectSelectable
    assert isinstance(posixbase._NO_FILEDESC, error.ConnectionFdescWentAway)
    assert tcp.EWOULDBLOCK == errno.EAGAIN
    # fileno() is the socket's until connectionLost deletes it; then FileDescriptor's -1.
    assert "self.fileno: Callable[[], int] = skt.fileno" in inspect.getsource(tcp.Connection.__init__)
    assert "del self.fileno" in inspect.getsource(tcp.Connection.connectionLost)
    assert "return -1" in inspect.getsource(fd.fileno)
    # startTLS keeps the transport's class and marks it with TLS.
    assert "transport.TLS = True" in inspect.getsource(_newtls.startTLS)
    for cls in (tcp.Server, tcp.Client):
        assert fastio._eager_class(cls) in fastio._inline_read_classes, cls


def _flat(fn) -> str:
    """Source without comments, whitespace collapsed."""
    return " ".join(re.sub(r"#[^\n]*", "", inspect.getsource(fn)).split())


def test_accelerate_ignores_other_transports():
    t = StringTransport()
    assert fastio.accelerate(t, read_size=1 << 20) is False
    assert not fastio.is_accelerated(t)
    assert not hasattr(t, "bufferSize")


class _Recorder(protocol.Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)


@contextlib.asynccontextmanager
async def _connected(proto_class):
    """A reactor client connection of ``proto_class`` and the accepted peer
    socket; continues from a timed call, outside any poll pass (the lean
    reactor, the suite's, holds writes made during a pass until its end)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    f = protocol.ClientFactory()
    f.protocol = proto_class
    f.made = defer.Deferred()
    connector = reactor.connectTCP("127.0.0.1", lsock.getsockname()[1], f, timeout=5)
    try:
        proto = await f.made.addTimeout(5, reactor)
        await task.deferLater(reactor, 0, lambda: None)
        peer, _ = lsock.accept()
        peer.settimeout(5)
        yield proto, peer
    finally:
        connector.disconnect()
        lsock.close()


@pytest_twisted.ensureDeferred
async def test_eager_write_sends_before_the_reactor_turns():
    """With an empty buffer, write() reaches the peer socket synchronously; with
    data already queued it takes Twisted's buffered path (order preserved)."""
    async with _connected(_Recorder) as (proto, peer):
        t = proto.transport
        assert fastio.accelerate(t, read_size=1 << 20)
        assert fastio.is_accelerated(t) and isinstance(t, tcp.Client)
        assert t.bufferSize == 1 << 20
        t.write(b"now")
        # No reactor iteration happened since write(): the bytes are already sent.
        assert t._tempDataLen == 0 and t.dataBuffer == b""
        assert peer.recv(100) == b"now"
        # Something queued: the next write must queue behind it, not jump ahead.
        t._tempDataBuffer.append(b"first")
        t._tempDataLen += 5
        t.startWriting()
        t.write(b"second")
        assert t._tempDataLen == len(b"firstsecond")
        got = b""
        while len(got) < 11:
            await deferLater(0.01)
            try:
                peer.setblocking(False)
                got += peer.recv(100)
            except BlockingIOError:
                pass
        assert got == b"firstsecond"
        # After loseConnection the normal path owns the shutdown sequence.
        t.loseConnection()
        t.write(b"late")
        assert t._tempDataLen == 4
        peer.close()


@implementer(IHalfCloseableProtocol)
class _HalfCloser(protocol.Protocol):
    write_lost = 0

    def connectionMade(self):
        if self.factory is not None:
            self.factory.made.callback(self)

    def readConnectionLost(self):
        pass

    def writeConnectionLost(self):
        self.write_lost += 1


@pytest_twisted.ensureDeferred
async def test_eager_half_close_shuts_down_at_once_when_nothing_is_buffered():
    async with _connected(_HalfCloser) as (proto, peer):
        t = proto.transport
        fastio.accelerate(t)
        t.write(b"last words")
        t.loseWriteConnection()
        # shutdown(SHUT_WR) already happened: the peer reads the data, then EOF,
        # without the reactor having turned.
        assert proto.write_lost == 1 and t._writeDisconnected
        assert peer.recv(100) == b"last words"
        assert peer.recv(100) == b""
        # The other direction still works.
        peer.sendall(b"reply")
        got = await _read_some(proto)
        assert got == b"reply"
        peer.close()


async def _read_some(proto):
    got = []
    proto.dataReceived = got.append
    for _ in range(500):
        if got:
            return b"".join(got)
        await deferLater(0.01)
    raise AssertionError("no data")


def test_eager_half_close_waits_for_buffered_data():
    """With bytes still queued the normal path runs: shutdown only after they
    are flushed (doWrite), so nothing is cut off."""
    a, b = socket.socketpair()
    try:
        proto = _HalfCloser()
        t = tcp.Server(a, proto, ("127.0.0.1", 1), _NoPort(), 1, reactor)
        proto.makeConnection(t)
        fastio.accelerate(t)
        t._tempDataBuffer.append(b"queued")
        t._tempDataLen += 6
        t.loseWriteConnection()
        assert t._writeDisconnecting and not t._writeDisconnected and proto.write_lost == 0
        t.doWrite()
        assert t._writeDisconnected and proto.write_lost == 1
        b.settimeout(5)
        assert b.recv(100) == b"queued" and b.recv(100) == b""
    finally:
        t.stopReading()
        t.stopWriting()
        a.close()
        b.close()


class _NoPort:
    """Just what tcp.Server reads from its listening port."""

    _realPortNumber = 1


def deferLater(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


def test_lean_reactor_class_is_an_epoll_reactor():
    cls = fastio.lean_reactor_class()
    assert issubclass(cls, epollreactor.EPollReactor)
    assert cls.doIteration is cls.doPoll


def test_lean_reactor_runs_and_survives_a_failing_selectable(tmp_path):
    """In a subprocess (a reactor can only be installed once): the lean reactor
    serves a connection, and an exception in a protocol is logged and only
    closes that connection."""
    import subprocess
    import sys

    script = tmp_path / "lean.py"
    script.write_text(
        """
import socket, sys
from lbtwist.fastio import install_lean_reactor
r = install_lean_reactor()
from twisted.internet import protocol
from twisted.python import log
errors = []
log.addObserver(lambda e: e.get("isError") and errors.append(e))
class Boom(protocol.Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise RuntimeError("boom")
        self.transport.write(data.upper())
f = protocol.Factory.forProtocol(Boom)
port = r.listenTCP(0, f, interface="127.0.0.1")
out = []
def client():
    a = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    b = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    a.sendall(b"boom")
    b.sendall(b"ok")
    out.append(b.recv(10))
    out.append(a.recv(10))  # closed after the error: b""
    r.callFromThread(r.stop)
import threading
threading.Thread(target=client, daemon=True).start()
r.callLater(10, r.stop)
r.run()
print(type(r).__name__, out, len(errors))
"""
    )
    res = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30,
        env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "LeanEPollReactor [b'OK', b''] 1", res.stdout + res.stderr
