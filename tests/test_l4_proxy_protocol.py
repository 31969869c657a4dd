"""PROXY protocol v1/v2: parsing (incremental, strict) and serialising."""
import struct

import pytest

from lbtwist.l4 import proxy_protocol as pp
from lbtwist.l4.proxy_protocol import (
    ProxyHeaderParser,
    ProxyProtocolError,
    crc32c,
    encode,
    encode_v1,
    encode_v2,
    parse_v1,
    parse_v2,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def feed_all(data: bytes, step: int = 1):
    p = ProxyHeaderParser()
    header = None
    for i in range(0, len(data), step):
        header = p.feed(data[i : i + step])
        if header is not None:
            break
    return p, header


# -- v1 --------------------------------------------------------------------


def test_v1_tcp4_byte_by_byte_keeps_following_bytes():
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"
    p, h = feed_all(line + b"GET / HTTP/1.1\r\n", step=1)
    assert h is not None
    assert (h.version, h.command, h.family) == (1, "proxy", "tcp4")
    assert h.source == ("192.0.2.10", 56324)
    assert h.dest == ("198.51.100.1", 443)
    # byte-by-byte: the header completes exactly at its CRLF
    assert p.rest == b""
    p2 = ProxyHeaderParser()
    assert p2.feed(line + b"GET /") is not None
    assert p2.rest == b"GET /"


def test_v1_tcp6_and_unknown():
    h = parse_v1(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
    assert h.source == ("2001:db8::1", 1) and h.dest == ("::1", 65535) and h.family == "tcp6"
    u = parse_v1(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n")
    assert u.family == "unknown" and u.source is None and u.dest is None
    assert parse_v1(b"PROXY UNKNOWN\r\n").source is None


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # missing field
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",  # port range
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",  # bad v4
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",  # trailing space
    ],
)
def test_v1_malformed(line):
    with pytest.raises(ProxyProtocolError):
        feed_all(line, step=len(line))


def test_v1_too_long_without_crlf_rejected_at_107_bytes():
    p = ProxyHeaderParser()
    assert p.feed(b"PROXY UNKNOWN " + b"x" * 90) is None
    with pytest.raises(ProxyProtocolError, match="107"):
        p.feed(b"x" * 10)


@pytest.mark.parametrize("first", [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXZ", b"\r\n\r\n\x01"])
def test_non_proxy_client_rejected_at_first_bytes(first):
    with pytest.raises(ProxyProtocolError):
        ProxyHeaderParser().feed(first)


# -- v2 --------------------------------------------------------------------


def v2_by_hand(cmd=0x21, fam=0x11, addr=b"", tlvs=b""):
    """Build a v2 header independently of the encoder."""
    body = addr + tlvs
    return SIG + struct.pack("!BBH", cmd, fam, len(body)) + body


def test_v2_ipv4_by_hand_incremental():
    addr = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1234, 80)
    raw = v2_by_hand(addr=addr)
    p, h = feed_all(raw + b"payload", step=3)
    assert h.version == 2 and h.command == "proxy" and h.family == "tcp4"
    assert h.source == ("10.0.0.1", 1234) and h.dest == ("10.0.0.2", 80)
    assert h.transport == "stream"
    assert raw + p.rest == (raw + b"payload")[: len(raw) + len(p.rest)]


def test_v2_ipv6_with_tlvs():
    addr = (b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01") + (b"\x00" * 15 + b"\x01") + struct.pack("!HH", 5, 6)
    tlvs = struct.pack("!BH", pp.PP2_TYPE_ALPN, 2) + b"h2" + struct.pack("!BH", pp.PP2_TYPE_AUTHORITY, 11) + b"example.com"
    h = parse_v2(v2_by_hand(fam=0x21, addr=addr, tlvs=tlvs))
    assert h.source == ("2001:db8::1", 5) and h.dest == ("::1", 6)
    assert h.tlv(pp.PP2_TYPE_ALPN) == b"h2"
    assert h.tlv(pp.PP2_TYPE_AUTHORITY) == b"example.com"
    assert h.tlv(pp.PP2_TYPE_NOOP) is None


def test_v2_local_and_unspec_and_unix_carry_no_addresses():
    assert parse_v2(v2_by_hand(cmd=0x20, fam=0x00)).command == "local"
    loc = parse_v2(v2_by_hand(cmd=0x20, fam=0x11, addr=b"\x00" * 12))
    assert loc.command == "local" and loc.source is None
    unix = parse_v2(v2_by_hand(fam=0x31, addr=b"/tmp/a".ljust(216, b"\x00")))
    assert unix.family == "unix" and unix.source is None


@pytest.mark.parametrize(
    "raw",
    [
        v2_by_hand(cmd=0x11, addr=b"\x00" * 12),  # version 1 in a v2 header
        v2_by_hand(cmd=0x22, addr=b"\x00" * 12),  # unknown command
        v2_by_hand(fam=0x41, addr=b"\x00" * 12),  # unknown family
        v2_by_hand(fam=0x13, addr=b"\x00" * 12),  # unknown transport
        v2_by_hand(addr=b"\x00" * 8),  # address block truncated
        v2_by_hand(addr=b"\x00" * 12, tlvs=b"\x01\x00"),  # truncated TLV head
        v2_by_hand(addr=b"\x00" * 12, tlvs=b"\x01\x00\x05abc"),  # TLV overruns
        v2_by_hand(addr=b"\x00" * 12, tlvs=b"\x03\x00\x02ab"),  # CRC TLV wrong size
    ],
)
def test_v2_malformed(raw):
    with pytest.raises(ProxyProtocolError):
        feed_all(raw, step=len(raw))


def test_v2_length_cap():
    p = ProxyHeaderParser(max_v2=64)
    with pytest.raises(ProxyProtocolError, match="exceeds"):
        p.feed(SIG + struct.pack("!BBH", 0x21, 0x11, 100))


def test_v2_crc32c_checked():
    raw = encode_v2(("10.1.1.1", 1), ("10.2.2.2", 2), crc=True)
    assert parse_v2(raw).source == ("10.1.1.1", 1)
    corrupt = bytearray(raw)
    corrupt[17] ^= 0x01  # flip a bit of the source address
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse_v2(bytes(corrupt))


def test_crc32c_known_vector():
    # RFC 3720 B.4 check value for the ASCII digits.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"\x00" * 32) == 0x8A9136AA


# -- serialising -------------------------------------------------------------


def test_encode_round_trips():
    for src, dst in [(("192.0.2.1", 1000), ("192.0.2.2", 443)), (("2001:db8::5", 7), ("2001:db8::6", 8))]:
        for version in ("v1", "v2"):
            h = ProxyHeaderParser().feed(encode(version, src, dst))
            assert (h.source, h.dest) == (src, dst)


def test_encode_v1_exact_bytes_and_unknown():
    assert encode_v1(("1.2.3.4", 5), ("6.7.8.9", 10)) == b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n"
    assert encode_v1(None, ("6.7.8.9", 10)) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_exact_bytes_and_local():
    raw = encode_v2(("1.2.3.4", 5), ("6.7.8.9", 10))
    assert raw == SIG + b"\x21\x11\x00\x0c" + bytes([1, 2, 3, 4, 6, 7, 8, 9]) + b"\x00\x05\x00\x0a"
    local = encode_v2(None, None)
    assert local == SIG + b"\x20\x00\x00\x00"
    assert parse_v2(local).command == "local"
    assert parse_v2(encode_v2(("1.2.3.4", 5), ("6.7.8.9", 10), dgram=True)).transport == "dgram"


def test_mixed_families_mapped_to_v6():
    h = parse_v1(encode_v1(("1.2.3.4", 5), ("::1", 6)))
    assert h.source == ("::ffff:102:304", 5) and h.dest == ("::1", 6)
    h2 = parse_v2(encode_v2(("::1", 6), ("1.2.3.4", 5)))
    assert h2.family == "tcp6" and h2.dest == ("::ffff:102:304", 5)


def test_encode_rejects_hostnames_and_unknown_version():
    with pytest.raises(ProxyProtocolError):
        encode_v1(("example.com", 1), ("1.2.3.4", 2))
    with pytest.raises(ValueError):
        encode("v3", ("1.2.3.4", 1), ("1.2.3.4", 2))


def test_parser_refuses_second_header():
    p = ProxyHeaderParser()
    p.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(ProxyProtocolError):
        p.feed(b"PROXY UNKNOWN\r\n")
