"""ServerTLS through wrap_server_factory, in memory: real OpenSSL on both
sides, a task.Clock for rotation and timeouts, no sockets."""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol

from lbtwist.config.model import (
    CertificateConfig,
    ListenerTLSConfig,
    SessionCacheConfig,
    SessionTicketsConfig,
)
from lbtwist.tls.clienthello import ClientHello, parse_client_hello
from lbtwist.tls.context import ServerTLS, TLSConfigError, session_reused
from lbtwist.tls.server import tls_info, wrap_server_factory
from lbtwist.tls.testing import MemoryTLSClient, TestCA

TLS12, TLS13 = SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION


class Echo(Protocol):
    def dataReceived(self, data):
        info = tls_info(self.transport)
        self.factory.infos.append(info)
        self.transport.write(data)


def echo_factory():
    f = Factory.forProtocol(Echo)
    f.infos = []
    return f


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def certs(ca, tmp_path):
    a = ca.issue("a.test", "*.a.test").write(tmp_path, "a")
    b = ca.issue("b.test").write(tmp_path, "b")
    return {"a": a, "b": b, "dir": tmp_path}


def tls_config(certs, **kw):
    certificates = kw.pop("certificates", None) or [
        CertificateConfig(cert=certs["a"][0], key=certs["a"][1]),
        CertificateConfig(cert=certs["b"][0], key=certs["b"][1]),
    ]
    return ListenerTLSConfig(certificates=certificates, **kw)


def served_name(ex) -> str:
    cert = ex.conn.get_peer_certificate()
    return cert.to_cryptography().subject.rfc4514_string()


class Harness:
    def __init__(self, ca, cfg, alpn=("http/1.1",)):
        self.clock = task.Clock()
        self.state = ServerTLS(cfg, self.clock, name="edge", alpn=alpn)
        self.app = echo_factory()
        self.factory = wrap_server_factory(self.app, self.state)
        self.ca = ca

    def client(self, **kw) -> MemoryTLSClient:
        return MemoryTLSClient(self.ca.cert_pem, **kw)


# -- SNI selection ----------------------------------------------------------------------


def test_sni_exact_wildcard_and_default(ca, certs):
    h = Harness(ca, tls_config(certs))
    c = h.client()
    for sni, want in [("a.test", "CN=a.test"), ("www.a.test", "CN=a.test"), ("b.test", "CN=b.test"),
                      ("x.y.a.test", "CN=a.test"), ("unknown.test", "CN=a.test"), (None, "CN=a.test")]:
        ex = c.connect(h.factory, h.clock, sni=sni)
        assert ex.error is None and ex.received == b"ping", sni
        assert served_name(ex) == want, sni
    assert h.state.stats.full_handshakes == 6 and h.state.stats.resumed_handshakes == 0


def test_names_override_and_default_flag(ca, certs):
    cfg = tls_config(certs, certificates=[
        CertificateConfig(cert=certs["a"][0], key=certs["a"][1], names=["alias.test"]),
        CertificateConfig(cert=certs["b"][0], key=certs["b"][1], default=True),
    ])
    h = Harness(ca, cfg)
    c = h.client()
    assert served_name(c.connect(h.factory, h.clock, sni="alias.test")) == "CN=a.test"
    # names replace the SANs for selection: a.test now falls to the default
    assert served_name(c.connect(h.factory, h.clock, sni="a.test")) == "CN=b.test"
    assert served_name(c.connect(h.factory, h.clock, sni=None)) == "CN=b.test"


def test_tls_info_and_alpn(ca, certs):
    h = Harness(ca, tls_config(certs), alpn=("h2", "http/1.1"))
    ex = h.client(alpn=[b"http/1.1", b"h2"]).connect(h.factory, h.clock, sni="b.test")
    info = h.app.infos[-1]
    assert info.version == "TLSv1.3" and info.server_name == "b.test"
    assert info.alpn == "h2"  # server preference wins
    assert info.cipher == ex.conn.get_cipher_name() and info.resumed is False
    h.client(alpn=[b"spdy/3"]).connect(h.factory, h.clock, sni="b.test")
    assert h.app.infos[-1].alpn is None  # no overlap: no ALPN, not a failure
    assert tls_info(object()) is None


# -- resumption ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_ticket_resumption_counted(ca, certs, version):
    h = Harness(ca, tls_config(certs))
    c = h.client(max_version=version)
    first = c.connect(h.factory, h.clock, sni="a.test")
    again = c.connect(h.factory, h.clock, sni="a.test", session=first.conn.get_session())
    assert session_reused(again.conn) and again.received == b"ping"
    assert parse_client_hello(again.hello).offers_ticket
    st = h.state.stats
    assert (st.full_handshakes, st.resumed_handshakes, st.resumed_by_ticket, st.resumed_by_cache) == (1, 1, 1, 0)
    assert h.app.infos[-1].resumed is True
    assert st.versions == {"TLSv1.2" if version == TLS12 else "TLSv1.3": 2}


def test_session_id_resumption_when_client_has_no_tickets(ca, certs):
    h = Harness(ca, tls_config(certs))
    c = h.client(max_version=TLS12, no_ticket=True)
    first = c.connect(h.factory, h.clock, sni="a.test")
    again = c.connect(h.factory, h.clock, sni="a.test", session=first.conn.get_session())
    hello = parse_client_hello(again.hello)
    assert hello.session_ticket is None and len(hello.session_id) == 32
    assert session_reused(again.conn)
    assert h.state.stats.resumed_by_cache == 1 and h.state.stats.resumed_by_ticket == 0


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_cache_only_when_tickets_disabled(ca, certs, version):
    h = Harness(ca, tls_config(certs, session_tickets=SessionTicketsConfig(enabled=False)))
    c = h.client(max_version=version)
    first = c.connect(h.factory, h.clock, sni="a.test")
    again = c.connect(h.factory, h.clock, sni="a.test", session=first.conn.get_session())
    assert session_reused(again.conn)
    hello = parse_client_hello(again.hello)
    assert hello.ticket_key_name is None  # a stateful ticket / session id, no key inside
    assert h.state.stats.resumed_by_cache == 1


def test_no_resumption_when_both_off(ca, certs):
    cfg = tls_config(certs, session_tickets=SessionTicketsConfig(enabled=False),
                     session_cache=SessionCacheConfig(size=0))
    h = Harness(ca, cfg)
    c = h.client(max_version=TLS12)
    first = c.connect(h.factory, h.clock, sni="a.test")
    again = c.connect(h.factory, h.clock, sni="a.test", session=first.conn.get_session())
    assert not session_reused(again.conn) and h.state.stats.full_handshakes == 2


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_session_for_one_certificate_not_resumed_under_another(ca, certs, version):
    h = Harness(ca, tls_config(certs))
    c = h.client(max_version=version)
    first = c.connect(h.factory, h.clock, sni="a.test")
    session = first.conn.get_session()
    # same certificate, other name: resumes
    same = c.connect(h.factory, h.clock, sni="www.a.test", session=session)
    assert session_reused(same.conn)
    session = same.conn.get_session() if version == TLS13 else session  # 1.3 tickets are single-use
    # other certificate: the ticket is offered, declined, full handshake with b's certificate
    other = c.connect(h.factory, h.clock, sni="b.test", session=session)
    assert parse_client_hello(other.hello).offers_ticket
    assert not session_reused(other.conn)
    assert served_name(other) == "CN=b.test" and other.received == b"ping"
    assert h.state.stats.resumed_handshakes == 1 and h.state.stats.full_handshakes == 2


# -- ticket-key rotation -------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_rotation_keeps_previous_key_then_drops_it(ca, certs, version):
    cfg = tls_config(certs, session_tickets=SessionTicketsConfig(rotate=3600.0, keep=2))
    h = Harness(ca, cfg)
    h.state.start()
    c = h.client(max_version=version)
    s0 = c.connect(h.factory, h.clock, sni="a.test").conn.get_session()
    s0b = c.connect(h.factory, h.clock, sni="a.test").conn.get_session()
    slot = h.state.choose(ClientHello(0x0303, server_name="a.test"))[0]
    k0 = slot.ring.current.key_name
    assert k0 is not None and len(k0) == 16

    h.clock.advance(3600.0)
    assert h.state.stats.rotations == 1
    k1 = slot.ring.current.key_name
    assert k1 is not None and k1 != k0
    s1 = c.connect(h.factory, h.clock, sni="a.test").conn.get_session()
    # A ticket from before the rotation still resumes, by the previous key.
    r = c.connect(h.factory, h.clock, sni="a.test", session=s0)
    assert parse_client_hello(r.hello).ticket_key_name == k0
    assert session_reused(r.conn)
    assert h.state.stats.resumed_previous_key == 1

    h.clock.advance(3600.0)  # k0 is now two rotations old: dropped (keep=2)
    r = c.connect(h.factory, h.clock, sni="a.test", session=s0b)
    assert parse_client_hello(r.hello).ticket_key_name == k0
    assert not session_reused(r.conn) and r.received == b"ping"
    r = c.connect(h.factory, h.clock, sni="a.test", session=s1)
    assert session_reused(r.conn)
    assert h.state.stats.rotations == 2
    h.state.stop()
    assert h.clock.getDelayedCalls() == []


def test_prepared_generations_accept_their_tickets_early(ca, certs):
    """With ``prepare``, a ticket issued by a future key (a sibling worker
    that rotated a moment earlier) is already accepted."""
    cfg = tls_config(certs, session_tickets=SessionTicketsConfig(prepare=2))
    h = Harness(ca, cfg)
    slot = h.state.choose(ClientHello(0x0303, server_name="a.test"))[0]
    future = slot.ring.ahead[0]
    assert future.key_name is not None and future.key_name != slot.ring.current.key_name
    # Issue a ticket from the future generation directly, as a sibling would.
    sib = ServerTLS(cfg, task.Clock(), name="edge")
    sib_slot = sib.choose(ClientHello(0x0303, server_name="a.test"))[0]
    sib_slot.ring.generations[-1] = future  # the sibling after its rotation, sharing pre-fork contexts
    sf = wrap_server_factory(echo_factory(), sib)
    c = h.client(max_version=TLS12)
    s = c.connect(sf, h.clock, sni="a.test").conn.get_session()
    r = c.connect(h.factory, h.clock, sni="a.test", session=s)
    assert session_reused(r.conn)
    h.state.rotate()
    assert slot.ring.current is future and len(slot.ring.ahead) == 2


# -- reload -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_reload_swaps_certificate_and_keeps_sessions(ca, certs, version):
    h = Harness(ca, tls_config(certs))
    c = h.client(max_version=version)
    first = c.connect(h.factory, h.clock, sni="a.test")
    old_serial = first.conn.get_peer_certificate().to_cryptography().serial_number
    ca.issue("a.test", "*.a.test").write(certs["dir"], "a")  # renewed in place
    h.state.reload()
    fresh = h.client(max_version=version).connect(h.factory, h.clock, sni="a.test")
    new_serial = fresh.conn.get_peer_certificate().to_cryptography().serial_number
    assert new_serial != old_serial
    again = c.connect(h.factory, h.clock, sni="a.test", session=first.conn.get_session())
    assert session_reused(again.conn)
    assert h.state.stats.reloads == 1


def test_reload_error_names_file_and_changes_nothing(ca, certs):
    h = Harness(ca, tls_config(certs))
    c = h.client()
    serial = c.connect(h.factory, h.clock, sni="b.test").conn.get_peer_certificate().to_cryptography().serial_number
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
    ca.issue("b.test", not_before=past - datetime.timedelta(days=1), not_after=past).write(certs["dir"], "b")
    with pytest.raises(TLSConfigError, match=r"b\.pem: certificate 'b.test' expired on"):
        h.state.reload()
    again = c.connect(h.factory, h.clock, sni="b.test")
    assert again.conn.get_peer_certificate().to_cryptography().serial_number == serial
    # key from another certificate
    (certs["dir"] / "b.key").write_bytes(ca.issue("b.test").key_pem)
    ca_b = ca.issue("b.test")
    (certs["dir"] / "b.pem").write_bytes(ca_b.cert_pem)
    with pytest.raises(TLSConfigError, match=r"b\.key: private key does not match certificate .*b\.pem"):
        h.state.reload()
    assert h.state.stats.reloads == 0


def test_reload_with_new_protocol_settings_starts_sessions_afresh(ca, certs):
    cfg = tls_config(certs)
    h = Harness(ca, cfg)
    c = h.client(max_version=TLS12)
    s = c.connect(h.factory, h.clock, sni="a.test").conn.get_session()
    import attrs

    h.state.reload(attrs.evolve(cfg, session_cache=SessionCacheConfig(timeout=60.0)))
    assert not session_reused(c.connect(h.factory, h.clock, sni="a.test", session=s).conn)


# -- refusals and timeouts ----------------------------------------------------------------


def test_min_version_13_refuses_tls12(ca, certs):
    h = Harness(ca, tls_config(certs, min_version="1.3"))
    ex = h.client(max_version=TLS12).connect(h.factory, h.clock, sni="a.test")
    assert ex.error is not None and ex.received == b""
    assert ex.closed_by_server
    ex.finish()
    assert h.state.stats.failed_handshakes == 1 and h.state.stats.full_handshakes == 0
    assert h.client(max_version=TLS13).connect(h.factory, h.clock, sni="a.test").received == b"ping"


def test_not_tls_is_closed_and_counted(ca, certs):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    h = Harness(ca, tls_config(certs))
    p = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert t.disconnecting and t.value() == b""
    assert h.state.stats.not_tls == 1 and h.app.infos == []


def test_handshake_deadlines(ca, certs):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    h = Harness(ca, tls_config(certs, handshake_timeout=5.0))
    hello = MemoryTLSClient().context
    conn = SSL.Connection(hello)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    data = conn.bio_read(65536)
    # 1) the ClientHello never completes
    p = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    t = StringTransport()
    p.makeConnection(t)
    p.dataReceived(data[:20])
    h.clock.advance(4.9)
    assert not t.disconnecting
    h.clock.advance(0.2)
    assert t.disconnecting
    # 2) the hello arrives, the client then stalls
    p = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
    t2 = StringTransport()
    p.makeConnection(t2)
    p.dataReceived(data)
    assert t2.value()  # the server's flight went out
    h.clock.advance(5.1)
    assert t2.disconnecting
    p.connectionLost(None)
    assert h.state.stats.handshake_timeouts == 2
    assert h.state.stats.failed_handshakes == 1
    assert h.clock.getDelayedCalls() == []


def test_construction_errors_name_the_file(ca, certs, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSConfigError, match="nope.pem: certificate file not found"):
        ServerTLS(ListenerTLSConfig(certificates=[CertificateConfig(cert=missing, key=certs["a"][1])]), task.Clock())
    with pytest.raises(TLSConfigError, match="at least one certificate"):
        ServerTLS(ListenerTLSConfig(), task.Clock())
    with pytest.raises(TLSConfigError, match="ciphersuites"):
        ServerTLS(tls_config(certs, ciphersuites="TLS_NOT_A_SUITE"), task.Clock())
    with pytest.raises(TLSConfigError, match="min_version"):
        ServerTLS(tls_config(certs, min_version="1.1"), task.Clock())


def test_certificate_for_reports_served_leaf(ca, certs):
    h = Harness(ca, tls_config(certs))
    leaf = h.state.certificate_for("b.test")
    assert isinstance(leaf, x509.Certificate)
    assert leaf.subject.rfc4514_string() == "CN=b.test"


def test_for_listener_picks_alpn_by_mode(ca, certs):
    from lbtwist.config.model import ListenerConfig

    tls = tls_config(certs)
    http = ServerTLS.for_listener(ListenerConfig(name="w", bind="tcp:0", mode="http", tls=tls), task.Clock())
    tcp = ServerTLS.for_listener(ListenerConfig(name="t", bind="tcp:0", mode="tcp", tls=tls), task.Clock())
    assert http.alpn == ("h2", "http/1.1") and tcp.alpn == () and http.name == "w"
    for state, want in ((http, "http/1.1"), (tcp, None)):
        app = echo_factory()
        clock = task.Clock()
        MemoryTLSClient(ca.cert_pem, alpn=[b"http/1.1"]).connect(wrap_server_factory(app, state, clock), clock)
        assert app.infos[-1].alpn == want
