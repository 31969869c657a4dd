"""Fleet rate limits, sans-IO: leased tokens, the over-admission bound, the
remembered refusal, and the local fallback (Redis down, slow, or garbage)."""
import math

from twisted.internet import defer
from twisted.internet.task import Clock

from lbtwist.fleet.ratelimit import FleetRateLimiter
from lbtwist.resilience.ratelimit import RateDecision, RateLimiter


class ScriptedLink:
    """Calls kept for the test to answer."""

    def __init__(self):
        self.up = True
        self.calls = []
        self.failures = []

    def evalsha(self, name, keys, args):
        d = defer.Deferred()
        self.calls.append((keys, args, d))
        return d

    def failed(self, kind, why):
        self.failures.append(kind)
        self.up = False


class BucketLink:
    """Answers the lease script like Redis would (a model of its GCRA, on the
    test clock), after ``delay`` seconds: the shared bucket of a fleet."""

    def __init__(self, clock, delay=0.001):
        self.clock = clock
        self.delay = delay
        self.up = True
        self.store = {}
        self.calls = 0

    def evalsha(self, name, keys, args):
        self.calls += 1
        per, span, want = float(args[0]), float(args[1]), int(args[2])
        d = defer.Deferred()

        def run():
            now = self.clock.seconds() * 1e6
            full_at = max(self.store.get(keys[0], now), now)
            free = math.floor((now + span - full_at) / per + 1e-6)
            if free < 1:
                d.callback([0, max(1, math.ceil((full_at + per - span - now) / 1000))])
                return
            n = min(free, want)
            self.store[keys[0]] = full_at + n * per
            d.callback([n, 0])

        self.clock.callLater(self.delay, run)
        return d

    def failed(self, kind, why):
        raise AssertionError(why)


def decide(lim, key, clock):
    got = []
    r = lim.check(key, clock.seconds())
    if isinstance(r, RateDecision):
        return r
    r.addCallback(got.append)
    return got  # filled when the link answers


def limiter(link, clock, rate=20.0, burst=20.0, lease_max=8, lease_time=0.25):
    return FleetRateLimiter(RateLimiter(rate, burst), link, "lbtwist:edge:rl:web/api:", clock,
                            lease_max=lease_max, lease_time=lease_time)


def test_first_request_waits_for_one_token_then_leases_grow():
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock)
    pending = decide(lim, "1.2.3.4", clock)
    assert pending == [] and len(link.calls) == 1
    keys, args, d = link.calls[0]
    assert keys == ["lbtwist:edge:rl:web/api:1.2.3.4"] and args[2] == 1  # a cold key asks for one token
    assert args[:2] == ["50000.000", "1000000.000"]  # the local limiter's rate and burst, in microseconds
    d.callback([1, 0])
    assert pending == [RateDecision(True)]
    # spent before it expired: the next lease asks for twice as many, up to lease_max
    decide(lim, "1.2.3.4", clock)
    assert link.calls[1][1][2] == 2
    link.calls[1][2].callback([2, 0])
    assert lim.decisions == {"fleet": 2, "lease": 0, "local": 0}
    assert decide(lim, "1.2.3.4", clock) == RateDecision(True)  # spent locally: no Redis call
    assert lim.decisions["lease"] == 1


def test_hot_key_costs_far_fewer_redis_calls_than_requests():
    clock = Clock()
    link = BucketLink(clock)
    lim = limiter(link, clock, rate=1000, burst=1000, lease_max=32)
    n = 0
    for _ in range(2000):  # 2000 requests at 1000/s
        decide(lim, "k", clock)
        clock.advance(0.001)
        n += 1
    clock.advance(0.1)
    assert lim.decisions["fleet"] + lim.decisions["lease"] == n
    assert link.calls < n / 10, link.calls




def test_two_instances_share_one_bucket_within_the_documented_bound():
    """20/s, burst 20, two instances each offered 60/s for 10 s: the fleet admits
    about 20/s, never more than burst + rate * (W + lease_time) in a window W."""
    clock = Clock()
    link = BucketLink(clock, delay=0.002)
    lims = [limiter(link, clock, lease_max=8, lease_time=0.25) for _ in range(2)]
    times = []
    step = 1.0 / 60
    waiting = []
    for _ in range(600):
        for lim in lims:
            r = lim.check("c", clock.seconds())
            if isinstance(r, RateDecision):
                if r.allowed:
                    times.append(clock.seconds())
            else:
                r.addCallback(lambda d, t=clock.seconds(): d.allowed and times.append(t))
                waiting.append(r)
        clock.advance(step)
    clock.advance(1)
    assert all(w.called for w in waiting)
    total = len(times)
    # 10 s at 20/s plus the burst: 220; 40/s (two local limiters) would be 420
    assert 190 <= total <= 220 + 20 * 0.25 + 1, total
    times.sort()
    for w in (1.0, 2.0, 5.0):
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - w:
                j += 1
            assert i - j + 1 <= 20 + 20 * (w + 0.25) + 1, (w, t, i - j + 1)


def test_refusal_is_remembered_until_the_retry_time():
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock)
    pending = decide(lim, "k", clock)
    link.calls[0][2].callback([0, 120])  # nothing free for 120 ms
    assert pending[0].allowed is False and abs(pending[0].retry_after - 0.12) < 1e-9
    for _ in range(50):  # a client hammering costs no Redis calls
        r = decide(lim, "k", clock)
        assert r.allowed is False
        clock.advance(0.002)
    assert len(link.calls) == 1
    clock.advance(0.03)
    decide(lim, "k", clock)
    assert len(link.calls) == 2


def test_concurrent_requests_share_a_call_then_ask_again_for_the_rest():
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock)
    got = [decide(lim, "k", clock) for _ in range(4)]
    assert len(link.calls) == 1
    link.calls[0][2].callback([1, 0])  # asked for 1, got 1: the bucket may hold more
    assert [len(g) for g in got] == [1, 0, 0, 0] and len(link.calls) == 2
    assert link.calls[1][1][2] >= 3  # one more call, for (at least) the three still waiting
    link.calls[1][2].callback([2, 0])  # fewer than asked: the bucket is empty now
    assert [g[0].allowed for g in got] == [True, True, True, False]


def test_no_request_waits_longer_than_the_timeout():
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock, rate=5, burst=2)
    got = [decide(lim, "k", clock) for _ in range(3)]
    clock.advance(0.049)
    assert got == [[], [], []]
    clock.advance(0.001)  # Redis never answered: the local limiter decided at 50 ms
    assert [g[0].allowed for g in got] == [True, True, False]
    assert lim.decisions["local"] == 3
    link.calls[0][2].callback([1, 0])  # a late answer changes nothing
    assert [len(g) for g in got] == [1, 1, 1]


def test_unspent_lease_expires_and_the_next_ask_shrinks():
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock, lease_time=0.25)
    decide(lim, "k", clock)
    link.calls[0][2].callback([1, 0])
    decide(lim, "k", clock)
    link.calls[1][2].callback([2, 0])  # one token left over
    clock.advance(0.3)
    decide(lim, "k", clock)  # the leftover expired: dropped, not spent
    assert lim.tokens_dropped == 1
    assert link.calls[2][1][2] == 1


def test_link_down_decides_locally_with_the_same_limits():
    clock, link = Clock(), ScriptedLink()
    link.up = False
    lim = limiter(link, clock, rate=5, burst=3)
    got = [decide(lim, "k", clock).allowed for _ in range(5)]
    assert got == [True, True, True, False, False]  # the local bucket: burst 3
    assert link.calls == [] and lim.decisions["local"] == 5 and lim.limited_by["local"] == 2


def test_a_failed_call_gives_the_waiting_requests_the_local_decision():
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock, rate=5, burst=1)
    got = [decide(lim, "k", clock) for _ in range(2)]
    link.calls[0][2].errback(defer.TimeoutError())
    assert [g[0].allowed for g in got] == [True, False]
    assert lim.decisions["local"] == 2


def test_garbage_answer_takes_the_link_down_and_falls_back():
    for junk in ([5, 0], [1], [b"1", 0], "OK", None, [0, 0], [-1, 3]):
        clock, link = Clock(), ScriptedLink()
        lim = limiter(link, clock)
        got = decide(lim, "k", clock)
        link.calls[0][2].callback(junk)  # want was 1: 5 tokens is a lie too
        assert link.failures == ["garbage"], junk
        assert got[0].allowed and lim.decisions["local"] == 1


def test_memory_is_bounded_by_max_keys():
    clock, link = Clock(), ScriptedLink()
    lim = FleetRateLimiter(RateLimiter(10, 5, max_keys=100), link, "p:", clock, lease_max=4, lease_time=0.25)
    for i in range(1000):
        decide(lim, f"k{i}", clock)
        link.calls[-1][2].callback([1, 0])
    assert len(lim) <= 101


def test_a_later_lease_does_not_extend_the_life_of_older_tokens():
    """Each batch expires lease_time after it was granted: that is what bounds
    the skew between spending a token and taking it from the shared bucket."""
    clock, link = Clock(), ScriptedLink()
    lim = limiter(link, clock, lease_max=8, lease_time=0.25)

    def answer(i):
        keys, args, d = link.calls[i]
        d.callback([int(args[2]), 0])  # everything asked for

    decide(lim, "k", clock)
    answer(0)  # 1 token, spent by the waiting request
    decide(lim, "k", clock)
    answer(1)  # 2 tokens: one spent, one left
    decide(lim, "k", clock)  # spends it; a refill of 4 goes out
    answer(2)  # batch B: 4 tokens granted at t=0
    decide(lim, "k", clock)
    decide(lim, "k", clock)  # 2 of B left: a refill goes out
    assert len(link.calls) == 4 and link.calls[3][1][2] == 6  # never more than lease_max held
    clock.advance(0.2)
    answer(3)  # batch C: 6 tokens granted at t=0.2
    assert lim.status()["tokens_held"] == 8
    clock.advance(0.1)  # t=0.3: B's 2 tokens are too old to spend; C's 6 are fine
    spent = 0
    for _ in range(20):
        r = decide(lim, "k", clock)
        if not isinstance(r, RateDecision):
            break
        spent += 1
    assert spent == 6 and lim.tokens_dropped == 2


def test_an_instance_never_holds_more_than_lease_max_tokens_of_a_key():
    clock = Clock()
    link = BucketLink(clock)
    lim = limiter(link, clock, rate=1000, burst=1000, lease_max=8)
    most = 0
    for _ in range(500):
        decide(lim, "k", clock)
        clock.advance(0.0005)
        most = max(most, lim.status()["tokens_held"])
    assert 4 <= most <= 8
