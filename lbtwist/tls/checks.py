"""Config checks for the TLS blocks, for L{lbtwist.config.validate}.

Each function yields ``(path, severity, message)`` with ``path`` relative to
the block it was given, so the validator can place it on its YAML line. File
checks read the files exactly as start-up and reload will, so an error here is
the error the operator would otherwise meet at SIGHUP.
"""
from __future__ import annotations

import datetime
from typing import Any, Iterator

from lbtwist.tls.context import HTTP_ALPN, OPENSSL_CACHE_SIZE, session_timeout, ticket_lifetime_problem, tls_version
from lbtwist.tls.files import TLSFileError, load_ca_bundle, load_certificate_pair
from lbtwist.tls.ocsp import file_staple
from lbtwist.tls.ocspfetch import fetch_settings, timing_problems
from lbtwist.tls.sni import check_name_pattern
from lbtwist.tls.suites import SuiteError, check_ciphers, check_ciphersuites, check_groups

__all__ = ["check_listener_tls", "check_passthrough", "check_pool_tls", "EXPIRY_WARNING"]

Found = tuple[str, str, str]

#: Warn when a certificate expires sooner than this.
EXPIRY_WARNING = 14 * 86400.0

#: The shortest max_age browsers' HSTS preload lists accept.
HSTS_PRELOAD_MIN_AGE = 31536000



def _covers(pattern: str, names: tuple[str, ...]) -> bool:
    """Would a client asking for ``pattern`` accept a certificate for ``names``?"""
    for n in names:
        if n == pattern:
            return True
        if n.startswith("*.") and not pattern.startswith("*."):
            dot = pattern.find(".")
            if dot > 0 and pattern[dot + 1:] == n[2:]:
                return True
    return False


def _file_problem(e: TLSFileError, cert_path: str, base: str) -> Found:
    where = f"{base}.cert" if e.path == cert_path else f"{base}.key"
    return where, "error", str(e)


def _alpn(protocols: Any) -> Iterator[Found]:
    """RFC 7301: a protocol name is 1 to 255 bytes; lbtwist sends them as ASCII."""
    for j, p in enumerate(protocols or ()):
        if not 1 <= len(p) <= 255 or not p.isascii() or not p.isprintable():
            yield f"alpn[{j}]", "error", f"ALPN protocol names are 1 to 255 bytes of printable ASCII, got {p!r}"


def _versions_and_ciphers(cfg: Any, with_ciphers: bool) -> Iterator[Found]:
    try:
        tls_version(cfg.min_version)
    except ValueError as e:
        yield "min_version", "error", str(e)
    if not with_ciphers:
        return
    for key, check in (("ciphers", check_ciphers), ("ciphersuites", check_ciphersuites), ("groups", check_groups)):
        try:
            check(getattr(cfg, key))
        except SuiteError as e:
            yield key, "error", str(e)


_FETCH_KEYS = ("ocsp_issuer", "ocsp_responder", "ocsp_timeout", "ocsp_refresh_min")


def _ocsp_fetch(c: Any, base: str, now: float) -> Iterator[Found]:
    """``ocsp_fetch`` and its keys, checked by what start-up builds the fetcher with."""
    if not c.ocsp_fetch:
        for key in ("ocsp_responder", "ocsp_issuer"):
            if getattr(c, key) is not None:
                yield f"{base}.{key}", "warning", "has no effect without ocsp_fetch: true"
        return
    timing = timing_problems(c)
    for key, problem in timing:
        yield f"{base}.{key}", "error", problem
    try:
        fetch_settings(c, now)
    except TLSFileError as e:
        if e.path in _FETCH_KEYS and timing and e.path in dict(timing):
            pass  # reported above
        elif e.path in _FETCH_KEYS:  # the key is the place: not repeated in the message
            yield f"{base}.{e.path}", "error", str(e).removeprefix(f"{e.path}: ")
        elif e.path == c.ocsp_issuer:
            yield f"{base}.ocsp_issuer", "error", str(e)
        elif e.path == c.ocsp:
            yield f"{base}.ocsp", "error", str(e)
        # else: the certificate itself, reported on cert/key already


def check_listener_tls(cfg: Any, mode: str, now: float) -> Iterator[Found]:
    """Problems in a listener's ``tls:`` block."""
    if mode not in ("http", "tcp"):
        yield "", "error", f"tls needs mode: http or tcp (this listener is {mode})"
        return
    if not cfg.certificates:
        yield "certificates", "error", "at least one certificate is needed"
    owner: dict[str, str] = {}
    defaults = []
    for i, c in enumerate(cfg.certificates):
        base = f"certificates[{i}]"
        if c.default:
            defaults.append(base)
        try:
            cf = load_certificate_pair(c.cert, c.key, now)
        except TLSFileError as e:
            yield _file_problem(e, c.cert, base)
            cf = None
        if cf is not None and cf.not_after - now < EXPIRY_WARNING:
            when = datetime.datetime.fromtimestamp(cf.not_after, datetime.timezone.utc).strftime("%Y-%m-%d")
            yield f"{base}.cert", "warning", f"{c.cert}: certificate expires soon ({when})"
        if cf is not None and c.ocsp:
            try:
                staple, ignored = file_staple(c.ocsp, cf.leaf, c.ocsp_fetch)
            except TLSFileError as e:
                yield f"{base}.ocsp", "error", str(e)
            else:
                problem = staple.problem(now) if staple is not None else ignored
                if problem is not None:
                    yield f"{base}.ocsp", "warning", problem
        if cf is not None:
            yield from _ocsp_fetch(c, base, now)
        if cf is not None and not c.names and not cf.names:
            yield f"{base}.cert", "warning", (
                f"{c.cert}: the certificate has no DNS subjectAltName, so no SNI name selects it "
                "(list names: or make it the default)"
            )
        names = c.names if c.names else (cf.names if cf is not None else ())
        for j, n in enumerate(names):
            npath = f"{base}.names[{j}]" if c.names else f"{base}.cert"
            try:
                p = check_name_pattern(n)
            except ValueError as e:
                yield npath, "error", str(e)
                continue
            if p in owner:
                yield npath, "error", f"server name {p!r} is already served by {owner[p]}"
            else:
                owner[p] = base
            if c.names and cf is not None and not _covers(p, cf.names):
                yield npath, "warning", f"{p!r} is not among the certificate's names {list(cf.names)}: clients will refuse it"
    if len(defaults) > 1:
        yield defaults[1] + ".default", "error", f"only one certificate can be the default (also {defaults[0]})"
    yield from _versions_and_ciphers(cfg, with_ciphers=True)
    yield from _alpn(cfg.alpn)
    if mode == "http" and cfg.alpn is not None:
        for j, p in enumerate(cfg.alpn):
            if p not in HTTP_ALPN:
                yield f"alpn[{j}]", "error", f"an http listener speaks only {', '.join(HTTP_ALPN)}; {p!r} would break clients that pick it"
    h = cfg.hsts
    if h is not None:
        if mode != "http":
            yield "hsts", "error", f"HSTS is an HTTP header: it needs mode: http (this listener is {mode})"
        if h.max_age < 0:
            yield "hsts.max_age", "error", "must not be negative (0 tells browsers to forget the policy)"
        if h.preload and not h.include_subdomains:
            yield "hsts.preload", "error", "preload lists require include_subdomains: true"
        if h.preload and h.max_age < HSTS_PRELOAD_MIN_AGE:
            yield "hsts.preload", "error", f"preload lists require max_age of at least one year ({HSTS_PRELOAD_MIN_AGE}s)"
    sc, st = cfg.session_cache, cfg.session_tickets
    if sc.size > OPENSSL_CACHE_SIZE:
        yield "session_cache.size", "error", f"above OpenSSL's fixed cache limit of {OPENSSL_CACHE_SIZE}"
    if sc.timeout <= 0:
        yield "session_cache.timeout", "error", "must be above 0"
    if st.enabled:
        if st.keep < 1:
            yield "session_tickets.keep", "error", "must be at least 1 (the current key)"
        elif st.rotate > 0 and st.rotate * (st.keep - 1) < session_timeout(cfg):
            yield "session_tickets.rotate", "warning", (
                f"a ticket's key is dropped {st.rotate * (st.keep - 1):g}s after its rotation, before the "
                f"ticket lifetime ({st.lifetime:g}s): raise keep or rotate, or clients fall back to full handshakes"
            )
        problem = ticket_lifetime_problem(st)
        if problem is not None:
            yield "session_tickets.lifetime", "error", problem


def check_passthrough(cfg: Any, mode: str, has_listener_pool: bool) -> Iterator[Found]:
    """Problems in a listener's ``tls_passthrough:`` block (pool names are
    checked with the other pool references)."""
    if mode != "tcp":
        yield "", "error", f"tls_passthrough needs mode: tcp (this listener is {mode})"
    seen: dict[str, str] = {}
    for pattern in cfg.routes:
        try:
            p = check_name_pattern(pattern)
        except ValueError as e:
            yield f"routes[{pattern!r}]", "error", str(e)
            continue
        if p in seen:
            yield f"routes[{pattern!r}]", "error", f"server name {p!r} is routed twice (also {seen[p]!r})"
        seen[p] = pattern
    if cfg.default is None and not has_listener_pool:
        yield "default", "warning", "no default pool: connections without SNI or with an unrouted name are closed"


def check_pool_tls(cfg: Any, now: float) -> Iterator[Found]:
    """Problems in a pool's ``tls:`` block."""
    if cfg.ca:
        try:
            load_ca_bundle(cfg.ca)
        except TLSFileError as e:
            yield "ca", "error", str(e)
    if cfg.cert:
        try:
            load_certificate_pair(cfg.cert, cfg.key, now)
        except TLSFileError as e:
            yield _file_problem(e, cfg.cert, "")[0].lstrip("."), "error", str(e)
    elif cfg.key:
        yield "key", "error", "a client key needs its certificate (cert)"
    yield from _versions_and_ciphers(cfg, with_ciphers=False)
    yield from _alpn(cfg.alpn)
    if cfg.server_name is not None:
        try:
            check_name_pattern(cfg.server_name)
            if cfg.server_name.startswith("*."):
                raise ValueError(f"{cfg.server_name!r}: a backend name cannot be a wildcard")
        except ValueError as e:
            yield "server_name", "error", str(e)
