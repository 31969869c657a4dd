# -*- test-case-name: tests.test_resilience_budget -*-
"""Retry budgets, sans-IO: retries may be at most ``percent`` of the requests
seen over a sliding window, plus a small floor of ``min_per_second`` retries
per second so that a quiet route can still retry.

This is what bounds load amplification however bad things get: over any
window, the backends receive at most ``requests * (1 + percent/100) +
min_per_second * window`` tries. When the budget is spent the request fails
fast with its original error and L{RetryBudget.exhausted} counts it.

The window is a ring of ``slots`` counters (default 10, so a 10 s window moves
in 1 s steps): O(1) per request, O(slots) per retry decision, constant memory.
"""
from __future__ import annotations

import attrs


class RetryBudget:
    """One budget: per route, or pool-wide across routes."""

    __slots__ = (
        "percent", "min_per_second", "window", "slots", "name",
        "_width", "_epochs", "_requests", "_retries", "exhausted", "retries_total",
        "requests_total", "_cur_start", "_cur_end", "_cur_i",
    )

    def __init__(
        self,
        percent: float = 10.0,
        min_per_second: float = 3.0,
        window: float = 10.0,
        *,
        slots: int = 10,
        name: str = "",
    ) -> None:
        if percent < 0:
            raise ValueError("budget_percent must be >= 0")
        if min_per_second < 0:
            raise ValueError("min_retries_per_second must be >= 0")
        if window <= 0:
            raise ValueError("budget window must be > 0")
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.percent = float(percent)
        self.min_per_second = float(min_per_second)
        self.window = float(window)
        self.slots = slots
        self.name = name
        self._width = self.window / slots
        self._epochs = [-1] * slots
        self._requests = [0] * slots
        self._retries = [0] * slots
        #: The slot requests are being counted in, and its time span: a
        #: request inside the span costs two comparisons and an increment.
        self._cur_i = 0
        self._cur_start = self._cur_end = float("-inf")
        #: Retries refused because this budget was spent (a counter for metrics).
        self.exhausted = 0
        #: Retries granted, ever.
        self.retries_total = 0
        #: Requests seen, ever.
        self.requests_total = 0

    # -- ring ---------------------------------------------------------------

    def _slot(self, now: float) -> int:
        epoch = int(now // self._width)
        i = epoch % self.slots
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _sums(self, now: float) -> tuple[int, int]:
        epoch = int(now // self._width)
        oldest = epoch - self.slots
        req = ret = 0
        for i in range(self.slots):
            e = self._epochs[i]
            if oldest < e <= epoch:
                req += self._requests[i]
                ret += self._retries[i]
        return req, ret

    # -- accounting ---------------------------------------------------------

    def record_request(self, now: float) -> None:
        """A client request (its first try) was seen: it earns retry credit."""
        if self._cur_start <= now < self._cur_end:  # runs for every request: the short way
            self._requests[self._cur_i] += 1
        else:
            i = self._cur_i = self._slot(now)
            epoch = self._epochs[i]
            self._cur_start = epoch * self._width
            self._cur_end = (epoch + 1) * self._width
            self._requests[i] += 1
        self.requests_total += 1

    def allowance(self, now: float) -> float:
        """Retries the window may hold at ``now``: percent of its requests plus the floor."""
        req, _ = self._sums(now)
        return req * self.percent / 100.0 + self.min_per_second * self.window

    def can_retry(self, now: float) -> bool:
        """Would one more retry stay within the budget? No side effect."""
        req, ret = self._sums(now)
        return ret + 1 <= req * self.percent / 100.0 + self.min_per_second * self.window

    def record_retry(self, now: float) -> None:
        """A retry was sent: it spends budget."""
        self._retries[self._slot(now)] += 1
        self.retries_total += 1

    def try_retry(self, now: float) -> bool:
        """Spend budget for one retry if there is some; count a refusal if not."""
        if self.can_retry(now):
            self.record_retry(now)
            return True
        self.exhausted += 1
        return False

    def snapshot(self, now: float) -> "BudgetSnapshot":
        req, ret = self._sums(now)
        return BudgetSnapshot(
            requests=req, retries=ret, allowance=self.allowance(now), exhausted=self.exhausted
        )


@attrs.frozen
class BudgetSnapshot:
    """What the admin API and metrics show about one budget."""

    requests: int
    retries: int
    allowance: float
    exhausted: int
