"""The L7 data plane with a rate limiter that answers later (a fleet limiter
waiting on Redis): the request continues when the decision comes, its body
(which may have fully arrived meanwhile) is forwarded once and whole, a
refusal is a 429, and a client that went away meanwhile costs nothing."""
from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor

from lbtwist.resilience.ratelimit import RateDecision
from support.l7 import connect
from test_resilience_integration import get, lb_with, pause, shutdown, status


class HeldLimiter:
    """Decides nothing until the test says so."""

    limited = 0

    def __init__(self):
        self.waiting: list[defer.Deferred] = []

    def check_request(self, head, now):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


def hold(lb):
    lim = HeldLimiter()
    for rr in lb.runtime.resilience.routes["web"].values():
        if rr.rate_limiter is not None:
            rr.rate_limiter = lim
    return lim


async def until(fn, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if fn():
            return
        await pause(0.01)
    raise AssertionError("not reached in time")


ROUTE = "        rate_limit: {rate: 100, key: client}\n        buffering: request"


@pytest_twisted.ensureDeferred
async def test_allowed_later_forwards_the_whole_body_once():
    lb, origins = await lb_with([status(200)], route=ROUTE)
    try:
        lim = hold(lb)
        body = b"x" * 5000
        d = defer.ensureDeferred(get(lb.port, "/up", method="POST", body=body))
        await until(lambda: lim.waiting)
        await pause(0.05)  # the whole body has arrived while the decision is pending
        assert origins[0].requests == []
        lim.waiting[0].callback(RateDecision(True))
        resp = await d
        assert resp.status == 200
        assert len(origins[0].requests) == 1 and origins[0].requests[0].body == body
    finally:
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_refused_later_is_a_429_with_retry_after():
    lb, origins = await lb_with([status(200)], route=ROUTE)
    try:
        lim = hold(lb)
        d = defer.ensureDeferred(get(lb.port, "/r"))
        await until(lambda: lim.waiting)
        lim.waiting[0].callback(RateDecision(False, 2.5))
        resp = await d
        assert resp.status == 429 and resp.header(b"retry-after") == b"3"
        assert origins[0].requests == []
    finally:
        await shutdown(lb, origins)


@pytest_twisted.ensureDeferred
async def test_client_gone_before_the_decision_costs_nothing():
    lb, origins = await lb_with([status(200)], route=ROUTE)
    try:
        lim = hold(lb)
        c = await connect(reactor, lb.port)
        c.transport.write(b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\n")
        await until(lambda: lim.waiting)
        c.transport.abortConnection()
        await pause(0.05)
        lim.waiting[0].callback(RateDecision(True))
        await pause(0.05)
        assert origins[0].requests == []
        d = defer.ensureDeferred(get(lb.port, "/after"))  # and the listener is fine
        await until(lambda: len(lim.waiting) == 2)
        lim.waiting[1].callback(RateDecision(True))
        assert (await d).status == 200
        assert [r.url for r in origins[0].requests] == [b"/after"]
    finally:
        for d in lim.waiting[1:]:
            if not d.called:
                d.callback(RateDecision(True))
        await shutdown(lb, origins)
