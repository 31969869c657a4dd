"""TLS termination for any listener factory: the thin Twisted adapter.

    factory = wrap_server_factory(l7_or_l4_factory, server_tls)

Each connection is first a L{ClientHelloPeeker}; once the ClientHello is in,
a TLS protocol (Twisted's memory-BIO TLS, with a handshake deadline and
handshake counting added) is built around the listener's own protocol, with
the OpenSSL connection made by L{ServerTLS} for that hello.

The listener's protocol sees a TLS transport; L{tls_info} on it gives the
negotiated version, cipher, server name, ALPN protocol and whether the session
was resumed (for ``X-Forwarded-Proto: https``, routing rules and logs).
"""
from __future__ import annotations

from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IProtocolFactory, IReactorTime
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from lbtwist import fastio
from lbtwist.tls import records
from lbtwist.tls.clienthello import ClientHello, NotTLS
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.peek import ClientHelloPeekFactory

__all__ = ["TLSInfo", "TLSServerProtocol", "tls_info", "wrap_server_factory"]


@attrs.frozen
class TLSInfo:
    """What a terminated TLS connection negotiated."""

    #: ``"TLSv1.3"`` / ``"TLSv1.2"``.
    version: str
    #: OpenSSL cipher name, e.g. ``"TLS_AES_128_GCM_SHA256"``.
    cipher: str
    #: SNI as sent by the client (lower-cased), or None.
    server_name: str | None
    #: ALPN protocol agreed, or None.
    alpn: str | None
    resumed: bool


class TLSServerProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol plus: a deadline for the whole handshake, and a
    hook (called from OpenSSL's info callback) that counts the handshake.

    The data path gets the plain one's speed levers: the TCP transport under
    the TLS layer is accelerated by L{lbtwist.fastio} (eager writes, batched
    sends at the end of the lean reactor's poll pass, inline reads), and the
    TLS layer writes through at once instead of Twisted's
    L{BufferingTLSTransport}, whose per-write ``callLater(0)`` costs a delayed
    call and a loop pass per response. Coalescing still happens: plaintext
    written during a poll pass is held and encrypted as one write at its end,
    and the batched TCP transport sends a pass's records in one ``send()``.

    Once the handshake is done, records move through L{lbtwist.tls.records}
    (Twisted's ``dataReceived``/``_flushReceiveBIO``/``_flushSendBIO``/``_write``
    are overridden): a read decrypts every record the TCP read brought and
    hands the wrapped protocol one ``dataReceived``, a write encrypts the
    whole buffer and hands the TCP transport one ``write``, with no
    ``WantReadError`` raised for "nothing more". Errors, close_notify, early
    writes (buffered until the handshake ends) and aborts end as in Twisted
    (tests/test_tls_records.py runs both)."""

    #: Accelerate the TCP transport underneath (benchmarks compare without).
    lbtwist_eager = True
    #: Plaintext written during a lean reactor poll pass, encrypted as one
    #: write at its end (L{fastio.hold_until_pass_end}); None when nothing is held.
    _held: list[bytes] | None = None
    _held_len = 0

    def write(self, data: bytes) -> None:  # type: ignore[override]
        held = self._held
        if held is not None:
            held.append(data)
            self._held_len += len(data)
            if self._held_len > fastio.BATCH_MAX:
                self._send_held()
            return
        if self.lbtwist_eager and type(data) is bytes and len(data) <= fastio.BATCH_MAX \
                and not self.disconnecting and fastio.hold_until_pass_end(self):
            self._held = [data]
            self._held_len = len(data)
            return
        super().write(data)

    def _send_held(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._held_len = 0
            if not self._lbtwist_closed:
                data = held[0] if len(held) == 1 else b"".join(held)
                if self._producer is None and self.disconnecting:
                    return  # what TLSMemoryBIOProtocol.write does after loseConnection
                self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        self._send_held()  # keep the order
        super().writeSequence(iovec)

    # -- record I/O (lbtwist.tls.records), once the handshake is done ------------------
    # Twisted's versions of these three methods (pinned in tests/test_tls_records.py)
    # move one record per call and end each read with two WantReadError exceptions;
    # these drain the BIOs in one call each, with the same outcomes.

    #: Use the record I/O below: only on a pyOpenSSL and a Twisted whose internals
    #: were checked (else Twisted's own throughout; tests compare both).
    lbtwist_records = records.FAST and fastio.twisted_supported()

    def dataReceived(self, data: bytes) -> None:
        if not self._handshakeDone or self._appSendBuffer or not self.lbtwist_records:
            super().dataReceived(data)
            return
        conn = self._tlsConnection
        records.feed_ciphertext(conn, data)
        if self._lostTLSConnection:
            self._flushSendBIO()
            return
        # _flushReceiveBIO below, inlined for the common case (no error).
        data, err = records.read_plaintext(conn)
        if err is None:
            if data and not self._aborted:
                self.wrappedProtocol.dataReceived(data)  # = ProtocolWrapper.dataReceived
            self._flushSendBIO()
            return
        self._received(data, err)

    def _flushReceiveBIO(self) -> None:
        if not self._handshakeDone or not self.lbtwist_records:
            super()._flushReceiveBIO()
            return
        if not self._lostTLSConnection:
            data, err = records.read_plaintext(self._tlsConnection)
            self._received(data, err)
            return
        self._flushSendBIO()

    def _received(self, data: bytes, err: SSL.Error | None) -> None:
        if data and not self._aborted:
            # All the records of this read at once (Twisted: one call per record).
            ProtocolWrapper.dataReceived(self, data)
        if err is not None and not self._lostTLSConnection:
            if isinstance(err, SSL.ZeroReturnError):
                # close_notify: TLS is shut down; the reason comes from the transport.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            else:
                self._tlsShutdownFinished(Failure(err))
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        if not self.lbtwist_records:
            super()._flushSendBIO()
            return
        out = records.take_ciphertext(self._tlsConnection)
        if out:
            self.transport.write(out)  # everything encrypted so far: one write

    def _write(self, data: bytes) -> None:
        if not self.lbtwist_records or type(data) is not bytes:
            super()._write(data)
            return
        if self._lostTLSConnection:
            return
        done, err = records.write_plaintext(self._tlsConnection, data)
        if err is None:
            self._flushSendBIO()  # all records of this write in one transport write
        elif isinstance(err, SSL.WantReadError):
            self._flushSendBIO()
            self._bufferedWrite(data[done:])  # written again once a read unblocks it, as Twisted does
        else:
            self._tlsShutdownFinished(Failure(err))

    def loseConnection(self) -> None:
        self._send_held()
        super().loseConnection()

    def abortConnection(self) -> None:
        self._held = None  # dropped, like any unsent buffer on abort
        super().abortConnection()

    _lbtwist_hello: ClientHello | None = None
    _lbtwist_choice: Any = None
    _lbtwist_state: ServerTLS | None = None
    _lbtwist_resumed: bool | None = None
    _lbtwist_info: TLSInfo | None = None
    _lbtwist_timer: IDelayedCall | None = None
    _lbtwist_closed = False

    def makeConnection(self, transport: Any) -> None:
        st = self._lbtwist_state
        if st is not None and st.handshake_timeout > 0:
            self._lbtwist_timer = self.factory.lbtwist_clock.callLater(st.handshake_timeout, self._lbtwist_timed_out)
        if self.lbtwist_eager:
            fastio.accelerate(transport)  # False (no change) for anything but plain TCP
        super().makeConnection(transport)

    def _lbtwist_timed_out(self) -> None:
        self._lbtwist_timer = None
        if self._lbtwist_resumed is None:
            if self._lbtwist_state is not None:
                self._lbtwist_state.stats.handshake_timeouts += 1
            self.abortConnection()

    def _lbtwist_handshake_done(self, conn: SSL.Connection) -> None:
        if self._lbtwist_resumed is not None:
            return
        t = self._lbtwist_timer
        if t is not None:
            self._lbtwist_timer = None
            if t.active():
                t.cancel()
        st = self._lbtwist_state
        self._lbtwist_resumed = st.count_handshake(self, conn) if st is not None else False

    def connectionLost(self, reason: Failure) -> None:
        t = self._lbtwist_timer
        if t is not None:
            self._lbtwist_timer = None
            if t.active():
                t.cancel()
        if self._lbtwist_resumed is None and self._lbtwist_state is not None and not self._lbtwist_closed:
            self._lbtwist_state.stats.failed_handshakes += 1
        self._lbtwist_closed = True
        super().connectionLost(reason)


def _read_info(p: TLSServerProtocol) -> TLSInfo:
    conn = p._tlsConnection
    alpn = conn.get_alpn_proto_negotiated()
    hello = p._lbtwist_hello
    return TLSInfo(
        version=conn.get_protocol_version_name(),
        cipher=conn.get_cipher_name() or "",
        server_name=hello.server_name if hello is not None else None,
        alpn=alpn.decode("ascii", "replace") if alpn else None,
        resumed=bool(p._lbtwist_resumed),
    )


def tls_info(transport: Any) -> TLSInfo | None:
    """The TLS parameters of a connection, given the transport a listener's
    protocol sees; None for a plain connection or before the handshake ends."""
    if not isinstance(transport, TLSServerProtocol):
        return None
    info = transport._lbtwist_info
    if info is None:
        if transport._lbtwist_resumed is None or transport._tlsConnection is None:
            return None
        info = transport._lbtwist_info = _read_info(transport)
    return info


class _ServerTLSFactory(TLSMemoryBIOFactory):
    protocol = TLSServerProtocol

    def __init__(self, tls: ServerTLS, wrapped: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(tls, False, wrapped, clock=clock)
        self.lbtwist_clock = clock


def wrap_server_factory(
    factory: IProtocolFactory, tls: ServerTLS, reactor: IReactorTime | None = None
) -> ClientHelloPeekFactory:
    """Terminate TLS in front of ``factory`` with ``tls``'s certificates and
    resumption state. ``factory.buildProtocol`` is called once the ClientHello
    has arrived; a connection that does not start with one is closed.

    @param reactor: times the handshake deadline and flushes TLS writes
        (Twisted coalesces small writes on the next reactor turn); defaults
        to the clock ``tls`` was built with."""
    clock = reactor if reactor is not None else tls.clock
    tls_factory = _ServerTLSFactory(tls, factory, clock)

    def decide(hello: ClientHello | NotTLS, addr: IAddress) -> IProtocol | None:
        if isinstance(hello, NotTLS):
            tls.stats.not_tls += 1
            return None
        app = factory.buildProtocol(addr)
        if app is None:
            return None
        p = TLSServerProtocol(tls_factory, app)
        if not getattr(factory, "eager", True):
            p.lbtwist_eager = False
        p._lbtwist_hello = hello
        p._lbtwist_state = tls
        return p

    def timed_out() -> None:
        tls.stats.handshake_timeouts += 1

    return ClientHelloPeekFactory(decide, clock, tls.handshake_timeout, wrapped=tls_factory, on_timeout=timed_out)
