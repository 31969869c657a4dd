"""The terminating side's TLS state: contexts, SNI selection, resumption.

Layout, and why:

  - A *slot* is one configured certificate and the names it serves. Each slot
    is its own resumption domain with long-lived *front* contexts (a
    L{TicketKeyRing}) holding the ticket key, the session cache, the session
    timeout and the session-id context. A session therefore only ever resumes
    under the slot that issued it: a session issued for ``a.test`` offered
    with SNI ``b.test`` (another certificate) finds neither its ticket key nor
    its cache entry and gets a full handshake with ``b.test``'s certificate -
    the cross-name resumption guard, structural rather than an abort.
  - The certificate and key live in a separate per-slot *certificate context*,
    switched onto each connection with ``SSL_set_SSL_CTX`` before the
    handshake. A reload replaces only certificate contexts, so sessions stay
    resumable across it (OpenSSL keeps resumption state in the context a
    connection was created with).
  - The slot and the front generation are chosen per connection from the
    ClientHello, which L{lbtwist.tls.server} reads before OpenSSL does.

Counters: full and resumed handshakes (by ticket or by session cache),
resumptions with a previous ticket key, failures and timeouts.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable, Sequence

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from lbtwist.config.model import TLS12_CIPHERS, TLS13_CIPHERSUITES, ListenerConfig, ListenerTLSConfig
from lbtwist.tls.clienthello import ClientHello
from lbtwist.tls.files import CertificateFile, TLSFileError, load_certificate_pair
from lbtwist.tls.ocsp import Staple, file_staple, parse_staple
from lbtwist.tls.sni import NameTable, check_name_pattern
from lbtwist.tls.suites import SuiteError, check_ciphers, check_ciphersuites, check_groups, set_groups
from lbtwist.tls.tickets import Generation, TicketKeyRing, ticket_key_name

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_CIPHERSUITES",
    "ServerTLS",
    "TLSConfigError",
    "TLSStats",
    "session_reused",
    "session_timeout",
    "ticket_lifetime_problem",
    "tls_version",
]

log = Logger(namespace="lbtwist.tls")

DEFAULT_CIPHERS = TLS12_CIPHERS
DEFAULT_CIPHERSUITES = TLS13_CIPHERSUITES

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: OpenSSL's built-in session cache limit (SSL_SESSION_CACHE_MAX_SIZE_DEFAULT);
#: pyOpenSSL has no setter, so this is also the most lbtwist can honour.
OPENSSL_CACHE_SIZE = 20 * 1024


#: ALPN protocols lbtwist can actually speak on an http listener, preferred
#: first: also the default an http listener offers.
HTTP_ALPN = ("h2", "http/1.1")


def listener_alpn(listener: Any, default_only: bool = False) -> tuple[str, ...]:
    """The ALPN protocols a TLS listener offers: ``tls.alpn``, else
    L{HTTP_ALPN} on http listeners and none on tcp (``default_only``: the
    latter whatever ``tls.alpn`` says)."""
    a = listener.tls.alpn if listener.tls is not None and not default_only else None
    if a is not None:
        return tuple(a)
    return HTTP_ALPN if listener.mode == "http" else ()


class TLSConfigError(ValueError):
    """The TLS settings cannot be applied; nothing was changed."""


def tls_version(text: str) -> int:
    """``"1.2"`` -> the OpenSSL constant. Raises ValueError."""
    try:
        return _VERSIONS[str(text)]
    except KeyError:
        raise ValueError(f"TLS version {text!r}: expected one of {', '.join(repr(v) for v in _VERSIONS)}") from None


#: RFC 8446 4.6.1: a ticket lifetime above seven days is not allowed.
MAX_TICKET_LIFETIME = 7 * 86400


def ticket_lifetime_problem(tickets: Any) -> str | None:
    """What is wrong with ``session_tickets.lifetime``, or None."""
    if tickets.lifetime < 1:
        return "must be at least 1s"
    if tickets.lifetime > MAX_TICKET_LIFETIME:
        return f"{tickets.lifetime:g}s is above the 7 days TLS allows (RFC 8446 4.6.1)"
    return None


def session_timeout(cfg: Any) -> int:
    """The session timeout of the front contexts, in whole seconds. OpenSSL
    keeps one timeout per session: it bounds both resumption and the lifetime
    hint in NewSessionTicket (TLS 1.2 and 1.3). With tickets on it is
    ``session_tickets.lifetime`` (cached session ids then live as long),
    otherwise ``session_cache.timeout``."""
    t = cfg.session_tickets.lifetime if cfg.session_tickets.enabled else cfg.session_cache.timeout
    return max(1, int(t))


def session_reused(conn: SSL.Connection) -> bool:
    """Was this handshake a resumption? pyOpenSSL has no public call for it
    (pyca/pyopenssl PR #1276); the binding exists, so wrap it here, once."""
    return bool(SSL._lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]


@attrs.define
class TLSStats:
    """Handshake counters of one terminating listener."""

    full_handshakes: int = 0
    resumed_handshakes: int = 0
    #: Resumed with a stateless ticket / from the server-side session cache.
    resumed_by_ticket: int = 0
    resumed_by_cache: int = 0
    #: Resumed with a ticket from a previous (rotated-out) key generation.
    resumed_previous_key: int = 0
    #: Connections that ended before their handshake completed.
    failed_handshakes: int = 0
    handshake_timeouts: int = 0
    #: Connections whose first bytes were not a TLS ClientHello.
    not_tls: int = 0
    versions: dict[str, int] = attrs.Factory(dict)
    rotations: int = 0
    reloads: int = 0
    #: Handshakes that got a stapled OCSP response.
    ocsp_stapled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class _Slot:
    key: str
    sid_ctx: bytes
    cert: CertificateFile
    cert_context: SSL.Context
    names: tuple[str, ...]
    ring: TicketKeyRing
    #: The certificate context new generations are probed with (shared with the ring).
    cell: list[SSL.Context]
    #: The OCSP response stapled for this certificate (``certificates[].ocsp``).
    staple: Staple | None = None


def _front_settings(cfg: Any) -> Any:
    """The part of the config the front contexts are built from."""
    return attrs.evolve(cfg, certificates=[], handshake_timeout=0.0)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """TLS state of one terminating listener, built from its ``tls:`` block
    (L{lbtwist.config.model.ListenerTLSConfig}).

    @param clock: schedules ticket-key rotation (handshake deadlines run on
        the reactor given to L{lbtwist.tls.server.wrap_server_factory}).
    @param alpn: protocols to negotiate when the config does not say
        (``["h2", "http/1.1"]`` for http listeners, none for tcp).
    @param wallclock: POSIX time, for certificate validity checks.
    """

    def __init__(
        self,
        config: ListenerTLSConfig,
        clock: IReactorTime,
        *,
        name: str = "",
        alpn: Sequence[str] = (),
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.name = name
        self.stats = TLSStats()
        self._default_alpn = tuple(alpn)
        self._wallclock = wallclock
        self._timer: IDelayedCall | None = None
        self.config = config
        self._apply(config, keep_fronts=False)

    @classmethod
    def for_listener(cls, listener: ListenerConfig, clock: IReactorTime, **kw: Any) -> "ServerTLS":
        """From a L{lbtwist.config.model.ListenerConfig} with ``tls:``; ALPN
        defaults to ``h2, http/1.1`` on http listeners, none on tcp."""
        return cls(listener.tls, clock, name=listener.name, alpn=listener_alpn(listener, default_only=True), **kw)

    # -- settings ---------------------------------------------------------

    @property
    def handshake_timeout(self) -> float:
        return float(self.config.handshake_timeout)

    @property
    def tickets(self) -> bool:
        return bool(self.config.session_tickets.enabled)

    @property
    def alpn(self) -> tuple[str, ...]:
        a = self.config.alpn
        return tuple(a) if a is not None else self._default_alpn

    def _configure(self, ctx: SSL.Context) -> None:
        """What every context of this listener shares. The front's settings
        are the ones in force (OpenSSL copies versions, ciphers and options
        into each connection from the context it is created with); the
        certificate context repeats them so ALPN and callbacks agree."""
        cfg = self.config
        ctx.set_min_proto_version(tls_version(cfg.min_version))
        opts = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF
        if not self.tickets:
            opts |= SSL.OP_NO_TICKET
        if cfg.prefer_server_ciphers:
            # OpenSSL applies it to the TLS 1.2 cipher, the TLS 1.3 suite and the group.
            opts |= SSL.OP_CIPHER_SERVER_PREFERENCE
        ctx.set_options(opts)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(cfg.ciphers.encode("ascii"))
        ctx.set_tls13_ciphersuites(cfg.ciphersuites.encode("ascii"))
        set_groups(ctx, cfg.groups)
        if self.alpn:
            ctx.set_alpn_select_callback(self._select_alpn)
        ctx.set_info_callback(self._info)

    def _front(self, sid_ctx: bytes) -> SSL.Context:
        cfg = self.config
        ctx = SSL.Context(SSL.TLS_METHOD)
        self._configure(ctx)
        ctx.set_session_id(sid_ctx)
        ctx.set_timeout(session_timeout(cfg))
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER if cfg.session_cache.size > 0 else SSL.SESS_CACHE_OFF)
        return ctx

    def _cert_context(self, cf: CertificateFile, sid_ctx: bytes) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        self._configure(ctx)
        # Same id context as the front: SSL_set_SSL_CTX carries it over, and
        # sessions are only resumed under the id context they were made in.
        ctx.set_session_id(sid_ctx)
        ctx.use_certificate(cf.leaf)
        for extra in cf.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(cf.key)
        ctx.check_privatekey()
        return ctx

    def _sid_ctx(self, key: str) -> bytes:
        # Stable across reloads and identical in forked workers.
        return hashlib.sha256(f"lbtwist\0{self.name}\0{key}".encode()).digest()

    def _check_settings(self, cfg: Any) -> None:
        try:
            tls_version(cfg.min_version)
        except ValueError as e:
            raise TLSConfigError(f"min_version: {e}") from None
        for key, check in (("ciphers", check_ciphers), ("ciphersuites", check_ciphersuites), ("groups", check_groups)):
            try:
                check(getattr(cfg, key))
            except SuiteError as e:
                raise TLSConfigError(f"{key}: {e}") from None
        problem = ticket_lifetime_problem(cfg.session_tickets)
        if problem is not None:
            raise TLSConfigError(f"session_tickets.lifetime: {problem}")
        if not cfg.certificates:
            raise TLSConfigError("tls: at least one certificate is needed")
        if cfg.session_cache.size > OPENSSL_CACHE_SIZE:
            raise TLSConfigError(
                f"session_cache.size {cfg.session_cache.size} is above OpenSSL's fixed limit of {OPENSSL_CACHE_SIZE}"
            )

    def _apply(self, cfg: Any, keep_fronts: bool) -> None:
        """Build everything for ``cfg`` first, then switch; raise with nothing changed."""
        self._check_settings(cfg)
        old_cfg, self.config = self.config, cfg  # _configure reads self.config
        try:
            now = self._wallclock()
            files = []
            staples: list[Staple | None] = []
            for c in cfg.certificates:
                try:
                    files.append(load_certificate_pair(c.cert, c.key, now))
                    staple, ignored = file_staple(c.ocsp, files[-1].leaf, c.ocsp_fetch) if c.ocsp else (None, None)
                    staples.append(staple)
                    if ignored is not None:
                        log.warn("tls {name}: {problem}", name=self.name, problem=ignored)
                except TLSFileError as e:
                    raise TLSConfigError(str(e)) from None
            old = {s.key: s for s in getattr(self, "_slots", ())} if keep_fronts else {}
            slots: list[_Slot] = []
            table: NameTable[_Slot] = NameTable()
            for c, cf, staple in zip(cfg.certificates, files, staples):
                key = c.cert
                sid = self._sid_ctx(key)
                try:
                    cctx = self._cert_context(cf, sid)
                except SSL.Error as e:
                    raise TLSConfigError(f"{c.cert}: OpenSSL refuses the certificate or key: {e}") from None
                holder: list[_Slot] = []
                if c.ocsp or c.ocsp_fetch:
                    # OpenSSL asks the context the connection was switched to
                    # (the certificate context) for the status response; set
                    # before the ring's probe connection freezes the context.
                    cctx.set_ocsp_server_callback(self._staple_callback(holder))
                prev = old.get(key)
                if c.ocsp_fetch:
                    # a fetched response newer than the file (or with no file) outlives a reload
                    kept = prev.staple if prev is not None and prev.cert.leaf == cf.leaf else None
                    if kept is not None and (staple is None or kept.this_update > staple.this_update):
                        staple = kept
                if prev is not None:
                    ring, cell = prev.ring, prev.cell
                else:
                    cell = [cctx]
                    ring = self._ring(sid, cell)
                names = tuple(check_name_pattern(n) for n in c.names) if c.names else cf.names
                slot = _Slot(key, sid, cf, cctx, names, ring, cell, staple)
                holder.append(slot)
                slots.append(slot)
                for n in names:
                    table.add(n, slot)
            defaults = [s for s, c in zip(slots, cfg.certificates) if c.default]
            table.default = defaults[0] if defaults else slots[0]
        except BaseException:
            self.config = old_cfg
            raise
        for s in slots:
            s.cell[0] = s.cert_context
        self._slots = slots
        self._table = table
        for s in slots:
            problem = s.staple.problem(now) if s.staple is not None else None
            if problem is not None:
                log.warn("tls {name}: {problem}", name=self.name, problem=problem)

    def _staple_callback(self, holder: list[_Slot]) -> Callable[[SSL.Connection, Any], bytes]:
        def staple_for(conn: SSL.Connection, data: Any) -> bytes:
            # read per handshake: offer_staple swaps it in place
            staple = holder[0].staple if holder else None
            if staple is not None and staple.usable(self._wallclock()):
                self.stats.ocsp_stapled += 1
                return staple.der
            return b""  # no staple: the client checks for itself
        return staple_for

    def offer_staple(self, cert: str, der: bytes | None, source: str) -> Staple | None:
        """Staple ``der`` (a fetched OCSP response; None: stop stapling) for
        the certificate configured as ``cert`` from the next handshake on,
        without rebuilding anything. It is checked against the slot's leaf with
        the file's validator; raises L{TLSFileError} naming ``source``, and
        then nothing changed. Returns the new staple (None: no such slot)."""
        for s in self._slots:
            if s.key != cert:
                continue
            staple = parse_staple(der, s.cert.leaf, source) if der is not None else None
            s.staple = staple
            return staple
        return None

    def staple_of(self, cert: str) -> Staple | None:
        """The response stapled (when usable) for certificate ``cert``."""
        for s in self._slots:
            if s.key == cert:
                return s.staple
        return None

    def _ring(self, sid: bytes, cell: list[SSL.Context]) -> TicketKeyRing:
        t = self.config.session_tickets
        learn = (lambda front: ticket_key_name(front, cell[0])) if self.tickets else None
        ring = TicketKeyRing(lambda: self._front(sid), learn, keep=t.keep if self.tickets else 1,
                             prepare=t.prepare if self.tickets else 0)
        if self.tickets and ring.current.key_name is None:
            log.warn("tls {name}: could not learn the ticket key name; rotated-out tickets will not resume", name=self.name)
        return ring

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Schedule ticket-key rotation on the clock."""
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self) -> None:
        self.stop()
        period = float(self.config.session_tickets.rotate)
        if self.tickets and period > 0:
            self._timer = self.clock.callLater(period, self._tick)

    def _tick(self) -> None:
        self._timer = None
        try:
            self.rotate()
        except Exception:
            log.failure("tls {name}: ticket key rotation failed", name=self.name)
        self._schedule()

    def rotate(self) -> None:
        """Make a new ticket key current in every slot, keeping the last few."""
        for s in self._slots:
            s.ring.rotate()
        self.stats.rotations += 1
        log.info("tls {name}: ticket keys rotated", name=self.name)

    def keeps_sessions(self, config: ListenerTLSConfig) -> bool:
        """Whether L{reload} with ``config`` keeps the front contexts (their
        ticket keys and session caches): only certificates, keys and the
        handshake deadline differ."""
        return _front_settings(config) == _front_settings(self.config)

    def reload(self, config: ListenerTLSConfig | None = None) -> None:
        """Re-read certificates and keys (from ``config`` if given). Sessions
        stay resumable; established connections are untouched. Raises
        L{TLSConfigError} naming the file, and then nothing has changed."""
        cfg = self.config if config is None else config
        same_fronts = self.keeps_sessions(cfg)
        self._apply(cfg, keep_fronts=same_fronts)
        if not same_fronts:
            log.warn("tls {name}: protocol or session settings changed: sessions start afresh", name=self.name)
            if self._timer is not None:
                self._schedule()
        self.stats.reloads += 1
        log.info("tls {name}: certificates reloaded", name=self.name)

    # -- per connection -------------------------------------------------------

    def choose(self, hello: ClientHello | None) -> tuple[_Slot, Generation]:
        """The slot for the hello's server name and the front generation that
        holds the offered ticket's key (else the current one)."""
        slot = self._table.lookup(hello.server_name if hello is not None else None)
        assert slot is not None
        if hello is None or not self.tickets:
            return slot, slot.ring.current
        return slot, slot.ring.for_key_name(hello.ticket_key_name)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """IOpenSSLServerConnectionCreator: called by the TLS protocol as it
        connects; the ClientHello was stored on it by the peeking adapter."""
        slot, gen = self.choose(getattr(tlsProtocol, "_lbtwist_hello", None))
        conn = SSL.Connection(gen.context)
        conn.set_context(slot.cert_context)
        tlsProtocol._lbtwist_choice = (slot, gen)
        return conn

    def certificate_for(self, server_name: str | None) -> Any:
        """The leaf certificate (cryptography) served for ``server_name``."""
        return self.choose(ClientHello(0x0303, server_name=server_name))[0].cert.leaf

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        for p in self.alpn:
            b = p.encode("ascii")
            if b in offered:
                return b
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def _info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_HANDSHAKE_DONE:
            try:
                proto = conn.get_app_data()
                done = getattr(proto, "_lbtwist_handshake_done", None)
                if done is not None:
                    done(conn)
            except Exception:
                log.failure("tls {name}: handshake bookkeeping failed", name=self.name)

    def count_handshake(self, proto: Any, conn: SSL.Connection) -> bool:
        """Record a completed handshake; returns whether it was resumed."""
        st = self.stats
        resumed = session_reused(conn)
        version = conn.get_protocol_version_name()
        st.versions[version] = st.versions.get(version, 0) + 1
        if not resumed:
            st.full_handshakes += 1
            return False
        st.resumed_handshakes += 1
        hello = getattr(proto, "_lbtwist_hello", None)
        if self.tickets and (version == "TLSv1.3" or (hello is not None and hello.session_ticket)):
            st.resumed_by_ticket += 1
            choice = getattr(proto, "_lbtwist_choice", None)
            if choice is not None and choice[1] is not choice[0].ring.current:
                st.resumed_previous_key += 1
        else:
            st.resumed_by_cache += 1
        return True
