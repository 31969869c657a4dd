"""Reading certificates and keys from PEM files, with errors that name the file.

Used at config validation, at start-up and on every reload, so a missing,
unreadable, expired or mismatched certificate is reported the same way each
time and never half-applied.
"""
from __future__ import annotations

import datetime
import re
from typing import Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

__all__ = ["CertificateFile", "TLSFileError", "load_ca_bundle", "load_certificate_pair"]

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey | dsa.DSAPrivateKey
)


_SIGNING_KEYS = (
    rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey, dsa.DSAPrivateKey
)


class TLSFileError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSFileError(path, f"{what} file not found") from None
    except PermissionError:
        raise TLSFileError(path, f"{what} file is not readable (permission denied)") from None
    except IsADirectoryError:
        raise TLSFileError(path, f"{what} file is a directory") from None
    except OSError as e:
        raise TLSFileError(path, f"cannot read {what} file: {e.strerror or e}") from None


def _certs(path: str, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSFileError(path, "no PEM certificate in file (expected -----BEGIN CERTIFICATE-----)")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSFileError(path, f"cannot parse certificate: {e}") from None


_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S)


def _key(path: str, data: bytes) -> PrivateKey:
    m = _KEY_BLOCK.search(data)
    if m is None:
        raise TLSFileError(path, "no PEM private key in file (expected -----BEGIN ... PRIVATE KEY-----)")
    block = m.group(0)
    if m.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in block:
        raise TLSFileError(path, "private key is encrypted; lbtwist needs an unencrypted key (protect the file instead)")
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError) as e:
        raise TLSFileError(path, f"cannot parse private key: {e}") from None
    except Exception as e:  # unsupported algorithm and friends
        raise TLSFileError(path, f"cannot parse private key: {type(e).__name__}: {e}") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise TLSFileError(path, f"a {type(key).__name__} cannot sign a TLS handshake")
    return key  # type: ignore[return-value]


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _when(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _subject(cert: x509.Certificate) -> str:
    try:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else cert.subject.rfc4514_string()
    except Exception:
        return "?"


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The certificate's DNS subjectAltNames, lower-cased (what clients check)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))


def check_validity(path: str, cert: x509.Certificate, now: float) -> None:
    """Raise if ``cert`` is expired or not yet valid at ``now`` (POSIX seconds)."""
    t = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if cert.not_valid_after_utc <= t:
        raise TLSFileError(path, f"certificate {_subject(cert)!r} expired on {_when(cert.not_valid_after_utc)}")
    if cert.not_valid_before_utc > t:
        raise TLSFileError(path, f"certificate {_subject(cert)!r} is not valid before {_when(cert.not_valid_before_utc)}")


@attrs.frozen(eq=False)
class CertificateFile:
    """A checked certificate chain and its key, ready for an SSL context."""

    cert_path: str
    key_path: str
    #: Leaf first, then the intermediates in file order.
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    #: DNS subjectAltNames of the leaf.
    names: tuple[str, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()


def load_certificate_pair(cert_path: str, key_path: str | None, now: float) -> CertificateFile:
    """Load and check a certificate chain and its key (``key_path`` None: the
    key is in the certificate file, HAProxy style). Raises L{TLSFileError}."""
    data = _read(cert_path, "certificate")
    chain = _certs(cert_path, data)
    kpath = key_path or cert_path
    key = _key(kpath, _read(kpath, "key") if key_path else data)
    leaf = chain[0]
    mine = _public_bytes(key.public_key())
    if mine != _public_bytes(leaf.public_key()):
        if any(mine == _public_bytes(c.public_key()) for c in chain[1:]):
            raise TLSFileError(cert_path, "the certificate matching the key is not first: put the leaf before its intermediates")
        raise TLSFileError(kpath, f"private key does not match certificate {cert_path} ({_subject(leaf)!r})")
    check_validity(cert_path, leaf, now)
    return CertificateFile(cert_path, kpath, tuple(chain), key, dns_names(leaf))


def load_ca_bundle(path: str) -> Sequence[x509.Certificate]:
    """Read a CA bundle (PEM, one or more certificates). Raises L{TLSFileError}."""
    return _certs(path, _read(path, "CA bundle"))
