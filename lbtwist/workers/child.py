"""A worker process: ``python -m lbtwist.workers.child --reactor NAME``.

Spawned by the master (L{lbtwist.workers.master}) with the AMP pipes on fds
3 (commands in) and 4 (answers out) and its listening sockets on further fds.
Nothing may ever be printed on 3 and 4; logs go to stderr (fd 2, the
master's). It waits for the ``config`` payload (the master's validated config
text plus this worker's slot and socket fds), builds the service in role
"worker" (listeners and data plane; no probes, no admin), says Ready, then
applies fleet-view snapshots, reloads and ticket rotations as they come and
reports passive outcomes. A spare (started by the master ahead of need, with
every slot's sockets) first gets ``prepare`` (the config text alone): it
loads the config and imports the data plane, then waits; its ``config``
names the slot it takes and the other slots' fds to close. It exits when
the master tells it to stop (SIGTERM: stop accepting, drain, exit 0) or when
the master is gone (its pipe closes, or PR_SET_PDEATHSIG)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

#: how often passive outcomes go to the master when there are any
OUTCOME_INTERVAL = 0.05


def _die_with_parent() -> None:
    """SIGTERM this process when the master dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # not Linux: the pipe's EOF still stops the worker
        pass


def install_reactor(name: str) -> None:
    """The master's reactor kind: 'lean' (lbtwist.fastio) or a Twisted name."""
    if name == "lean":
        from lbtwist import fastio

        fastio.install_supported_reactor()
        return
    from twisted.application.reactors import installReactor

    if name != "default":
        installReactor(name)


#: Twisted modules that look for pyOpenSSL when imported and do without it
#: (no reactor.listenSSL/connectSSL, no transport.startTLS, no AMP StartTLS,
#: no endpoints.wrapClientTLS or "ssl:" strings). A worker uses none of them:
#: its sockets come from the master and lbtwist's TLS (termination, backend
#: TLS, the fleet link) wraps protocols in TLSMemoryBIOFactory itself
#: (lbtwist.tls.client.TLSClientEndpoint). Imported with pyOpenSSL hidden,
#: a worker whose config has no TLS never loads pyOpenSSL, cryptography and
#: libssl (about 17 MB of its RSS); one with TLS imports them later, when
#: lbtwist.tls is first used.
OPENSSL_OPTIONAL = ("twisted.internet.stdio", "twisted.protocols.amp", "twisted.internet.endpoints")


class _HideOpenSSL:
    """A meta path finder that makes ``import OpenSSL`` fail (while installed)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "OpenSSL" or name.startswith("OpenSSL."):
            raise ImportError(f"{name}: hidden while Twisted's reactor is imported in a worker")
        return None


def install_reactor_without_openssl(name: str) -> None:
    """L{install_reactor}, and OPENSSL_OPTIONAL imported, with pyOpenSSL hidden."""
    import importlib

    hide = _HideOpenSSL()
    sys.meta_path.insert(0, hide)
    try:
        install_reactor(name)
        for mod in OPENSSL_OPTIONAL:
            importlib.import_module(mod)
    finally:
        sys.meta_path.remove(hide)


def shared_memory() -> dict[str, int]:
    """``pss_bytes`` (proportional set size: shared pages split among the
    processes mapping them) and ``uss_bytes`` (private pages: what exiting
    would free) from /proc/self/smaps_rollup; 0 where unreadable. RSS counts
    every shared library page in full in every process; these two say what
    N workers really cost together."""
    out = {"pss_bytes": 0, "uss_bytes": 0}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    if parts[0] == "Pss:":
                        out["pss_bytes"] = int(parts[1]) * 1024
                    elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                        out["uss_bytes"] += int(parts[1]) * 1024
    except OSError:
        pass
    return out


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Worker:
    """The worker's side of the AMP link and its service."""

    def __init__(self, reactor: Any, tls_servers: dict | None = None) -> None:
        from lbtwist.workers.protocol import Parts

        self.reactor = reactor
        #: forked workers: the ServerTLS the master built (shared ticket keys)
        self.tls_servers = tls_servers or {}
        self.service: Any = None
        self.proto: Any = None
        self.started = time.time()
        self.requests = 0
        self.batcher: Any = None
        self._metrics: bytes = b""
        self._live: Any = None
        self._registry: Any = None
        #: a spare: (text, source, workers, config) loaded before it has a slot
        self._prepared: tuple | None = None
        self.parts = Parts({
            "prepare": self.on_prepare,
            "config": self.on_config,
            "snapshot": self.on_snapshot,
            "ocsp": self.on_ocsp,
        })

    # -- from the master ------------------------------------------------------

    def _load(self, msg: dict) -> Any:
        """The worker's config from the master's text (its limits split N ways)."""
        from lbtwist.config import load_config_text
        from lbtwist.workers.fleetview import worker_config

        loaded = load_config_text(msg["text"], self.registry(), source_name=msg["source"])
        return worker_config(loaded.config, msg["workers"])

    def on_prepare(self, data: bytes) -> None:
        """A spare (no slot yet): load the config and import what serving it
        needs now, so that taking a slot later is only building the service."""
        msg = json.loads(data)
        config = self._load(msg)
        import lbtwist.service  # noqa: F401  (the data plane's modules)

        self._prepared = (msg["text"], msg["source"], msg["workers"], config)

    def on_config(self, data: bytes) -> Any:
        msg = json.loads(data)
        if self.service is None:
            prep, self._prepared = self._prepared, None
            if prep is not None and prep[:3] == (msg["text"], msg["source"], msg["workers"]):
                config = prep[3]
            else:
                config = self._load(msg)
            for fd in msg.get("close", ()):  # a spare's sockets of the other slots
                try:
                    os.close(int(fd))
                except OSError:
                    pass
            if msg.get("slot", -1) >= 0:
                os.environ["LBTWIST_WORKER"] = str(msg["slot"] + 1)
            return self._start(config, msg)
        return self.service.apply(self._load(msg))

    def registry(self) -> Any:
        from lbtwist.registry import Registry

        if not hasattr(self, "_reg"):
            self._reg = Registry.default()
        return self._reg

    def _start(self, config: Any, msg: dict) -> None:
        from lbtwist.service import LbtwistService
        from lbtwist.workers.fleetview import OutcomeBatcher

        sockets = {bind: int(fd) for bind, fd in msg["sockets"].items()}
        self.service = LbtwistService(
            config, self.reactor, self.registry(), role="worker", install_signals=True, sockets=sockets,
            tls_servers=self.tls_servers, workers=msg["workers"],
        )
        self.service.runtime.traffic.subscribe(self._count)
        if msg.get("snapshot") is not None:  # the master's view before the first request
            from lbtwist.workers.fleetview import apply_snapshot

            apply_snapshot(self.service.runtime, msg["snapshot"])
        self.batcher = OutcomeBatcher(self.service.runtime)
        self.service.privilegedStartService()
        self.service.startService()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.service.stopService)
        from twisted.internet import task

        self._outcomes = task.LoopingCall(self._send_outcomes)
        self._outcomes.clock = self.reactor
        self._outcomes.start(OUTCOME_INTERVAL, now=False)
        from lbtwist.workers.protocol import Ready

        self.reactor.callLater(0, lambda: self.proto.callRemote(Ready, pid=os.getpid()).addErrback(lambda f: None))

    def on_snapshot(self, data: bytes) -> None:
        from lbtwist.workers.fleetview import apply_snapshot

        if self.service is not None:
            apply_snapshot(self.service.runtime, json.loads(data))

    def on_ocsp(self, data: bytes) -> None:
        """OCSP responses the master fetched (lbtwist.tls.ocspfetch)."""
        from lbtwist.tls.ocspfetch import apply_pushed

        if self.service is not None:
            apply_pushed(self.service.runtime, data)

    def ping(self) -> dict:
        conns = 0
        if self.service is not None:
            for svc in self.service.listeners:
                conns += len(getattr(svc, "connections", ()) or ())
        return {"pid": os.getpid(), "requests": self.requests, "connections": conns,
                "started": self.started, "rss_bytes": rss_bytes(), **shared_memory()}

    def fetch(self, kind: str, offset: int) -> dict:
        from lbtwist.workers.protocol import PART

        if kind != "metrics":
            raise ValueError(f"unknown fetch kind {kind!r}")
        if offset == 0:
            self._metrics = self._render_metrics()
        part = self._metrics[offset:offset + PART]
        return {"part": part, "more": offset + PART < len(self._metrics)}

    def _render_metrics(self) -> bytes:
        if self.service is None:
            return b""
        from lbtwist.admin.live import Live
        from lbtwist.admin.metrics import exposition, make_registry

        if self._registry is None:
            self._live = Live(self.service.runtime, self.reactor)
            self._live.attach()
            self._registry = make_registry(self.service.runtime, self._live, self.reactor)
        self._live.sync()
        return exposition(self._registry)

    # -- to the master --------------------------------------------------------

    def _count(self, record: Any) -> None:
        self.requests += 1

    def _send_outcomes(self) -> None:
        if self.batcher is None or self.proto is None:
            return
        batch = self.batcher.take()
        if batch:
            from lbtwist.workers.protocol import put_all

            put_all(self.proto, "outcomes", json.dumps(batch, separators=(",", ":")).encode()).addErrback(lambda f: None)

    def master_gone(self) -> None:
        # reactor.stop() first: a log write to a closed stderr must not leave an orphan
        if self.reactor.running:
            self.reactor.stop()


def _amp_class() -> type:
    from twisted.protocols import amp

    from lbtwist.workers.protocol import Fetch, Ping, Put

    class ChildAMP(amp.AMP):
        def __init__(self, worker: Worker) -> None:
            super().__init__()
            self.worker = worker

        @Ping.responder
        def ping(self) -> dict:
            return self.worker.ping()

        @Put.responder
        def put(self, kind: str, part: bytes, more: bool) -> Any:
            return self.worker.parts.put(kind, part, more)

        @Fetch.responder
        def fetch(self, kind: str, offset: int) -> dict:
            return self.worker.fetch(kind, offset)

        def connectionLost(self, reason: Any) -> None:
            self.worker.master_gone()
            super().connectionLost(reason)

    return ChildAMP


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lbtwist.workers.child")
    ap.add_argument("--reactor", default="lean")
    args = ap.parse_args(argv)
    _die_with_parent()
    if os.getppid() == 1:  # the master died before prctl took effect
        return 1
    install_reactor_without_openssl(args.reactor)
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from lbtwist.workers.protocol import CHILD_IN, CHILD_OUT

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    worker = Worker(reactor)
    proto = _amp_class()(worker)
    worker.proto = proto
    stdio.StandardIO(proto, stdin=CHILD_IN, stdout=CHILD_OUT, reactor=reactor)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
