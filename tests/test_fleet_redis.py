"""The link and the scripts against a real redis-server (started here on a
free loopback port): TLS with a private CA and a client certificate, an ACL
user limited to the fleet's keys and channel (the one docs/ha.md suggests),
the real Lua scripts, and a garbage-speaking server treated as down."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

from lbtwist.config.model import FleetConfig, FleetTLSConfig
from lbtwist.fleet.ejections import FleetEjections
from lbtwist.fleet.link import FleetLink
from lbtwist.fleet.ratelimit import LEASE_SCRIPT, FleetRateLimiter
from lbtwist.fleet.settings import FleetSettings
from lbtwist.resilience.ratelimit import RateDecision, RateLimiter
from lbtwist.tls.testing import TestCA
from support.procs import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server Debian package (make system-deps)"),
]

ACL = "user lbtwist on >pw ~lbtwist:edge:* &lbtwist:edge:* +@read +@write +@scripting +@pubsub +ping +select +time"


@pytest.fixture
def tls_redis(tmp_path):
    ca = TestCA()
    ca_path = ca.write_ca(tmp_path / "ca.pem")
    scert, skey = ca.issue("127.0.0.1", "localhost").write(tmp_path, "server")
    ccert, ckey = ca.issue("lbtwist", client=True).write(tmp_path, "client")
    port = free_port()
    (tmp_path / "users.acl").write_text(ACL + "\nuser default off\n")
    p = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--tls-cert-file", scert, "--tls-key-file", skey,
         "--tls-ca-cert-file", ca_path, "--tls-auth-clients", "yes", "--aclfile", str(tmp_path / "users.acl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            import select

            select.select([], [], [], 0.05)
    try:
        yield port, ca_path, ccert, ckey
    finally:
        p.kill()
        p.wait(10)


async def until(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_tls_client_cert_and_acl_user_run_the_real_scripts(tls_redis):
    port, ca, cert, key = tls_redis
    settings = FleetSettings.from_config(FleetConfig(
        redis=f"rediss://127.0.0.1:{port}", name="edge", username="lbtwist", password="pw",
        tls=FleetTLSConfig(ca=ca, cert=cert, key=key), connect_timeout=5.0, timeout=1.0))
    link = FleetLink(settings, reactor)
    link.add_script("lease", LEASE_SCRIPT)
    received = []
    ej = FleetEjections(link, reactor, settings.prefix, origin="me")
    link.subscribe(ej.channel, lambda data: received.append(data) or ej.on_message(data))
    lim = FleetRateLimiter(RateLimiter(10, 5), link, f"{settings.prefix}rl:web/r:", reactor,
                           lease_max=8, lease_time=1.0, timeout=1.0)
    link.start()
    try:
        await until(lambda: link.up or link.state == "down")
        assert link.up, link.last_error
        allowed = 0
        for _ in range(8):
            r = lim.check("client", reactor.seconds())
            if not isinstance(r, RateDecision):
                r = await r
            allowed += r.allowed
        assert allowed == 5  # burst 5, the real GCRA script under the ACL user
        ej.local_event("app", "127.0.0.1:9000", "ejected", reactor.seconds() + 30, "test")
        await until(lambda: received)
        assert ej.counts["echoes_ignored"] == 1 and ej.counts["published"] == 1
        got = await link.evalsha("sync", [], [f"{settings.prefix}ej:*"])
        assert len(got) == 2 and 29000 < got[1] <= 30000
        ej.local_event("app", "127.0.0.1:9000", "returned", None, "over")
        await until(lambda: len(received) == 2)
        assert await link.evalsha("sync", [], [f"{settings.prefix}ej:*"]) == []  # our key is gone
        assert link.up
    finally:
        link.stop()


@pytest_twisted.ensureDeferred
async def test_without_the_client_certificate_the_link_stays_down(tls_redis):
    port, ca, cert, key = tls_redis
    settings = FleetSettings.from_config(FleetConfig(
        redis=f"rediss://127.0.0.1:{port}", name="edge", username="lbtwist", password="pw",
        tls=FleetTLSConfig(ca=ca), connect_timeout=2.0))
    link = FleetLink(settings, reactor)
    link.start()
    try:
        await until(lambda: link.state == "down")
        assert link.last_error
    finally:
        link.stop()


class Liar(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_a_server_that_is_not_redis_is_down_not_trusted():
    f = protocol.Factory.forProtocol(Liar)
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    try:
        settings = FleetSettings.from_config(FleetConfig(
            redis=f"tcp:127.0.0.1:{port.getHost().port}", name="edge", connect_timeout=2.0))
        link = FleetLink(settings, reactor)
        link.start()
        await until(lambda: link.state == "down")
        assert link.errors["garbage"] >= 1, link.errors
        link.stop()
    finally:
        await defer.maybeDeferred(port.stopListening)
