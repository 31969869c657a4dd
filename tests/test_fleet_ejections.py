"""Shared ejections, sans-IO: what one instance's detector decides reaches the
others' pools; nothing received is published again (no echo loops); the
max_ejection_percent cap still holds; a (re)starting instance learns what is
out; bad messages are ignored; Redis down keeps ejections local, then they
are published when it is back."""
from __future__ import annotations

import json

from twisted.internet import defer, task

from lbtwist.config.model import PassiveHealthConfig
from lbtwist.fleet.ejections import FleetEjections, parse_message
from lbtwist.health.outlier import OutlierDetector
from lbtwist.pool import Backend, Pool
from support.fakes import FirstBalancer
from test_health_outlier import out, work


class Bus:
    """The Redis side of the two scripts (keys with a TTL, one channel), on the test clock."""

    def __init__(self, clock):
        self.clock = clock
        self.keys = {}  # key -> (data, expires_at)
        self.links = []
        self.published = []

    def live(self):
        now = self.clock.seconds()
        return {k: v for k, v in self.keys.items() if v[1] > now}


class BusLink:
    def __init__(self, bus):
        self.bus = bus
        self.up = True
        self.handlers = {}
        self.on_up = []
        self.failures = []
        bus.links.append(self)

    def add_script(self, name, source):
        pass

    def subscribe(self, channel, handler):
        self.handlers[channel] = handler

    def failed(self, kind, why):
        self.failures.append(kind)

    def evalsha(self, name, keys, args):
        if not self.up:
            return defer.fail(RuntimeError("down"))
        bus = self.bus
        if name == "sync":
            out = []
            for data, exp in bus.live().values():
                out += [data.encode(), int((exp - bus.clock.seconds()) * 1000)]
            return defer.succeed(out)
        channel, data, event, ttl, origin = args
        if event == "ejected":
            bus.keys[keys[0]] = (data, bus.clock.seconds() + ttl / 1000)
        elif keys[0] in bus.keys and json.loads(bus.keys[keys[0]][0])["origin"] == origin:
            del bus.keys[keys[0]]
        bus.published.append(data)
        n = 0
        for link in bus.links:  # the publisher hears its own message too, as in Redis
            if link.up and channel in link.handlers:
                link.handlers[channel](data.encode())
                n += 1
        return defer.succeed(n)


def instance(bus, clock, origin, n=4, **cfg):
    pool = Pool("app", [Backend(f"127.0.0.1:{9000 + i}") for i in range(n)], FirstBalancer(), clock)
    det = OutlierDetector(pool, PassiveHealthConfig(**cfg))
    pool.observe_outcomes(det.on_outcome)
    link = BusLink(bus)
    ej = FleetEjections(link, clock, "lbtwist:edge:", origin=origin)
    ej.attach(det)
    return pool, det, link, ej


def test_an_ejection_by_a_reaches_b_and_is_not_echoed():
    clock = task.Clock()
    bus = Bus(clock)
    pa, da, la, ea = instance(bus, clock, "A")
    pb, db, lb, eb = instance(bus, clock, "B")
    bad = pa.backends()[1]
    work(pa, bad, "5xx", times=5)
    assert out(pa, clock) == {bad.address}
    assert out(pb, clock) == {bad.address}  # applied by B at once
    bb = pb.get(bad.address)
    assert bb.ejected_until == bad.ejected_until == 30.0
    assert "shared by A" in bb.reason
    assert len(bus.published) == 1  # B did not publish what it applied
    assert ea.counts["echoes_ignored"] == 1 and eb.counts["applied"] == 1
    # it ends at A: the return is published, B returns it too, still no echo
    clock.advance(30)
    da.tick(clock.seconds())
    assert out(pa, clock) == set() and out(pb, clock) == set()
    assert len(bus.published) == 2 and bus.live() == {}
    db.tick(clock.seconds())  # B's own tick finds nothing to return and publishes nothing
    assert len(bus.published) == 2


def test_a_remote_ejection_ends_by_itself_without_publishing():
    clock = task.Clock()
    bus = Bus(clock)
    pa, da, la, ea = instance(bus, clock, "A")
    pb, db, lb, eb = instance(bus, clock, "B")
    la.up = False  # A's return will not be heard
    work(pa, pa.backends()[0], "5xx", times=5)  # A is down: ejects locally only
    assert out(pb, clock) == set() and bus.published == []
    la.up = True
    for hook in la.on_up:  # Redis back: A publishes what is still running
        hook()
    assert out(pb, clock) == {pa.backends()[0].address}
    lb_before = len(bus.published)
    clock.advance(30)
    db.tick(clock.seconds())
    assert out(pb, clock) == set()
    assert len(bus.published) == lb_before  # B's return of a shared ejection is not news


def test_the_cap_still_holds_for_shared_ejections():
    clock = task.Clock()
    bus = Bus(clock)
    pa, da, la, ea = instance(bus, clock, "A", n=4, max_ejection_percent=50)
    pb, db, lb, eb = instance(bus, clock, "B", n=4, max_ejection_percent=25)
    b0, b1 = pa.backends()[0], pa.backends()[1]
    work(pa, b0, "5xx", times=5)
    work(pa, b1, "5xx", times=5)
    assert out(pa, clock) == {b0.address, b1.address}  # A's cap: two of four
    assert out(pb, clock) == {b0.address}  # B's cap: one of four; the second is refused
    assert db.remote_refused == 1 and eb.counts["not_applied"] == 1


def test_a_starting_instance_learns_current_ejections():
    clock = task.Clock()
    bus = Bus(clock)
    pa, da, la, ea = instance(bus, clock, "A")
    bad = pa.backends()[2]
    work(pa, bad, "5xx", times=5)
    clock.advance(10)
    pc, dc, lc, ec = instance(bus, clock, "C")  # started later: missed the message
    assert out(pc, clock) == set()
    for hook in lc.on_up:
        hook()
    assert out(pc, clock) == {bad.address}
    assert pc.get(bad.address).ejected_until == 30.0  # what is left of it, not a new 30 s
    assert ec.counts["synced"] == 1


def test_bad_messages_are_ignored_and_unknown_pools_skipped():
    clock = task.Clock()
    bus = Bus(clock)
    pb, db, lb, eb = instance(bus, clock, "B")
    handler = lb.handlers["lbtwist:edge:ejections"]
    for junk in (b"\xff\xfe", b"[]", b'{"origin": "A"}', b'{"origin":"A","pool":"app","backend":"127.0.0.1:9000",'
                 b'"event":"ejected","reason":"x","ttl_ms":-5}', b'{"origin":"A","pool":"app","backend":"x",'
                 b'"event":"gone","reason":"x"}'):
        handler(junk)
    assert eb.counts["bad_messages"] == 5 and out(pb, clock) == set()
    handler(json.dumps({"origin": "A", "pool": "other", "backend": "127.0.0.1:9000", "event": "ejected",
                        "reason": "r", "ttl_ms": 1000}).encode())
    handler(json.dumps({"origin": "A", "pool": "app", "backend": "10.9.9.9:1", "event": "ejected",
                        "reason": "r", "ttl_ms": 1000}).encode())
    assert eb.counts["not_applied"] == 2 and out(pb, clock) == set()


def test_a_return_for_a_backend_out_by_our_own_decision_is_ignored():
    clock = task.Clock()
    bus = Bus(clock)
    pb, db, lb, eb = instance(bus, clock, "B")
    mine = pb.backends()[0]
    lb.up = False
    work(pb, mine, "5xx", times=5)
    lb.up = True
    lb.handlers["lbtwist:edge:ejections"](json.dumps({"origin": "A", "pool": "app", "backend": mine.address,
                                                      "event": "returned", "reason": "r"}).encode())
    assert out(pb, clock) == {mine.address}


def test_detach_stops_sharing():
    clock = task.Clock()
    bus = Bus(clock)
    pa, da, la, ea = instance(bus, clock, "A")
    ea.detach(da)
    work(pa, pa.backends()[0], "5xx", times=5)
    assert bus.published == []


def test_parse_message_requires_each_field():
    m = parse_message(b'{"origin":"A","pool":"p","backend":"b","event":"returned","reason":""}')
    assert m["event"] == "returned"
