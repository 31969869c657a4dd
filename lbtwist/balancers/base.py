"""What every algorithm shares: which candidates may take this work, and the
slow-start coin flip for algorithms that do not weigh load.

Rules common to all built-ins (IBalancer's contract):
  - a backend in ``ctx.exclude`` (already tried for this work) is never
    returned; when every candidate is excluded the answer is None;
  - a backend whose configured weight is 0 takes no new work;
  - ``candidates`` may change between calls (membership, health, weights), so
    state keyed by backend survives a new tuple and tables are rebuilt lazily.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from lbtwist.pool import Backend, PickContext


def eligible(candidates: Sequence[Backend], ctx: PickContext) -> list[Backend]:
    """Candidates that may take this work: not excluded, weight above zero."""
    exclude = ctx.exclude
    if exclude:
        return [b for b in candidates if b.weight > 0 and b not in exclude]
    return [b for b in candidates if b.weight > 0]


class EligibleCache:
    """L{eligible} for hot paths: without exclusions the answer depends only on
    the candidate tuple, which the pool hands out unchanged until membership,
    health or weights change (IBalancer's contract), so compute it once per tuple."""

    __slots__ = ("_candidates", "_eligible")

    def __init__(self) -> None:
        self._candidates: Sequence[Backend] | None = None
        self._eligible: list[Backend] = []

    def __call__(self, candidates: Sequence[Backend], ctx: PickContext) -> list[Backend]:
        if ctx.exclude:
            return eligible(candidates, ctx)
        if candidates is not self._candidates:
            self._candidates = candidates
            self._eligible = [b for b in candidates if b.weight > 0]
        return self._eligible


def least_loaded(
    candidates: Sequence[Backend], ctx: PickContext, load: Callable[[Backend, float], float], rng: random.Random,
) -> Backend | None:
    """The eligible candidate with the lowest ``load(backend, now)``; ties are
    broken uniformly at random (reservoir sampling: each of k tied backends
    wins with probability 1/k), so equal backends share work."""
    exclude = ctx.exclude
    now = ctx.now
    best: Backend | None = None
    best_load = 0.0
    ties = 0
    for b in candidates:
        if b.weight <= 0 or (exclude and b in exclude):
            continue
        x = load(b, now)
        if best is None or x < best_load:
            best, best_load, ties = b, x, 1
        elif x == best_load:
            ties += 1
            if rng.random() * ties < 1.0:
                best = b
    return best


def admits(backend: Backend, now: float, rng: random.Random) -> bool:
    """Slow start for algorithms that ignore weights and load (round_robin,
    random): a ramping backend takes its turn with probability ``ramp``, so a
    cold node joining at 10% sees about 10% of its share at first."""
    if backend.slow_start <= 0:
        return True
    ramp = backend.ramp(now)
    return ramp >= 1.0 or rng.random() < ramp


class NoFeedback:
    """Algorithms that do not learn from outcomes ignore start/finish events
    (and say so, so the pool does not call them at all)."""

    wants_outcomes = False

    def on_start(self, backend: Backend, now: float) -> None:
        pass

    def on_finish(self, backend: Backend, now: float, latency: float, ok: bool) -> None:
        pass
