# -*- test-case-name: tests.test_health_drain -*-
"""Draining one backend: no new work, in-flight work may finish until the
pool's ``drain_timeout``, then the data plane is told to close what is left.

The pool holds the state and announces it (``draining``, ``drained``,
``drain-expired``); this module only owns the timer, so config removal, the
admin API and shutdown all drain the same way.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from lbtwist.pool import Backend, Pool

#: How a drain ended: the last unit finished, the timeout ran out (the rest
#: was told to close), or the backend was taken out of draining first.
DRAINED, EXPIRED, UNDRAINED = "drained", "expired", "undrained"


def drain_backend(
    pool: Pool,
    backend: Backend,
    clock: IReactorTime,
    reason: str,
    timeout: float | None = None,
) -> defer.Deferred:
    """Mark ``backend`` draining. The Deferred fires with L{DRAINED},
    L{EXPIRED} or L{UNDRAINED}; cancelling it stops the timer (the backend
    stays draining)."""
    timeout = pool.drain_timeout if timeout is None else timeout
    timer: list[Any] = []

    def cancel(_: defer.Deferred) -> None:
        cleanup()

    d: defer.Deferred = defer.Deferred(canceller=cancel)

    def cleanup() -> None:
        pool.unsubscribe(listener)
        if timer and timer[0].active():
            timer[0].cancel()

    def finish(how: str) -> None:
        if d.called:
            return
        cleanup()
        d.callback(how)

    def listener(p: Pool, b: Backend | None, state: str, why: str) -> None:
        if b is not backend:
            return
        if state == "drained":
            finish(DRAINED)
        elif state in ("undrained", "removed"):
            finish(UNDRAINED if state == "undrained" else DRAINED if b.active <= 0 else EXPIRED)

    def expire() -> None:
        if d.called:
            return
        pool.drain_expired(backend)
        finish(EXPIRED)

    pool.subscribe(listener)
    timer.append(clock.callLater(timeout, expire))
    pool.set_draining(backend, True, reason)
    if backend.active <= 0:
        finish(DRAINED)
    return d
