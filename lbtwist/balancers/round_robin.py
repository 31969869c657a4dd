"""``round_robin``: each eligible backend in turn, ignoring weights and load.

Slow start: a backend whose ramp is below 1 takes its turn only with
probability ``ramp`` (the turn passes to the next backend otherwise), so a
node that just joined is not handed a full share while cold.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import NoFeedback, admits
from lbtwist.balancers.options import check_known
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext


@implementer(IBalancer)
class RoundRobin(NoFeedback):
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._candidates: Sequence[Backend] | None = None
        self._next = 0
        self._last: Backend | None = None

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        n = len(candidates)
        if not n:
            return None
        if candidates is not self._candidates:
            # Membership changed: carry on after the backend served last, so a
            # health flap elsewhere does not restart the rotation at the top.
            self._candidates = candidates
            if self._last is not None and self._last in candidates:
                self._next = candidates.index(self._last) + 1
        start = self._next
        exclude = ctx.exclude
        b = candidates[start % n]
        if b.weight > 0 and b.slow_start <= 0 and not (exclude and b in exclude):
            return self._take(candidates, start)  # the common case: the first in turn, no loop
        first = -1
        for i in range(n):
            b = candidates[(start + i) % n]
            if b.weight <= 0 or (exclude and b in exclude):
                continue
            if first < 0:
                first = i
            if admits(b, ctx.now, self._rng):
                return self._take(candidates, start + i)
        if first < 0:
            return None
        # Every eligible backend lost its slow-start coin: serve the next one anyway.
        return self._take(candidates, start + first)

    def _take(self, candidates: Sequence[Backend], index: int) -> Backend:
        n = len(candidates)
        b = candidates[index % n]
        self._next = (index + 1) % n
        self._last = b
        return b


def make_round_robin(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> RoundRobin:
    check_known("round_robin", options, ())
    return RoundRobin(rng)
