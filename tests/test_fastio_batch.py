"""Sends batched per poll pass (lbtwist.fastio, lean reactor only): small
writes made while a pass's events are dispatched reach the peer at the end of
the pass, in order; closing sends them first, aborting drops them, large
writes and writeSequence keep the order, and writes outside a pass go at once.

Real 127.0.0.1 sockets on a private lean reactor driven by ``doPoll``."""
import socket

import pytest

from lbtwist import fastio
from support.fakes import Logged
from test_fastio_dispatch import LEAN, _Recorder, _Rig


@pytest.fixture
def rig():
    r = _Rig(LEAN)
    yield r
    r.close()


class _Replier(_Recorder):
    """On each read, runs ``on_read(transport)`` and notes what was still held."""

    def __init__(self, on_read):
        super().__init__()
        self.on_read = on_read
        self.held_during = None

    def dataReceived(self, data):
        super().dataReceived(data)
        self.on_read(self.transport)
        self.held_during = self.transport._held


def _recv_all(peer: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = peer.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_writes_during_a_pass_are_sent_at_its_end_in_order(rig):
    def reply(t):
        t.write(b"one,")
        t.write(b"two,")
        t.write(b"three")

    proto = _Replier(reply)
    t, peer = rig.connect(proto)
    peer.sendall(b"go")
    rig.poll_until(lambda: proto.data)
    # Held during the dispatch, sent once the pass ended.
    assert proto.held_during == [b"one,", b"two,", b"three"]
    assert t._held is None and not fastio._batch.held and not fastio._batch.active
    assert _recv_all(peer, 13) == b"one,two,three"


def test_write_outside_a_pass_is_sent_at_once(rig):
    proto = _Recorder()
    t, peer = rig.connect(proto)
    t.write(b"now")
    assert t._held is None
    assert peer.recv(10) == b"now"


@pytest.mark.parametrize("close", ["loseConnection", "loseWriteConnection"])
def test_close_and_half_close_send_what_is_held_first(rig, close):
    def reply(t):
        t.write(b"last words")
        getattr(t, close)()

    proto = _Replier(reply)
    t, peer = rig.connect(proto)
    peer.sendall(b"go")
    rig.poll_until(lambda: proto.data)
    # a close completes from Twisted's next write event; a half-close at once
    rig.poll_until(lambda: proto.lost is not None if close == "loseConnection" else t._writeDisconnected)
    assert _recv_all(peer, 100) == b"last words"  # then EOF


def test_abort_drops_what_is_held(rig):
    def reply(t):
        t.write(b"never sent")
        t.abortConnection()

    proto = _Replier(reply)
    t, peer = rig.connect(proto)
    peer.sendall(b"go")
    rig.poll_until(lambda: proto.data)
    for _ in range(20):  # abortConnection reports the loss from a timed call
        rig.reactor.runUntilCurrent()
        if proto.lost is not None:
            break
        rig.reactor.doPoll(0.05)
    assert proto.lost is not None
    try:
        got = peer.recv(100)
    except ConnectionResetError:
        got = b""
    assert got == b""


def test_large_write_and_write_sequence_keep_the_order(rig):
    big = b"x" * (fastio.BATCH_MAX + 1)

    def reply(t):
        t.write(b"a")
        t.write(big)  # too large to hold: what is held goes first, then this
        t.write(b"b")
        t.writeSequence([b"c", b"d"])  # Twisted's own buffer: held data first
        t.write(b"e")

    proto = _Replier(reply)
    t, peer = rig.connect(proto)
    peer.sendall(b"go")
    rig.poll_until(lambda: proto.data)
    want = b"a" + big + b"bcde"
    peer.settimeout(5)
    got = b""
    while len(got) < len(want):
        rig.reactor.doPoll(0)  # lets Twisted flush its buffered part
        try:
            got += peer.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
    assert got == want


def test_a_failing_send_does_not_strand_the_others(rig):
    class Bad(_Replier):
        pass

    bad = Bad(lambda t: t.write(b"lost"))
    good = _Replier(lambda t: t.write(b"kept"))
    tb, pb = rig.connect(bad)
    tg, pg = rig.connect(good)

    def broken(data):
        raise RuntimeError("send failed")

    tb._send = broken
    with Logged() as logged:
        pb.sendall(b"go")
        pg.sendall(b"go")
        rig.poll_until(lambda: bad.data and good.data)
    assert pg.recv(10) == b"kept"
    assert tb._held is None and not fastio._batch.held
    assert any("sending held data failed" in x and "send failed" in x for x in logged.texts())


def test_stock_reactor_sends_at_once():
    """Only the lean reactor batches: on Twisted's epoll reactor a write in a
    read callback is sent before the callback returns."""
    from twisted.internet import epollreactor

    r = _Rig(epollreactor.EPollReactor)
    try:
        sent = []

        def reply(t):
            t.write(b"direct")
            sent.append(t._held is None and t.dataBuffer == b"" and t._tempDataLen == 0)

        proto = _Replier(reply)
        t, peer = r.connect(proto)
        peer.sendall(b"go")
        r.poll_until(lambda: proto.data)
        assert sent == [True]
        assert peer.recv(10) == b"direct"
    finally:
        r.close()


class _Producer:
    """A streaming producer that records the calls its consumer makes."""

    def __init__(self):
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self):
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        self.paused = False
        self.resumes += 1

    def stopProducing(self):
        pass


def _small_buffers(t, peer):
    """Kernel buffers small enough that a non-reading peer fills them at once."""
    t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)


def test_a_flood_of_small_writes_to_a_peer_that_does_not_read_pauses_the_producer(rig):
    """One pass's small writes are held, but held bytes count as buffered: the
    transport's producer is paused once they (plus Twisted's buffer) pass the
    buffer size, and no more than BATCH_MAX is ever held."""
    chunk = b"z" * 512
    cap = 64 << 20  # what an unbounded hold would take in before anyone paused it
    state = {"written": 0, "max_held": 0}
    producer = _Producer()

    def flood(t):
        if state["written"]:
            return
        while not producer.paused and state["written"] < cap:
            t.write(chunk)
            state["written"] += len(chunk)
            state["max_held"] = max(state["max_held"], t.held_size())

    proto = _Replier(flood)
    t, peer = rig.connect(proto)
    _small_buffers(t, peer)
    t.registerProducer(producer, True)
    peer.sendall(b"go")
    rig.poll_until(lambda: proto.data)
    assert producer.pauses >= 1, f"wrote {state['written']} bytes to a peer that does not read, never paused"
    assert state["written"] < 8 << 20
    assert state["max_held"] <= fastio.BATCH_MAX
    # The peer reads again: everything arrives in order and the producer is resumed.
    got = 0
    peer.setblocking(False)
    for _ in range(2000):
        if got >= state["written"] and producer.resumes:
            break
        rig.reactor.doPoll(0.01)
        try:
            while True:
                d = peer.recv(1 << 20)
                assert d.count(b"z") == len(d)
                got += len(d)
        except BlockingIOError:
            pass
    assert got == state["written"]
    assert producer.resumes >= 1 and not producer.paused


def test_a_producer_paused_by_held_bytes_alone_is_resumed_once_they_are_sent(rig):
    """Twisted resumes a producer when its buffer drains, from a write event;
    held bytes that the end of the pass sends at once never make one, so the
    flush resumes the producer itself."""
    producer = _Producer()
    seen = {}

    def burst(t):
        for _ in range(10):
            t.write(b"y" * 1000)
        seen["paused_in_pass"] = producer.paused

    proto = _Replier(burst)
    t, peer = rig.connect(proto)
    t.bufferSize = 4096  # held bytes alone exceed it
    t.registerProducer(producer, True)
    peer.sendall(b"go")
    rig.poll_until(lambda: proto.data)
    assert seen["paused_in_pass"] is True
    assert not producer.paused and producer.resumes == 1
    assert t.held_size() == 0 and t.dataBuffer == b"" and t._tempDataLen == 0
    assert _recv_all(peer, 10000) == b"y" * 10000
