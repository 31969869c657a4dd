"""A deadline that is cheap to move: the proxy re-arms its timeouts on every
request (header, body, keep-alive idle, response), and cancelling and
rescheduling a DelayedCall each time costs more than the work it guards.

L{Deadline} keeps one DelayedCall and only reschedules it when the deadline
moves *earlier*; when the call fires early (the deadline moved later) it
re-arms itself for the rest. Clearing is an attribute store.

L{TimerHeap} holds the deadlines of many connections (a listener's client
connections) in one heap behind one DelayedCall, and expires at most
``batch`` of them per reactor pass. Measured under a flood of idle and
slowloris connections (docs/drills.md, flood): connections opened in one
burst time out in one burst, and expiring thousands in a single
``runUntilCurrent`` (each writes a 408 and closes) stalled every established
connection for a second or more; in batches, reads and writes of the others
run between two batches.
"""
from __future__ import annotations

import heapq
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

#: Deadlines a L{TimerHeap} expires per reactor pass at most.
EXPIRY_BATCH = 8


class TimerHeap:
    """Deadlines of many connections behind one DelayedCall (see module doc).

    Each entry is ``[when, seq, deadline]``; a deadline has at most one live
    entry. An entry it moved away from, or cancelled, is made stale by
    dropping its deadline reference (so a closed connection is not kept
    alive by its old entry, as Twisted's cancelled DelayedCalls drop their
    function); stale entries are skipped when popped, and the heap is
    rebuilt when they outnumber the live ones. Push and pop are O(log n); a
    deadline pushed later than its live entry is not pushed at all (it
    re-arms when that entry comes due), so a deadline moved on every request
    costs nothing.
    """

    def __init__(self, clock: IReactorTime, batch: int = EXPIRY_BATCH) -> None:
        if batch < 1:
            raise ValueError("a TimerHeap expires at least one deadline per pass")
        self._clock = clock
        self.batch = batch
        self._heap: list[list[Any]] = []
        self._seq = 0
        self._call: Any = None
        self._at = float("inf")
        #: Deadlines with a live entry.
        self.live = 0
        #: Reactor passes that left due deadlines for the next pass.
        self.deferred_passes = 0

    def __len__(self) -> int:
        return self.live

    def _push(self, d: "Deadline", when: float) -> None:
        old = d._entry
        if old is None:
            self.live += 1
        else:
            old[2] = None
        self._seq += 1
        entry = [when, self._seq, d]
        d._entry = entry
        d._at = when
        heap = self._heap
        heapq.heappush(heap, entry)
        if len(heap) > 2 * self.live + 64:
            self._compact()
        if when < self._at:
            self._arm(when)

    def _drop(self, d: "Deadline") -> None:
        entry = d._entry
        if entry is not None:
            entry[2] = None
            d._entry = None
            self.live -= 1
            if not self.live:
                self.close()  # nothing left: leave the reactor clean

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[2] is not None]
        heapq.heapify(self._heap)

    def _arm(self, when: float) -> None:
        delay = max(0.0, when - self._clock.seconds())
        if self._call is not None and self._call.active():
            self._call.reset(delay)
        else:
            self._call = self._clock.callLater(delay, self._run)
        self._at = when

    def _run(self) -> None:
        self._call = None
        self._at = float("inf")
        now = self._clock.seconds()
        fired = 0
        while self._heap and self._heap[0][0] <= now:
            if fired >= self.batch:
                # the rest on the next pass, after everyone else's I/O
                self.deferred_passes += 1
                self._arm(now)
                return
            entry = heapq.heappop(self._heap)
            d = entry[2]
            if d is None:
                continue  # stale: moved or cancelled
            d._entry = None
            self.live -= 1
            if d._due(now):
                fired += 1
        if self._heap:
            self._arm(self._heap[0][0])

    def close(self) -> None:
        """Forget every deadline and the pending call (listener stopped)."""
        for e in self._heap:
            if e[2] is not None:
                e[2]._entry = None
        self._heap = []
        self.live = 0
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._at = float("inf")


class Deadline:
    """``fire(kind)`` once the clock passes the deadline last ``set``.

    With ``heap`` the deadline lives in that shared L{TimerHeap} (one
    DelayedCall for all of them); without, it keeps its own DelayedCall."""

    __slots__ = ("_clock", "_fire", "_call", "_at", "when", "kind", "_heap", "_entry")

    def __init__(self, clock: IReactorTime, fire: Callable[[Any], None], heap: TimerHeap | None = None) -> None:
        self._clock = clock
        self._fire = fire
        self._call: Any = None
        #: When the pending call (or live heap entry) fires.
        self._at = 0.0
        self.when: float | None = None
        self.kind: Any = None
        self._heap = heap
        #: The live heap entry (None: none).
        self._entry: list[Any] | None = None

    def set(self, delay: float, kind: Any) -> None:
        """Expire ``delay`` seconds from now with ``kind`` (replaces any previous)."""
        clock = self._clock
        when = clock.seconds() + delay
        self.when = when
        self.kind = kind
        heap = self._heap
        if heap is not None:
            if self._entry is None or self._at > when:
                heap._push(self, when)
            return
        if self._call is None:
            self._call = clock.callLater(delay, self._expired)
            self._at = when
        elif self._at > when:
            self._call.reset(delay)
            self._at = when

    def set_at(self, when: float, kind: Any) -> None:
        """Like L{set} with an absolute time (saves a clock read when the
        caller already has the time)."""
        self.when = when
        self.kind = kind
        heap = self._heap
        if heap is not None:
            if self._entry is None or self._at > when:
                heap._push(self, when)
            return
        if self._call is None:
            self._call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._expired)
            self._at = when
        elif self._at > when:
            self._call.reset(max(0.0, when - self._clock.seconds()))
            self._at = when

    def clear(self) -> None:
        """No deadline (the pending call, if any, fires harmlessly)."""
        self.when = None

    def cancel(self) -> None:
        """No deadline and no pending call (on close: leave the reactor clean)."""
        self.when = None
        if self._heap is not None:
            self._heap._drop(self)
            return
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    @property
    def active(self) -> bool:
        return self.when is not None

    def _expired(self) -> None:
        self._call = None
        when = self.when
        if when is None:
            return
        now = self._clock.seconds()
        if now < when:
            self._call = self._clock.callLater(when - now, self._expired)
            self._at = when
            return
        self.when = None
        self._fire(self.kind)

    def _due(self, now: float) -> bool:
        """Its heap entry came due: fire, or re-enter the heap for a deadline
        moved later. True when it fired."""
        when = self.when
        if when is None:
            return False
        if now < when:
            self._heap._push(self, when)  # type: ignore[union-attr]
            return False
        self.when = None
        self._fire(self.kind)
        return True


class ExchangeTimers:
    """The reactor side of an exchange's L{lbtwist.l7.machine.Timers}: one
    DelayedCall per kind, firing ``exchange.timer_fired(kind)``. Built only
    for an exchange that needs a timer (queued for a connection, waiting to
    retry), so the common request pays nothing."""

    __slots__ = ("_clock", "_target", "_calls")

    def __init__(self, clock: IReactorTime, target: Any) -> None:
        self._clock = clock
        self._target = target
        self._calls: dict[str, Any] = {}

    def start(self, kind: str, delay: float) -> None:
        self.cancel(kind)
        self._calls[kind] = self._clock.callLater(delay, self._fire, kind)

    def cancel(self, kind: str) -> None:
        call = self._calls.pop(kind, None)
        if call is not None and call.active():
            call.cancel()

    def _fire(self, kind: str) -> None:
        self._calls.pop(kind, None)
        self._target.timer_fired(kind)
