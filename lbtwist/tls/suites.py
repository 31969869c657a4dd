"""Cipher, TLS 1.3 suite and group lists: one parser for the config check and
for the contexts the listener builds.

OpenSSL is lenient where an operator needs it strict: ``set_cipher_list``
silently skips an unknown name as long as one other matches, unknown TLS 1.3
suite names are ignored, so a typo quietly narrows (or changes) what is
offered. Here each element of a list is tried on its own and the first one
OpenSSL does not know is named in the error.
"""
from __future__ import annotations

import re

from OpenSSL import SSL

__all__ = [
    "SuiteError",
    "check_ciphers",
    "check_ciphersuites",
    "check_groups",
    "set_groups",
]

_MODIFIERS = "!-+"
_AT_WORD = re.compile(r"@(STRENGTH|SECLEVEL=[0-5])\Z")


class SuiteError(ValueError):
    """A cipher, suite or group list OpenSSL would not apply as written."""


def _elements(text: str, what: str, sep: str = r"[:, ]+") -> list[str]:
    if not isinstance(text, str):
        raise SuiteError(f"expected a {what} list as a string (OpenSSL syntax, ':'-separated), got {text!r}")
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        raise SuiteError(f"{text!r}: not ASCII") from None
    parts = [p.strip() for p in re.split(sep, text) if p.strip()]
    if not parts:
        raise SuiteError(f"the {what} list is empty")
    return parts


def _tls12_names(ctx: SSL.Context) -> list[str]:
    return [n for n in SSL.Connection(ctx).get_cipher_list() if not n.startswith("TLS_")]


def check_ciphers(text: str) -> str:
    """Validate a TLS 1.2 cipher list (OpenSSL syntax: names, aliases such as
    ``ECDHE+AESGCM``, ``!``/``-``/``+`` modifiers, ``@STRENGTH``). Returns it
    unchanged; raises L{SuiteError} naming the first element that matches no
    cipher, or when the whole list leaves none."""
    for el in _elements(text, "cipher"):
        bare = el.lstrip(_MODIFIERS)
        if bare.startswith("@"):
            if not _AT_WORD.match(bare):
                raise SuiteError(f"unknown cipher list directive {el!r} (known: @STRENGTH, @SECLEVEL=0-5)")
            continue
        if bare.startswith("TLS_"):
            raise SuiteError(f"{el!r} is a TLS 1.3 suite: list it under ciphersuites")
        probe = SSL.Context(SSL.TLS_METHOD)
        try:
            probe.set_cipher_list(bare.encode("ascii"))
        except SSL.Error:
            raise SuiteError(f"unknown cipher {el!r}: OpenSSL has no TLS 1.2 cipher of that name") from None
    probe = SSL.Context(SSL.TLS_METHOD)
    try:
        probe.set_cipher_list(text.encode("ascii"))
        if not _tls12_names(probe):
            raise SSL.Error("empty")
    except SSL.Error:
        raise SuiteError(f"{text!r} leaves no TLS 1.2 cipher") from None
    return text


def check_ciphersuites(text: str) -> str:
    """Validate a TLS 1.3 suite list (exact names, ``:``-separated). Raises
    L{SuiteError} naming the first unknown suite."""
    for el in _elements(text, "TLS 1.3 suite", sep=":"):
        probe = SSL.Context(SSL.TLS_METHOD)
        try:
            probe.set_tls13_ciphersuites(el.encode("ascii"))
            known = el in SSL.Connection(probe).get_cipher_list()
        except SSL.Error:
            known = False
        if not known:
            raise SuiteError(f"unknown TLS 1.3 suite {el!r} (known: {', '.join(_tls13_known())})")
    return text


def _tls13_known() -> list[str]:
    probe = SSL.Context(SSL.TLS_METHOD)
    probe.set_tls13_ciphersuites(
        b"TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:"
        b"TLS_AES_128_CCM_SHA256:TLS_AES_128_CCM_8_SHA256"
    )
    return [n for n in SSL.Connection(probe).get_cipher_list() if n.startswith("TLS_")]


def _set_groups_raw(ctx: SSL.Context, text: str) -> bool:
    # pyOpenSSL has no setter for a group list (only set_tmp_ecdh, one curve);
    # the binding has SSL_CTX_set1_curves_list. Private API: wrapped here, once.
    ok = SSL._lib.SSL_CTX_set1_curves_list(ctx._context, text.encode("ascii"))  # type: ignore[attr-defined]
    if not ok:
        SSL._lib.ERR_clear_error()  # type: ignore[attr-defined]
    return bool(ok)


def check_groups(text: str) -> str:
    """Validate a group list (``X25519:P-256:...``). Raises L{SuiteError}
    naming the first unknown group."""
    for el in _elements(text, "group", sep=":"):
        if not _set_groups_raw(SSL.Context(SSL.TLS_METHOD), el):
            raise SuiteError(f"unknown group {el!r} (for example X25519, X448, P-256, P-384, P-521, ffdhe2048)")
    return text


def set_groups(ctx: SSL.Context, text: str) -> None:
    """Apply a group list, in preference order, to ``ctx``."""
    names = ":".join(_elements(text, "group", sep=":"))
    if not _set_groups_raw(ctx, names):
        raise SuiteError(f"OpenSSL refuses the group list {text!r}")
