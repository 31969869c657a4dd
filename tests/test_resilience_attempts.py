"""The per-request attempt planner, driven the way the L7 data plane will
drive it, against a real L{Pool}, on a task.Clock."""
import random

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from lbtwist.config.model import (
    CircuitBreakerConfig, PoolConfig, PoolLimitsConfig, RateLimitConfig,
    RetryBudgetConfig, RetryConfig, RouteConfig,
)
from lbtwist.interfaces import IBalancer
from lbtwist.pool import Backend, PickContext, Pool
from lbtwist.resilience import (
    Failure, Limit, PoolResilience, RequestRetryState, RetryBudget, RetryPolicy, RouteResilience,
)
from lbtwist.resilience.breaker import BreakerState


@implementer(IBalancer)
class RoundRobin:
    """Honours ctx.exclude as the IBalancer contract says."""

    def __init__(self):
        self.i = 0

    def pick(self, candidates, ctx):
        for _ in range(len(candidates)):
            b = candidates[self.i % len(candidates)]
            self.i += 1
            if b not in ctx.exclude:
                return b
        return None

    def on_start(self, backend, now):
        pass

    def on_finish(self, backend, now, latency, ok):
        pass


def make_pool(clock, n=3):
    return Pool("app", [Backend(f"127.0.0.1:{9000 + i}") for i in range(n)], RoundRobin(), clock)


def pool_res(**kw):
    kw.setdefault("limits", PoolLimitsConfig(max_retries=10**6, max_requests=10**6))
    return PoolResilience.from_config(PoolConfig(name="app", **kw))


def route_res(timeout=None, **retry):
    return RouteResilience.from_config(RouteConfig(pool="app", timeout=timeout, retry=RetryConfig(**retry)), name="r")


class Driver:
    """The thin loop the L7 proxy runs, with backends simulated by ``behave``:
    ``behave(backend, attempt) -> (outcome, failure, status, retry_after)``.
    Retry delays go through clock.callLater, so requests overlap in time."""

    def __init__(self, clock, pool, route, pres, behave, rng=None):
        self.clock, self.pool, self.route, self.pres, self.behave = clock, pool, route, pres, behave
        self.rng = rng or random.Random(1)
        self.sent = []        # (backend address, method) per attempt that reached a backend
        self.results = []     # final result per request
        self.states = []

    def request(self, method="GET", headers=(), replayable=True):
        state = self.route.start_request(self.pres, self.clock, self.rng, method=method, headers=headers)
        self.states.append(state)
        refused = state.admit()
        if refused is not None:
            state.finish()
            self.results.append(("503", refused.value))
            return
        self._attempt(state, method, replayable)

    def _attempt(self, state, method, replayable):
        now = self.clock.seconds()
        backend = self.pool.select(PickContext(now, exclude=state.pick_exclude(now)))
        if backend is None:
            state.finish()
            self.results.append(("fail", "no-backend"))
            return
        state.on_attempt_start(backend)
        self.pool.on_start(backend)
        outcome, failure, status, retry_after = self.behave(backend, state.attempts)
        if failure != Failure.CONNECT_FAILURE:
            self.sent.append((backend.address, method))
        state.on_attempt_finish(backend, outcome, status, retry_after)
        self.pool.on_finish(backend, 0.0, outcome == "ok", outcome)
        if outcome == "ok":
            state.finish()
            self.results.append(("ok", backend.address))
            return
        d = state.may_retry(failure, status, response_started=False, body_replayable=replayable)
        if not d.retry:
            state.finish()
            self.results.append(("fail", d.reason))
            return
        self.clock.callLater(d.delay, self._attempt, state, method, replayable)


def settle(clock, seconds, step=0.01):
    """Advance in small steps: Clock.advance jumps first, so a retry scheduled
    during one advance lands after it."""
    clock.pump([step] * int(seconds / step))


def always(outcome, failure=None, status=None, retry_after=None):
    return lambda backend, attempt: (outcome, failure, status, retry_after)


def test_get_reset_on_one_backend_succeeds_on_another():
    clock = Clock()
    pool = make_pool(clock)
    bad = pool.backends()[0]

    def behave(backend, attempt):
        if backend is bad:
            return ("gateway", Failure.RESET, None, None)
        return ("ok", None, 200, None)

    drv = Driver(clock, pool, route_res(), pool_res(), behave)
    drv.request("GET")
    settle(clock, 1.0)
    assert drv.results == [("ok", "127.0.0.1:9001")]
    assert [a for a, _ in drv.sent] == ["127.0.0.1:9000", "127.0.0.1:9001"]


def test_post_without_key_is_sent_exactly_once_whatever_happens():
    for failure, outcome, status in (
        (Failure.RESET, "gateway", None), (Failure.TIMEOUT, "gateway", None), (Failure.STATUS, "5xx", 503),
    ):
        clock = Clock()
        drv = Driver(clock, make_pool(clock), route_res(retry_on=["connect-failure", "reset", "timeout", 503],
                                                         max_attempts=5, per_try_timeout=1.0),
                     pool_res(circuit_breaker=CircuitBreakerConfig(consecutive_failures=0)),
                     always(outcome, failure, status))
        for _ in range(20):
            drv.request("POST")
        settle(clock, 10)
        assert len(drv.sent) == 20
        assert {r for r in drv.results} == {("fail", "non-idempotent")}


def test_post_is_never_sent_twice_with_breakers_on_either():
    clock = Clock()
    drv = Driver(clock, make_pool(clock), route_res(retry_on=["reset", "5xx"], max_attempts=3),
                 pool_res(circuit_breaker=CircuitBreakerConfig(consecutive_failures=5)),
                 always("5xx", Failure.STATUS, 503))
    for _ in range(30):
        drv.request("POST")
    settle(clock, 1)
    assert all(st.attempts <= 1 for st in drv.states)
    assert len(drv.sent) == sum(st.attempts for st in drv.states) == 15  # breakers opened after 5 each


def test_post_with_idempotency_key_is_retried():
    clock = Clock()
    pool = make_pool(clock)
    drv = Driver(clock, pool, route_res(), pool_res(), always("gateway", Failure.RESET))
    drv.request("POST", headers=[("idempotency-key", "abc")])
    settle(clock, 1)
    assert len(drv.sent) == 2 and drv.results == [("fail", "attempts-exhausted")]


def test_connect_failure_of_post_retried_only_when_asked():
    for any_method, attempts in ((False, 1), (True, 2)):
        clock = Clock()
        drv = Driver(clock, make_pool(clock), route_res(connect_failure_any_method=any_method), pool_res(),
                     always("gateway", Failure.CONNECT_FAILURE))
        drv.request("POST")
        settle(clock, 1)
        assert drv.states[0].attempts == attempts
        assert drv.sent == []  # a failed connect sends nothing


def test_retry_goes_to_a_backend_not_yet_tried_and_stops_when_none_left():
    clock = Clock()
    pool = make_pool(clock, n=2)
    drv = Driver(clock, pool, route_res(max_attempts=5), pool_res(), always("gateway", Failure.RESET))
    drv.request("GET")
    settle(clock, 5)
    assert sorted(a for a, _ in drv.sent) == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert drv.results == [("fail", "no-backend")]


def test_budget_bounds_load_when_every_backend_fails():
    """Every backend resets everything; the policy alone would triple the load
    (max_attempts 3). The budget caps backend attempts at
    requests x (1 + 10%) + floor x (duration + window)."""
    rate, duration = 200, 30.0
    pct, floor, window = 10.0, 3.0, 10.0

    def run(budget_percent, min_rps):
        clock = Clock()
        drv = Driver(clock, make_pool(clock, n=5),
                     route_res(max_attempts=3, budget_percent=budget_percent, min_retries_per_second=min_rps),
                     pool_res(circuit_breaker=CircuitBreakerConfig(consecutive_failures=0)),
                     always("gateway", Failure.RESET))
        n = int(rate * duration)
        for i in range(n):  # one arrival per 1/rate seconds, retries in between
            drv.request("GET")
            clock.advance(1 / rate)
        settle(clock, 1.0)
        assert len(drv.results) == n
        return n, len(drv.sent), drv

    n, unbudgeted, _ = run(10_000.0, 0.0)
    assert unbudgeted == 3 * n  # what the budget protects against
    n, attempts, drv = run(pct, floor)
    bound = n * (1 + pct / 100) + floor * (duration + window)
    assert attempts <= bound
    assert attempts > n * (1 + pct / 100) * 0.95  # the budget is used, not just refused
    exhausted = drv.route.budget.exhausted
    assert exhausted > 0 and drv.route.stats.decisions["budget-exhausted"] == exhausted
    print(f"\nrequests={n} attempts={attempts} ({attempts / n:.3f}x) bound={bound:.0f} "
          f"unbudgeted={3 * n} budget-exhausted={exhausted}")


def test_pool_wide_budget_caps_across_routes():
    clock = Clock()
    pool = make_pool(clock, n=4)
    pres = pool_res(retry_budget=RetryBudgetConfig(budget_percent=0, min_retries_per_second=0.1, window=10.0),
                    circuit_breaker=CircuitBreakerConfig(consecutive_failures=0))
    routes = [route_res(max_attempts=2), route_res(max_attempts=2)]
    drivers = [Driver(clock, pool, r, pres, always("gateway", Failure.RESET)) for r in routes]
    for _ in range(50):
        for d in drivers:
            d.request("GET")
    settle(clock, 1)
    # each route budget alone allows 30 retries, the pool one allows 1 in all
    assert sum(len(d.sent) for d in drivers) == 100 + 1
    assert pres.budget.exhausted == 99


def test_breaker_opens_and_excludes_backend_at_pick_time():
    clock = Clock()
    pool = make_pool(clock, n=2)
    a, b = pool.backends()
    pres = pool_res(circuit_breaker=CircuitBreakerConfig(consecutive_failures=2, open_for=10.0, half_open_requests=1))

    def behave(backend, attempt):
        return ("gateway", Failure.CONNECT_FAILURE, None, None) if backend is a else ("ok", None, 200, None)

    drv = Driver(clock, pool, route_res(), pres, behave)
    for _ in range(10):
        drv.request("GET")
    settle(clock, 1)
    assert all(r[0] == "ok" for r in drv.results)
    assert pres.breakers.state(a, clock.seconds()) is BreakerState.OPEN
    # a's failures were retried on b while the breaker was closed; afterwards a gets nothing
    tried_a = sum(1 for s in drv.states if a in s.exclude)
    assert tried_a == 2
    settle(clock, 10)
    assert pres.breakers.allows(a, clock.seconds())  # half-open: one trial


def test_retry_after_on_503_holds_the_backend():
    clock = Clock()
    pool = make_pool(clock, n=2)
    a, b = pool.backends()

    def behave(backend, attempt):
        return ("5xx", Failure.STATUS, 503, "5") if backend is a else ("ok", None, 200, None)

    pres = pool_res()
    drv = Driver(clock, pool, route_res(retry_on=["connect-failure", 503]), pres, behave)
    drv.request("GET")
    settle(clock, 0.5)
    assert drv.results == [("ok", b.address)]
    assert a in pres.breakers.blocked(clock.seconds())
    for _ in range(4):
        drv.request("GET")
    settle(clock, 0.5)
    assert [r[1] for r in drv.results[1:]] == [b.address] * 4
    settle(clock, 4.1)
    assert a not in pres.breakers.blocked(clock.seconds())


class Fixed:
    """A planner on a bare clock, for rule-by-rule checks."""

    def __init__(self, policy=None, budgets=None, limits=None, timeout=None, method="GET", headers=()):
        self.clock = Clock()
        self.state = RequestRetryState(
            policy or RetryPolicy(), RetryBudget(10, 100, 10) if budgets is None else budgets, None, limits,
            self.clock, random.Random(0), method=method, headers=headers, timeout=timeout,
        )


def test_rules_in_order():
    st = Fixed().state
    st.on_attempt_start(object())
    assert st.may_retry("reset", response_started=True).reason == "response-started"
    assert st.may_retry(Failure.TIMEOUT).reason == "not-retryable"
    assert st.may_retry(Failure.STATUS, 503).reason == "not-retryable"
    assert st.may_retry(Failure.RESET, body_replayable=False).reason == "body-not-replayable"
    d = st.may_retry(Failure.RESET)
    assert d.retry and 0 <= d.delay <= 0.025
    st.on_attempt_start(object())
    assert st.may_retry(Failure.RESET).reason == "attempts-exhausted"


def test_deadline_and_try_timeout():
    f = Fixed(policy=RetryPolicy(per_try_timeout=1.0, max_attempts=5), timeout=2.5)
    st, clock = f.state, f.clock
    assert st.try_timeout() == 1.0
    st.on_attempt_start(object())
    clock.advance(2.0)
    assert st.try_timeout() == pytest.approx(0.5)  # cut to what the route has left
    clock.advance(0.5)
    assert st.may_retry(Failure.RESET).reason == "deadline"
    assert Fixed().state.try_timeout() is None


def test_retry_limit_slot_held_until_the_retry_ends():
    from lbtwist.resilience.limits import LimitSettings, PoolLimits
    limits = PoolLimits(LimitSettings(max_retries=1))
    p = RetryPolicy(max_attempts=3)
    one, two = Fixed(p, limits=limits).state, Fixed(p, limits=limits).state
    x = object()
    for st in (one, two):
        st.on_attempt_start(x)
        st.on_attempt_finish(x, "gateway")
    assert one.may_retry(Failure.RESET).retry
    assert two.may_retry(Failure.RESET).reason == "retry-limit"
    assert limits.refused[Limit.RETRIES] == 1
    y = object()
    one.on_attempt_start(y)
    assert limits.in_use(Limit.RETRIES) == 1  # held during the retry
    one.on_attempt_finish(y, "ok", 200)
    assert limits.in_use(Limit.RETRIES) == 0
    assert two.may_retry(Failure.RESET).retry
    two.finish()  # granted but never started: finish gives it back
    assert limits.in_use(Limit.RETRIES) == 0


def test_budget_refusal_leaves_limits_and_budget_untouched():
    from lbtwist.resilience.limits import LimitSettings, PoolLimits
    limits = PoolLimits(LimitSettings(max_retries=5))
    budget = RetryBudget(0, 0, 10)
    st = Fixed(budgets=[budget], limits=limits).state
    st.on_attempt_start(object())
    assert st.may_retry(Failure.RESET).reason == "budget-exhausted"
    assert limits.in_use(Limit.RETRIES) == 0 and budget.retries_total == 0 and budget.exhausted == 1


def test_admit_refuses_over_max_requests_and_finish_releases():
    from lbtwist.resilience.limits import LimitSettings, PoolLimits
    limits = PoolLimits(LimitSettings(max_requests=1))
    first, second = Fixed(limits=limits).state, Fixed(limits=limits).state
    assert first.admit() is None
    assert second.admit() is Limit.REQUESTS
    first.finish()
    first.finish()
    assert limits.in_use(Limit.REQUESTS) == 0
    assert second.admit() is None


def test_rate_limiter_built_from_route_config():
    r = RouteResilience.from_config(
        RouteConfig(pool="app", rate_limit=RateLimitConfig(rate=1, burst=1, key="client")), name="r")
    assert r.rate_limiter.check("1.2.3.4", 0).allowed
    assert not r.rate_limiter.check("1.2.3.4", 0).allowed
    default = RouteResilience.from_config(None, default_timeout=60.0)
    assert default.rate_limiter is None and default.timeout == 60.0
    assert default.policy.max_attempts == 2


def test_needs_a_clock():
    with pytest.raises(TypeError):
        RequestRetryState(RetryPolicy())


def test_l7_bytes_request_with_key_is_eligible():
    assert Fixed(method=b"POST", headers=[(b"Idempotency-Key", b"abc")]).state.eligible
    assert not Fixed(method=b"POST", headers=[(b"Content-Type", b"x")]).state.eligible
