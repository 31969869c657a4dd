"""Peak EWMA: the latency signal that makes a balancer shed a node going slow.

L{PeakEwma} is one peak-sensitive moving average (reused by passive outlier
detection). L{PeakEwmaLoad} keeps one per backend and turns it into a cost,
Finagle-style: ``latency estimate * (outstanding + 1) / effective_weight``.
L{PeakEwmaBalancer} (``peak_ewma``) sends work to the lowest cost; ``p2c``
uses the same cost on two random candidates.

Why peak-sensitive: a plain EWMA needs many slow samples before it moves, and
during a gray failure those samples are requests stuck on the bad node. Here
one slow observation raises the estimate at once; fast ones pull it down only
gradually (time constant ``decay``). Outstanding work multiplies the cost, so
a node whose requests stop completing repels new work before the first slow
answer even arrives.
"""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

from zope.interface import implementer

from lbtwist.balancers.base import least_loaded
from lbtwist.balancers.options import check_known, duration
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext

DEFAULT_DECAY = 10.0
DEFAULT_PENALTY = 1.0
DEFAULT_FAILURE_PENALTY = 0.1


class PeakEwma:
    """A peak-sensitive exponentially weighted moving average over time.

    An observation above the current estimate replaces it at once; one below
    is blended in with weight ``1 - exp(-elapsed / decay)``, so the estimate
    forgets at a rate set in seconds, not in samples (steady whatever the
    request rate). Reading with L{value} also decays the estimate toward zero
    with idle time, so a node that was slow and then left alone is eventually
    tried again (that retry is how recovery is noticed).
    """

    __slots__ = ("decay", "_value", "_stamp")

    def __init__(self, decay: float, now: float, initial: float = 0.0) -> None:
        if not decay > 0:
            raise ValueError("decay must be > 0")
        self.decay = decay
        self._value = initial
        self._stamp = now

    def observe(self, sample: float, now: float) -> None:
        if sample > self._value:
            self._value = sample
        else:
            elapsed = now - self._stamp
            w = math.exp(-elapsed / self.decay) if elapsed > 0 else 1.0
            self._value = self._value * w + sample * (1.0 - w)
        if now > self._stamp:
            self._stamp = now

    def value(self, now: float) -> float:
        """The estimate at ``now``, decayed for the time since the last observation."""
        elapsed = now - self._stamp
        if elapsed <= 0:
            return self._value
        return self._value * math.exp(-elapsed / self.decay)


class PeakEwmaLoad:
    """Per-backend peak EWMA latency and the cost derived from it.

    A backend never measured costs 0 while idle (so it gets a first request
    and is measured) and ``penalty * (outstanding + 1)`` once work is in
    flight: until its first answer it is treated as slow, so a cold or newly
    added node is probed, not flooded. A failed request is a penalty, not a
    sample: it is observed as ``failure_penalty`` on top of the larger of its
    own latency and the current estimate, so every failure raises the
    estimate and a node that fails fast never looks fast (the "black hole"
    that attracts all traffic); failures in a row push it further away.
    """

    def __init__(self, decay: float = DEFAULT_DECAY, penalty: float = DEFAULT_PENALTY,
                 failure_penalty: float = DEFAULT_FAILURE_PENALTY) -> None:
        self.decay = decay
        self.penalty = penalty
        self.failure_penalty = failure_penalty
        self._ewma: dict[Backend, PeakEwma] = {}

    def observe(self, backend: Backend, now: float, latency: float, ok: bool) -> None:
        e = self._ewma.get(backend)
        if e is None:
            e = self._ewma[backend] = PeakEwma(self.decay, now)
        if not ok:
            latency = max(latency, e.value(now)) + self.failure_penalty
        e.observe(latency, now)

    def estimate(self, backend: Backend, now: float) -> float | None:
        """The latency estimate in seconds, or None before the first answer."""
        e = self._ewma.get(backend)
        return None if e is None else e.value(now)

    def cost(self, backend: Backend, now: float) -> float:
        """Expected wait for one more unit of work on ``backend``, before weighting."""
        e = self._ewma.get(backend)
        pending = backend.active
        if e is None:
            return 0.0 if pending <= 0 else self.penalty * (pending + 1)
        return e.value(now) * (max(pending, 0) + 1)

    def load(self, backend: Backend, now: float) -> float:
        """Cost per unit of effective weight: lower is better. Slow start shows
        here: a backend ramping at 10% looks ten times as loaded."""
        return self.cost(backend, now) / backend.effective_weight(now)

    def retain(self, candidates: Sequence[Backend]) -> None:
        """Drop history of backends that left and have nothing in flight, so a
        pool whose membership churns does not grow without bound."""
        keep = set(candidates)
        for b in [b for b in self._ewma if b not in keep and b.active <= 0]:
            del self._ewma[b]


def load_options(algorithm: str, options: dict[str, Any]) -> PeakEwmaLoad:
    """Build a L{PeakEwmaLoad} from the ``decay``, ``penalty`` and
    ``failure_penalty`` options (shared by peak_ewma and p2c)."""
    decay = duration(algorithm, "decay", options.get("decay", DEFAULT_DECAY), minimum=0.001)
    penalty = duration(algorithm, "penalty", options.get("penalty", DEFAULT_PENALTY))
    failure_penalty = duration(
        algorithm, "failure_penalty", options.get("failure_penalty", DEFAULT_FAILURE_PENALTY)
    )
    return PeakEwmaLoad(decay, penalty, failure_penalty)


EWMA_OPTIONS = ("decay", "penalty", "failure_penalty")


@implementer(IBalancer)
class PeakEwmaBalancer:
    """``peak_ewma``: every eligible backend is scored, the cheapest wins (ties
    at random). Deterministic steering at the price of an O(n) scan and herd
    risk when many balancers share a pool; p2c trades a little precision for
    neither."""

    def __init__(self, load: PeakEwmaLoad, rng: random.Random) -> None:
        self.load = load
        self._rng = rng
        self._candidates: Sequence[Backend] | None = None

    def pick(self, candidates: Sequence[Backend], ctx: PickContext) -> Backend | None:
        if candidates is not self._candidates:
            self._candidates = candidates
            self.load.retain(candidates)
        return least_loaded(candidates, ctx, self.load.load, self._rng)

    def on_start(self, backend: Backend, now: float) -> None:
        pass  # outstanding work is read from backend.active, kept by the pool

    def on_finish(self, backend: Backend, now: float, latency: float, ok: bool) -> None:
        self.load.observe(backend, now, latency, ok)

    def latency_estimate(self, backend: Backend, now: float) -> float | None:
        """The peak EWMA estimate (see L{lbtwist.pool.Pool.latency_estimate})."""
        return self.load.estimate(backend, now)


def make_peak_ewma(options: dict[str, Any], *, clock: Any = None, rng: random.Random) -> PeakEwmaBalancer:
    check_known("peak_ewma", options, EWMA_OPTIONS)
    return PeakEwmaBalancer(load_options("peak_ewma", options), rng)
