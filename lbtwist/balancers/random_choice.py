"""``random``: a uniformly random eligible backend, ignoring weights and load.

Useful as a baseline and where many independent balancers must not
synchronise. Slow start as in round_robin: a ramping backend drawn is kept
with probability ``ramp``, otherwise another draw is made.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import EligibleCache, NoFeedback, admits
from lbtwist.balancers.options import check_known
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext


@implementer(IBalancer)
class RandomChoice(NoFeedback):
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._eligible = EligibleCache()

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        pool = self._eligible(candidates, ctx)
        if not pool:
            return None
        choice = self._rng.choice
        b = choice(pool)
        # Bounded redraws: with every backend ramping at 10% the loop still ends.
        for _ in range(4 * len(pool)):
            if admits(b, ctx.now, self._rng):
                break
            b = choice(pool)
        return b


def make_random(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> RandomChoice:
    check_known("random", options, ())
    return RandomChoice(rng)
