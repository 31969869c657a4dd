"""What is wrong with a configuration file, said once per problem with where.

The loader and the validator both produce L{Problem}s; L{ConfigError} carries
them to the command line, where each becomes one ``FILE:LINE: path: message``
line (no traceback), so an operator can fix every problem in one pass.
"""
from __future__ import annotations

import re
from typing import Iterable, Literal

import attrs

Severity = Literal["error", "warning"]

#: Keys that can be written bare in a path (``pools[0].name``); others are quoted.
_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def key_path(parent: str, key: str) -> str:
    """The path of mapping entry ``key`` under ``parent``."""
    if not _BARE_KEY.match(key):
        return f"{parent}[{key!r}]"
    return f"{parent}.{key}" if parent else key


def index_path(parent: str, index: int) -> str:
    """The path of list item ``index`` under ``parent``."""
    return f"{parent}[{index}]"


def is_under(path: str, prefix: str) -> bool:
    """Is ``path`` the same as ``prefix`` or inside it? (``pools[1]`` is not under ``pools[10]``)."""
    if path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix == "" or path[len(prefix)] in ".["


def num(value: float) -> str:
    """A number as written in the file, for messages: ``1000001`` (never
    ``1e+06`` as ``%g`` would print it), ``0.25``, ``1e-07``; a whole float
    without its ``.0``. Fractions keep 15 significant digits (every decimal a
    config can spell exactly, without the noise of sums like 0.1 x 3)."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**63:
            return str(int(value))
        return format(value, ".15g")
    return str(value)


Positions = dict[str, int]


def line_of(positions: Positions, path: str) -> int | None:
    """The line of ``path``, else of its nearest ancestor that has one."""
    while True:
        if path in positions:
            return positions[path]
        if not path:
            return None
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""


@attrs.frozen
class Problem:
    """One thing wrong (or suspicious) in a config file."""

    severity: Severity
    #: Key path such as ``pools[0].backends[1].address``; "" for the whole file.
    path: str
    message: str
    file: str | None = None
    #: 1-based line, when known.
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        parts = [where]
        if self.severity == "warning":
            parts.append("warning")
        if self.path:
            parts.append(self.path)
        # one line per problem, even when a plugin's message spans several
        parts.append("; ".join(x.strip() for x in self.message.splitlines() if x.strip()))
        return ": ".join(parts)


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    """File order (by line), problems without a line last; stable otherwise."""
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


class ConfigError(Exception):
    """The configuration cannot be used. ``str()`` is one line per problem."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sort_problems(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]
