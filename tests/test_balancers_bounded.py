"""Bounded-load consistent hashing (``balance_factor``) and slow start for
``ring_hash`` and ``maglev``. Deterministic: the pool's own accounting
(``on_start``/``on_finish``) carries the in-flight load, task.Clock the ramp."""
from __future__ import annotations

import collections
import math
import random
import time

import pytest
import pytest_twisted
from twisted.internet import protocol, reactor as real_reactor, task

from lbtwist.balancers.hashing import Maglev, RingHash
from lbtwist.config import load_config
from lbtwist.pool import Backend, PickContext, Pool
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService
from support.procs import free_port

ALGOS = ["ring_hash", "maglev"]
CLASSES = {"ring_hash": RingHash, "maglev": Maglev}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.default(entry_points=False)


def make(registry, name, options):
    if name == "maglev":
        options = {"table_size": 1021, **options}
    return registry.make_balancer(name, options, clock=task.Clock(), rng=random.Random(1))


def backends(n: int, prefix: str = "10.0.0.") -> list[Backend]:
    return [Backend(f"{prefix}{i + 1}:80") for i in range(n)]


def pool_of(bal, bs, clock=None, slow_start=0.0) -> Pool:
    return Pool("p", bs, bal, clock or task.Clock(), slow_start=slow_start, rng=random.Random(1))


@pytest.mark.parametrize("name", ALGOS)
@pytest.mark.parametrize("factor", [1.25, 1.5, 2.0])
def test_hot_key_under_concurrency_is_bounded(registry, name, factor):
    """40 requests in flight at once for one hot key over 4 slow backends
    (none finishes): none carries more than factor x mean (rounded up) + 1."""
    pool = pool_of(make(registry, name, {"balance_factor": factor}), backends(4))
    placed = collections.Counter()
    for _ in range(40):
        b = pool.select(PickContext(now=0.0, key=b"hot"))
        pool.on_start(b, 0.0)
        placed[b] += 1
    bound = math.ceil(factor * 40 / 4) + 1
    assert max(placed.values()) <= bound
    assert sum(placed.values()) == 40
    assert max(b.active for b in pool.backends()) <= bound


@pytest.mark.parametrize("name", ALGOS)
def test_without_balance_factor_the_hot_key_piles_onto_one_backend(registry, name):
    """The weakness the bound defends against, as it was."""
    pool = pool_of(make(registry, name, {}), backends(4))
    picked = set()
    for _ in range(40):
        b = pool.select(PickContext(now=0.0, key=b"hot"))
        pool.on_start(b, 0.0)
        picked.add(b)
    assert len(picked) == 1


@pytest.mark.parametrize("name", ALGOS)
def test_without_pressure_every_key_keeps_its_backend(registry, name):
    """Requests that finish before the next starts never hit the bound: each
    key maps to exactly one backend, the same as without a balance_factor."""
    bs = backends(4)
    plain = make(registry, name, {})
    bounded = make(registry, name, {"balance_factor": 1.25})
    pool = pool_of(bounded, bs)
    cands = tuple(bs)
    for i in range(500):
        key = b"user-%d" % i
        seen = set()
        for _ in range(5):
            b = pool.select(PickContext(now=0.0, key=key))
            pool.on_start(b, 0.0)
            pool.on_finish(b, 0.01, True, now=0.0)
            seen.add(b)
        assert seen == {plain.pick(cands, PickContext(now=0.0, key=key))}


@pytest.mark.parametrize("name", ALGOS)
def test_background_load_below_the_bound_moves_nothing(registry, name):
    """Even load on every backend (10 each) leaves the capacity above every
    backend's load: keys stay put."""
    bs = backends(4)
    for b in bs:
        b.active = 10
    plain = make(registry, name, {})
    bounded = make(registry, name, {"balance_factor": 1.25})
    cands = tuple(bs)
    for i in range(1000):
        ctx = PickContext(now=0.0, key=b"k%d" % i)
        assert bounded.pick(cands, ctx) is plain.pick(cands, ctx)


@pytest.mark.parametrize("name", ALGOS)
def test_bounded_hash_still_moves_about_one_nth_on_removal(registry, name):
    bs = backends(10)
    removed = bs[3]
    rest = tuple(b for b in bs if b is not removed)
    keys = [b"client-%d" % i for i in range(20_000)]
    before_bal = make(registry, name, {"balance_factor": 1.25})
    after_bal = make(registry, name, {"balance_factor": 1.25})
    before = [before_bal.pick(tuple(bs), PickContext(0.0, key=k)) for k in keys]
    after = [after_bal.pick(rest, PickContext(0.0, key=k)) for k in keys]
    moved = sum(a is not b for a, b in zip(before, after)) / len(keys)
    assert moved <= 1.5 / 10


@pytest.mark.parametrize("name", ALGOS)
def test_overloaded_backend_passes_to_the_retry_walk(registry, name):
    """The next candidate under pressure is the one a retry would take."""
    bs = backends(5)
    bal = make(registry, name, {"balance_factor": 1.0})
    cands = tuple(bs)
    for i in range(200):
        key = b"k%d" % i
        own = bal.pick(cands, PickContext(0.0, key=key))
        retry = bal.pick(cands, PickContext(0.0, key=key, exclude=(own,)))
        own.active = 3  # capacity with 1.0: ceil((3 + 1) / 5) = 1
        assert bal.pick(cands, PickContext(0.0, key=key)) is retry
        own.active = 0


@pytest.mark.parametrize("name", ALGOS)
def test_all_full_still_places_the_work(registry, name):
    """With every other backend excluded and the last over its bound, the
    work still goes there: a bound never turns a request away."""
    bs = backends(3)
    bal = make(registry, name, {"balance_factor": 1.0})
    bs[0].active = 50
    got = bal.pick(tuple(bs), PickContext(0.0, key=b"x", exclude=(bs[1], bs[2])))
    assert got is bs[0]


@pytest.mark.parametrize("name", ALGOS)
def test_slow_start_hands_a_joining_backend_its_keys_gradually(registry, name):
    """A backend joining with slow_start 10s takes ~10% of its keys at once,
    ~50% at 5s, all at 10s; the ramp only grows, so a key that moved stays;
    the keys it does not admit yet stay where they were before it joined
    (ring_hash: exactly; maglev: its next slot)."""
    clock = task.Clock()
    clock.advance(100.0)
    old = backends(4)
    new = Backend("10.0.0.9:80")
    keys = [b"k%d" % i for i in range(20_000)]
    bal = make(registry, name, {})
    pool = pool_of(bal, old + [new], clock, slow_start=10.0)
    full = make(registry, name, {})  # the settled mapping
    everyone = tuple(old + [new])
    home = [full.pick(everyone, PickContext(0.0, key=k)) for k in keys]
    mine = [k for k, h in zip(keys, home) if h is new]
    assert len(mine) > 2000
    before_join = make(registry, name, {})
    was = {k: before_join.pick(tuple(old), PickContext(0.0, key=k)) for k in mine}

    new.joined_at = clock.seconds()
    admitted_at = {}
    shares = []
    for t in (0.0, 2.5, 5.0, 7.5, 10.0):
        now = 100.0 + t
        taken = 0
        for k in mine:
            b = pool.select(PickContext(now=now, key=k))
            if b is new:
                taken += 1
                admitted_at.setdefault(k, t)
            else:
                assert k not in admitted_at, "a key that moved to the new backend went back"
                if name == "ring_hash":
                    assert b is was[k]
        shares.append(taken / len(mine))
    assert shares[0] == pytest.approx(0.1, abs=0.03)
    assert shares[1] == pytest.approx(0.25, abs=0.03)
    assert shares[2] == pytest.approx(0.5, abs=0.03)
    assert shares == sorted(shares)
    assert shares[-1] == 1.0
    # keys of the other backends never move during the ramp
    others = [k for k, h in zip(keys, home) if h is not new][:2000]
    for k in others:
        assert pool.select(PickContext(now=100.0, key=k)) is full.pick(everyone, PickContext(0.0, key=k))


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("ring_hash", {"balance_factor": 0.9}, "ring_hash: balance_factor must be between 1 and 100"),
        ("maglev", {"balance_factor": "1.25"}, "maglev: balance_factor must be a number"),
        ("maglev", {"balance_factor": True}, "maglev: balance_factor must be a number"),
        ("ring_hash", {"balance_fator": 1.25}, "did you mean 'balance_factor'?"),
    ],
)
def test_bad_balance_factor_is_named(registry, name, options, message):
    with pytest.raises(ValueError) as e:
        make(registry, name, options)
    assert message in str(e.value)


def test_balance_factor_is_read(registry):
    assert make(registry, "ring_hash", {"balance_factor": 1.25}).balance_factor == 1.25
    assert make(registry, "maglev", {"balance_factor": 2}).balance_factor == 2.0
    assert make(registry, "maglev", {}).balance_factor is None


# -- end to end: real sockets ------------------------------------------------------


class _Slow:
    """An HTTP origin that holds every request until released."""

    def __init__(self, name: bytes, reactor):
        from twisted.web import resource, server

        outer = self
        self.name = name
        self.held: list = []
        self.gone: set[int] = set()

        class Res(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                outer.held.append(request)
                request.notifyFinish().addErrback(lambda _: outer.gone.add(id(request)))
                return server.NOT_DONE_YET

        site = server.Site(Res())
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    def release(self):
        for r in self.held:
            if not r.finished and id(r) not in self.gone:
                r.write(self.name)
                r.finish()
        self.held.clear()


@pytest.mark.parametrize("name", ALGOS)
@pytest_twisted.ensureDeferred
async def test_hot_key_over_real_slow_origins_is_bounded(name):
    """40 concurrent requests from one client address (the hot key with
    ``hash_key: source``) through an http listener to 4 origins that hold
    every request: with balance_factor 1.25 no origin holds more than
    ceil(1.25 x 10) + 1 = 14 at once."""
    origins = [_Slow(b"%d" % i, real_reactor) for i in range(4)]
    web = free_port()
    backends = ", ".join(f'{{address: "127.0.0.1:{o.port.getHost().port}"}}' for o in origins)
    opts = "{balance_factor: 1.25, table_size: 1021}" if name == "maglev" else "{balance_factor: 1.25}"
    text = (
        "listeners:\n"
        f'  - {{name: web, bind: "tcp:{web}:interface=127.0.0.1", mode: http, pool: app}}\n'
        "pools:\n"
        f"  - {{name: app, algorithm: {name}, algorithm_options: {opts}, backends: [{backends}]}}\n"
    )
    reg = Registry.default(entry_points=False)
    svc = LbtwistService(load_config(text, reg).config, real_reactor, reg)
    svc.privilegedStartService()
    svc.startService()
    clients = []
    try:
        class C(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

        for _ in range(40):
            clients.append(await protocol.ClientCreator(real_reactor, C).connectTCP("127.0.0.1", web, timeout=10))
        end = time.monotonic() + 30
        while sum(len(o.held) for o in origins) < 40:
            assert time.monotonic() < end, [len(o.held) for o in origins]
            await task.deferLater(real_reactor, 0.05, lambda: None)
        counts = [len(o.held) for o in origins]
        assert max(counts) <= math.ceil(1.25 * 40 / 4) + 1, counts
        assert sum(counts) == 40
    finally:
        for o in origins:
            o.release()
        for c in clients:
            c.transport.loseConnection()
        await svc.stopService()
        for o in origins:
            await o.port.stopListening()
