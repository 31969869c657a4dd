"""Who may use the admin API. Loopback binds are open unless a token is set;
any other bind requires a bearer token, so a drain button is never exposed to
a network by accident. Browser-borne attacks on a loopback admin (cross-site
POSTs, DNS rebinding) are refused by checking Origin and Host.
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
from pathlib import Path
from typing import Any

from lbtwist.config.binds import split_description

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback_host(host: str) -> bool:
    host = host.strip().lower()
    if host.startswith("[") and "]" in host:
        host = host[1 : host.index("]")]
    if host in _LOCAL_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_is_loopback(bind: str) -> bool:
    """Is the endpoint description reachable only from this machine?
    ``tcp:9900`` (all interfaces) is not; ``unix:`` sockets are (file permissions guard them)."""
    kind, args, kwargs = split_description(bind)
    if kind == "unix":
        return True
    if kind in ("tcp", "tcp6", "ssl", "tls") or kind.isdigit():
        interface = kwargs.get("interface", "")
        return bool(interface) and is_loopback_host(interface)
    return False


def read_token(admin_cfg: Any) -> str | None:
    """The configured token (inline or from ``token_file``), None when unset.
    Raises ValueError naming the key when the file cannot be used."""
    token = getattr(admin_cfg, "token", None)
    path = getattr(admin_cfg, "token_file", None)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"admin.token_file: cannot read {path!r}: {e.strerror or e}") from None
        lines = text.strip().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ValueError(f"admin.token_file: {path!r} is empty")
    if token is not None and len(token) < 16:
        raise ValueError("admin.token: shorter than 16 characters; use a long random string")
    return token


def admin_config_problems(admin_cfg: Any) -> list[tuple[str, str]]:
    """``(key path, message)`` errors for an admin block; for the config
    validator and ``lbtwist check``."""
    from lbtwist.admin.channel import limit_problems

    out: list[tuple[str, str]] = list(limit_problems(admin_cfg))
    try:
        token = read_token(admin_cfg)
    except ValueError as e:
        key, _, msg = str(e).partition(": ")
        return out + [(key, msg)]
    if token is None and not bind_is_loopback(admin_cfg.bind):
        out.append((
            "admin.bind",
            f"{admin_cfg.bind!r} is reachable from other machines: set admin.token_file "
            "(or admin.token), or bind to 127.0.0.1",
        ))
    return out


class Guard:
    """Decides, per request, whether it may proceed. ``check`` returns None
    (go ahead) or ``(status, message)``."""

    def __init__(self, token: str | None, loopback: bool) -> None:
        self.loopback = loopback
        self.set_token(token)

    def set_token(self, token: str | None) -> None:
        self.token = token
        self._expected = token.encode() if token else b""

    def authorized(self, header: bytes | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.strip().partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"bearer":
            return hmac.compare_digest(value, self._expected)
        if scheme == b"basic":  # lets a browser prompt for it: any user name, the token as password
            try:
                user_pass = base64.b64decode(value, validate=True)
            except ValueError:
                return False
            _, _, password = user_pass.partition(b":")
            return hmac.compare_digest(password, self._expected)
        return False

    def check(self, method: bytes, host: bytes | None, origin: bytes | None, authorization: bytes | None):
        if self.loopback and self.token is None and host is not None:
            # DNS rebinding: a page served from evil.example resolving to 127.0.0.1
            name = host.decode("latin-1").rsplit(":", 1)[0] if not host.startswith(b"[") else host.decode("latin-1")
            if not is_loopback_host(name):
                return 403, f"Host {host.decode('latin-1')!r} is not a loopback name"
        if not self.authorized(authorization):
            return 401, "missing or wrong bearer token"
        if method not in (b"GET", b"HEAD") and origin is not None and host is not None:
            # a cross-site form or fetch: browsers always send Origin on these
            o = origin.decode("latin-1")
            if o == "null" or o.split("://", 1)[-1] != host.decode("latin-1"):
                return 403, f"cross-origin request from {o} refused"
        return None
