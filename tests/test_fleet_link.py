"""The Redis link's state machine on a Clock: up after the whole handshake,
down at the first timeout, drop or garbage (logged once each way), bounded
reconnect backoff, a frozen Redis noticed by the heartbeat, and back up."""
import random

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from lbtwist.config.model import FleetConfig
from lbtwist.fleet.link import FleetDown, FleetLink
from lbtwist.fleet.settings import FleetSettings
from support.fakeredis import FakeRedis


def make(**kw):
    clock = Clock()
    server = FakeRedis()
    kw.setdefault("redis", "tcp:127.0.0.1:6379")
    settings = FleetSettings.from_config(FleetConfig(name="edge", **kw))
    link = FleetLink(settings, clock, connect=server.connect, rng=random.Random(1))
    link.add_script("s", "return 1")
    link.subscribe("lbtwist:edge:ejections", lambda data: None)
    return clock, server, link


class Logs:
    def __init__(self):
        self.events = []

    def __enter__(self):
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *a):
        globalLogPublisher.removeObserver(self.events.append)

    def fleet(self, level):
        return [e for e in self.events if e.get("log_namespace") == "lbtwist.fleet" and e["log_level"] == level]


def test_up_after_auth_select_script_load_and_subscribe():
    clock, server, link = make(password="pw", db=3)
    server.password = "pw"
    link.start()
    assert link.up
    names = [c[0] for c in server.commands]
    assert names == [b"AUTH", b"SELECT", b"PING", b"SCRIPT", b"AUTH", b"SELECT", b"PING", b"SUBSCRIBE"]
    assert len(server.conns) == 2


def test_wrong_password_is_down_with_the_reason_and_retried():
    clock, server, link = make(password="nope")
    server.password = "pw"
    link.start()
    assert link.state == "down" and "WRONGPASS" in link.last_error
    assert link.errors["error_reply"] == 1
    assert server.conns == []  # nothing half-open is kept


def test_timeout_falls_back_at_once_then_calls_fail_fast_and_backoff_is_bounded():
    clock, server, link = make(reconnect_max=2.0)
    link.start()
    server.frozen = True
    with Logs() as logs:
        d = link.call("PING")
        failed = []
        d.addErrback(failed.append)
        clock.advance(0.049)
        assert not failed and link.up
        clock.advance(0.002)  # 50 ms: the call's own timeout
        assert failed and link.state == "down"
        assert link.errors["timeout"] == 1 and link.fallbacks == 1
        fast = []
        link.call("PING").addErrback(lambda f: fast.append(f.type))
        assert fast == [FleetDown]  # no waiting on a dead Redis
        # frozen: every attempt's handshake times out; the waits grow but stay under reconnect_max
        starts = []
        for _ in range(200):
            before = link.attempts
            clock.advance(0.05)
            if link.attempts != before:
                starts.append(clock.seconds())
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert len(starts) >= 4
        assert max(gaps) <= 2.0 + 1.0 + 0.1  # reconnect_max plus the 1 s connect timeout
        assert gaps[-1] > gaps[0]
        assert len(logs.fleet(LogLevel.warn)) == 1  # logged once, not per attempt
        server.frozen = False
        thawed = clock.seconds()
        for _ in range(200):
            clock.advance(0.05)
            if link.up:
                break
        # at worst the attempt under way times out (1 s), then one wait of at most reconnect_max
        assert link.up and link.resumes == 1
        assert clock.seconds() - thawed <= 1.0 + 2.0 + 0.1
        assert len(logs.fleet(LogLevel.info)) == 1 and "resumed" in logs.fleet(LogLevel.info)[0]["log_format"]


def test_heartbeat_notices_a_frozen_redis_while_idle():
    clock, server, link = make(heartbeat=1.0)
    link.start()
    server.frozen = True
    clock.advance(1.0)
    assert link.up
    clock.advance(0.06)
    assert link.state == "down" and link.errors["timeout"] >= 1


def test_garbage_reply_is_the_same_as_down():
    clock, server, link = make()
    link.start()
    server.garbage = b"HTTP/1.1 400 Bad Request\r\n\r\n"
    got = []
    link.call("PING").addErrback(lambda f: got.append(f))
    assert got and link.state == "down" and link.errors["garbage"] == 1
    server.garbage = None
    clock.advance(0.2)
    assert link.up


def test_connection_dropped_by_redis_goes_down_and_reconnects():
    clock, server, link = make()
    link.start()
    server.conns[0].abortConnection()
    assert link.state == "down" and link.errors["connection"] == 1
    assert server.conns == []  # the other connection was dropped too
    server.down = True
    clock.advance(1.0)
    assert link.state == "down"
    server.down = False
    clock.advance(5.0)
    assert link.up


def test_wrong_script_sha_is_garbage():
    clock, server, link = make()
    server.handlers["SCRIPT"] = lambda cmd: b"0" * 40
    link.start()
    assert link.state == "down" and "SCRIPT LOAD" in link.last_error


def test_stop_cancels_everything():
    clock, server, link = make()
    link.start()
    link.stop()
    assert server.conns == [] and clock.getDelayedCalls() == []


def test_flapping_redis_logs_each_change_once_and_calls_never_wait_past_the_timeout():
    clock, server, link = make(reconnect_max=0.5)
    with Logs() as logs:
        link.start()
        waits = []
        for cycle in range(5):
            # up for a while: calls answer at once
            for _ in range(100):
                clock.advance(0.01)
                if link.up:
                    break
            assert link.up, cycle
            # then it freezes mid-call, and comes back
            server.frozen = True
            t0 = clock.seconds()
            done = []
            link.call("PING").addBoth(done.append)
            while not done:
                clock.advance(0.005)
            waits.append(clock.seconds() - t0)
            assert link.state == "down"
            server.frozen = False
        assert max(waits) <= 0.05 + 0.005
        assert link.fallbacks == 5 and link.resumes == 4
        assert len(logs.fleet(LogLevel.warn)) == 5
        assert len(logs.fleet(LogLevel.info)) == 5  # connected once, resumed four times


def test_a_redis_that_connects_but_fails_every_call_backs_off_instead_of_cycling_fast():
    """E.g. OOM or a lost script on every call: each reconnect succeeds, each
    call fails. The backoff keeps growing (it restarts only after the link
    stayed up a while), so the up/down log lines come at most once per
    reconnect_max, not ten times a second."""
    clock, server, link = make(reconnect_max=2.0, heartbeat=10.0)
    with Logs() as logs:
        link.start()
        ups = []
        for _ in range(2000):  # 20 s
            if link.up:
                ups.append(clock.seconds())
                server.garbage = b"-OOM command not allowed\r\n"
                link.call("GET", "k").addErrback(lambda f: None)
                server.garbage = None
                assert not link.up
            clock.advance(0.01)
        gaps = [b - a for a, b in zip(ups, ups[1:])]
        assert len(ups) < 20, len(ups)
        assert max(gaps[-3:]) >= 1.0  # reached the cap's range (jittered: 1-2 s)
        assert len(logs.fleet(LogLevel.warn)) == len(ups)


def test_heartbeat_on_a_link_with_nothing_subscribed_stays_up():
    """A worker's link (no shared ejections: no SUBSCRIBE) gets PONG, not
    [pong, ""], on its pub/sub connection: that is no garbage."""
    clock = Clock()
    server = FakeRedis()
    settings = FleetSettings.from_config(FleetConfig(name="edge", redis="tcp:127.0.0.1:6379", heartbeat=1.0))
    link = FleetLink(settings, clock, connect=server.connect, rng=random.Random(1))
    link.start()
    assert link.up
    for _ in range(5):
        clock.advance(1.0)
    assert link.up and link.errors["garbage"] == 0 and link.fallbacks == 0
