"""A deadline that is cheap to move: the proxy re-arms its timeouts on every
request (header, body, keep-alive idle, response), and cancelling and
rescheduling a DelayedCall each time costs more than the work it guards.

L{Deadline} keeps one DelayedCall and only reschedules it when the deadline
moves *earlier*; when the call fires early (the deadline moved later) it
re-arms itself for the rest. Clearing is an attribute store.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime


class Deadline:
    """``fire(kind)`` once the clock passes the deadline last ``set``."""

    __slots__ = ("_clock", "_fire", "_call", "_at", "when", "kind")

    def __init__(self, clock: IReactorTime, fire: Callable[[Any], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._call: Any = None
        #: When the pending call fires (saves asking the DelayedCall).
        self._at = 0.0
        self.when: float | None = None
        self.kind: Any = None

    def set(self, delay: float, kind: Any) -> None:
        """Expire ``delay`` seconds from now with ``kind`` (replaces any previous)."""
        clock = self._clock
        when = clock.seconds() + delay
        self.when = when
        self.kind = kind
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
