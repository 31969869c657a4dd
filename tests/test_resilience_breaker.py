"""Per-backend circuit breakers: closed -> open -> half-open -> closed/open."""
import pytest
from twisted.internet.task import Clock

from lbtwist.pool import Backend
from lbtwist.resilience.breaker import BreakerSet, BreakerSettings, BreakerState as S

SETTINGS = BreakerSettings(consecutive_failures=3, open_for=10.0, half_open_requests=2)


def fail(bs, b, now, outcome="gateway", status=None):
    gen = bs.on_start(b, now)
    bs.on_finish(b, now, outcome, status, gen)


def ok(bs, b, now):
    gen = bs.on_start(b, now)
    bs.on_finish(b, now, "ok", 200, gen)


@pytest.fixture
def setup():
    bs = BreakerSet(SETTINGS, name="app")
    seen = []
    bs.subscribe(lambda backend, old, new, reason: seen.append((backend.address, old, new)))
    return bs, Backend("127.0.0.1:1"), Backend("127.0.0.1:2"), seen


def test_opens_after_n_consecutive_failures_only(setup):
    bs, a, _, seen = setup
    fail(bs, a, 0)
    fail(bs, a, 0)
    ok(bs, a, 0)  # success resets the count
    fail(bs, a, 0)
    fail(bs, a, 0)
    assert bs.state(a, 0) is S.CLOSED and bs.allows(a, 0)
    fail(bs, a, 1.0)
    assert bs.state(a, 1.0) is S.OPEN
    assert not bs.allows(a, 1.0) and not bs.allows(a, 10.99)
    assert seen == [("127.0.0.1:1", S.CLOSED, S.OPEN)]
    assert bs.opened_total == 1


def test_half_open_lets_a_few_trials_through_and_closes_on_success(setup):
    bs, a, _, seen = setup
    for _ in range(3):
        fail(bs, a, 0)
    assert bs.allows(a, 10.0)  # cooldown over
    assert bs.state(a, 10.0) is S.HALF_OPEN
    g1 = bs.on_start(a, 10.0)
    assert bs.allows(a, 10.0)
    g2 = bs.on_start(a, 10.0)
    assert not bs.allows(a, 10.0)  # both trial slots taken
    assert a in bs.blocked(10.0)
    bs.on_finish(a, 10.5, "ok", 200, g1)
    assert bs.state(a, 10.5) is S.HALF_OPEN
    bs.on_finish(a, 10.6, "ok", 200, g2)
    assert bs.state(a, 10.6) is S.CLOSED and bs.allows(a, 10.6)
    assert a not in bs.blocked(10.6)
    assert [s[2] for s in seen] == [S.OPEN, S.HALF_OPEN, S.CLOSED]


def test_failed_trial_reopens_for_another_cooldown(setup):
    bs, a, _, _ = setup
    for _ in range(3):
        fail(bs, a, 0)
    fail(bs, a, 12.0)  # a trial that fails
    assert bs.state(a, 12.0) is S.OPEN
    assert not bs.allows(a, 21.9)
    assert bs.allows(a, 22.0)


def test_cancelled_trial_frees_its_slot_and_says_nothing(setup):
    bs, a, _, _ = setup
    for _ in range(3):
        fail(bs, a, 0)
    g1 = bs.on_start(a, 10.0)
    g2 = bs.on_start(a, 10.0)
    assert not bs.allows(a, 10.0)
    bs.on_finish(a, 10.1, "cancelled", None, g1)
    assert bs.allows(a, 10.1) and bs.state(a, 10.1) is S.HALF_OPEN
    bs.on_finish(a, 10.2, "ok", 200, g2)
    assert bs.state(a, 10.2) is S.HALF_OPEN  # one success of two needed


def test_results_from_before_a_transition_are_ignored(setup):
    """A slow request started while closed must not re-open a breaker whose
    trials are under way (it describes the backend as it was)."""
    bs, a, _, _ = setup
    slow = bs.on_start(a, 0.0)
    for _ in range(3):
        fail(bs, a, 1.0)
    trial = bs.on_start(a, 11.0)
    bs.on_finish(a, 11.5, "gateway", None, slow)  # stale
    assert bs.state(a, 11.5) is S.HALF_OPEN
    bs.on_finish(a, 11.6, "ok", 200, trial)
    assert bs.state(a, 11.6) is S.HALF_OPEN


def test_failure_classification():
    st = BreakerSettings(failure_statuses=frozenset({503}))
    assert st.is_failure("gateway", None) is True
    assert st.is_failure("5xx", 503) is True
    assert st.is_failure("5xx", 500) is False
    assert st.is_failure("5xx", None) is True
    assert st.is_failure("ok", 200) is False
    assert st.is_failure("cancelled", None) is None


def test_5xx_not_in_failure_statuses_does_not_open(setup):
    bs, a, _, _ = setup
    for _ in range(10):
        fail(bs, a, 0, "5xx", 500)
    assert bs.state(a, 0) is S.CLOSED
    for _ in range(3):
        fail(bs, a, 0, "5xx", 503)
    assert bs.state(a, 0) is S.OPEN


def test_disabled_breaker_never_opens():
    bs = BreakerSet(BreakerSettings(consecutive_failures=0))
    a = Backend("127.0.0.1:1")
    assert not bs.enabled
    for _ in range(100):
        fail(bs, a, 0)
    assert bs.allows(a, 0) and bs.blocked(0) == frozenset()


def test_retry_after_hold_skips_backend_without_changing_state(setup):
    bs, a, b, _ = setup
    assert bs.hold(a, 5.0, 120.0) == 30.0  # capped by max_retry_after
    assert not bs.allows(a, 34.9) and bs.blocked(34.9) == {a}
    assert bs.allows(a, 35.0) and bs.state(a, 35.0) is S.CLOSED
    assert bs.blocked(35.0) == frozenset()
    assert bs.allows(b, 6.0)
    assert BreakerSet(BreakerSettings(max_retry_after=0)).hold(a, 0, 10) == 0.0


def test_blocked_is_cheap_when_all_closed_and_forgets_recovered(setup):
    bs, a, b, _ = setup
    ok(bs, a, 0)
    assert bs.blocked(0) == frozenset() and not bs.watching
    for _ in range(3):
        fail(bs, b, 0)
    assert bs.blocked(1) == {b}
    for now in (10.0, 10.0):
        bs.on_finish(b, now, "ok", 200, bs.on_start(b, now))
    assert bs.blocked(11) == frozenset()
    assert not bs.watching


def test_forget_drops_state(setup):
    bs, a, _, _ = setup
    for _ in range(3):
        fail(bs, a, 0)
    bs.forget([a])
    assert bs.allows(a, 0) and bs.blocked(0) == frozenset()


def test_driven_by_a_clock():
    clock = Clock()
    bs = BreakerSet(SETTINGS)
    a = Backend("127.0.0.1:1")
    for _ in range(3):
        fail(bs, a, clock.seconds())
    clock.advance(9.999)
    assert not bs.allows(a, clock.seconds())
    clock.advance(0.001)
    assert bs.allows(a, clock.seconds())


@pytest.mark.parametrize("kwargs", [
    dict(consecutive_failures=-1), dict(open_for=0), dict(half_open_requests=0), dict(max_retry_after=-1)])
def test_settings_reject_nonsense(kwargs):
    with pytest.raises(ValueError):
        BreakerSettings(**kwargs)
