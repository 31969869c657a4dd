"""Reading ``bind`` strings (Twisted endpoint descriptions) without binding.

Stream endpoints are checked by Twisted's own parser against a MemoryReactor;
UDP has no server-endpoint syntax in Twisted, so lbtwist defines
``udp:PORT[:interface=ADDR]`` here and the UDP relay parses it with
L{parse_udp_bind}. L{bind_key} tells which binds would fight for one socket.
"""
from __future__ import annotations

import ipaddress
from typing import NamedTuple

from lbtwist.registry import suggest

UDP_SYNTAX = "udp:PORT[:interface=ADDR]"
_WILDCARDS = {"", "0.0.0.0", "::"}


def split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``"tcp:80:interface=\\:\\:1"`` -> ``("tcp", ["80"], {"interface": "::1"})``,
    with Twisted's escaping rules (a backslash quotes the next character)."""
    tokens: list[tuple[str | None, str]] = []
    cur: list[str] = []
    key: str | None = None
    i = 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            cur.append(description[i + 1])
            i += 2
            continue
        if c == ":":
            tokens.append((key, "".join(cur)))
            cur, key = [], None
        elif c == "=" and key is None:
            key, cur = "".join(cur), []
        else:
            cur.append(c)
        i += 1
    tokens.append((key, "".join(cur)))
    kind = tokens[0][1] if tokens[0][0] is None else ""
    args = [v for k, v in tokens[1:] if k is None]
    kwargs = {k: v for k, v in tokens[1:] if k is not None}
    return kind.lower(), args, kwargs


def _port(text: str, bind: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r} in {bind!r}: expected 0-65535")
    return int(text)


def parse_udp_bind(bind: str) -> tuple[int, str]:
    """``"udp:5353:interface=127.0.0.1"`` -> ``(5353, "127.0.0.1")``; the
    interface is "" (all IPv4 addresses) when omitted. Raises ValueError."""
    kind, args, kwargs = split_description(bind)
    if kind != "udp":
        raise ValueError(f"a udp listener binds with {UDP_SYNTAX}, got {bind!r}")
    unknown = set(kwargs) - {"port", "interface"}
    if unknown:
        name = sorted(unknown)[0]
        raise ValueError(
            f"unknown option {name!r} in {bind!r}{suggest(name, ['port', 'interface'])}; syntax: {UDP_SYNTAX}"
        )
    ports = args[:1] + ([kwargs["port"]] if "port" in kwargs else [])
    if len(ports) != 1 or len(args) > 1:
        raise ValueError(f"expected exactly one port in {bind!r}; syntax: {UDP_SYNTAX}")
    port = _port(ports[0], bind)
    interface = kwargs.get("interface", "")
    if interface:
        try:
            ipaddress.ip_address(interface)
        except ValueError:
            raise ValueError(f"interface {interface!r} in {bind!r} is not an IP address") from None
    return port, interface


#: the reactor given to endpoint parsers that only validate (nothing is bound)
_NO_REACTOR = object()


def check_stream_bind(bind: str) -> None:
    """Parse a TCP/TLS/UNIX server endpoint description as twistd will, on a
    MemoryReactor so nothing is bound. Raises ValueError with a readable message."""
    # imported here: Twisted's endpoints take most of a second to import, and
    # split_description (lbtwist status --check, every second) needs none of it
    from twisted.internet.endpoints import serverFromString

    try:
        # the parsers only keep the reactor in the endpoint, never call it:
        # a placeholder, not twisted.internet.testing (which imports trial,
        # unittest and doctest into every process that loads a config)
        serverFromString(_NO_REACTOR, bind)
    except Exception as e:  # Twisted raises ValueError, TypeError, KeyError, OSError (ssl files)...
        detail = str(e) or type(e).__name__
        if isinstance(e, TypeError) and "unexpected keyword argument" in detail:
            detail = "unknown option " + detail.rsplit("argument", 1)[-1].strip()
        hint = ""
        if split_description(bind)[0] == "udp":
            hint = " (udp binds need mode: udp)"
        raise ValueError(f"bad endpoint description {bind!r}: {detail}{hint}") from None


class BindKey(NamedTuple):
    """What a bind occupies: ("tcp"|"udp", port, interface) or ("unix", path, "")."""

    proto: str
    where: int | str
    interface: str

    def conflicts(self, other: "BindKey") -> bool:
        """Would binding both fail? (Port 0 is ephemeral; wildcards overlap all.)"""
        if self.proto != other.proto or self.where != other.where:
            return False
        if self.proto == "unix":
            return True
        if self.where == 0:
            return False
        return (
            self.interface == other.interface
            or self.interface in _WILDCARDS
            or other.interface in _WILDCARDS
        )


def bind_key(bind: str, udp: bool = False) -> BindKey | None:
    """The socket ``bind`` would occupy, or None when that cannot be told
    (plugin endpoint types). Assumes the description already parsed."""
    if udp:
        port, interface = parse_udp_bind(bind)
        return BindKey("udp", port, interface)
    kind, args, kwargs = split_description(bind)
    if kind in ("tcp", "tcp6", "ssl"):
        port = args[0] if args else kwargs.get("port")
        default = "::" if kind == "tcp6" else ""
        if port is None or not port.isdigit():
            return None
        return BindKey("tcp", int(port), kwargs.get("interface", default))
    if kind == "tls":  # tls:PEM_DIR[:port=443][:interface=::] (Twisted's defaults)
        port = args[1] if len(args) > 1 else kwargs.get("port", "443")
        return BindKey("tcp", int(port), kwargs.get("interface", "::")) if port.isdigit() else None
    if kind == "unix":
        path = args[0] if args else kwargs.get("address")
        return BindKey("unix", path, "") if path else None
    return None
