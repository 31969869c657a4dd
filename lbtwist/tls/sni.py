"""Server-name lookup, sans-IO: exact names, ``*.`` wildcards and a default.

Shared by certificate selection on terminating listeners and by pool
selection on ``tls_passthrough`` listeners, so both read a name the same way.
"""
from __future__ import annotations

from typing import Generic, Iterable, Mapping, TypeVar

import attrs

__all__ = ["NameTable", "SNIRouter", "normalize_name", "check_name_pattern"]

T = TypeVar("T")


def normalize_name(name: str) -> str:
    """DNS names compare case-insensitively and without the root dot."""
    return name.strip().lower().rstrip(".")


def check_name_pattern(pattern: str) -> str:
    """Normalise a configured name: ``host.example``, or ``*.example`` (one
    whole leftmost label, as certificates use it). Raises ValueError."""
    p = normalize_name(pattern)
    if not p:
        raise ValueError("empty server name")
    body = p[2:] if p.startswith("*.") else p
    if "*" in body:
        raise ValueError(f"{pattern!r}: a wildcard must be the whole leftmost label ('*.example.com')")
    if not body or any(not label for label in body.split(".")):
        raise ValueError(f"{pattern!r} is not a valid server name")
    try:
        body.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{pattern!r}: write internationalised names in their xn-- (IDNA) form") from None
    return p


class NameTable(Generic[T]):
    """Maps server names to values. Exact names win over wildcards; a
    wildcard covers exactly one label (``*.a.test`` matches ``x.a.test``, not
    ``a.test`` nor ``y.x.a.test``); anything else gets the default."""

    def __init__(self, default: T | None = None) -> None:
        self.default = default
        self._exact: dict[str, T] = {}
        self._wild: dict[str, T] = {}

    def add(self, pattern: str, value: T) -> bool:
        """Add ``pattern``; False (and no change) if it is already mapped."""
        p = check_name_pattern(pattern)
        if p.startswith("*."):
            table, key = self._wild, p[2:]
        else:
            table, key = self._exact, p
        if key in table:
            return False
        table[key] = value
        return True

    def lookup(self, name: str | None) -> T | None:
        """The value for ``name`` (already normalised, as L{ClientHello} gives it)."""
        if name:
            v = self._exact.get(name)
            if v is not None:
                return v
            dot = name.find(".")
            if dot > 0:
                v = self._wild.get(name[dot + 1:])
                if v is not None:
                    return v
        return self.default

    def patterns(self) -> Iterable[tuple[str, T]]:
        yield from self._exact.items()
        for k, v in self._wild.items():
            yield "*." + k, v


@attrs.define
class SNIRouter:
    """Passthrough routing: server name -> pool name (None: no pool, close)."""

    table: NameTable[str]

    @classmethod
    def from_routes(cls, routes: Mapping[str, str], default: str | None) -> "SNIRouter":
        """Raises ValueError on a bad or repeated name."""
        t: NameTable[str] = NameTable(default)
        for pattern, pool in routes.items():
            if not t.add(pattern, pool):
                raise ValueError(f"server name {pattern!r} is routed twice")
        return cls(t)

    def route(self, server_name: str | None) -> str | None:
        return self.table.lookup(server_name)
