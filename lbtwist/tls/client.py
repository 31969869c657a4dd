"""TLS to backends: verified, optionally with a client certificate, and
resuming sessions per backend.

One L{BackendTLS} per pool holds one OpenSSL client context (pyOpenSSL only
resumes a session on a connection made from the context that created it) and
one L{BackendConnectionCreator} per backend, which remembers that backend's
latest session. Verification is never optional: the chain must lead to the
configured CA bundle (or the system store) and the certificate must name the
backend (service-identity rules); any failure aborts the handshake with a
L{BackendVerificationError}, counted on that backend's creator.

Wiring, for the data path and for health probes alike::

    creator = pool_tls.creator_for(backend.host, key=backend.address)
    d = connect_tls(TCP4ClientEndpoint(reactor, backend.host, backend.port, timeout), creator, factory, reactor)
"""
from __future__ import annotations

import ipaddress
import time
from typing import Any

import attrs
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity.hazmat import DNS_ID, IPAddress_ID, VerificationError, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import defer
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lbtwist.config.model import PoolTLSConfig
from lbtwist.tls.context import TLSConfigError, session_reused, tls_version
from lbtwist.tls.files import TLSFileError, load_ca_bundle, load_certificate_pair

__all__ = [
    "BackendConnectionCreator",
    "BackendTLS",
    "BackendTLSStats",
    "BackendVerificationError",
    "client_connection_creator",
    "connect_tls",
    "is_verification_failure",
    "probe_tls",
]

log = Logger(namespace="lbtwist.tls.client")

_TICKET_READ = b"SSLv3/TLS read server session ticket"


def detached_session(conn: SSL.Connection) -> SSL.Session | None:
    """A private copy of the connection's current session.

    OpenSSL marks a connection's session unresumable when the connection is
    freed without having sent close_notify (a backend that just closes TCP),
    which would spoil the session kept for the next connection; a copy made
    through DER is immune. pyOpenSSL has no copy call: the binding's
    ``i2d``/``d2i_SSL_SESSION`` are used here, and only here."""
    sess = conn.get_session()
    if sess is None:
        return None
    ffi, lib = SSL._ffi, SSL._lib  # type: ignore[attr-defined]
    n = lib.i2d_SSL_SESSION(sess._session, ffi.NULL)
    if n <= 0:
        return None
    buf = ffi.new("unsigned char[]", n)
    lib.i2d_SSL_SESSION(sess._session, ffi.new("unsigned char **", buf))
    raw = lib.d2i_SSL_SESSION(ffi.NULL, ffi.new("const unsigned char **", buf), n)
    if raw == ffi.NULL:
        return None
    copy = SSL.Session.__new__(SSL.Session)
    copy._session = ffi.gc(raw, lib.SSL_SESSION_free)
    copy._context = sess._context
    return copy


class BackendVerificationError(Exception):
    """The backend's certificate did not verify; a gateway error, never ignored."""


def is_verification_failure(reason: Failure | BaseException) -> bool:
    """Did a backend connection end because its certificate failed verification?"""
    exc = reason.value if isinstance(reason, Failure) else reason
    return isinstance(exc, BackendVerificationError)


@attrs.define
class BackendTLSStats:
    handshakes: int = 0
    resumed: int = 0
    verify_failures: int = 0
    last_verify_error: str | None = None


@implementer(IOpenSSLClientConnectionCreator)
class BackendConnectionCreator:
    """Makes the OpenSSL connection for one backend: SNI, verification of the
    expected name, and the session to resume."""

    def __init__(self, owner: "BackendTLS", server_name: str) -> None:
        self._owner = owner
        self.server_name = server_name
        try:
            ipaddress.ip_address(server_name)
            self._ident: Any = IPAddress_ID(server_name)
            self._sni: bytes | None = None  # SNI carries DNS names only
        except ValueError:
            self._ident = DNS_ID(server_name)
            self._sni = server_name.encode("idna")
        self.session: SSL.Session | None = None
        self.stats = BackendTLSStats()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._owner.context)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)
        if self.session is not None and self._owner.session_reuse:
            conn.set_session(self.session)
        tlsProtocol._lbtwist_creator = self
        return conn

    def _verify_failed(self, proto: Any, message: str) -> None:
        st = self.stats
        st.verify_failures += 1
        st.last_verify_error = message
        self.session = None
        log.warn("TLS to backend {name}: {message}", name=self.server_name, message=message)
        if proto is not None and hasattr(proto, "failVerification"):
            proto.failVerification(Failure(BackendVerificationError(f"{self.server_name}: {message}")))


class BackendTLS:
    """The TLS settings of one pool (L{lbtwist.config.model.PoolTLSConfig}).
    Raises L{TLSConfigError} naming the file when a CA or client cert is unusable."""

    def __init__(self, config: PoolTLSConfig, now: float | None = None) -> None:
        self.config = config
        self.session_reuse = bool(config.session_reuse)
        self._creators: dict[Any, BackendConnectionCreator] = {}
        ctx = SSL.Context(SSL.TLS_METHOD)
        try:
            ctx.set_min_proto_version(tls_version(config.min_version))
        except ValueError as e:
            raise TLSConfigError(str(e)) from None
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        try:
            if config.ca:
                load_ca_bundle(config.ca)  # a clear error naming the file, before OpenSSL's
                ctx.load_verify_locations(config.ca.encode())
            else:
                ctx.set_default_verify_paths()
            if config.cert:
                cf = load_certificate_pair(config.cert, config.key, time.time() if now is None else now)
                ctx.use_certificate(cf.leaf)
                for extra in cf.chain[1:]:
                    ctx.add_extra_chain_cert(extra)
                ctx.use_privatekey(cf.key)
                ctx.check_privatekey()
            elif config.key:
                raise TLSConfigError(f"{config.key}: a client key needs its certificate (cert)")
        except TLSFileError as e:
            raise TLSConfigError(str(e)) from None
        if config.alpn:
            ctx.set_alpn_protos([p.encode("ascii") for p in config.alpn])
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_info_callback(self._info)
        self.context = ctx

    def creator_for(self, host: str, key: Any = None) -> BackendConnectionCreator:
        """The creator for backend ``key`` (default: ``host``); it verifies
        ``server_name`` from the config, else ``host``."""
        k = host if key is None else key
        c = self._creators.get(k)
        if c is None:
            c = self._creators[k] = BackendConnectionCreator(self, self.config.server_name or host)
        return c

    def forget(self, key: Any) -> None:
        """Drop a removed backend's creator (and its session)."""
        self._creators.pop(key, None)

    # OpenSSL callbacks; they must never raise.

    def _verify(self, conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
        proto = conn.get_app_data()
        creator: BackendConnectionCreator | None = getattr(proto, "_lbtwist_creator", None)
        if creator is None:
            return False
        try:
            if not ok:
                what = SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(errno)).decode()  # type: ignore[attr-defined]
                subject = cert.to_cryptography().subject.rfc4514_string() or "?"
                creator._verify_failed(proto, f"certificate verify failed at depth {depth} ({subject!r}): {what}")
                return False
            if depth == 0:
                try:
                    verify_service_identity(extract_patterns(cert), [creator._ident], [])
                except VerificationError as e:
                    creator._verify_failed(proto, f"certificate does not match {creator.server_name!r}: {e}")
                    return False
            return True
        except Exception:
            log.failure("verifying a backend certificate")
            return False

    def _info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        try:
            if where & SSL.SSL_CB_HANDSHAKE_DONE:
                proto = conn.get_app_data()
                creator = getattr(proto, "_lbtwist_creator", None)
                if creator is None:
                    return
                creator.stats.handshakes += 1
                if session_reused(conn):
                    creator.stats.resumed += 1
                # TLS 1.2: the session is complete now (1.3: see below).
                creator.session = detached_session(conn)
            elif where & SSL.SSL_CB_LOOP and conn.get_state_string() == _TICKET_READ:
                # TLS 1.3 tickets arrive after the handshake; keep the newest.
                creator = getattr(conn.get_app_data(), "_lbtwist_creator", None)
                if creator is not None:
                    creator.session = detached_session(conn)
        except Exception:
            log.failure("TLS session bookkeeping")


def client_connection_creator(pool_tls_config: PoolTLSConfig, hostname: str) -> BackendConnectionCreator:
    """A creator for one backend, with its own pool context (prefer one
    L{BackendTLS} per pool so its backends share the context)."""
    return BackendTLS(pool_tls_config).creator_for(hostname)


def connect_tls(
    endpoint: IStreamClientEndpoint,
    creator: BackendConnectionCreator,
    factory: Any,
    clock: IReactorTime,
) -> defer.Deferred:
    """Connect ``factory``'s protocol over TLS through ``endpoint`` (what
    ``wrapClientTLS`` does, but with the clock passed in). The Deferred fires
    at TCP connect; a handshake or verification failure reaches the protocol's
    ``connectionLost`` (see L{is_verification_failure})."""
    tls_factory = TLSMemoryBIOFactory(creator, True, factory, clock=clock)
    return endpoint.connect(tls_factory).addCallback(lambda p: p.wrappedProtocol)


class TLSClientEndpoint:
    """``endpoint`` with TLS on top (``creator``: the pool's TLS settings, or
    any IOpenSSLClientConnectionCreator), the clock passed in: an https
    probe's connection, a fleet link to Redis over TLS. Used instead of
    Twisted's ``wrapClientTLS``, which a worker process does not have
    (lbtwist.workers.child imports twisted.internet.endpoints with pyOpenSSL
    hidden)."""

    def __init__(self, endpoint: Any, creator: Any, clock: Any) -> None:
        self.endpoint = endpoint
        self.creator = creator
        self.clock = clock

    def connect(self, factory: Any) -> defer.Deferred:
        return connect_tls(self.endpoint, self.creator, factory, self.clock)


@implementer(IHandshakeListener)
class _HandshakeWaiter(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done

    def handshakeCompleted(self) -> None:  # IHandshakeListener
        if not self.done.called:
            self.done.callback(self.transport)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.errback(reason)


def probe_tls(
    endpoint: IStreamClientEndpoint, creator: BackendConnectionCreator, clock: IReactorTime, timeout: float
) -> defer.Deferred:
    """Connect and complete a verified handshake, then close: a TLS health
    probe. Fires with None, or errbacks (L{BackendVerificationError}, the
    connect error, or TimeoutError)."""
    done: defer.Deferred = defer.Deferred()
    f = Factory.forProtocol(lambda: _HandshakeWaiter(done))  # type: ignore[arg-type]
    conn = connect_tls(endpoint, creator, f, clock)
    conn.addErrback(lambda fail: None if done.called else done.errback(fail))
    done.addTimeout(timeout, clock)

    def close(result: Any) -> Any:
        if isinstance(result, Failure):
            conn.cancel()
            if conn.called and not isinstance(conn.result, Failure):
                proto = conn.result
                if proto is not None and proto.transport is not None:
                    proto.transport.abortConnection()
            return result
        return None

    return done.addBoth(close)
