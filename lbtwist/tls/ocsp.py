"""OCSP stapling from a DER response file (``certificates[].ocsp``), and the
parts of fetching one (``certificates[].ocsp_fetch``, L{lbtwist.tls.ocspfetch}):
the responder URL, the issuer, the request.

The file is read with the certificate, at check, start and SIGHUP reload, by
L{load_staple}; the listener staples the bytes as they are, to clients that
ask (``status_request``), while the response is within its validity window.

What makes a file an error (the reload is refused, naming it): missing,
unreadable, not an OCSP response, unsuccessful, or about another certificate
(serial number and issuer name hash are compared with the leaf's). What makes
it a warning (nothing is stapled, clients check for themselves): the response
is stale (past ``nextUpdate``), not yet valid, or says the certificate is
revoked. Close to ``nextUpdate`` (L{OCSP_WARNING}) it is still stapled, with a
warning. The signature is not verified here: clients verify it against the
issuer, and a refresher that wrote a bad one would be caught by them.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Callable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from lbtwist.tls.files import TLSFileError

__all__ = ["OCSP_WARNING", "Staple", "file_staple", "find_issuer", "load_staple", "ocsp_request", "parse_staple", "responder_url"]

#: Warn when a stapled response's nextUpdate is closer than this.
OCSP_WARNING = 24 * 3600.0

_HASHES: dict[str, Callable[[bytes], "hashlib._Hash"]] = {
    "sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512,
}


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


@attrs.frozen(eq=False)
class Staple:
    """A checked OCSP response for one certificate."""

    path: str
    der: bytes
    this_update: float
    #: POSIX time after which it must not be stapled (None: the responder gave none).
    next_update: float | None
    #: "good" / "revoked" / "unknown".
    status: str

    def usable(self, now: float) -> bool:
        """May it be stapled at ``now``?"""
        if self.status != "good" or now < self.this_update - 300:  # 5 min of clock skew
            return False
        return self.next_update is None or now < self.next_update

    def problem(self, now: float) -> str | None:
        """Why it is not stapled, or is about to stop being: a warning, or None."""
        if self.status == "revoked":
            return f"{self.path}: the OCSP response says the certificate is revoked: not stapled (replace the certificate)"
        if self.status != "good":
            return f"{self.path}: the responder does not know the certificate (status {self.status}): not stapled"
        if now < self.this_update - 300:
            return f"{self.path}: OCSP response not valid before {_when(self.this_update)} (clock?): not stapled"
        if self.next_update is not None:
            if now >= self.next_update:
                return f"{self.path}: OCSP response is stale (nextUpdate {_when(self.next_update)}): not stapled; refresh the file and reload"
            if self.next_update - now < OCSP_WARNING:
                return f"{self.path}: OCSP response expires soon (nextUpdate {_when(self.next_update)}): refresh the file and reload"
        return None


def load_staple(path: str, leaf: x509.Certificate) -> Staple:
    """Read and check a DER OCSP response for ``leaf``. Raises L{TLSFileError}."""
    try:
        with open(path, "rb") as f:
            der = f.read()
    except OSError as e:
        raise TLSFileError(path, f"cannot read OCSP response: {e.strerror or e}") from None
    return parse_staple(der, leaf, path)


def parse_staple(der: bytes, leaf: x509.Certificate, source: str) -> Staple:
    """Check a DER OCSP response for ``leaf``, from a file or a responder
    (``source`` names it in messages): the one validator of both. Raises
    L{TLSFileError} naming ``source``."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise TLSFileError(source, f"not a DER OCSP response ({e})") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise TLSFileError(source, f"OCSP response status is {resp.response_status.name.lower()}, not successful")
    single = None
    for r in resp.responses:
        if r.serial_number == leaf.serial_number:
            single = r
            break
    if single is None:
        raise TLSFileError(source, f"the OCSP response is for another certificate (serial {leaf.serial_number:x} not in it)")
    h = _HASHES.get(single.hash_algorithm.name)
    if h is not None and h(leaf.issuer.public_bytes()).digest() != single.issuer_name_hash:
        raise TLSFileError(source, "the OCSP response is for a certificate of another issuer (issuer name hash differs)")
    status = single.certificate_status.name.lower()
    nxt = single.next_update_utc
    return Staple(
        path=source, der=der, this_update=single.this_update_utc.timestamp(),
        next_update=nxt.timestamp() if nxt is not None else None, status=status,
    )


# -- fetching (certificates[].ocsp_fetch, lbtwist.tls.ocspfetch) ----------------------


def responder_url(leaf: x509.Certificate) -> str | None:
    """The first http OCSP URL of the leaf's Authority Information Access, or None."""
    try:
        aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for d in aia:
        if d.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
                d.access_location, x509.UniformResourceIdentifier):
            url = d.access_location.value
            if url.lower().startswith("http://"):
                return url
    return None


def find_issuer(leaf: x509.Certificate, chain: Sequence[x509.Certificate], issuer_path: str | None) -> x509.Certificate:
    """The issuer of ``leaf``: the certificate in ``issuer_path`` (PEM) when
    given, else the one of ``chain`` (the cert file's intermediates) whose
    subject is the leaf's issuer. Raises L{TLSFileError}: the path, or
    ``"ocsp_issuer"`` when neither has it."""
    if issuer_path:
        try:
            with open(issuer_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise TLSFileError(issuer_path, f"cannot read the OCSP issuer certificate: {e.strerror or e}") from None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise TLSFileError(issuer_path, f"not a PEM certificate ({e})") from None
        for c in certs:
            if c.subject == leaf.issuer:
                return c
        raise TLSFileError(issuer_path, f"no certificate for the leaf's issuer {leaf.issuer.rfc4514_string()!r}")
    for c in chain:
        if c.subject == leaf.issuer:
            return c
    raise TLSFileError("ocsp_issuer", (
        f"ocsp_fetch needs the issuer of {leaf.subject.rfc4514_string()!r} "
        f"({leaf.issuer.rfc4514_string()!r}): append it to the cert file or set ocsp_issuer"
    ))


def ocsp_request(leaf: x509.Certificate, issuer: x509.Certificate) -> bytes:
    """The DER OCSP request for ``leaf`` (SHA-1 CertID, as RFC 5019 asks of
    responders and every responder understands; no nonce, so responses can
    be cached and reused)."""
    b = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1())
    return b.build().public_bytes(serialization.Encoding.DER)


def file_staple(path: str, leaf: x509.Certificate, fetch: bool) -> tuple[Staple | None, str | None]:
    """The ``ocsp`` file's response: (staple, None). With ``fetch`` (the
    file is where fetched responses are written) a missing file is no
    response and an unusable one (e.g. for the certificate before its
    renewal) a warning: (None, why), since the fetch replaces it. Without,
    both raise L{TLSFileError}."""
    if fetch and not os.path.exists(path):
        return None, None
    try:
        return load_staple(path, leaf), None
    except TLSFileError as e:
        if not fetch:
            raise
        return None, f"{e}: ignored until a response is fetched"
