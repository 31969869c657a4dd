"""``least_connections``: the backend with the least outstanding work per unit
of weight, ``(active + 1) / effective_weight(now)``.

The ``+ 1`` makes weights count even when everything is idle (a weight-3
node is preferred over a weight-1 node at zero load) and slow start shows
through ``effective_weight``. Ties are broken with the injected rng, not by
position, so idle pools do not pile onto the first backend.

Its known trap (the field guide's opening story): a backend that turns slow
holds its connections longer, which least-connections partly notices; a
backend that fails fast looks idle and attracts work. Prefer ``p2c`` over
peak EWMA for variable-latency work.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import NoFeedback, least_loaded
from lbtwist.balancers.options import check_known
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext


def connection_load(backend: Backend, now: float) -> float:
    """Outstanding work per unit of effective weight (lower is better)."""
    return (backend.active + 1) / backend.effective_weight(now)


@implementer(IBalancer)
class LeastConnections(NoFeedback):
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        return least_loaded(candidates, ctx, connection_load, self._rng)


def make_least_connections(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> LeastConnections:
    check_known("least_connections", options, ())
    return LeastConnections(rng)
