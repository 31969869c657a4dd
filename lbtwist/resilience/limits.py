# -*- test-case-name: tests.test_resilience_limits -*-
"""Per-pool concurrency limits (Envoy-style circuit breaking), sans-IO.

Over a limit, work is refused at once (L7: 503 with a header naming the limit)
instead of queueing without bound: memory stays flat and the client learns
quickly. Each admitted unit holds a L{Slot}; releasing it twice is harmless,
which keeps the data plane's error paths simple.
"""
from __future__ import annotations

import enum

import attrs


class Limit(str, enum.Enum):
    """The limits, named as their config keys (and in the overflow header)."""

    #: Open connections to the pool's backends (L7 upstream, or L4 relayed).
    CONNECTIONS = "max_connections"
    #: Requests waiting for a backend connection to become available.
    PENDING = "max_pending"
    #: Requests in flight to the pool, retries included.
    REQUESTS = "max_requests"
    #: Retries in flight to the pool.
    RETRIES = "max_retries"


#: Response header naming the limit that refused a request (with a 503).
LIMIT_HEADER = "x-lbtwist-limit"


class Slot:
    """One admitted unit of a limit; L{release} it when the work ends."""

    __slots__ = ("_limits", "kind", "released")

    def __init__(self, limits: "PoolLimits", kind: Limit) -> None:
        self._limits = limits
        self.kind = kind
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._limits._in_use[self.kind] -= 1

    def __repr__(self) -> str:
        return f"<Slot {self.kind.value}{' released' if self.released else ''}>"


@attrs.frozen
class LimitSettings:
    max_connections: int = 1024
    max_pending: int = 256
    max_requests: int = 1024
    max_retries: int = 3

    def __attrs_post_init__(self) -> None:
        for kind in Limit:
            if getattr(self, kind.value) < 0:
                raise ValueError(f"limits: {kind.value} must be >= 0")

    @classmethod
    def from_config(cls, cfg) -> "LimitSettings":
        return cls(
            max_connections=cfg.max_connections,
            max_pending=cfg.max_pending,
            max_requests=cfg.max_requests,
            max_retries=cfg.max_retries,
        )


class PoolLimits:
    """Counters against L{LimitSettings} for one pool."""

    def __init__(self, settings: LimitSettings = LimitSettings(), name: str = "") -> None:
        self.settings = settings
        self.name = name
        self._max = {kind: getattr(settings, kind.value) for kind in Limit}
        self._in_use = {kind: 0 for kind in Limit}
        #: Refusals per limit (counters for metrics).
        self.refused = {kind: 0 for kind in Limit}

    def in_use(self, kind: Limit) -> int:
        return self._in_use[kind]

    def available(self, kind: Limit) -> bool:
        """Would L{try_acquire} succeed? No side effect, no refusal counted."""
        return self._in_use[kind] < self._max[kind]

    def try_acquire(self, kind: Limit) -> Slot | None:
        """A slot of ``kind``, or None (counted in L{refused}) when the limit is reached."""
        if self._in_use[kind] >= self._max[kind]:
            self.refused[kind] += 1
            return None
        self._in_use[kind] += 1
        return Slot(self, kind)

    def reconfigure(self, settings: LimitSettings) -> None:
        """New limits on reload; slots held keep counting against them."""
        self.settings = settings
        self._max = {kind: getattr(settings, kind.value) for kind in Limit}


def overflow_headers(kind: Limit) -> list[tuple[bytes, bytes]]:
    """Headers for the immediate 503 when ``kind`` refused a request."""
    return [(LIMIT_HEADER.encode(), kind.value.encode())]
