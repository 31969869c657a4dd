"""Checking ``algorithm_options`` for balancer factories.

Options arrive as a raw dict from YAML (the generic loader cannot know each
algorithm's keys), so every factory validates its own and raises ValueError
with a message that names the bad option: a typo must fail at config load,
not silently fall back to a default in production.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from lbtwist.registry import suggest

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(us|µs|ms|s|m|h)?\s*$")
_UNITS = {None: 1.0, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def check_known(algorithm: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Reject option names the algorithm does not take."""
    known = list(known)
    for name in options:
        if name not in known:
            if known:
                hint = suggest(str(name), known) or f"; valid options: {', '.join(known)}"
            else:
                hint = f"; {algorithm} takes no options"
            raise ValueError(f"{algorithm}: unknown option {name!r}{hint}")


def duration(algorithm: str, name: str, value: Any, *, minimum: float = 0.0) -> float:
    """Seconds from a number (seconds) or a string like ``250ms``, ``10s``, ``1m``."""
    if isinstance(value, bool):
        raise ValueError(f"{algorithm}: {name} must be a duration like 10s or 250ms, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{algorithm}: {name} must be a duration like 10s or 250ms, not {value!r}")
    if not seconds >= minimum:  # also rejects NaN
        raise ValueError(f"{algorithm}: {name} must be at least {minimum:g}s, not {value!r}")
    return seconds


def integer(algorithm: str, name: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """A whole number within bounds (YAML ``160``; ``160.0`` is refused as a likely mistake)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{algorithm}: {name} must be an integer, not {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{algorithm}: {name} must be {bound}, not {value!r}")
    return value


def number(algorithm: str, name: str, value: Any, *, minimum: float, maximum: float) -> float:
    """A real number within bounds (YAML ``1.25`` or ``2``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{algorithm}: {name} must be a number, not {value!r}")
    if not minimum <= value <= maximum:  # also rejects NaN
        raise ValueError(f"{algorithm}: {name} must be between {minimum:g} and {maximum:g}, not {value!r}")
    return float(value)


def choice(algorithm: str, name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        hint = suggest(str(value), allowed)
        raise ValueError(f"{algorithm}: {name} must be one of {', '.join(allowed)}, not {value!r}{hint}")
    return value
