"""Discovery against real servers on 127.0.0.1: a twisted.names DNS server
the test starts (an in-memory authority whose records change during the
test) and real HTTP origins behind an lbtwist http listener; the file source
with inotify on the real reactor. Waits are bounded by events with generous
deadlines (a loaded 2-core box)."""
from __future__ import annotations

import os
import time

import pytest_twisted
from twisted.internet import defer, reactor as real_reactor, task
from twisted.names import common, dns, error, server
from twisted.web import resource, server as web_server

from lbtwist.config import load_config
from lbtwist.config.model import DnsDiscoveryConfig
from lbtwist.discovery.base import SourceTracker
from lbtwist.discovery.dns import DnsSource
from lbtwist.discovery.file import FileSource
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService
from support.l7 import connect
from support.procs import free_port

DEADLINE = 30.0


class MemoryAuthority(common.ResolverBase):
    """Records by (name, type), changed by the test; ``mode`` scripts failures."""

    def __init__(self):
        super().__init__()
        self.records: dict[tuple[bytes, int], list] = {}
        self.mode = "answer"  # or "servfail", "nxdomain", "drop"
        self.queries = 0

    def _lookup(self, name, cls, type, timeout=None):
        self.queries += 1
        if self.mode == "servfail":
            return defer.fail(error.DNSServerError())
        if self.mode == "nxdomain":
            return defer.fail(error.DNSNameError())
        if self.mode == "drop":
            return defer.Deferred()  # never answered: the client times out
        key = (name.lower() if isinstance(name, bytes) else name.encode().lower(), type)
        rrs = self.records.get(key)
        if rrs is None:
            return defer.fail(error.DomainError())
        answers = [dns.RRHeader(name=name, type=type, ttl=r.ttl, payload=r, auth=True) for r in rrs]
        return defer.succeed((answers, [], []))


class DnsServer:
    def __init__(self):
        self.auth = MemoryAuthority()
        factory = server.DNSServerFactory(authorities=[self.auth])
        factory.noisy = False
        self.port = real_reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"

    def srv(self, name: str, *targets: tuple[int, int, int], ttl: int = 0) -> None:
        """targets: (priority, weight, port), all on host t.test -> 127.0.0.1."""
        self.auth.records[(name.encode(), dns.SRV)] = [
            dns.Record_SRV(p, w, port, "t.test", ttl=ttl) for p, w, port in targets
        ]
        self.auth.records[(b"t.test", dns.A)] = [dns.Record_A("127.0.0.1", ttl=ttl)]

    async def stop(self):
        await self.port.stopListening()


class _Named(resource.Resource):
    isLeaf = True

    def __init__(self, name: bytes):
        super().__init__()
        self.name = name

    def render_GET(self, request):
        return self.name


class Origins:
    def __init__(self, *names: bytes):
        self.ports = {}
        for n in names:
            site = web_server.Site(_Named(n))
            site.noisy = False
            self.ports[n] = real_reactor.listenTCP(0, site, interface="127.0.0.1")

    def port(self, n: bytes) -> int:
        return self.ports[n].getHost().port

    async def stop(self):
        for p in self.ports.values():
            await p.stopListening()




async def http_get(port: int) -> bytes:
    c = await connect(real_reactor, port)
    c.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await c.closed(real_reactor, 20)
    return data.rpartition(b"\r\n\r\n")[2]


async def until(cond, what: str, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(real_reactor, 0.05, lambda: None)


async def bodies(port: int, n: int) -> set[bytes]:
    return {await http_get(port) for _ in range(n)}


@pytest_twisted.ensureDeferred
async def test_srv_discovery_adds_removes_and_survives_dns_failures(tmp_path):
    dns_server = DnsServer()
    origins = Origins(b"A", b"B", b"C")
    name = "_http._tcp.app.test"
    dns_server.srv(name, (10, 1, origins.port(b"A")))
    web = free_port()
    text = (
        "listeners:\n"
        f'  - {{name: web, bind: "tcp:{web}:interface=127.0.0.1", mode: http, pool: app}}\n'
        "pools:\n"
        "  - name: app\n"
        "    algorithm: round_robin\n"
        "    drain_timeout: 1s\n"
        f"    discovery: [{{dns: {{name: {name!r}, resolver: {dns_server.address!r}, "
        "refresh: 300ms, refresh_min: 200ms, timeout: 1s}}]\n"
    )
    reg = Registry.default(entry_points=False)
    svc = LbtwistService(load_config(text, reg).config, real_reactor, reg)
    svc.privilegedStartService()
    svc.startService()
    pool = svc.runtime.pools["app"]
    tracker = svc.discovery["app"].trackers[0]
    addr = lambda n: f"127.0.0.1:{origins.port(n)}"  # noqa: E731
    members = lambda: {b.address for b in pool.backends()}  # noqa: E731
    try:
        await until(lambda: members() == {addr(b"A")}, "the first SRV answer")
        assert await bodies(web, 4) == {b"A"}
        # add B (same priority) and C (a lower priority: standby, weight 0)
        dns_server.srv(name, (10, 1, origins.port(b"A")), (10, 1, origins.port(b"B")), (20, 1, origins.port(b"C")))
        await until(lambda: len(members()) == 3, "B and C added")
        assert pool.get(addr(b"C")).weight == 0.0
        assert await bodies(web, 8) == {b"A", b"B"}
        # failures: each keeps the set
        for mode in ("servfail", "nxdomain", "drop"):
            dns_server.auth.mode = mode
            failures = tracker.failures
            await until(lambda: tracker.failures > failures, f"a {mode} failure")
            assert tracker.state == "failing" and len(members()) == 3
            assert await bodies(web, 4) == {b"A", b"B"}
        assert tracker.last_error == "timeout"
        dns_server.auth.mode = "answer"
        # empty answer (the record set is gone): kept
        del dns_server.auth.records[(name.encode(), dns.SRV)]
        failures = tracker.failures
        await until(lambda: tracker.failures > failures, "an empty answer")
        assert len(members()) == 3
        # recovery, and a removal of one of three (33%: applied at once)
        dns_server.srv(name, (10, 1, origins.port(b"B")), (20, 1, origins.port(b"C")))
        await until(lambda: members() == {addr(b"B"), addr(b"C")}, "A drained and removed")
        assert tracker.state == "ok"
        assert await bodies(web, 4) == {b"B"}
        # the preferred group leaves rotation: the standby takes the traffic
        b = pool.get(addr(b"B"))
        pool.set_enabled(b, False, "test: out of rotation")
        await until(lambda: pool.get(addr(b"C")).weight == 1.0, "SRV priority failover")
        assert await bodies(web, 4) == {b"C"}
        pool.set_enabled(b, True, "test: back")
        await until(lambda: pool.get(addr(b"C")).weight == 0.0, "back to the preferred group")
    finally:
        await svc.stopService()
        await origins.stop()
        await dns_server.stop()


@pytest_twisted.ensureDeferred
async def test_dns_ttl_sets_the_next_resolution():
    """A 1s TTL: re-resolved about every second, not at refresh_min."""
    dns_server = DnsServer()
    name = "_x._tcp.ttl.test"
    dns_server.srv(name, (0, 1, 9001), ttl=1)
    cfg = DnsDiscoveryConfig(name=name, resolver=dns_server.address, refresh_min=0.1, refresh_max=60.0)
    src = DnsSource(cfg, real_reactor)
    t = SourceTracker("p", "dns", name, real_reactor, lambda: None)
    try:
        src.start(t)
        await until(lambda: t.accepted is not None, "the first answer")
        assert src.next_in == 1.0
        start, seen = time.monotonic(), dns_server.auth.queries
        await until(lambda: dns_server.auth.queries >= seen + 4, "two more resolutions")  # SRV + A each
        assert time.monotonic() - start >= 1.5
    finally:
        src.stop()
        await dns_server.stop()


@pytest_twisted.ensureDeferred
async def test_file_source_sees_atomic_rename_through_inotify(tmp_path):
    """poll_interval is an hour: only inotify can see these changes in time."""
    path = tmp_path / "backends.json"
    path.write_text('["127.0.0.1:9001"]')
    t = SourceTracker("p", "file", str(path), real_reactor, lambda: None, max_shrink=100.0)
    src = FileSource(str(path), real_reactor, poll_interval=3600.0)
    try:
        src.start(t)
        assert {e.address for e in t.accepted} == {"127.0.0.1:9001"}
        tmp = tmp_path / ".backends.json.tmp"
        tmp.write_text('["127.0.0.1:9002", "127.0.0.1:9003"]')
        os.rename(tmp, path)
        await until(lambda: {e.address for e in t.accepted} == {"127.0.0.1:9002", "127.0.0.1:9003"},
                    "the renamed file read")
        with open(path, "w") as f:  # truncated in place: kept
            f.truncate(0)
        await until(lambda: t.state == "failing", "the truncation seen")
        assert len(t.accepted) == 2
        path.write_text('["127.0.0.1:9004"]')
        await until(lambda: t.state == "ok", "the rewrite read")
        assert {e.address for e in t.accepted} == {"127.0.0.1:9004"}
    finally:
        src.stop()
