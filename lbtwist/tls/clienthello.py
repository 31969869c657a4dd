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
    "bytes_needed",
    "parse_client_hello",
]

#: Largest ClientHello accepted. Real ones are 0.2-2 KiB (post-quantum key
#: shares make ~1.8 KiB); a client that needs more is not one we want to buffer for.
MAX_CLIENT_HELLO: Final = 16384 + 4

_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_MAX_RECORD: Final = 16384
#: Real clients use one record, two at most; more is a way to burn our CPU.
_MAX_RECORDS: Final = 16

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


# Parsing works on plain offsets into one bytes object (no reader objects,
# no copies): it runs once per connection, ahead of the handshake.


def _u16(b: bytes, p: int, end: int) -> int:
    if p + 2 > end:
        raise _Malformed("truncated")
    return (b[p] << 8) | b[p + 1]


def _is_grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def _handshake_bytes(data: bytes, max_size: int) -> tuple[bytes, int] | NotTLS | NeedMore:
    """Join the handshake records at the start of ``data`` until they hold
    the whole first handshake message. Returns (message body, bytes used)."""
    n = len(data)
    if not n:
        return NEED_MORE
    if data[0] != _HANDSHAKE:
        return NotTLS(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    if n >= 2 and data[1] != 3:
        return NotTLS(f"record version major {data[1]} is not 3")
    parts: list[bytes] = []
    have = 0  # handshake bytes gathered
    pos = 0
    need: int | None = None  # body length, once the 4-byte header is known
    while True:
        if len(parts) >= _MAX_RECORDS:
            return NotTLS(f"ClientHello spread over more than {_MAX_RECORDS} records")
        if n - pos < 5:
            return NEED_MORE
        if data[pos] != _HANDSHAKE:
            return NotTLS(f"record type {data[pos]} before the ClientHello was complete")
        if data[pos + 1] != 3:
            return NotTLS(f"record version major {data[pos + 1]} is not 3")
        rlen = (data[pos + 3] << 8) | data[pos + 4]
        if rlen == 0 or rlen > _MAX_RECORD:
            return NotTLS(f"handshake record length {rlen} is out of range")
        avail = min(rlen, n - pos - 5)
        if need is None and have + avail >= 4:
            head = (b"".join(parts) + data[pos + 5:pos + 5 + avail])[:4]
            if head[0] != _CLIENT_HELLO:
                return NotTLS(f"handshake message type {head[0]} is not ClientHello")
            need = int.from_bytes(head[1:4], "big")
            if need > max_size:
                return NotTLS("ClientHello larger than the limit")
        if avail < rlen:
            return NEED_MORE
        parts.append(data[pos + 5:pos + 5 + rlen])
        have += rlen
        pos += 5 + rlen
        if need is not None and have >= 4 + need:
            msg = parts[0] if len(parts) == 1 else b"".join(parts)
            return msg[4:4 + need], pos


def _server_name(b: bytes, p: int, end: int) -> str | None:
    lend = p + 2 + _u16(b, p, end)
    if lend != end:
        raise _Malformed("bad server_name length")
    p += 2
    host: str | None = None
    while p < lend:
        if p + 3 > lend:
            raise _Malformed("truncated server_name")
        kind = b[p]
        ln = (b[p + 1] << 8) | b[p + 2]
        p += 3
        if p + ln > lend:
            raise _Malformed("truncated server_name")
        raw = b[p:p + ln]
        p += ln
        if kind != 0:
            continue
        if host is not None:
            raise _Malformed("two host names in server_name")
        if not raw or b"\x00" in raw:
            raise _Malformed("invalid host name in server_name")
        if not raw.isascii():
            raise _Malformed("non-ASCII host name in server_name")
        host = raw.decode("ascii").lower().rstrip(".")
        if not host:
            raise _Malformed("empty host name in server_name")
    return host


def _alpn(b: bytes, p: int, end: int) -> tuple[str, ...]:
    lend = p + 2 + _u16(b, p, end)
    if lend != end:
        raise _Malformed("bad ALPN length")
    p += 2
    out = []
    while p < lend:
        ln = b[p]
        p += 1
        if ln == 0:
            raise _Malformed("empty ALPN protocol name")
        if p + ln > lend:
            raise _Malformed("truncated ALPN")
        out.append(b[p:p + ln].decode("latin-1"))
        p += ln
    return tuple(out)


def _psk_identities(b: bytes, p: int, end: int) -> tuple[bytes, ...]:
    lend = p + 2 + _u16(b, p, end)
    if lend > end:
        raise _Malformed("truncated pre_shared_key")
    p += 2
    out = []
    while p < lend:
        ln = _u16(b, p, lend)
        p += 2
        if p + ln + 4 > lend:
            raise _Malformed("truncated PSK identity")
        out.append(b[p:p + ln])
        p += ln + 4  # identity, obfuscated_ticket_age
    return tuple(out)


def _versions(b: bytes, p: int, end: int) -> tuple[int, ...]:
    if p >= end:
        raise _Malformed("truncated supported_versions")
    ln = b[p]
    p += 1
    if p + ln != end:
        raise _Malformed("bad supported_versions length")
    if ln % 2:
        raise _Malformed("odd supported_versions length")
    return tuple(
        v for v in ((b[i] << 8) | b[i + 1] for i in range(p, end, 2)) if not _is_grease(v)
    )


_WANTED = frozenset({EXT_SERVER_NAME, EXT_ALPN, EXT_SESSION_TICKET, EXT_PRE_SHARED_KEY, EXT_SUPPORTED_VERSIONS})


def _hello(b: bytes, length: int) -> ClientHello:
    n = len(b)
    legacy_version = _u16(b, 0, n)
    if legacy_version >> 8 != 3:
        raise _Malformed(f"ClientHello version 0x{legacy_version:04x}")
    p = 2 + 32  # random
    if p >= n:
        raise _Malformed("truncated")
    sid_len = b[p]
    p += 1
    if sid_len > 32:
        raise _Malformed("session id longer than 32 bytes")
    if p + sid_len > n:
        raise _Malformed("truncated")
    session_id = b[p:p + sid_len]
    p += sid_len
    cs = _u16(b, p, n)
    if cs < 2 or cs % 2:
        raise _Malformed("bad cipher_suites length")
    p += 2 + cs
    if p >= n:
        raise _Malformed("truncated")
    comp = b[p]
    if comp < 1:
        raise _Malformed("no compression methods")
    p += 1 + comp
    if p > n:
        raise _Malformed("truncated")
    fields: dict = {"legacy_version": legacy_version, "session_id": session_id, "length": length}
    if p == n:
        return ClientHello(**fields)  # no extensions at all (old clients)
    end = p + 2 + _u16(b, p, n)
    if end > n:
        raise _Malformed("truncated extensions")
    if end < n:
        raise _Malformed("trailing bytes after extensions")
    p += 2
    seen: list[int] = []
    wanted = {}  # extension type -> (start, end), for the few we read
    while p < end:
        if p + 4 > end:
            raise _Malformed("truncated extension")
        etype = (b[p] << 8) | b[p + 1]
        e_end = p + 4 + ((b[p + 2] << 8) | b[p + 3])
        if e_end > end:
            raise _Malformed("truncated extension")
        seen.append(etype)
        if etype in _WANTED:
            wanted[etype] = (p + 4, e_end)
        p = e_end
    if len(set(seen)) != len(seen):
        dup = next(t for t in seen if seen.count(t) > 1)
        raise _Malformed(f"duplicate extension {dup}")
    for etype, (start, stop) in wanted.items():
        if etype == EXT_SERVER_NAME:
            fields["server_name"] = _server_name(b, start, stop)
        elif etype == EXT_ALPN:
            fields["alpn"] = _alpn(b, start, stop)
        elif etype == EXT_SESSION_TICKET:
            fields["session_ticket"] = b[start:stop]
        elif etype == EXT_PRE_SHARED_KEY:
            fields["psk_identities"] = _psk_identities(b, start, stop)
        else:
            fields["supported_versions"] = _versions(b, start, stop)
    return ClientHello(**fields)


def bytes_needed(data: bytes) -> int:
    """After L{NEED_MORE}: the buffer length below which parsing again cannot
    decide anything (the end of the record being received), so a reader fed
    one byte at a time does not re-parse on every byte."""
    pos, n = 0, len(data)
    while n - pos >= 5:
        end = pos + 5 + ((data[pos + 3] << 8) | data[pos + 4])
        if end > n:
            return end
        pos = end
    return pos + 5


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
