"""Certificates made on the spot, for tests, benchmarks and demos (never for
production): a private CA and EC P-256 leaves with DNS (or IP) subjectAltNames."""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "TestCA"]

_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@attrs.frozen(eq=False)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def write(self, directory: str | Path, stem: str) -> tuple[str, str]:
        """Write ``stem.pem`` (leaf + chain) and ``stem.key``; return their paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        c, k = d / f"{stem}.pem", d / f"{stem}.key"
        c.write_bytes(self.cert_pem)
        k.write_bytes(self.key_pem)
        return str(c), str(k)


class TestCA:
    """A throwaway certificate authority."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "lbtwist test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_ca(self, path: str | Path) -> str:
        Path(path).write_bytes(self.cert_pem)
        return str(path)

    def issue(
        self,
        *names: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        client: bool = False,
        key_type: str = "p256",
        ocsp_url: str | None = None,
    ) -> Issued:
        """A leaf for ``names`` (DNS names, or IP addresses), valid from
        yesterday for 30 days unless told otherwise; ``key_type`` p256 or
        rsa2048; ``ocsp_url``: named as its OCSP responder (Authority
        Information Access)."""
        if key_type == "rsa2048":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "client")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _DAY)
            .not_valid_after(not_after or now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if ocsp_url is not None:
            b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
        return Issued(b.sign(self.key, hashes.SHA256()), key)


class MemoryTLSClient:
    """A pyOpenSSL client talking to a server-side protocol over a
    StringTransport, entirely in memory: drives lbtwist's real TLS stack
    deterministically (no sockets, no reactor; pass a task.Clock)."""

    __test__ = False

    def __init__(self, ca_pem: bytes | None = None, max_version: int | None = None, no_ticket: bool = False,
                 alpn: list[bytes] | None = None) -> None:
        from OpenSSL import SSL

        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
        if no_ticket:
            ctx.set_options(SSL.OP_NO_TICKET)
        if ca_pem is not None:
            from OpenSSL.crypto import X509

            for c in x509.load_pem_x509_certificates(ca_pem):
                ctx.get_cert_store().add_cert(X509.from_cryptography(c))
            ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, err, depth, ok: bool(ok))
        if alpn:
            ctx.set_alpn_protos(alpn)
        self.context = ctx
        #: Connections are kept so their sessions stay resumable (OpenSSL
        #: spoils the session of a connection freed without close_notify).
        self.kept: list = []

    def connect(self, factory, clock, sni: str | None = None, session=None, data: bytes = b"ping",
                first_bytes_limit: int | None = None):
        """Connect through ``factory`` (what listens), handshake, send ``data``
        and read the echo. Returns a L{MemoryExchange}."""
        from OpenSSL import SSL
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        server.makeConnection(transport)
        conn = SSL.Connection(self.context)
        conn.set_connect_state()
        if sni:
            conn.set_tlsext_host_name(sni.encode())
        if session is not None:
            conn.set_session(session)
        self.kept.append(conn)
        ex = MemoryExchange(conn, server, transport)
        ok = ex.pump(clock)
        if ok and data:
            conn.write(data)
            ex.pump(clock)
            try:
                ex.received = conn.recv(65536)
            except SSL.Error:
                ex.received = b""
        return ex


@attrs.define(eq=False)
class MemoryExchange:
    conn: object
    server: object
    transport: object
    received: bytes = b""
    error: object = None
    hello: bytes = b""

    def pump(self, clock, rounds: int = 10) -> bool:
        """Move bytes both ways until quiet; False if the handshake failed."""
        from OpenSSL import SSL

        conn = self.conn
        for _ in range(rounds):
            moved = False
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                self.error = e
                return False
            try:
                out = conn.bio_read(1 << 17)
            except SSL.WantReadError:
                out = b""
            if out:
                if not self.hello:
                    self.hello = out
                if not self.transport.disconnecting:
                    self.server.dataReceived(out)
                moved = True
            clock.advance(0)
            back = self.transport.value()
            if back:
                self.transport.clear()
                conn.bio_write(back)
                moved = True
            if not moved:
                break
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as e:
            self.error = e
            return False
        return True

    @property
    def closed_by_server(self) -> bool:
        return bool(self.transport.disconnecting) or bool(getattr(self.transport, "disconnected", False))

    def finish(self) -> None:
        """Complete a close the server asked for (StringTransport only records it)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        if self.transport.disconnecting:
            self.server.connectionLost(Failure(ConnectionDone()))
