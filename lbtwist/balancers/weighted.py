"""``weighted_round_robin``: smooth weighted round robin (the nginx scheme).

Plain weighted RR serves a weight-5 node five times in a row, a burst that
arrives while its peers idle. The smooth scheme interleaves: every pick, each
eligible backend's credit grows by its weight; the richest is served and pays
the total. Over any cycle of sum(weights) picks each backend gets exactly its
share, spread out (weights 5,1,1 give a a b a c a a).

Weights are ``effective_weight(now)``, so slow start lowers a joining
backend's share as it ramps; excluded backends sit the round out.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import NoFeedback
from lbtwist.balancers.options import check_known
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext


@implementer(IBalancer)
class SmoothWeightedRoundRobin(NoFeedback):
    def __init__(self) -> None:
        #: Accumulated credit per backend; kept across candidate changes.
        self._credit: dict[Backend, float] = {}
        self._candidates: Sequence[Backend] | None = None

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        if candidates is not self._candidates:
            self._candidates = candidates
            # Forget backends that left, so a returning one starts even.
            self._credit = {b: self._credit.get(b, 0.0) for b in candidates}
        credit = self._credit
        exclude = ctx.exclude
        now = ctx.now
        total = 0.0
        best: Backend | None = None
        best_credit = 0.0
        for b in candidates:
            if b.weight <= 0 or (exclude and b in exclude):
                continue
            w = b.effective_weight(now)
            c = credit[b] + w
            credit[b] = c
            total += w
            if best is None or c > best_credit:
                best, best_credit = b, c
        if best is not None:
            credit[best] = best_credit - total
        return best


def make_weighted_round_robin(
    options: dict[str, Any], *, clock: Any = None, rng: random.Random | None = None
) -> SmoothWeightedRoundRobin:
    check_known("weighted_round_robin", options, ())
    return SmoothWeightedRoundRobin()
