"""A sans-IO reader for the first flight of a TLS client: the ClientHello.

lbtwist reads it before any TLS library sees the connection, for two reasons:
SNI passthrough routes on the server name without terminating, and the
terminating side picks, per connection, the front context whose session-ticket
key issued the ticket the client offers (pyOpenSSL cannot share or rotate
ticket keys inside one context, see L{lbtwist.tls.tickets}).

Feed L{parse_client_hello} everything received so far. It answers L{NEED_MORE}
(wait for more bytes), L{NotTLS} (close: this is not a TLS ClientHello, or a
malformed one) or a L{ClientHello}. It never raises on any input.
"""
from __future__ import annotations

from typing import Final, Union

import attrs

__all__ = [
    "ClientHello",
    "MAX_CLIENT_HELLO",
    "NEED_MORE",
    "NeedMore",
    "NotTLS",
    "ParseResult",
    "parse_client_hello",
]

#: Largest ClientHello accepted. Real ones are 0.2-2 KiB (post-quantum key
#: shares make ~1.8 KiB); a client that needs more is not one we want to buffer for.
MAX_CLIENT_HELLO: Final = 16384 + 4

_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_MAX_RECORD: Final = 16384

EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SESSION_TICKET: Final = 35
EXT_PRE_SHARED_KEY: Final = 41
EXT_SUPPORTED_VERSIONS: Final = 43

#: OpenSSL's stateless tickets start with a 16-byte key name, then a 16-byte
#: IV, the encrypted session and a 32-byte MAC; a stateful TLS 1.3 "ticket"
#: is a bare 32-byte session id. Anything this short carries no key name.
_KEY_NAME_LEN: Final = 16
_MIN_STATELESS_TICKET: Final = 16 + 16 + 1 + 32


class NeedMore:
    """Not enough bytes yet to decide."""

    _instance: "NeedMore | None" = None

    def __new__(cls) -> "NeedMore":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


@attrs.frozen
class NotTLS:
    """The bytes are not a (well-formed) TLS ClientHello; ``reason`` says why."""

    reason: str


@attrs.frozen
class ClientHello:
    """What lbtwist needs from a ClientHello; all fields are as sent."""

    #: ``legacy_version`` of the hello (0x0303 for TLS 1.2 and 1.3 clients).
    legacy_version: int
    session_id: bytes = b""
    #: Lower-cased host name from the server_name extension, trailing dot removed.
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    #: Contents of the session_ticket extension: None when absent, b"" when the
    #: client supports tickets but has none to offer.
    session_ticket: bytes | None = None
    #: Identities of the pre_shared_key extension (TLS 1.3 resumption).
    psk_identities: tuple[bytes, ...] = ()
    #: supported_versions, GREASE values removed; empty when the extension is absent.
    supported_versions: tuple[int, ...] = ()
    #: Total bytes of the records that carried the hello.
    length: int = 0

    @property
    def max_version(self) -> int:
        """The highest protocol version offered (0x0304 = TLS 1.3)."""
        return max(self.supported_versions) if self.supported_versions else self.legacy_version

    @property
    def offers_ticket(self) -> bool:
        """Does the client try to resume with a stateless ticket?"""
        return bool(self.session_ticket) or bool(self.psk_identities)

    @property
    def ticket_key_name(self) -> bytes | None:
        """The key name of the offered ticket (first 16 bytes of an OpenSSL
        stateless ticket), from the TLS 1.3 PSK identity or the TLS 1.2
        session_ticket extension; None when no stateless ticket is offered."""
        for ident in self.psk_identities:
            if len(ident) >= _MIN_STATELESS_TICKET:
                return ident[:_KEY_NAME_LEN]
        t = self.session_ticket
        if t is not None and len(t) >= _MIN_STATELESS_TICKET:
            return t[:_KEY_NAME_LEN]
        return None


ParseResult = Union[ClientHello, NotTLS, NeedMore]


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked big-endian reads over one bytes object."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise _Malformed("truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, len_size: int) -> "_Reader":
        n = self.uint(len_size)
        if n > self.end - self.pos:
            raise _Malformed("truncated vector")
        sub = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return sub


def _is_grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def _handshake_bytes(data: bytes, max_size: int) -> tuple[bytes, int] | NotTLS | NeedMore:
    """Join the handshake records at the start of ``data`` until they hold
    the whole first handshake message. Returns (message, bytes used)."""
    if not data:
        return NEED_MORE
    if data[0] != _HANDSHAKE:
        return NotTLS(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    if len(data) >= 2 and data[1] != 3:
        return NotTLS(f"record version major {data[1]} is not 3")
    buf = bytearray()
    pos = 0
    need: int | None = None
    while True:
        if len(data) - pos < 5:
            return NEED_MORE
        ctype, major = data[pos], data[pos + 1]
        if ctype != _HANDSHAKE:
            return NotTLS(f"record type {ctype} before the ClientHello was complete")
        if major != 3:
            return NotTLS(f"record version major {major} is not 3")
        rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
        if rlen == 0 or rlen > _MAX_RECORD:
            return NotTLS(f"handshake record length {rlen} is out of range")
        if len(data) - pos - 5 < rlen:
            # Decide early what the header already tells.
            if need is None and len(buf) + len(data) - pos - 5 >= 4:
                head = bytes(buf + data[pos + 5:pos + 9])[:4]
                if head[0] != _CLIENT_HELLO:
                    return NotTLS(f"handshake message type {head[0]} is not ClientHello")
                if int.from_bytes(head[1:4], "big") > max_size:
                    return NotTLS("ClientHello larger than the limit")
            return NEED_MORE
        buf += data[pos + 5:pos + 5 + rlen]
        pos += 5 + rlen
        if need is None and len(buf) >= 4:
            if buf[0] != _CLIENT_HELLO:
                return NotTLS(f"handshake message type {buf[0]} is not ClientHello")
            need = int.from_bytes(buf[1:4], "big")
            if need > max_size:
                return NotTLS("ClientHello larger than the limit")
        if need is not None and len(buf) >= 4 + need:
            return bytes(buf[4:4 + need]), pos


def _server_name(r: _Reader) -> str | None:
    names = r.vector(2)
    host: str | None = None
    while names.left():
        kind = names.uint(1)
        value = names.vector(2)
        raw = value.take(value.left())
        if kind != 0:
            continue
        if host is not None:
            raise _Malformed("two host names in server_name")
        if not raw or len(raw) > 255 or b"\x00" in raw:
            raise _Malformed("invalid host name in server_name")
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _Malformed("non-ASCII host name in server_name") from None
        host = text.lower().rstrip(".")
        if not host:
            raise _Malformed("empty host name in server_name")
    if r.left():
        raise _Malformed("trailing bytes in server_name")
    return host


def _alpn(r: _Reader) -> tuple[str, ...]:
    lst = r.vector(2)
    out = []
    while lst.left():
        p = lst.vector(1)
        if not p.left():
            raise _Malformed("empty ALPN protocol name")
        out.append(p.take(p.left()).decode("latin-1"))
    return tuple(out)


def _psk_identities(r: _Reader) -> tuple[bytes, ...]:
    ids = r.vector(2)
    out = []
    while ids.left():
        ident = ids.vector(2)
        out.append(ident.take(ident.left()))
        ids.uint(4)  # obfuscated_ticket_age
    return tuple(out)


def _versions(r: _Reader) -> tuple[int, ...]:
    v = r.vector(1)
    if v.left() % 2:
        raise _Malformed("odd supported_versions length")
    out = []
    while v.left():
        x = v.uint(2)
        if not _is_grease(x):
            out.append(x)
    return tuple(out)


def _hello(body: bytes, length: int) -> ClientHello:
    r = _Reader(body)
    legacy_version = r.uint(2)
    if legacy_version >> 8 != 3:
        raise _Malformed(f"ClientHello version 0x{legacy_version:04x}")
    r.take(32)  # random
    sid = r.vector(1)
    if sid.left() > 32:
        raise _Malformed("session id longer than 32 bytes")
    session_id = sid.take(sid.left())
    suites = r.vector(2)
    if suites.left() < 2 or suites.left() % 2:
        raise _Malformed("bad cipher_suites length")
    comp = r.vector(1)
    if comp.left() < 1:
        raise _Malformed("no compression methods")
    fields: dict = {"legacy_version": legacy_version, "session_id": session_id, "length": length}
    if not r.left():
        return ClientHello(**fields)  # no extensions at all (old clients)
    exts = r.vector(2)
    if r.left():
        raise _Malformed("trailing bytes after extensions")
    seen: set[int] = set()
    while exts.left():
        etype = exts.uint(2)
        edata = exts.vector(2)
        if etype in seen:
            raise _Malformed(f"duplicate extension {etype}")
        seen.add(etype)
        if etype == EXT_SERVER_NAME:
            fields["server_name"] = _server_name(edata)
        elif etype == EXT_ALPN:
            fields["alpn"] = _alpn(edata)
        elif etype == EXT_SESSION_TICKET:
            fields["session_ticket"] = edata.take(edata.left())
        elif etype == EXT_PRE_SHARED_KEY:
            fields["psk_identities"] = _psk_identities(edata)
        elif etype == EXT_SUPPORTED_VERSIONS:
            fields["supported_versions"] = _versions(edata)
    return ClientHello(**fields)


def parse_client_hello(data: bytes, max_size: int = MAX_CLIENT_HELLO) -> ParseResult:
    """Parse the ClientHello at the start of ``data`` (all bytes received so far)."""
    try:
        got = _handshake_bytes(bytes(data), max_size)
        if not isinstance(got, tuple):
            return got
        body, used = got
        return _hello(body, used)
    except _Malformed as e:
        return NotTLS(f"malformed ClientHello: {e}")
    except Exception as e:  # never let hostile bytes raise into the reactor
        return NotTLS(f"malformed ClientHello: {type(e).__name__}")
