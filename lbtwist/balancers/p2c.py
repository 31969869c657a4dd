"""``p2c``: power of two choices. Draw two distinct eligible backends at
random and send the work to the less loaded one.

Why not "the least loaded of all": load signals lag, and every balancer (or
every request in a burst) that reads the same signal picks the same node,
which is then the most loaded (herding). Two random samples still steer away
from hot or slow nodes, the worst node is never chosen while any other is
drawn with it, and the choice stays spread out.

The load signal is ``algorithm_options: {load: peak_ewma}`` (default; latency
estimate times outstanding work, see L{lbtwist.balancers.ewma}) or
``{load: connections}`` (outstanding work). Both are divided by
``effective_weight(now)``, which carries weights and slow start. This is the
algorithm a pool gets when it names none.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import EligibleCache
from lbtwist.balancers.ewma import EWMA_OPTIONS, PeakEwmaLoad, load_options
from lbtwist.balancers.least_conn import connection_load
from lbtwist.balancers.options import check_known, choice
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext

LOADS = ("connections", "peak_ewma")


@implementer(IBalancer)
class PowerOfTwoChoices:
    def __init__(self, rng: random.Random, ewma: PeakEwmaLoad | None = None) -> None:
        """With ``ewma`` the load is peak EWMA cost; without, outstanding connections."""
        self._rng = rng
        self.ewma = ewma
        self._load: Callable[[Backend, float], float] = ewma.load if ewma is not None else connection_load
        self._eligible = EligibleCache()
        self._candidates: Sequence[Backend] | None = None

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        if self.ewma is not None and candidates is not self._candidates:
            self._candidates = candidates
            self.ewma.retain(candidates)
        pool = self._eligible(candidates, ctx)
        n = len(pool)
        if n <= 1:
            return pool[0] if n else None
        randrange = self._rng.randrange
        i = randrange(n)
        j = randrange(n - 1)
        if j >= i:
            j += 1
        a, b = pool[i], pool[j]
        now = ctx.now
        return a if self._load(a, now) <= self._load(b, now) else b

    def on_start(self, backend: Backend, now: float) -> None:
        pass  # outstanding work is read from backend.active, kept by the pool

    def on_finish(self, backend: Backend, now: float, latency: float, ok: bool) -> None:
        if self.ewma is not None:
            self.ewma.observe(backend, now, latency, ok)

    def latency_estimate(self, backend: Backend, now: float) -> float | None:
        """The peak EWMA estimate with ``load: peak_ewma``; None with
        ``load: connections`` (see L{lbtwist.pool.Pool.latency_estimate})."""
        return self.ewma.estimate(backend, now) if self.ewma is not None else None


def make_p2c(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> PowerOfTwoChoices:
    check_known("p2c", options, ("load",) + EWMA_OPTIONS)
    load = choice("p2c", "load", options.get("load", "peak_ewma"), LOADS)
    if load == "connections":
        extra = [k for k in EWMA_OPTIONS if k in options]
        if extra:
            raise ValueError(f"p2c: option {extra[0]!r} only applies with load: peak_ewma")
        return PowerOfTwoChoices(rng)
    return PowerOfTwoChoices(rng, load_options("p2c", options))
