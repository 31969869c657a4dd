"""The admin listener's connections in memory (StringTransport, MemoryReactorClock):
a request head is judged before any body is read and a body never reaches a
temporary file; a request must arrive within admin.header_timeout however
slowly it trickles; the connection caps push out the oldest connection that
has not yet sent an authorized request, never a served one."""
from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from lbtwist.admin import AdminService, admin_config_problems
from lbtwist.admin.api import MAX_BODY
from lbtwist.config import ConfigError, load_config
from lbtwist.config.model import AdminConfig, Config, PoolConfig
from lbtwist.pool import Backend, Pool
from lbtwist.registry import Registry
from lbtwist.runtime import Runtime
from support.fakes import FirstBalancer

TOKEN = "admin-channel-token-0123456789"
AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
DRAIN = b"POST /api/pools/web/backends/127.0.0.1:9001/drain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
METRICS = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class Env:
    def __init__(self, **admin):
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        admin.setdefault("token", TOKEN)
        self.cfg = AdminConfig(bind="tcp:0:interface=127.0.0.1", **admin)
        self.rt = Runtime(reactor=self.clock, registry=Registry(), config=Config(admin=self.cfg))
        self.pool = Pool("web", [Backend(address="127.0.0.1:9001")], FirstBalancer(), self.clock)
        self.rt.pools["web"] = self.pool
        self.rt.pool_configs["web"] = PoolConfig(name="web")
        self.svc = AdminService(self.cfg, self.rt, process_metrics=False)

    def connect(self, client: str = "127.0.0.1", port: int = 40000):
        proto = self.svc.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9900))
        t = StringTransport(peerAddress=IPv4Address("TCP", client, port))
        proto.makeConnection(t)
        return proto, t


def status_of(t: StringTransport) -> int | None:
    raw = t.value()
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None


def body_of(t: StringTransport):
    return json.loads(t.value().split(b"\r\n\r\n", 1)[1])


@pytest.fixture
def no_tempfile(monkeypatch):
    """twisted.web spools a request body of 100 KB or more to a temporary
    file: any such file is a failure here."""
    from twisted.web import http

    made = []

    def refuse(*a, **kw):
        made.append(a)
        raise AssertionError("a request body was spooled to a temporary file")

    monkeypatch.setattr(http.tempfile, "TemporaryFile", refuse)
    return made


# -- the request head is judged before the body ----------------------------------------


def test_huge_unauthenticated_body_is_refused_on_its_head(no_tempfile):
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(DRAIN + b"Content-Length: 10000000000\r\n\r\n")
    assert status_of(t) == 401  # answered before a single body byte was sent
    assert b"www-authenticate: Bearer" in t.value() and t.disconnecting
    assert body_of(t) == {"error": "missing or wrong bearer token", "status": 401}
    answered = t.value()
    proto.dataReceived(b"x" * 1_000_000)  # whatever follows is not read, nor stored
    assert t.value() == answered and not no_tempfile
    assert not env.pool.backends()[0].draining


def test_authenticated_body_over_the_cap_is_refused_on_its_content_length(no_tempfile):
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(DRAIN + AUTH + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (MAX_BODY + 1))
    assert status_of(t) == 413 and t.disconnecting
    assert b"100 Continue" not in t.value()  # the client is not invited to send it
    assert f"larger than {MAX_BODY} bytes" in body_of(t)["error"]
    assert not no_tempfile and not env.pool.backends()[0].draining


def test_chunked_body_is_refused_as_soon_as_it_passes_the_cap(no_tempfile):
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(DRAIN + AUTH + b"Transfer-Encoding: chunked\r\n\r\n")
    assert t.value() == b""
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b" " * 16 * 1024)
    for _ in range(4):  # 64 KiB: still within the cap
        proto.dataReceived(chunk)
    assert t.value() == b""
    proto.dataReceived(chunk + chunk + b"0\r\n\r\n")
    assert status_of(t) == 413 and t.disconnecting
    assert not no_tempfile and not env.pool.backends()[0].draining


def test_a_body_within_the_cap_is_held_in_memory_and_served(no_tempfile):
    env = Env()
    proto, t = env.connect()
    body = b"{}" + b" " * (MAX_BODY - 2)
    proto.dataReceived(DRAIN + AUTH + b"Content-Length: %d\r\n\r\n" % len(body))
    proto.dataReceived(body)
    assert status_of(t) == 200 and body_of(t)["state"] == "draining"
    assert not t.disconnecting and not no_tempfile  # kept alive


def test_head_refusals_cover_origin_host_and_head_requests():
    env = Env(token=None)  # tokenless loopback: Host and Origin are checked
    proto, t = env.connect()
    proto.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert status_of(t) == 403 and "not a loopback name" in body_of(t)["error"]
    proto, t = env.connect()
    proto.dataReceived(DRAIN + b"Origin: http://evil.example\r\nContent-Length: 2\r\n\r\n")
    assert status_of(t) == 403 and "cross-origin" in body_of(t)["error"]
    env = Env()
    proto, t = env.connect()
    proto.dataReceived(b"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, rest = t.value().partition(b"\r\n\r\n")
    assert status_of(t) == 401 and rest == b"" and b"content-length: " in head  # no body after a HEAD


# -- the request deadline -------------------------------------------------------------


def test_a_trickling_request_is_closed_at_the_header_timeout():
    env = Env(header_timeout=5.0)
    proto, t = env.connect()
    request = METRICS + AUTH + b"\r\n"
    for i in range(4):  # one byte a second resets an idle timeout, not this deadline
        proto.dataReceived(request[i:i + 1])
        env.clock.advance(1.0)
    assert not t.disconnecting
    env.clock.advance(1.01)
    assert status_of(t) == 408 and t.disconnecting
    assert "admin.header_timeout" in body_of(t)["error"]
    assert len(env.svc.gate) == 0  # its place is free at once
    env.clock.advance(2.1)
    assert t.disconnected  # a peer that does not take the answer is cut


def test_a_silent_new_connection_is_closed_at_the_header_timeout():
    env = Env(header_timeout=3.0)
    proto, t = env.connect()
    env.clock.advance(2.9)
    assert not t.disconnecting
    env.clock.advance(0.2)
    assert status_of(t) == 408


def test_a_kept_alive_connection_waits_idle_then_gets_the_deadline_from_its_first_byte():
    env = Env(header_timeout=5.0, idle_timeout=60.0)
    proto, t = env.connect()
    proto.dataReceived(METRICS + AUTH + b"\r\n")
    assert status_of(t) == 200
    t.clear()
    env.clock.advance(30.0)  # idle between requests: the idle timeout applies, not the deadline
    assert not t.disconnecting
    proto.dataReceived(b"G")
    env.clock.advance(4.9)
    assert not t.disconnecting
    env.clock.advance(0.2)
    assert status_of(t) == 408
    env = Env(header_timeout=5.0, idle_timeout=60.0)
    proto, t = env.connect()
    proto.dataReceived(METRICS + AUTH + b"\r\n")
    env.clock.advance(60.1)
    assert t.disconnecting  # idle too long (twisted.web's default would be 12 hours)


def test_no_deadline_while_a_request_is_being_answered():
    from twisted.internet import defer

    pending = defer.Deferred()
    env = Env(header_timeout=2.0)
    env.svc.resource.reload = lambda: pending
    proto, t = env.connect()
    proto.dataReceived(b"POST /api/reload HTTP/1.1\r\nHost: 127.0.0.1\r\n" + AUTH + b"\r\n")
    env.clock.advance(10.0)  # the reload takes long: that is not the client's fault
    assert not t.disconnecting and t.value() == b""
    pending.callback(None)
    assert status_of(t) == 200 and b'{"reloaded":true}' in t.value()


# -- connection caps --------------------------------------------------------------------


def test_per_client_cap_pushes_out_the_oldest_silent_connection_of_that_client():
    env = Env(max_connections_per_client=3, max_connections=10)
    flood = [env.connect("127.0.0.9", 50000 + i) for i in range(3)]
    other, ot = env.connect("127.0.0.8")
    proto, t = env.connect("127.0.0.9", 50010)  # the 4th from .9: its oldest silent one goes
    assert flood[0][1].disconnected and not any(ft.disconnecting for _, ft in flood[1:])
    assert not ot.disconnecting and env.svc.gate.count("127.0.0.9") == 3
    proto.dataReceived(METRICS + AUTH + b"\r\n")  # and the newcomer is served
    assert status_of(t) == 200


def test_served_connections_are_never_pushed_out_the_newcomer_is_refused():
    env = Env(max_connections_per_client=2, max_connections=10)
    served = []
    for i in range(2):
        proto, t = env.connect("127.0.0.9", 50000 + i)
        proto.dataReceived(METRICS + AUTH + b"\r\n")
        assert status_of(t) == 200
        served.append(t)
    proto, t = env.connect("127.0.0.9", 50005)
    assert status_of(t) == 503 and t.disconnecting and b"retry-after: 1" in t.value()
    assert "admin.max_connections_per_client" in body_of(t)["error"]
    assert not any(s.disconnecting for s in served)
    assert env.svc.gate.refused == 1 and env.svc.gate.count("127.0.0.9") == 2


def test_total_cap_pushes_out_the_oldest_untrusted_connection_of_any_client():
    env = Env(max_connections_per_client=8, max_connections=4)
    served, st = env.connect("127.0.0.5")
    served.dataReceived(METRICS + AUTH + b"\r\n")
    silent = [env.connect(f"127.0.0.{10 + i}") for i in range(3)]
    # an unauthenticated head does not earn a place: refused and gone
    bad, bt = env.connect("127.0.0.20")
    assert silent[0][1].disconnected  # made room for `bad`
    bad.dataReceived(METRICS + b"\r\n")
    assert status_of(bt) == 401 and len(env.svc.gate) == 3
    newcomer, nt = env.connect("127.0.0.30")
    assert len(env.svc.gate) == 4 and not silent[1][1].disconnecting
    another, at = env.connect("127.0.0.31")
    assert silent[1][1].disconnected and not st.disconnecting
    assert env.svc.gate.evicted == 2


def test_total_cap_evicts_from_the_busiest_client_not_an_older_monitor():
    """At the total cap the flood pays: the victim is the oldest untrusted
    connection of the address holding the most, so a monitoring client's
    one connection (older, its head not read yet) survives the burst."""
    env = Env(max_connections_per_client=8, max_connections=4)
    monitor, mt = env.connect("127.0.0.1")  # connected first, head still in flight
    flood = [env.connect("127.0.0.9", 50000 + i) for i in range(3)]
    more = [env.connect("127.0.0.9", 50100 + i) for i in range(5)]  # a burst past the cap
    assert not mt.disconnecting
    assert all(ft.disconnected for _, ft in flood) and env.svc.gate.count("127.0.0.9") == 3
    assert not any(t.disconnecting for _, t in more[2:])
    monitor.dataReceived(METRICS + AUTH + b"\r\n")
    assert status_of(mt) == 200


def test_a_closed_connection_frees_its_place():
    env = Env(max_connections_per_client=1)
    proto, t = env.connect("127.0.0.9")
    proto.dataReceived(METRICS + AUTH + b"\r\n")
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    proto.connectionLost(Failure(ConnectionDone()))
    assert len(env.svc.gate) == 0 and env.svc.connections == set()
    proto, t = env.connect("127.0.0.9")
    proto.dataReceived(METRICS + AUTH + b"\r\n")
    assert status_of(t) == 200


def test_a_reload_applies_new_limits():
    env = Env(max_connections_per_client=1)
    env.rt.config = Config(admin=AdminConfig(bind=env.cfg.bind, token=TOKEN, max_connections_per_client=5,
                                             max_connections=7, idle_timeout=9.0))
    env.svc.follow_admin_config()
    assert (env.svc.gate.max_total, env.svc.gate.max_per_client) == (7, 5)
    proto, t = env.connect()
    assert proto.timeOut == 9.0


# -- configuration ------------------------------------------------------------------


@pytest.mark.parametrize("key,value,needle", [
    ("header_timeout", 0.0, "must be above 0"),
    ("idle_timeout", 0.0, "must be above 0"),
    ("max_connections", 0, "must be at least 1"),
    ("max_connections_per_client", 0, "must be at least 1"),
])
def test_limits_are_validated(key, value, needle):
    problems = admin_config_problems(AdminConfig(**{key: value}))
    assert [(p, needle in m) for p, m in problems] == [(f"admin.{key}", True)]
    with pytest.raises(ValueError, match=f"admin.{key}"):
        Env(**{key: value})


def test_limits_load_from_yaml_and_bad_ones_are_errors_on_their_line():
    text = ("admin:\n  bind: \"tcp:9900:interface=127.0.0.1\"\n  header_timeout: 2s\n"
            "  idle_timeout: 30s\n  max_connections: 32\n  max_connections_per_client: 4\n")
    cfg = load_config(text, Registry()).config
    assert (cfg.admin.header_timeout, cfg.admin.idle_timeout, cfg.admin.max_connections,
            cfg.admin.max_connections_per_client) == (2.0, 30.0, 32, 4)
    with pytest.raises(ConfigError) as e:
        load_config(text.replace("max_connections: 32", "max_connections: 0"), Registry(), source_name="t.yaml")
    [p] = e.value.problems
    assert p.path == "admin.max_connections" and p.line == 5 and "at least 1" in p.message


def test_a_trickling_body_is_bounded_by_the_same_deadline():
    env = Env(header_timeout=5.0)
    proto, t = env.connect()
    proto.dataReceived(DRAIN + AUTH + b"Content-Length: 100\r\n\r\n")  # the head at once
    for _ in range(4):
        proto.dataReceived(b" ")
        env.clock.advance(1.0)
    assert t.value() == b""
    env.clock.advance(1.01)
    assert status_of(t) == 408 and not env.pool.backends()[0].draining


def test_after_twisted_webs_own_400_the_deadline_adds_nothing():
    env = Env(header_timeout=5.0)
    proto, t = env.connect()
    proto.dataReceived(b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n")
    answered = t.value()
    assert answered.startswith(b"HTTP/1.1 400 ") and t.disconnecting
    env.clock.advance(5.1)
    assert t.value() == answered and len(env.svc.gate) == 0
    env.clock.advance(2.1)
    assert t.disconnected  # a peer that does not let go is cut
