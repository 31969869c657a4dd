"""The sans-IO ClientHello parser, on real ClientHellos (stdlib ssl and
pyOpenSSL clients) and on hand-built, truncated, fragmented and hostile input."""
from __future__ import annotations

import random
import ssl
import struct

import pytest
from OpenSSL import SSL

from lbtwist.tls.clienthello import (
    MAX_CLIENT_HELLO,
    NEED_MORE,
    ClientHello,
    NotTLS,
    parse_client_hello,
)
from lbtwist.tls.testing import TestCA


def stdlib_hello(sni: str | None = "a.test", alpn: list[str] | None = None, maxv=None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maxv is not None:
        ctx.maximum_version = maxv
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# -- hand-built hellos ----------------------------------------------------------------


def ext(etype: int, body: bytes) -> bytes:
    return struct.pack("!HH", etype, len(body)) + body


def sni_ext(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", kind, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def hello_body(exts: bytes | None, sid: bytes = b"", version: int = 0x0303) -> bytes:
    body = struct.pack("!H", version) + b"\x11" * 32 + bytes([len(sid)]) + sid
    body += struct.pack("!H", 4) + b"\x13\x01\xc0\x2b" + b"\x01\x00"
    if exts is not None:
        body += struct.pack("!H", len(exts)) + exts
    return body


def records(body: bytes, split: int | None = None, rec_version: bytes = b"\x03\x01") -> bytes:
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    parts = [hs] if split is None else [hs[:split], hs[split:]]
    return b"".join(b"\x16" + rec_version + struct.pack("!H", len(p)) + p for p in parts)


# -- real hellos ----------------------------------------------------------------------


def test_stdlib_tls13_hello_fields():
    data = stdlib_hello("Www.A.Test.", alpn=["h2", "http/1.1"])
    h = parse_client_hello(data)
    assert isinstance(h, ClientHello)
    assert h.server_name == "www.a.test"  # lower-cased, root dot removed
    assert h.alpn == ("h2", "http/1.1")
    assert 0x0304 in h.supported_versions and h.max_version == 0x0304
    assert h.session_ticket == b""  # supports tickets, has none
    assert h.psk_identities == () and h.ticket_key_name is None
    assert h.length == len(data)


def test_tls12_only_hello_and_no_sni():
    h = parse_client_hello(stdlib_hello(None, maxv=ssl.TLSVersion.TLSv1_2))
    assert isinstance(h, ClientHello)
    assert h.server_name is None
    assert h.max_version == 0x0303


def test_every_prefix_needs_more_and_extra_bytes_are_ignored():
    data = stdlib_hello("a.test")
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is NEED_MORE, n
    assert isinstance(parse_client_hello(data + b"\x17\x03\x03garbage"), ClientHello)


def test_hello_fragmented_over_records():
    body = hello_body(sni_ext(b"frag.test"))
    for split in (1, 3, 4, 10, len(body)):
        data = records(body, split)
        h = parse_client_hello(data)
        assert isinstance(h, ClientHello) and h.server_name == "frag.test"
        for n in range(len(data)):
            assert parse_client_hello(data[:n]) is NEED_MORE


def _session_pair(version: int):
    """pyOpenSSL server and a client that holds a session from it."""
    ca = TestCA()
    leaf = ca.issue("t.test")
    sctx = SSL.Context(SSL.TLS_METHOD)
    sctx.use_certificate(leaf.cert)
    sctx.use_privatekey(leaf.key)
    sctx.set_session_id(b"t")
    cctx = SSL.Context(SSL.TLS_METHOD)
    cctx.set_max_proto_version(version)
    cctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)

    def handshake(session=None) -> tuple[SSL.Connection, bytes]:
        s, c = SSL.Connection(sctx), SSL.Connection(cctx)
        s.set_accept_state()
        c.set_connect_state()
        if session is not None:
            c.set_session(session)
        first = b""
        for _ in range(6):
            for a, b in ((c, s), (s, c)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    d = a.bio_read(65536)
                except SSL.WantReadError:
                    continue
                if a is c and not first:
                    first = d
                b.bio_write(d)
        s.send(b"x")
        c.bio_write(s.bio_read(65536))
        c.recv(10)
        return c, first

    # Keep the first client alive: OpenSSL spoils the session of a connection
    # freed without close_notify.
    c, _ = handshake()
    return handshake, c.get_session(), c


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_resuming_hello_exposes_the_ticket_key_name(version):
    handshake, session, _keep = _session_pair(version)
    _, data = handshake(session)
    h = parse_client_hello(data)
    assert isinstance(h, ClientHello) and h.offers_ticket
    if version == SSL.TLS1_2_VERSION:
        assert h.session_ticket and not h.psk_identities
        assert h.ticket_key_name == h.session_ticket[:16]
    else:
        assert len(h.psk_identities) == 1
        assert h.ticket_key_name == h.psk_identities[0][:16]
    # Another ticket from the same server carries the same key name.
    other, _ = handshake()
    _, again = handshake(other.get_session())
    assert parse_client_hello(again).ticket_key_name == h.ticket_key_name


# -- what is not TLS, or not acceptable ---------------------------------------------------


@pytest.mark.parametrize(
    "data,why",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not a TLS handshake"),
        (b"\x80\x2e\x01\x03\x01", "not a TLS handshake"),  # SSLv2-compatible hello
        (b"\x16\x02\x00", "major"),
        (b"\x16\x03\x01\x00\x00", "length 0"),
        (b"\x16\x03\x01\x40\x01", "out of range"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "not ClientHello"),
    ],
)
def test_not_tls_is_decided_early(data, why):
    r = parse_client_hello(data)
    assert isinstance(r, NotTLS) and why in r.reason


def test_first_byte_decides_and_one_handshake_byte_waits():
    assert isinstance(parse_client_hello(b"G"), NotTLS)
    assert parse_client_hello(b"\x16") is NEED_MORE
    assert parse_client_hello(b"") is NEED_MORE


def test_non_handshake_record_in_the_middle():
    data = records(hello_body(sni_ext(b"x.test")), split=10)
    cut = 5 + 10
    bad = data[:cut] + b"\x17" + data[cut + 1:]
    assert "record type 23" in parse_client_hello(bad).reason


def test_oversized_hello_refused_from_its_header():
    hs_header = b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    r = parse_client_hello(b"\x16\x03\x01\x40\x00" + hs_header + b"\x00" * 20)
    assert isinstance(r, NotTLS) and "limit" in r.reason


@pytest.mark.parametrize(
    "exts,why",
    [
        (sni_ext(b"a\x00b.test"), "invalid host name"),
        (sni_ext("é.test".encode()), "non-ASCII"),
        (sni_ext(b"a.test", b"b.test"), "two host names"),
        (sni_ext(b"."), "empty host name"),
        (sni_ext(b"a.test") + sni_ext(b"b.test"), "duplicate extension"),
        (ext(16, b"\x00\x03\x00ab"), "empty ALPN"),
        (ext(43, b"\x03\x03\x04\x03"), "odd supported_versions"),
        (ext(0, b"\x00\x10\x00"), "server_name length"),
        (ext(41, b"\x00\x04\x00\x05ab"), "truncated PSK identity"),
        (ext(16, b"\x00\x05\x03ab"), "bad ALPN length"),
        (b"\x00\x00\x00\x10", "truncated extension"),
        (b"\x00\x00\x00", "truncated extension"),
    ],
)
def test_malformed_extensions(exts, why):
    r = parse_client_hello(records(hello_body(exts)))
    assert isinstance(r, NotTLS) and why in r.reason, r


def test_no_extensions_and_other_name_types():
    h = parse_client_hello(records(hello_body(None, sid=b"s" * 32)))
    assert isinstance(h, ClientHello) and h.session_id == b"s" * 32 and h.server_name is None
    h = parse_client_hello(records(hello_body(sni_ext(b"x", kind=7))))
    assert isinstance(h, ClientHello) and h.server_name is None


def test_grease_versions_ignored_and_short_tickets_have_no_key_name():
    exts = ext(43, b"\x04\x0a\x0a\x03\x04") + ext(35, b"short") + ext(
        41, struct.pack("!H", 2 + 32 + 4) + struct.pack("!H", 32) + b"i" * 32 + b"\0\0\0\0" + b"\x00\x00"
    )
    h = parse_client_hello(records(hello_body(exts)))
    assert isinstance(h, ClientHello)
    assert h.supported_versions == (0x0304,)
    assert h.psk_identities == (b"i" * 32,)  # a stateful (session id) TLS 1.3 ticket
    assert h.ticket_key_name is None


def test_random_garbage_and_mutations_never_raise():
    rng = random.Random(1234)
    real = stdlib_hello("fuzz.test", alpn=["http/1.1"])
    for i in range(3000):
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
            data = b"\x16\x03" + data if i % 2 else data
        else:
            b = bytearray(real)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b[: rng.randrange(len(b) + 1)])
        r = parse_client_hello(data)
        assert r is NEED_MORE or isinstance(r, (NotTLS, ClientHello))


def test_too_many_records_refused():
    body = hello_body(sni_ext(b"x.test"))
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    data = b"".join(b"\x16\x03\x01\x00\x01" + hs[i:i + 1] for i in range(len(hs)))
    r = parse_client_hello(data)
    assert isinstance(r, NotTLS) and "more than 16 records" in r.reason


def test_bytes_needed_points_at_the_end_of_the_pending_record():
    from lbtwist.tls.clienthello import bytes_needed

    data = records(hello_body(sni_ext(b"x.test")), split=10)
    first_end = 5 + 10
    assert bytes_needed(b"") == 5 and bytes_needed(data[:3]) == 5
    assert bytes_needed(data[:5]) == first_end and bytes_needed(data[:first_end - 1]) == first_end
    assert bytes_needed(data[:first_end]) == first_end + 5
    assert bytes_needed(data[:first_end + 6]) == len(data)
    # parsing below the hint cannot decide; at the hint it progresses
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is NEED_MORE
    assert isinstance(parse_client_hello(data[:bytes_needed(data[:-1])]), ClientHello)
