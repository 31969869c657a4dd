"""The lean reactor's inline read (lbtwist.fastio.lean_reactor_class): on real
127.0.0.1 sockets, every outcome matches Twisted's own epoll reactor, and only
plain read events on accelerated transports skip ``_doReadOrWrite``.

Each test runs on a private reactor instance (stock and lean) driven by
``doPoll`` directly, so nothing depends on the global reactor or on timing."""
import os
import select
import socket
import struct

import pytest
from twisted.internet import epollreactor, error, protocol, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer

from lbtwist import fastio
from support.fakes import Logged

LEAN = fastio.lean_reactor_class()


class _NoPort:
    """Just what tcp.Server reads from its listening port."""

    _realPortNumber = 1


class _Recorder(protocol.Protocol):
    def __init__(self):
        self.data = []
        self.lost = None

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class _HalfCloseRecorder(_Recorder):
    read_lost = False

    def readConnectionLost(self):
        self.read_lost = True

    def writeConnectionLost(self):
        pass


class _Boom(_Recorder):
    exc = RuntimeError

    def dataReceived(self, data):
        raise self.exc("boom")


class _OwnReadServer(tcp.Server):
    """A transport class with its own doRead: must keep Twisted's path."""

    reads = 0

    def doRead(self):
        self.reads += 1
        return super().doRead()


class _ForcedPoller:
    """The real poller, except that the next poll() returns given events."""

    def __init__(self, real, events):
        self._real = real
        self._events = events

    def poll(self, timeout, maxevents):
        events, self._events = self._events, None
        return events if events is not None else self._real.poll(timeout, maxevents)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _Rig:
    """A private reactor, a listening socket, and a record of which
    selectables went through ``_doReadOrWrite``."""

    def __init__(self, reactor_class):
        self.reactor = reactor_class()
        self.lean = isinstance(self.reactor, LEAN)
        self.dispatched = []
        real = self.reactor._doReadOrWrite

        def counting(selectable, fd, event):
            self.dispatched.append(selectable)
            return real(selectable, fd, event)

        self.reactor._doReadOrWrite = counting
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.socks = [self.lsock]

    def connect(self, proto, accelerated=True, cls=tcp.Server):
        """A served connection: (transport, the peer's blocking socket)."""
        peer = socket.create_connection(self.lsock.getsockname(), timeout=5)
        skt, addr = self.lsock.accept()
        skt.setblocking(False)
        self.socks += [peer, skt]
        t = cls(skt, proto, addr, _NoPort(), 1, self.reactor)
        proto.makeConnection(t)
        if accelerated:
            assert fastio.accelerate(t)
        return t, peer

    def poll_until(self, done):
        for _ in range(20):
            if done():
                return
            self.reactor.doPoll(0.5)
        raise AssertionError("condition not reached")

    def force_poll(self, events):
        real = self.reactor._poller
        self.reactor._poller = _ForcedPoller(real, events)
        try:
            self.reactor.doPoll(0)
        finally:
            self.reactor._poller = real

    def inline(self, t):
        """True when t's events (if any) bypassed _doReadOrWrite."""
        return t not in self.dispatched

    def close(self):
        for s in self.socks:
            s.close()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()


@pytest.fixture(params=[epollreactor.EPollReactor, LEAN], ids=["stock", "lean"])
def rig(request):
    r = _Rig(request.param)
    yield r
    r.close()


def _wait_readable(*socks):
    ready = set()
    for _ in range(20):
        ready.update(select.select(socks, [], [], 0.5)[0])
        if len(ready) == len(socks):
            return
    raise AssertionError("sockets not readable")


def test_data_reaches_the_protocol(rig):
    proto = _Recorder()
    t, peer = rig.connect(proto)
    peer.sendall(b"hello")
    rig.poll_until(lambda: proto.data)
    assert b"".join(proto.data) == b"hello"
    assert t.connected and proto.lost is None
    assert rig.inline(t) is rig.lean
    # The connection keeps working both ways.
    t.write(b"back")
    assert peer.recv(10) == b"back"
    peer.sendall(b"more")
    rig.poll_until(lambda: len(proto.data) == 2)
    assert proto.data[1] == b"more"


def test_eof_is_connection_done(rig):
    proto = _Recorder()
    t, peer = rig.connect(proto)
    peer.sendall(b"last")
    peer.close()
    rig.poll_until(lambda: proto.lost)
    assert b"".join(proto.data) == b"last"
    assert proto.lost.check(error.ConnectionDone)
    assert t not in rig.reactor.getReaders() + rig.reactor.getWriters()
    assert rig.inline(t) is rig.lean


def test_half_close_reaches_read_connection_lost(rig):
    proto = _HalfCloseRecorder()
    t, peer = rig.connect(proto)
    peer.shutdown(socket.SHUT_WR)
    rig.poll_until(lambda: proto.read_lost)
    assert proto.lost is None and t.connected
    assert t not in rig.reactor.getReaders()
    assert rig.inline(t) is rig.lean
    # Our direction still works, then closes normally.
    t.write(b"bye")
    t.loseConnection()
    rig.poll_until(lambda: proto.lost)
    assert peer.recv(10) == b"bye" and peer.recv(10) == b""


@pytest.mark.parametrize("exc", [RuntimeError, BlockingIOError])
def test_exception_in_data_received_is_logged_and_closes_only_that_connection(rig, exc):
    """Even an OSError such as EAGAIN: Twisted catches those only around recv."""
    bad, good = _Boom(), _Recorder()
    bad.exc = exc
    tb, peer_bad = rig.connect(bad)
    tg, peer_good = rig.connect(good)
    with Logged() as logged:
        peer_bad.sendall(b"x")
        peer_good.sendall(b"ok")
        rig.poll_until(lambda: bad.lost and good.data)
    assert bad.lost.check(exc)
    failures = [e["failure"] for e in logged.events if e.get("isError")]
    assert [f.check(exc) for f in failures] == [exc]
    assert peer_bad.recv(10) == b""
    assert rig.inline(tb) is rig.lean
    # The reactor and the other connection carry on.
    peer_good.sendall(b"again")
    rig.poll_until(lambda: len(good.data) == 2)
    assert good.data == [b"ok", b"again"] and good.lost is None


def test_spurious_read_event_is_ignored(rig):
    """EAGAIN (e.g. a reused fd's stale event in the same pass): nothing."""
    proto = _Recorder()
    t, peer = rig.connect(proto)
    rig.force_poll([(t.fileno(), select.EPOLLIN)])
    assert proto.data == [] and proto.lost is None and t.connected
    assert rig.inline(t) is rig.lean
    peer.sendall(b"later")
    rig.poll_until(lambda: proto.data)
    assert proto.data == [b"later"]


def test_recv_error_is_connection_lost(rig):
    proto = _Recorder()
    t, peer = rig.connect(proto)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    _wait_readable(t.socket)
    # The real event also carries EPOLLHUP/EPOLLERR; force a plain read event
    # so that the recv error itself is what both paths have to handle.
    rig.force_poll([(t.fileno(), select.EPOLLIN)])
    assert proto.lost.check(error.ConnectionLost)
    assert proto.data == []
    assert rig.inline(t) is rig.lean


def test_socket_closed_earlier_in_the_same_pass_is_not_read(rig):
    """Whichever connection is served first takes the other's socket away
    (fileno() becomes -1 while it is still registered): the other is never
    read and is disconnected with ConnectionFdescWentAway."""
    taken = []

    class Taker(_Recorder):
        def dataReceived(self, data):
            super().dataReceived(data)
            other = protos[1 - protos.index(self)]
            if not taken and not other.data:
                taken.append(other.transport.socket.detach())

    protos = [Taker(), Taker()]
    pairs = [rig.connect(p) for p in protos]
    for _, peer in pairs:
        peer.sendall(b"data")
    _wait_readable(*(t.socket for t, _ in pairs))
    try:
        rig.reactor.doPoll(0)
    finally:
        for fd in taken:
            os.close(fd)
    served = [p for p in protos if p.data]
    gone = [p for p in protos if not p.data]
    assert len(served) == 1 and len(gone) == 1 and len(taken) == 1
    assert served[0].lost is None
    assert gone[0].lost.check(error.ConnectionFdescWentAway)
    assert all(rig.inline(t) is rig.lean for t, _ in pairs)


@pytest.mark.parametrize("kind", ["not_accelerated", "own_doRead", "tls_flag"])
def test_other_transports_keep_twisteds_path(rig, kind):
    proto = _Recorder()
    if kind == "own_doRead":
        t, peer = rig.connect(proto, cls=_OwnReadServer)
        assert fastio.is_accelerated(t)
    else:
        t, peer = rig.connect(proto, accelerated=kind != "not_accelerated")
    if kind == "tls_flag":
        # What startTLS sets; the read itself needs no real TLS here.
        t.TLS = True
    peer.sendall(b"hello")
    rig.poll_until(lambda: proto.data)
    assert proto.data == [b"hello"]
    assert t in rig.dispatched
    if kind == "own_doRead":
        assert t.reads == 1
    peer.close()
    rig.poll_until(lambda: proto.lost)
    assert proto.lost.check(error.ConnectionDone)
