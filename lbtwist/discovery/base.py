"""What every discovery source shares: the endpoints it reports and the guard
that stands between a source and its pool.

A source (DNS, a file, a plugin) only reports: ``tracker.update(endpoints)``
after a good answer, ``tracker.failed(reason)`` after a bad one. The
L{SourceTracker} decides what the pool sees:
  - a failure (timeout, SERVFAIL, NXDOMAIN, an empty answer, a missing or
    broken file) never empties a pool: the last known set stays, the failure
    is logged once (and the recovery once), and the state and age show in the
    admin API and ``/metrics``;
  - an answer that removes more than ``max_shrink`` percent of the current
    set at once is held until the next answer confirms it (a half-propagated
    DNS change or a file written in two steps must not drain half a fleet).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import attrs
from twisted.logger import Logger

from lbtwist.pool import split_address

log = Logger(namespace="lbtwist.discovery")

#: Default for ``max_shrink``: a source may remove up to half its set at once.
DEFAULT_MAX_SHRINK = 50.0


@attrs.frozen
class Endpoint:
    """One backend as a source reports it."""

    address: str
    weight: float = 1.0
    name: str | None = None
    #: SRV priority: lower is preferred; 0 for sources without priorities.
    priority: int = 0

    def __attrs_post_init__(self) -> None:
        split_address(self.address)  # raises ValueError naming the address
        if not self.weight >= 0:
            raise ValueError(f"backend {self.address}: weight must be >= 0, not {self.weight!r}")


class Tracker(Protocol):
    def update(self, endpoints: Iterable[Endpoint]) -> None: ...
    def failed(self, reason: str) -> None: ...


class Source(Protocol):
    """What a source (built-in or plugin) provides. ``start`` begins
    reporting to ``tracker`` (the first answer may come later); ``stop`` ends
    every timer, watch and query it holds."""

    #: Short kind ("dns", "file", a plugin's name) and what it watches, for logs and the admin API.
    kind: str
    target: str

    def start(self, tracker: Tracker) -> None: ...
    def stop(self) -> None: ...


@attrs.define(eq=False)
class SourceTracker:
    """The guard between one source and its pool (see the module doc)."""

    pool: str
    kind: str
    target: str
    clock: Any
    on_change: Callable[[], None]
    max_shrink: float = DEFAULT_MAX_SHRINK
    #: The set the pool uses; None until the first good answer.
    accepted: tuple[Endpoint, ...] | None = None
    #: A shrinking answer waiting for confirmation.
    held: tuple[Endpoint, ...] | None = None
    state: str = "starting"
    last_error: str | None = None
    last_ok_at: float | None = None
    changed_at: float | None = None
    failures: int = 0
    updates: int = 0

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        new = _canonical(endpoints)
        if not new:
            self.failed("empty answer")
            return
        now = self.clock.seconds()
        old = self.accepted
        if old is not None and self._shrinks_too_much(old, new):
            if self.held != new:
                if self.held is None:
                    log.warn(
                        "pool {pool}: discovery {kind} {target}: answer removes {n} of {m} backends "
                        "(more than max_shrink {s:g}%): held until the next answer confirms it",
                        pool=self.pool, kind=self.kind, target=self.target,
                        n=len(_addresses(old) - _addresses(new)), m=len(old), s=self.max_shrink,
                    )
                self.held = new
                self.state = "held"
                self.last_ok_at = now
                return
            log.info("pool {pool}: discovery {kind} {target}: shrink confirmed, applying",
                     pool=self.pool, kind=self.kind, target=self.target)
        self.held = None
        if self.state == "failing":
            log.info("pool {pool}: discovery {kind} {target}: recovered ({n} backends)",
                     pool=self.pool, kind=self.kind, target=self.target, n=len(new))
        self.state = "ok"
        self.last_error = None
        self.last_ok_at = now
        if new != old:
            self.accepted = new
            self.changed_at = now
            self.updates += 1
            self.on_change()

    def failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if self.state != "failing":
            kept = len(self.accepted) if self.accepted is not None else 0
            log.warn(
                "pool {pool}: discovery {kind} {target} failing ({reason}); keeping the last "
                "known {n} backends",
                pool=self.pool, kind=self.kind, target=self.target, reason=reason, n=kept,
            )
            self.state = "failing"

    def _shrinks_too_much(self, old: tuple[Endpoint, ...], new: tuple[Endpoint, ...]) -> bool:
        removed = len(_addresses(old) - _addresses(new))
        return removed * 100.0 > self.max_shrink * len(old)

    def status(self, now: float) -> dict[str, Any]:
        """For the admin API and ``/metrics``."""
        return {
            "kind": self.kind,
            "target": self.target,
            "state": self.state,
            "up": self.state in ("ok", "held"),
            "backends": len(self.accepted) if self.accepted is not None else 0,
            "held_backends": len(self.held) if self.held is not None else None,
            "age_seconds": None if self.last_ok_at is None else round(now - self.last_ok_at, 3),
            "last_error": self.last_error,
            "failures_total": self.failures,
            "updates_total": self.updates,
        }


def _canonical(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """Sorted by address, one entry per address (the first wins)."""
    out: dict[str, Endpoint] = {}
    for e in endpoints:
        out.setdefault(e.address, e)
    return tuple(out[a] for a in sorted(out))


def _addresses(endpoints: Iterable[Endpoint]) -> set[str]:
    return {e.address for e in endpoints}


def select_priority(endpoints: Iterable[Endpoint], in_rotation: Callable[[str], bool]) -> dict[str, float]:
    """Weights per address after SRV priority: the most preferred (lowest)
    priority group with a backend in rotation keeps its weights, every other
    group gets weight 0 (kept in the pool and health-checked, taking no new
    work). With none in rotation anywhere, the most preferred group is used.
    In a group whose weights are all 0, each member gets weight 1 (RFC 2782:
    weight 0 only means "rarely" next to others)."""
    groups: dict[int, list[Endpoint]] = {}
    for e in endpoints:
        groups.setdefault(e.priority, []).append(e)
    if not groups:
        return {}
    order = sorted(groups)
    active = next((p for p in order if any(in_rotation(e.address) for e in groups[p])), order[0])
    out: dict[str, float] = {}
    for p in order:
        members = groups[p]
        all_zero = all(e.weight == 0 for e in members)
        for e in members:
            out[e.address] = (1.0 if all_zero else e.weight) if p == active else 0.0
    return out
