# -*- test-case-name: tests.test_fleet_link -*-
"""The connections to Redis and whether they can be trusted right now.

Two connections: one for commands (scripts, PING), one subscribed to the
fleet's channels. The link is ``up`` only while both answered their last
call in time; every call carries ``timeout`` (50 ms by default), and a call
that times out, a connection that drops, or a reply that is not what the
command returns (garbage) takes the link ``down`` at once: both connections
are dropped, callers fall back to local decisions, and reconnect attempts
follow with a jittered backoff doubling from 100 ms up to ``reconnect_max``.
A frozen Redis (SIGSTOP) accepts TCP connections but answers nothing; the
heartbeat (PING on both connections every ``heartbeat``) notices it while
idle, and a reconnect attempt must finish AUTH, SELECT, SCRIPT LOAD and
SUBSCRIBE within ``connect_timeout``.

The change is logged once each way (down, and back up); attempts that fail
while already down are counted, not logged. The backoff starts over only
once the link stayed up ``STABLE_UP`` seconds, so a Redis that accepts
connections but fails every call (out of memory, say) is retried at most
every ``reconnect_max``, not every 100 ms. Never a blocking call.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbtwist.fleet.resp import ProtocolError, ReplyError, RespProtocol
from lbtwist.fleet.settings import FleetSettings

log = Logger(namespace="lbtwist.fleet")

#: First reconnect delay; doubles per failed attempt up to reconnect_max.
FIRST_BACKOFF = 0.1
#: The backoff starts over only after the link stayed up this long: a Redis
#: that accepts connections but fails every call does not cycle every 100 ms.
STABLE_UP = 5.0


class FleetDown(Exception):
    """The link is not up: decide locally."""


def classify(f: Failure) -> str:
    """The error counter a failed call goes to."""
    if f.check(TimeoutError, CancelledError):
        return "timeout"
    if f.check(ProtocolError):
        return "garbage"
    if f.check(ReplyError):
        return "error_reply"
    if f.check(ConnectError, ConnectionLost):
        return "connection"
    return "other"


def sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


def endpoint_connector(settings: FleetSettings, reactor: Any) -> Callable[[RespProtocol], defer.Deferred]:
    """``connect(protocol) -> Deferred(protocol)`` over TCP, unix or TLS."""
    from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol

    t = settings.target
    if t.path is not None:
        ep: Any = UNIXClientEndpoint(reactor, t.path, timeout=settings.connect_timeout)
    else:
        ep = HostnameEndpoint(reactor, t.host, t.port, timeout=settings.connect_timeout)
        if settings.tls:
            from twisted.internet import ssl

            trust = None
            if settings.ca is not None:
                pem = open(settings.ca, "rb").read()
                certs = [ssl.Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
                         for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
                trust = ssl.trustRootFromCertificates(certs)
            client = None
            if settings.cert is not None and settings.key is not None:
                client = ssl.PrivateCertificate.loadPEM(
                    open(settings.cert, "rb").read() + b"\n" + open(settings.key, "rb").read())
            opts = ssl.optionsForClientTLS(settings.server_name or t.host, trustRoot=trust, clientCertificate=client)
            from lbtwist.tls.client import TLSClientEndpoint

            ep = TLSClientEndpoint(ep, opts, reactor)

    def connect(proto: RespProtocol) -> defer.Deferred:
        return connectProtocol(ep, proto)

    return connect


class FleetLink:
    """Both Redis connections, their timeouts, and the up/down state."""

    def __init__(
        self,
        settings: FleetSettings,
        reactor: Any,
        *,
        connect: Callable[[RespProtocol], defer.Deferred] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.connect = connect or endpoint_connector(settings, reactor)
        self.rng = rng or random.Random()
        #: connecting (before the first answer) | up | down
        self.state = "connecting"
        self.since = reactor.seconds()
        self.last_error: str | None = None
        self.cmd: RespProtocol | None = None
        self.sub: RespProtocol | None = None
        #: name -> (source, sha1)
        self.scripts: dict[str, tuple[str, str]] = {}
        #: channel -> handler(data: bytes)
        self.channels: dict[str, Callable[[bytes], None]] = {}
        #: Run once the link is up (e.g. learn current ejections); may return a Deferred.
        self.on_up: list[Callable[[], Any]] = []
        #: ``fn(up: bool)`` on every change of state.
        self.on_change: list[Callable[[bool], None]] = []
        self.errors: dict[str, int] = {"timeout": 0, "garbage": 0, "error_reply": 0, "connection": 0, "other": 0}
        self.fallbacks = 0
        self.resumes = 0
        self.attempts = 0
        self._failures_in_row = 0
        self._retry: Any = None
        self._heartbeat: Any = None
        self._connecting: defer.Deferred | None = None
        self.running = False

    # -- public ---------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.state == "up"

    def add_script(self, name: str, source: str) -> None:
        self.scripts[name] = (source, sha1(source))

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        self.channels[channel] = handler

    def start(self) -> None:
        self.running = True
        self._attempt()

    def stop(self) -> None:
        self.running = False
        for c in (self._retry, self._heartbeat):
            if c is not None and c.active():
                c.cancel()
        self._retry = self._heartbeat = None
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._drop()

    def call(self, *args: Any) -> defer.Deferred:
        """A command on the command connection, answered within ``timeout``
        or failed; any failure takes the link down. Fails at once with
        L{FleetDown} when the link is not up (no waiting on a dead Redis)."""
        if not self.up or self.cmd is None:
            return defer.fail(FleetDown(self.last_error or "Redis is not connected"))
        return self._timed(self.cmd, args)

    def evalsha(self, name: str, keys: list[str], args: list[Any]) -> defer.Deferred:
        _, sha = self.scripts[name]
        return self.call("EVALSHA", sha, len(keys), *keys, *args)

    def failed(self, kind: str, why: str) -> None:
        """A caller found a reply unusable (wrong shape): Redis is as good as down."""
        self._failed(kind, why)

    def status(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        nxt = None
        if self._retry is not None and self._retry.active():
            nxt = round(max(0.0, self._retry.getTime() - now), 3)
        return {
            "redis": self.settings.target.describe(),
            "name": self.settings.name,
            "state": self.state,
            "mode": "fleet" if self.up else "local",
            "redis_up": self.up,
            "since_s": round(max(0.0, now - self.since), 3),
            "last_error": self.last_error,
            "next_attempt_in_s": nxt,
            "fallbacks_total": self.fallbacks,
            "resumes_total": self.resumes,
            "connect_attempts_total": self.attempts,
            "errors_total": dict(self.errors),
        }

    # -- calls ----------------------------------------------------------------------

    def _timed(self, proto: RespProtocol, args: tuple, timeout: float | None = None) -> defer.Deferred:
        d = proto.call(*args)
        d.addTimeout(self.settings.timeout if timeout is None else timeout, self.reactor)

        def bad(f: Failure) -> Failure:
            if proto is self.cmd or proto is self.sub:
                kind = classify(f)
                self._failed(kind, f"{args[0]}" if kind == "timeout" else
                             f"{args[0]}: {f.getErrorMessage() or f.type.__name__}")
            return f

        return d.addErrback(bad)

    # -- connecting -----------------------------------------------------------------

    def _attempt(self) -> None:
        self._retry = None
        if not self.running:
            return
        self.attempts += 1
        d = self._connecting = defer.ensureDeferred(self._open())
        d.addTimeout(self.settings.connect_timeout, self.reactor)
        d.addCallbacks(self._opened, self._open_failed)

    async def _open(self) -> tuple[RespProtocol, RespProtocol]:
        cmd = sub = None
        try:
            cmd = await self.connect(RespProtocol(on_lost=lambda why: self._lost(cmd, why)))
            await self._hello(cmd)
            for name, (source, sha) in self.scripts.items():
                got = await cmd.call("SCRIPT", "LOAD", source)
                if got != sha.encode():
                    raise ProtocolError(f"SCRIPT LOAD of {name} answered {str(got)[:60]}, not its SHA1")
            sub = await self.connect(RespProtocol(on_push=self._push, on_lost=lambda why: self._lost(sub, why)))
            await self._hello(sub)
            for channel in self.channels:
                got = await sub.call("SUBSCRIBE", channel)
                if not (isinstance(got, list) and len(got) == 3 and got[0] == b"subscribe"):
                    raise ProtocolError(f"SUBSCRIBE answered {str(got)[:60]}")
            return cmd, sub
        except BaseException:
            for p in (cmd, sub):
                if p is not None:
                    p.close()
            raise

    async def _hello(self, p: RespProtocol) -> None:
        s = self.settings
        if s.password is not None:
            args = ("AUTH", s.username, s.password) if s.username else ("AUTH", s.password)
            got = await p.call(*args)
            if got != b"OK":
                raise ProtocolError(f"AUTH answered {str(got)[:60]}")
        if s.db:
            got = await p.call("SELECT", s.db)
            if got != b"OK":
                raise ProtocolError(f"SELECT answered {str(got)[:60]}")
        got = await p.call("PING")
        if got != b"PONG":
            raise ProtocolError(f"PING answered {str(got)[:60]}")

    def _opened(self, pair: tuple[RespProtocol, RespProtocol]) -> None:
        self._connecting = None
        if not self.running:
            for p in pair:
                p.close()
            return
        self.cmd, self.sub = pair
        was = self.state
        self.state = "up"
        self.since = self.reactor.seconds()
        if was == "down":
            self.resumes += 1
            log.info("fleet {name}: Redis at {redis} is back: fleet mode resumed (shared rate limits and ejections)",
                     name=self.settings.name, redis=self.settings.target.describe())
        else:
            log.info("fleet {name}: connected to Redis at {redis}: fleet mode",
                     name=self.settings.name, redis=self.settings.target.describe())
        self._schedule_heartbeat()
        self._notify(True)
        for hook in list(self.on_up):
            d = defer.maybeDeferred(hook)
            d.addErrback(lambda f: None)  # a failed call already took the link down

    def _open_failed(self, f: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        kind = classify(f)
        self.errors[kind] += 1
        why = f"connecting: {f.getErrorMessage() or f.type.__name__}"
        if kind == "timeout":
            why = f"connecting: no answer within {self.settings.connect_timeout:g}s"
        self._go_down(why)

    # -- failures -------------------------------------------------------------------

    def _lost(self, proto: RespProtocol | None, why: str) -> None:
        if proto is not None and (proto is self.cmd or proto is self.sub):
            self.errors["garbage" if why.startswith("garbage") else "connection"] += 1
            self._go_down(why)

    def _failed(self, kind: str, why: str) -> None:
        if not self.up:
            return
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if kind == "timeout":
            why = f"{why} (no answer within {self.settings.timeout * 1000:g}ms)"
        self._go_down(why)

    def _go_down(self, why: str) -> None:
        self.last_error = why
        was = self.state
        if was == "up" and self.reactor.seconds() - self.since >= STABLE_UP:
            self._failures_in_row = 0  # it had been fine: the next attempt comes soon
        self._drop()
        if was != "down":
            self.state = "down"
            self.since = self.reactor.seconds()
            self.fallbacks += 1
            log.warn("fleet {name}: Redis at {redis} unusable ({why}): local rate limits and local ejections "
                     "until it is back", name=self.settings.name, redis=self.settings.target.describe(), why=why)
            self._notify(False)
        self._schedule_retry()

    def _drop(self) -> None:
        cmd, sub, self.cmd, self.sub = self.cmd, self.sub, None, None
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        for p in (cmd, sub):
            if p is not None:
                p.close()

    def _schedule_retry(self) -> None:
        if not self.running or self._connecting is not None:
            return
        if self._retry is not None and self._retry.active():
            return
        delay = min(self.settings.reconnect_max, FIRST_BACKOFF * (2 ** self._failures_in_row))
        self._failures_in_row = min(self._failures_in_row + 1, 30)
        delay *= 0.5 + 0.5 * self.rng.random()
        self._retry = self.reactor.callLater(delay, self._attempt)

    def _notify(self, up: bool) -> None:
        for fn in list(self.on_change):
            try:
                fn(up)
            except Exception:
                log.failure("fleet: a state listener failed")

    # -- heartbeat and pub/sub -------------------------------------------------------

    def _schedule_heartbeat(self) -> None:
        self._heartbeat = self.reactor.callLater(self.settings.heartbeat, self._beat)

    def _beat(self) -> None:
        self._heartbeat = None
        if not self.up or self.cmd is None or self.sub is None:
            return
        sub = self.sub

        def pong(got: Any, wants: tuple, proto: RespProtocol) -> None:
            if got not in wants and (proto is self.cmd or proto is self.sub):
                self._failed("garbage", f"PING answered {str(got)[:60]}")

        self._timed(self.cmd, ("PING",)).addCallback(pong, (b"PONG",), self.cmd).addErrback(lambda f: None)
        # a subscribed connection answers [pong, ""]; one with nothing to
        # subscribe to (a worker: no shared ejections) answers PONG
        self._timed(sub, ("PING",)).addCallback(pong, ([b"pong", b""], b"PONG"), sub).addErrback(lambda f: None)
        if self.up:
            self._schedule_heartbeat()

    def _push(self, reply: Any) -> bool:
        """Claim pub/sub messages on the subscribed connection."""
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
            channel = reply[1].decode("utf-8", "replace") if isinstance(reply[1], bytes) else ""
            handler = self.channels.get(channel)
            if handler is not None and isinstance(reply[2], bytes):
                try:
                    handler(reply[2])
                except Exception:
                    log.failure("fleet: handling a message on {channel} failed", channel=channel)
            return True
        return False
