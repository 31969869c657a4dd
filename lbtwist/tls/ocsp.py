"""OCSP stapling from a DER response file (``certificates[].ocsp``).

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
from typing import Callable

import attrs
from cryptography import x509
from cryptography.x509 import ocsp

from lbtwist.tls.files import TLSFileError

__all__ = ["OCSP_WARNING", "Staple", "load_staple"]

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
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as e:
        raise TLSFileError(path, f"not a DER OCSP response ({e})") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise TLSFileError(path, f"OCSP response status is {resp.response_status.name.lower()}, not successful")
    single = None
    for r in resp.responses:
        if r.serial_number == leaf.serial_number:
            single = r
            break
    if single is None:
        raise TLSFileError(path, f"the OCSP response is for another certificate (serial {leaf.serial_number:x} not in it)")
    h = _HASHES.get(single.hash_algorithm.name)
    if h is not None and h(leaf.issuer.public_bytes()).digest() != single.issuer_name_hash:
        raise TLSFileError(path, "the OCSP response is for a certificate of another issuer (issuer name hash differs)")
    status = single.certificate_status.name.lower()
    nxt = single.next_update_utc
    return Staple(
        path=path, der=der, this_update=single.this_update_utc.timestamp(),
        next_update=nxt.timestamp() if nxt is not None else None, status=status,
    )
