"""The master's side: spawns and supervises the worker processes, keeps them
on one fleet view, and takes reloads and shutdown to all of them.

The master is the twistd process (``workers:`` above 1). Its LbtwistService
runs in role "master": pools, health probes (once for the fleet), discovery,
admin API and /metrics, but no listeners. L{Fleet} is a child of that
service and owns:

- the listening sockets, one SO_REUSEPORT socket per listener per worker
  slot (L{lbtwist.workers.sockets}); the master's copy keeps a slot's queue
  alive while its worker is replaced;
- one worker process per slot (``reactor.spawnProcess`` with the AMP pipes
  on the child's fds 3/4 and the slot's sockets after them), supervised by
  the sans-IO L{Supervisor}; plus one pre-started **spare** (exec'd
  workers): imported, config loaded, holding every slot's sockets, it takes
  the next slot that needs a worker (a replacement serves in about 0.1 s
  instead of a Python start-up), and a new spare starts once it serves;
- the fleet view: a snapshot (lbtwist.workers.fleetview) goes to every worker
  within 100 ms of a change, and an admin change waits for every worker's ack;
  passive outcomes come back and feed the master's outlier detection.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.protocols import amp

from lbtwist.workers import fleetview, forked
from lbtwist.workers.count import worker_count
from lbtwist.workers.protocol import (
    CHILD_IN, CHILD_OUT, Bridge, Fetch, Parts, Ping, Put, Ready, put_all,
)
from lbtwist.workers.sockets import ListenSocket, open_socket
from lbtwist.workers.supervisor import Supervisor

log = Logger(namespace="lbtwist.workers")

#: how often the master checks the fleet view for changes to push
PUSH_INTERVAL = 0.05
#: heartbeat period, and how long one Ping may take
PING_INTERVAL = 0.5
PING_TIMEOUT = 2.0
#: an admin change waits at most this for every worker's ack
ACK_TIMEOUT = 5.0
#: after SIGTERM a worker not gone within its drain plus this is killed
STOP_GRACE = 10.0
#: a spare that died is replaced after this, doubling per failure in a row up to SPARE_RETRY_MAX
SPARE_RETRY = 1.0
SPARE_RETRY_MAX = 30.0


def reactor_name(reactor: Any) -> str:
    """What the worker installs to run the master's reactor kind."""
    mod = type(reactor).__module__
    if mod.startswith("lbtwist.fastio"):
        return "lean"
    for name in ("epoll", "poll", "select", "asyncio"):
        if mod == f"twisted.internet.{name}reactor":
            return name
    return "default"


def exit_reason(reason: Any) -> str:
    """'exit code N' or 'killed by signal N (NAME)' from processEnded's reason."""
    v = getattr(reason, "value", reason)
    sig = getattr(v, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"killed by signal {sig} ({name})"
    return f"exit code {getattr(v, 'exitCode', None)}"


class MasterAMP(amp.AMP):
    def __init__(self, fleet: "Fleet", wid: int) -> None:
        super().__init__()
        self.fleet = fleet
        self.wid = wid
        self.parts = Parts({"outcomes": self._outcomes})

    @Put.responder
    def put(self, kind: str, part: bytes, more: bool) -> Any:
        return self.parts.put(kind, part, more)

    @Ready.responder
    def ready(self, pid: int) -> dict:
        self.fleet.worker_ready(self.wid)
        return {}

    def _outcomes(self, data: bytes) -> None:
        self.fleet.outcomes(self.wid, json.loads(data))


class WorkerLink:
    """One worker process as the master sees it."""

    def __init__(self, wid: int, slot: int, proto: MasterAMP) -> None:
        self.wid = wid
        self.slot = slot
        self.proto = proto
        self.process: Any = None
        self.ready = False
        self.ended: defer.Deferred = defer.Deferred()
        self.stats: dict = {}
        self.ready_waiters: list[defer.Deferred] = []
        #: a spare: config loaded, waiting for a slot (slot is -1 until then)
        self.prepared = False
        #: when the master last heard from it (spares: not under the Supervisor)
        self.heard = 0.0
        #: slot -> bind -> fd number in the child (exec'd workers; a spare has every slot's)
        self.fds: dict[int, dict[str, int]] = {}


class Fleet(Service):
    def __init__(self, service: Any) -> None:
        self.setName("workers")
        self.service = service
        self.runtime = service.runtime
        self.reactor = service.reactor
        self.n = worker_count(self.runtime.config.workers)
        #: the validated config text the workers run (sent at spawn and reload)
        self.text, self.source = self._read_config()
        self.links: dict[int, WorkerLink] = {}
        #: slot -> {bind: ListenSocket}
        self.slot_sockets: dict[int, dict[str, ListenSocket]] = {}
        self._next_wid = 0
        self._last_snap: dict | None = None
        self.supervisor = Supervisor(
            self.reactor, self.n, self._spawn, self._kill, log=lambda m: log.warn("lbtwist: {m}", m=m),
        )
        self._push_loop = task.LoopingCall(self._push_if_changed)
        self._push_loop.clock = self.reactor
        self._ping_loop = task.LoopingCall(self._heartbeat)
        self._ping_loop.clock = self.reactor
        #: TLS with session tickets: workers are forked from this process so
        #: they share the ticket keys built here (lbtwist.workers.forked)
        self.fork = forked.needs_fork(self.runtime.config)
        self.tls_servers: dict[str, Any] = {}
        #: the pre-started spare worker (exec'd workers only): it has imported
        #: and loaded the config, holds every slot's sockets and takes the
        #: next slot that needs a worker
        self.spare: WorkerLink | None = None
        self._spare_call: Any = None
        self._spare_failures = 0
        self._reloading = False
        self.runtime.workers = self  # /api/workers, /metrics, admin acks
        service.fleet = self  # reloads go through the fleet

    def _read_config(self) -> tuple[str, str]:
        path = self.service.config_path
        if path is None:
            raise ValueError("workers: the master needs the config file to give its workers")
        with open(path, encoding="utf-8") as f:
            return f.read(), path

    # -- sockets ----------------------------------------------------------------

    def _binds(self, config: Any) -> dict[str, tuple[str, bool]]:
        """bind text -> (a listener name, udp?) of ``config``."""
        return {l.bind: (l.name, l.mode == "udp") for l in config.listeners}

    def open_sockets(self, config: Any, keep: dict[int, dict[str, ListenSocket]] | None = None) -> dict[int, dict[str, ListenSocket]]:
        """Sockets for every slot and bind of ``config``; binds in ``keep``
        are reused. A bind error closes what this call opened and raises
        OSError-based ValueError naming the listener."""
        keep = keep or {}
        out: dict[int, dict[str, ListenSocket]] = {}
        opened: list[ListenSocket] = []
        ports: dict[str, int] = {}
        try:
            for slot in range(self.n):
                out[slot] = {}
                for bind, (name, udp) in self._binds(config).items():
                    old = keep.get(slot, {}).get(bind)
                    if old is not None:
                        out[slot][bind] = old
                        continue
                    s = open_socket(name, bind, udp, port=ports.get(bind))
                    opened.append(s)
                    ports.setdefault(bind, s.port)
                    out[slot][bind] = s
        except OSError as e:
            for s in opened:
                s.close()
            raise ValueError(f"listener {name}: cannot bind {bind!r}: {e.strerror or e}") from None
        return out

    # -- service ----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.slot_sockets = self.open_sockets(self.runtime.config)
        if self.fork:
            self.tls_servers = forked.build_tls(self.runtime.config, self.reactor)

    def startService(self) -> None:
        super().startService()
        log.info("lbtwist: master {pid} starting {n} workers", pid=os.getpid(), n=self.n)
        self.supervisor.start()
        self._push_loop.start(PUSH_INTERVAL, now=False)
        self._ping_loop.start(PING_INTERVAL, now=False)

    def stopService(self) -> defer.Deferred:
        """Every worker stops accepting, drains and exits; killed if it
        outlives its drain. Fires when no worker is left."""
        super().stopService()
        self.supervisor.stop()
        if self._spare_call is not None and self._spare_call.active():
            self._spare_call.cancel()
        self.spare = None
        for loop in (self._push_loop, self._ping_loop):
            if loop.running:
                loop.stop()
        waits = []
        for link in list(self.links.values()):
            waits.append(self._stop_worker(link))
        d = defer.DeferredList(waits, consumeErrors=True)

        def close(_: Any) -> None:
            for socks in self.slot_sockets.values():
                for s in socks.values():
                    s.close()
            log.info("lbtwist: every worker has exited")

        return d.addBoth(close)

    def _drain_limit(self) -> float:
        pools = self.runtime.config.pools
        return max([p.drain_timeout for p in pools] + [30.0]) + STOP_GRACE

    def _stop_worker(self, link: WorkerLink) -> defer.Deferred:
        """SIGTERM (drain, exit 0); SIGKILL after the drain limit."""
        if link.ended.called:
            return defer.succeed(None)
        self._signal(link, "TERM")
        timer = self.reactor.callLater(self._drain_limit(), self._signal, link, "KILL")
        d = defer.Deferred()

        def done(r: Any) -> Any:
            if timer.active():
                timer.cancel()
            d.callback(None)
            return r

        link.ended.addBoth(done)
        return d

    def _signal(self, link: WorkerLink, sig: str) -> None:
        try:
            link.process.signalProcess(sig)
        except (error.ProcessExitedAlready, AttributeError, OSError):
            pass

    # -- spawning (Supervisor effects) -----------------------------------------

    def _spawn(self, slot: int) -> int:
        spare = self.spare
        if spare is not None and spare.prepared and not self.fork:
            return self._assign(spare, slot)
        self._next_wid += 1
        wid = self._next_wid
        proto = MasterAMP(self, wid)
        link = WorkerLink(wid, slot, proto)
        self.links[wid] = link
        socks = self.slot_sockets[slot]
        if self.fork:
            return self._fork(wid, slot, link, socks)
        fd_of = self._exec(link, {slot: socks}, str(slot + 1))[slot]
        # the fleet view comes along: the worker applies it before it listens
        # (else its backends would wait 'unknown' for the first push: 503s)
        payload = {"text": self.text, "source": self.source, "workers": self.n,
                   "slot": slot, "sockets": fd_of, "snapshot": fleetview.snapshot(self.runtime)}
        d = put_all(proto, "config", json.dumps(payload).encode())
        d.addErrback(self._failed, link, "starting")
        log.info("lbtwist: worker {wid} (slot {slot}) started, pid {pid}", wid=wid, slot=slot,
                 pid=link.process.pid)
        return wid

    def _exec(self, link: WorkerLink, slots: dict[int, dict[str, ListenSocket]], label: str) -> dict[int, dict[str, int]]:
        """spawnProcess a worker with the AMP pipes and the sockets of
        ``slots``; returns slot -> bind -> the fd number in the child."""
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, CHILD_IN: "w", CHILD_OUT: "r"}
        fd_of: dict[int, dict[str, int]] = {}
        fd = CHILD_OUT + 1
        for slot, socks in sorted(slots.items()):
            fd_of[slot] = {}
            for bind, s in sorted(socks.items()):
                child_fds[fd] = s.fileno()
                fd_of[slot][bind] = fd
                fd += 1
        argv = [sys.executable, "-m", "lbtwist.workers.child", "--reactor", reactor_name(self.reactor)]
        env = dict(os.environ)
        env["LBTWIST_WORKER"] = label
        bridge = Bridge(link.proto, CHILD_IN, CHILD_OUT, lambda reason: self._ended(link, reason))
        link.process = self.reactor.spawnProcess(bridge, sys.executable, argv, env=env,
                                                 path=os.getcwd(), childFDs=child_fds)
        link.fds = fd_of
        return fd_of

    # -- the spare --------------------------------------------------------------

    def _want_spare(self) -> bool:
        return (not self.fork and self.running and not self._reloading and self.spare is None
                and (self._spare_call is None or not self._spare_call.active())
                and len(self.ready_links()) >= self.n)

    def _maybe_spare(self) -> None:
        """Start a spare once every slot serves (never competing with a slot's
        own start for the CPU)."""
        if self._want_spare():
            self._start_spare()

    def _start_spare(self) -> None:
        self._spare_call = None
        if not self._want_spare():
            return
        self._next_wid += 1
        wid = self._next_wid
        link = WorkerLink(wid, -1, MasterAMP(self, wid))
        link.heard = self.reactor.seconds()
        self.links[wid] = link
        self.spare = link
        self._exec(link, self.slot_sockets, "spare")
        payload = {"text": self.text, "source": self.source, "workers": self.n}

        def prepared(_: Any) -> None:
            link.prepared = True
            link.heard = self.reactor.seconds()
            self._spare_failures = 0

        d = put_all(link.proto, "prepare", json.dumps(payload).encode())
        d.addCallbacks(prepared, self._failed, errbackArgs=(link, "preparing as the spare"))
        log.info("lbtwist: spare worker {wid} started, pid {pid}", wid=wid, pid=link.process.pid)

    def _assign(self, link: WorkerLink, slot: int) -> int:
        """The spare takes ``slot``: it closes the other slots' sockets, builds
        its service on the slot's and says Ready."""
        self.spare = None
        link.slot = slot
        fd_of = link.fds[slot]
        close = [fd for s, fds in link.fds.items() if s != slot for fd in fds.values()]
        payload = {"text": self.text, "source": self.source, "workers": self.n, "slot": slot,
                   "sockets": fd_of, "close": close, "snapshot": fleetview.snapshot(self.runtime)}
        d = put_all(link.proto, "config", json.dumps(payload).encode())
        d.addErrback(self._failed, link, "starting")
        log.info("lbtwist: worker {wid} (slot {slot}) started, pid {pid} (the spare)", wid=link.wid,
                 slot=slot, pid=link.process.pid)
        return link.wid

    def _spare_ended(self, link: WorkerLink, why: str) -> None:
        self.spare = None
        self._spare_failures += 1
        delay = min(SPARE_RETRY_MAX, SPARE_RETRY * 2 ** (self._spare_failures - 1))
        log.warn("lbtwist: spare worker {wid} exited: {why}; a new spare in {delay:g}s",
                 wid=link.wid, why=why, delay=delay)
        if self.running and not self.fork:
            self._spare_call = self.reactor.callLater(delay, self._start_spare)

    def _drop_spare(self) -> None:
        """A reload: the spare holds the old config and sockets; it exits and
        a new one starts when the reload is done."""
        link, self.spare = self.spare, None
        if self._spare_call is not None and self._spare_call.active():
            self._spare_call.cancel()
        if link is not None:
            log.info("lbtwist: spare worker {wid} stopped (reload); a new one follows", wid=link.wid)
            self._signal(link, "TERM")

    def _fork(self, wid: int, slot: int, link: WorkerLink, socks: dict[str, ListenSocket]) -> int:
        from twisted.internet.protocol import Factory

        fd_of = {bind: s.fileno() for bind, s in socks.items()}  # fork keeps the numbers
        link.process = forked.fork_worker(self.reactor, Factory.forProtocol(lambda: link.proto),
                                          fd_of.values(), reactor_name(self.reactor), self.tls_servers)
        forked.PidWatcher(self.reactor, link.process, lambda reason: self._ended(link, reason))
        payload = {"text": self.text, "source": self.source, "workers": self.n,
                   "slot": slot, "sockets": fd_of}
        d = put_all(link.proto, "config", json.dumps(payload).encode())
        d.addErrback(self._failed, link, "starting")
        log.info("lbtwist: worker {wid} (slot {slot}) forked, pid {pid}", wid=wid, slot=slot,
                 pid=link.process.pid)
        return wid

    def _failed(self, f: Any, link: WorkerLink, what: str) -> None:
        if not link.ended.called:
            log.error("lbtwist: worker {wid} failed {what}: {err}; killing it", wid=link.wid, what=what,
                      err=f.getErrorMessage())
            self._signal(link, "KILL")

    def _kill(self, wid: int, why: str) -> None:
        link = self.links.get(wid)
        if link is not None:
            self._signal(link, "KILL")

    def _ended(self, link: WorkerLink, reason: Any) -> None:
        self.links.pop(link.wid, None)
        why = exit_reason(reason)
        if link is self.spare:
            link.ended.callback(why)
            return self._spare_ended(link, why)
        self.supervisor.exited(link.wid, why)
        for w in link.ready_waiters:
            if not w.called:
                w.errback(RuntimeError(f"worker {link.wid} exited before it was ready: {why}"))
        link.ended.callback(why)

    def worker_ready(self, wid: int) -> None:
        link = self.links.get(wid)
        if link is None:
            return
        link.ready = True
        self.supervisor.heard(wid)
        log.info("lbtwist: worker {wid} (slot {slot}) serving", wid=wid, slot=link.slot)
        self._push(link, self._snapshot_bytes())
        ocsp = getattr(self.runtime, "ocsp", None)
        if ocsp is not None and ocsp.current:
            self._push_ocsp(link, ocsp.payload())
        for w in link.ready_waiters:
            if not w.called:
                w.callback(None)
        link.ready_waiters.clear()
        self._maybe_spare()

    def ready_links(self) -> list[WorkerLink]:
        return [l for l in self.links.values() if l.ready]

    # -- heartbeat --------------------------------------------------------------

    def _heartbeat(self) -> None:
        self._check_spare()
        for link in list(self.links.values()):
            if not link.ready:
                continue
            d = link.proto.callRemote(Ping)
            d.addTimeout(PING_TIMEOUT, self.reactor)
            d.addCallbacks(self._pong, lambda f: None, callbackArgs=(link,))
        self.supervisor.tick()

    def _check_spare(self) -> None:
        """The spare answers the same heartbeat; silent for the Supervisor's
        heartbeat timeout (its start-up timeout before it has loaded the
        config) it is killed, and replaced after SPARE_RETRY."""
        link = self.spare
        if link is None:
            return
        now = self.reactor.seconds()
        limit = self.supervisor.heartbeat_timeout if link.prepared else self.supervisor.startup_timeout
        if now - link.heard >= limit:
            log.warn("lbtwist: spare worker {wid}: no answer for {s:.1f}s; killing it", wid=link.wid,
                     s=now - link.heard)
            link.heard = now
            self._signal(link, "KILL")
            return
        if link.prepared:
            d = link.proto.callRemote(Ping)
            d.addTimeout(PING_TIMEOUT, self.reactor)
            d.addCallbacks(lambda _: setattr(link, "heard", self.reactor.seconds()), lambda f: None)

    def _pong(self, stats: dict, link: WorkerLink) -> None:
        self.supervisor.heard(link.wid)
        link.stats = stats

    def workers_json(self) -> dict:
        """GET /api/workers."""
        out = []
        for link in sorted(self.ready_links(), key=lambda l: l.slot):
            st = link.stats
            out.append({
                "pid": link.process.pid if link.process is not None else None,
                "slot": link.slot,
                "requests": st.get("requests", 0),
                "connections": st.get("connections", 0),
                "started": st.get("started"),
                "rss_bytes": st.get("rss_bytes", 0),
                "pss_bytes": st.get("pss_bytes", 0),
                "uss_bytes": st.get("uss_bytes", 0),
            })
        spare = self.spare
        from lbtwist.workers.child import shared_memory

        return {"workers": out, "master": {"pid": os.getpid(), "rss_bytes": _rss(), **shared_memory()},
                "spare": {"pid": spare.process.pid, "prepared": spare.prepared} if spare is not None else None}

    # -- fleet view ------------------------------------------------------------

    def _snapshot(self) -> tuple[dict, bytes]:
        """(the snapshot without its clock reading, for comparing; its bytes)"""
        snap = fleetview.snapshot(self.runtime)
        data = json.dumps(snap, separators=(",", ":")).encode()
        snap.pop("now", None)  # moves every time
        return snap, data

    def _snapshot_bytes(self) -> bytes:
        return self._snapshot()[1]

    def _push(self, link: WorkerLink, data: bytes) -> defer.Deferred:
        d = put_all(link.proto, "snapshot", data)
        d.addTimeout(ACK_TIMEOUT, self.reactor)
        return d

    def _push_if_changed(self) -> None:
        try:
            key, data = self._snapshot()
        except Exception:
            log.failure("lbtwist: fleet view snapshot")
            return
        if key == self._last_snap:
            return
        self._last_snap = key
        for link in self.ready_links():
            self._push(link, data).addErrback(lambda f: None)

    def _push_ocsp(self, link: WorkerLink, data: bytes) -> defer.Deferred:
        d = put_all(link.proto, "ocsp", data).addTimeout(ACK_TIMEOUT, self.reactor)
        return d.addErrback(lambda f: log.warn("lbtwist: worker {wid}: OCSP push failed: {e}",
                                               wid=link.wid, e=f.getErrorMessage()))

    def push_ocsp(self, data: bytes) -> None:
        """Give every serving worker OCSP responses the master fetched
        (lbtwist.tls.ocspfetch); a worker that starts later gets all of them
        when it is ready."""
        for link in self.ready_links():
            self._push_ocsp(link, data)

    def _push_ocsp_all(self) -> None:
        ocsp = getattr(self.runtime, "ocsp", None)
        if ocsp is not None and ocsp.current:
            self.push_ocsp(ocsp.payload())

    def sync(self) -> defer.Deferred:
        """Push the fleet view now; fires when every serving worker applied it
        (admin drain/weight/enable return after this)."""
        self._last_snap, data = self._snapshot()
        waits = [self._push(l, data) for l in self.ready_links()]
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def outcomes(self, wid: int, batch: dict) -> None:
        self.supervisor.heard(wid)
        fleetview.feed_outcomes(self.runtime, batch)

    # -- metrics ---------------------------------------------------------------

    def fetch_metrics(self) -> defer.Deferred:
        """[(worker label, exposition text)] of every serving worker (a
        worker that does not answer in time is left out)."""
        links = sorted(self.ready_links(), key=lambda l: l.slot)
        ds = [self._fetch(l).addTimeout(PING_TIMEOUT, self.reactor) for l in links]
        d = defer.DeferredList(ds, consumeErrors=True)
        return d.addCallback(lambda res: [(str(l.slot + 1), r) for l, (ok, r) in zip(links, res) if ok])

    @defer.inlineCallbacks
    def _fetch(self, link: WorkerLink) -> Any:
        parts, offset = [], 0
        while True:
            r = yield link.proto.callRemote(Fetch, kind="metrics", offset=offset)
            parts.append(r["part"])
            offset += len(r["part"])
            if not r["more"]:
                return b"".join(parts).decode("utf-8")

    # -- reload ----------------------------------------------------------------

    def reload(self) -> defer.Deferred:
        """Validate the file; a bad one changes nothing (ReloadError). A good
        one: the master applies it, then every worker in place; when the
        listeners' binds changed, the workers are replaced one at a time on
        new sockets instead, so no port is ever without a listener."""
        from lbtwist.config import load_config_text
        from lbtwist.service import ReloadError

        try:
            with open(self.service.config_path, encoding="utf-8") as f:
                text = f.read()
            loaded = load_config_text(text, self.runtime.registry, source_name=self.service.config_path)
        except OSError as e:
            return defer.fail(ReloadError(f"cannot read the config file: {e.strerror or e}"))
        except Exception as e:  # ConfigError: one line per problem
            return defer.fail(ReloadError(str(e)))
        new = loaded.config
        try:
            n = worker_count(new.workers)
        except ValueError as e:
            return defer.fail(ReloadError(str(e)))
        if n != self.n:
            return defer.fail(ReloadError(
                f"workers: changing the number of workers ({self.n} -> {n}) needs a restart; nothing was changed"))
        same_binds = self._binds(new) == self._binds(self.runtime.config)
        fresh = None
        if not same_binds:
            try:
                fresh = self.open_sockets(new, keep=self.slot_sockets)
            except ValueError as e:
                return defer.fail(ReloadError(f"{e}; nothing was changed"))
            from lbtwist.listener import default_backlog

            kept = {id(s) for per in self.slot_sockets.values() for s in per.values()}
            backlog = {l.bind: l.backlog or default_backlog() for l in new.listeners}
            for per in fresh.values():
                for bind, sock in per.items():
                    if id(sock) not in kept:
                        sock.listen(backlog[bind])
        try:
            d = defer.maybeDeferred(self.service.apply, new)
        except Exception as e:
            d = defer.fail(e)

        def refused(f: Any) -> Any:
            if fresh is not None:
                self._close_unused(fresh, self.slot_sockets)
            return f

        d.addErrback(refused)
        roll_for_tls: list[str] = []
        if self.fork:  # workers fork from here: the master's TLS follows the reload first
            def master_tls(r: Any) -> Any:
                roll_for_tls.extend(forked.refresh_tls(self.tls_servers, new, self.reactor))
                return r
            d.addCallback(master_tls)

        def workers(_: Any) -> Any:
            if fresh is None and roll_for_tls:
                log.info("lbtwist: reload: TLS session settings of {names} changed: workers are replaced "
                         "one at a time so they share the new ticket keys", names=", ".join(roll_for_tls))
                return self._reload_workers(text, dict(self.slot_sockets))
            return self._reload_workers(text, fresh)
        d.addCallback(workers)
        return d

    def _reload_workers(self, text: str, fresh: dict | None) -> defer.Deferred:
        """The spare holds the old config (and, when binds moved, the old
        sockets): it is dropped, and a new one starts after the workers."""
        self._reloading = True
        self._drop_spare()

        def done(r: Any) -> Any:
            self._reloading = False
            self._maybe_spare()
            return r

        return self._reload_running(text, fresh).addBoth(done)

    def _close_unused(self, socks: dict[int, dict[str, ListenSocket]], keep: dict[int, dict[str, ListenSocket]]) -> None:
        kept = {id(s) for per in keep.values() for s in per.values()}
        for per in socks.values():
            for s in per.values():
                if id(s) not in kept:
                    s.close()

    def _reload_running(self, text: str, fresh: dict | None) -> defer.Deferred:
        self.text = text
        payload = json.dumps({"text": text, "source": self.source, "workers": self.n, "slot": -1,
                              "sockets": {}}).encode()
        if fresh is None:
            waits = [put_all(l.proto, "config", payload).addTimeout(ACK_TIMEOUT * 2, self.reactor)
                     for l in self.ready_links()]
            d = defer.gatherResults(waits, consumeErrors=True)
            d.addCallback(lambda _: self._push_ocsp_all())  # listeners the reload added
            return d.addCallback(lambda _: self.sync())
        return self._roll(fresh)

    @defer.inlineCallbacks
    def _roll(self, fresh: dict) -> Any:
        """Replace the workers one slot at a time: the new worker serves on
        the new sockets before the old one stops accepting and drains."""
        old_sockets, self.slot_sockets = self.slot_sockets, fresh
        for slot in range(self.n):
            waiter: defer.Deferred = defer.Deferred()
            old_wid, new_wid = self.supervisor.replace(slot)
            self.links[new_wid].ready_waiters.append(waiter)
            waiter.addTimeout(self.supervisor.startup_timeout, self.reactor)
            try:
                yield waiter
            except Exception as e:
                log.error("lbtwist: reload: the new worker of slot {slot} did not start: {e}", slot=slot, e=e)
            old = self.links.get(old_wid) if old_wid is not None else None
            if old is not None:  # stops accepting now; drains in the background
                self._stop_worker(old)
        self._close_unused(old_sockets, self.slot_sockets)
        log.info("lbtwist: reload: every worker replaced on the new listeners")


def _rss() -> int:
    from lbtwist.workers.child import rss_bytes

    return rss_bytes()
