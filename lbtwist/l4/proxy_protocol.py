"""The PROXY protocol (HAProxy, versions 1 and 2), sans-IO.

A relay that accepts connections from another proxy learns the real client
address from this header instead of from the socket; a relay that forwards to
backends sends one so they can log and rate-limit by the real client. This
module only parses and serialises bytes: the TCP adapter feeds it what it reads
and decides what to do with the result.

Parsing is strict on purpose: a header is trusted information, so anything
malformed (bad signature, bad address, truncated TLV, wrong CRC32c) raises
L{ProxyProtocolError} and the connection must be closed.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import Literal

import attrs

#: The 12-byte signature opening every v2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest legal v1 line, CRLF included (spec section 2.1).
V1_MAX = 107
#: Largest v2 header we accept (16-byte fixed part plus payload).
V2_MAX = 16 + 65535

# v2 commands, families and transports (spec section 2.2).
_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0x0, 0x1, 0x2
_ADDR_LEN = {_AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

#: TLV types defined by the spec.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

Address = tuple[str, int]


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


@attrs.frozen
class ProxyHeader:
    """A decoded header.

    ``source``/``dest`` are None when the sender did not convey addresses
    (v1 ``UNKNOWN``, v2 ``LOCAL`` or an unspecified/unix family): the receiver
    then uses the socket's own addresses.
    """

    version: Literal[1, 2]
    #: "proxy": addresses are the real client's; "local": a health check or
    #: the proxy's own connection, addresses must be ignored.
    command: Literal["proxy", "local"]
    #: "tcp4", "tcp6", "unix" or "unknown".
    family: str
    source: Address | None = None
    dest: Address | None = None
    #: Transport named by a v2 header: "stream", "dgram" or "unspec".
    transport: str = "stream"
    #: v2 TLVs as (type, value) pairs, in order.
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        for t, v in self.tlvs:
            if t == kind:
                return v
        return None


# -- parsing -----------------------------------------------------------------


class ProxyHeaderParser:
    """Incremental parser: call L{feed} with each chunk read from the socket
    until it returns a L{ProxyHeader}; the bytes that followed the header are
    then in L{rest}. Raises L{ProxyProtocolError} as soon as the input cannot
    be a header (so a client that does not speak PROXY is refused at its first
    bytes, not after a timeout)."""

    def __init__(self, max_v2: int = V2_MAX) -> None:
        self._buf = b""
        self._max_v2 = max_v2
        self.rest = b""
        self.header: ProxyHeader | None = None

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self.header is not None:
            raise ProxyProtocolError("header already parsed")
        buf = self._buf + data
        n = len(buf)
        if n == 0:
            return None
        if buf[:1] == b"P":
            if V1_PREFIX[: min(n, 6)] != buf[:6]:
                raise ProxyProtocolError("not a PROXY protocol header")
            end = buf.find(b"\r\n", 0, V1_MAX)
            if end < 0:
                if n >= V1_MAX:
                    raise ProxyProtocolError("v1 header longer than 107 bytes")
                if b"\n" in buf:
                    raise ProxyProtocolError("v1 header line not terminated by CRLF")
                self._buf = buf
                return None
            header = parse_v1(buf[: end + 2])
            rest = buf[end + 2 :]
        elif buf[:1] == b"\r":
            if V2_SIGNATURE[: min(n, 12)] != buf[:12]:
                raise ProxyProtocolError("not a PROXY protocol header")
            if n < 16:
                self._buf = buf
                return None
            total = 16 + struct.unpack_from("!H", buf, 14)[0]
            if total > self._max_v2:
                raise ProxyProtocolError(f"v2 header of {total} bytes exceeds {self._max_v2}")
            if n < total:
                self._buf = buf
                return None
            header = parse_v2(buf[:total])
            rest = buf[total:]
        else:
            raise ProxyProtocolError("not a PROXY protocol header")
        self._buf = b""
        self.rest = rest
        self.header = header
        return header


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyProtocolError(f"v1 bad port {text!r}")
    p = int(text)
    if p > 65535:
        raise ProxyProtocolError(f"v1 port out of range {p}")
    return p


def parse_v1(line: bytes) -> ProxyHeader:
    """Parse one complete v1 line, CRLF included."""
    if len(line) > V1_MAX or not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyProtocolError("malformed v1 header")
    parts = line[:-2].split(b" ")
    proto = parts[1] if len(parts) > 1 else b""
    if proto == b"UNKNOWN":
        # Anything may follow UNKNOWN; the receiver must ignore it.
        return ProxyHeader(version=1, command="proxy", family="unknown")
    if proto not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyProtocolError(f"malformed v1 header {line[:-2]!r}")
    cls = ipaddress.IPv4Address if proto == b"TCP4" else ipaddress.IPv6Address
    try:
        src = str(cls(parts[2].decode("ascii")))
        dst = str(cls(parts[3].decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise ProxyProtocolError(f"v1 bad {proto.decode()} address in {line[:-2]!r}") from None
    return ProxyHeader(
        version=1,
        command="proxy",
        family="tcp4" if proto == b"TCP4" else "tcp6",
        source=(src, _port(parts[4])),
        dest=(dst, _port(parts[5])),
    )


def parse_v2(data: bytes) -> ProxyHeader:
    """Parse one complete v2 header (exactly the bytes of the header)."""
    if len(data) < 16 or data[:12] != V2_SIGNATURE:
        raise ProxyProtocolError("malformed v2 header")
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
    if len(data) != 16 + length:
        raise ProxyProtocolError("v2 length does not match")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 unsupported version {ver_cmd >> 4}")
    cmd = ver_cmd & 0xF
    if cmd not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"v2 unsupported command {cmd}")
    af, tp = fam >> 4, fam & 0xF
    if af > _AF_UNIX or tp > _T_DGRAM:
        raise ProxyProtocolError(f"v2 unsupported family/transport 0x{fam:02x}")
    transport = {_T_UNSPEC: "unspec", _T_STREAM: "stream", _T_DGRAM: "dgram"}[tp]
    alen = _ADDR_LEN.get(af, 0)
    if length < alen:
        raise ProxyProtocolError("v2 address block truncated")
    body = data[16:]
    tlvs, crc_at = _parse_tlvs(body[alen:])
    if crc_at is not None:
        _check_crc(data, 16 + alen + crc_at)
    family = {_AF_UNSPEC: "unknown", _AF_INET: "tcp4", _AF_INET6: "tcp6", _AF_UNIX: "unix"}[af]
    if cmd == _CMD_LOCAL or af in (_AF_UNSPEC, _AF_UNIX):
        # LOCAL: the receiver must use the real connection addresses.
        return ProxyHeader(
            version=2,
            command="local" if cmd == _CMD_LOCAL else "proxy",
            family=family,
            transport=transport,
            tlvs=tlvs,
        )
    if af == _AF_INET:
        s, d, sp, dp = struct.unpack_from("!4s4sHH", body)
        src, dst = str(ipaddress.IPv4Address(s)), str(ipaddress.IPv4Address(d))
    else:
        s, d, sp, dp = struct.unpack_from("!16s16sHH", body)
        src, dst = str(ipaddress.IPv6Address(s)), str(ipaddress.IPv6Address(d))
    return ProxyHeader(
        version=2,
        command="proxy",
        family=family,
        source=(src, sp),
        dest=(dst, dp),
        transport=transport,
        tlvs=tlvs,
    )


def _parse_tlvs(data: bytes) -> tuple[tuple[tuple[int, bytes], ...], int | None]:
    """The TLVs, and the offset of the CRC32C value if there is one."""
    out = []
    crc_at = None
    i, n = 0, len(data)
    while i < n:
        if n - i < 3:
            raise ProxyProtocolError("v2 truncated TLV")
        kind, length = data[i], struct.unpack_from("!H", data, i + 1)[0]
        if i + 3 + length > n:
            raise ProxyProtocolError(f"v2 TLV 0x{kind:02x} overruns the header")
        if kind == PP2_TYPE_CRC32C:
            if length != 4:
                raise ProxyProtocolError("v2 CRC32C TLV must be 4 bytes")
            crc_at = i + 3
        out.append((kind, bytes(data[i + 3 : i + 3 + length])))
        i += 3 + length
    return tuple(out), crc_at


def _check_crc(data: bytes, at: int) -> None:
    """The checksum covers the whole header with its own value zeroed."""
    want = struct.unpack_from("!I", data, at)[0]
    zeroed = data[:at] + b"\x00\x00\x00\x00" + data[at + 4 :]
    if crc32c(zeroed) != want:
        raise ProxyProtocolError("v2 CRC32C mismatch")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the v2 CRC32C TLV uses. Headers are small."""
    c = 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# -- serialising -------------------------------------------------------------


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ProxyProtocolError(f"not an IP address: {host!r}") from None


def _same_family(src: Address, dst: Address):
    """Both addresses as ip objects of one family; a v4 one is mapped into v6
    when the other is v6 (the header has one family for both)."""
    s, d = _ip(src[0]), _ip(dst[0])
    if s.version != d.version:
        if s.version == 4:
            s = ipaddress.IPv6Address(f"::ffff:{s}")
        else:
            d = ipaddress.IPv6Address(f"::ffff:{d}")
    return s, d


def encode_v1(source: Address | None, dest: Address | None) -> bytes:
    """A v1 line; ``UNKNOWN`` when either address is missing."""
    if source is None or dest is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = _same_family(source, dest)
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {source[1]} {dest[1]}\r\n".encode("ascii")


def encode_v2(
    source: Address | None,
    dest: Address | None,
    *,
    dgram: bool = False,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    crc: bool = False,
) -> bytes:
    """A v2 header: PROXY with the addresses, or LOCAL when either is missing.
    ``crc`` appends a CRC32C TLV so the receiver can detect corruption."""
    transport = _T_DGRAM if dgram else _T_STREAM
    if source is None or dest is None:
        ver_cmd, fam, addr = 0x20 | _CMD_LOCAL, (_AF_UNSPEC << 4) | _T_UNSPEC, b""
    else:
        s, d = _same_family(source, dest)
        ver_cmd = 0x20 | _CMD_PROXY
        if s.version == 4:
            fam = (_AF_INET << 4) | transport
            addr = struct.pack("!4s4sHH", s.packed, d.packed, source[1], dest[1])
        else:
            fam = (_AF_INET6 << 4) | transport
            addr = struct.pack("!16s16sHH", s.packed, d.packed, source[1], dest[1])
    tlv_bytes = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in tlvs)
    if crc:
        tlv_bytes += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\x00\x00\x00\x00"
    payload = addr + tlv_bytes
    if len(payload) > 65535:
        raise ProxyProtocolError("v2 header too large")
    out = V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(payload)) + payload
    if crc:
        out = out[:-4] + struct.pack("!I", crc32c(out))
    return out


def encode(version: Literal["v1", "v2"], source: Address | None, dest: Address | None) -> bytes:
    """The header to send to a backend for a connection from ``source`` to ``dest``."""
    if version == "v1":
        return encode_v1(source, dest)
    if version == "v2":
        return encode_v2(source, dest)
    raise ValueError(f"unknown PROXY protocol version {version!r} (v1 or v2)")
