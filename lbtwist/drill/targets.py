# -*- test-case-name: tests.test_drill_targets -*-
"""The balancer under test as a real process: ``twistd -n lbtwist`` with a
generated config (defaults or naive), or HAProxy with the equivalent config.

Each target answers the same questions for the runner: is it serving, what
does it believe about each backend (state words as lbtwist's admin API uses
them: healthy, slow_start, unhealthy, ejected, draining, ...), and it takes
the same operations (drain, undrain, reload with a new backend list).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from lbtwist.drill.configs import Setup, haproxy_config, haproxy_states, lbtwist_config, to_yaml
from lbtwist.drill.control import ControlError, http_call
from lbtwist.drill.procs import Child, ProcessGone, cpu_seconds, guarded, rss_kib, wait_port

Echo = Callable[[str, str], None]


def tree_cpu(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its direct children (HAProxy's master and
    worker)."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    total = own
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    for k in kids:
        total += cpu_seconds(k) or 0.0
    return total


def tree_rss_kib(pid: int) -> int | None:
    """Resident KiB of ``pid`` and its direct children (HAProxy's worker)."""
    own = rss_kib(pid)
    if own is None:
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    return own + sum(rss_kib(k) or 0 for k in kids)


class _Target:
    kind = "?"
    START_TIMEOUT = 40.0

    def __init__(self, reactor: Any, workdir: Path, echo: Echo | None = None) -> None:
        self.reactor = reactor
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.child: Child | None = None
        self.setup: Setup | None = None
        self.config_text = ""

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None and not self.child.ended else None

    def cpu(self) -> float | None:
        pid = self.pid
        return tree_cpu(pid) if pid is not None else None

    def rss_kib(self) -> int | None:
        pid = self.pid
        return tree_rss_kib(pid) if pid is not None else None

    async def admin_probe(self) -> bytes:  # pragma: no cover - overridden
        """One read of the target's monitoring endpoint (raises ControlError)."""
        raise NotImplementedError

    async def _wait_listening(self, port: int) -> None:
        assert self.child is not None
        listening = wait_port(self.reactor, port, self.START_TIMEOUT)
        ended = self.child.when_ended()
        # whichever comes first: the port accepts, or the process dies (bad config)
        await defer.DeferredList([listening, ended], fireOnOneCallback=True, fireOnOneErrback=True,
                                 consumeErrors=True)
        for d in (listening, ended):
            if not d.called:
                d.addErrback(lambda f: f.trap(defer.CancelledError))
                d.cancel()
        if self.child.ended:
            raise ProcessGone(f"{self.kind} exited during start-up (code {self.child.exit_code}):\n" + self.child.tail())


    async def wait_in_rotation(self, names: set[str], timeout: float) -> dict[str, str]:
        """Until every backend in ``names`` is in rotation (fails after ``timeout``)."""
        deadline = self.reactor.seconds() + timeout
        last: dict[str, str] = {}
        while True:
            try:
                last = await self.states()
            except ControlError:
                pass
            if all(last.get(n) in ("healthy", "slow_start") for n in names):
                return last
            if self.reactor.seconds() > deadline:
                raise ProcessGone(f"{self.kind}: backends not in rotation after {timeout:g}s: {last}")
            if self.child is not None and self.child.ended:
                raise ProcessGone(f"{self.kind} exited:\n" + self.child.tail())
            await deferLater(self.reactor, 0.25, lambda: None)

    async def stop(self) -> None:
        if self.child is None:
            return
        await self.child.terminate(15.0)

    async def states(self) -> dict[str, str]:  # pragma: no cover - overridden
        raise NotImplementedError


class LbtwistTarget(_Target):
    """``twistd -n --pidfile= lbtwist --config GENERATED``."""

    def __init__(self, reactor: Any, workdir: Path, *, naive: bool = False, echo: Echo | None = None) -> None:
        super().__init__(reactor, workdir, echo)
        self.naive = naive
        self.kind = "naive" if naive else "lbtwist"
        self.config_path = self.workdir / "lbtwist.yaml"

    def _write(self, setup: Setup) -> None:
        self.setup = setup
        self.config_text = to_yaml(lbtwist_config(setup, naive=self.naive))
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.config_text)
        os.replace(tmp, self.config_path)

    async def start(self, setup: Setup) -> None:
        self._write(setup)
        twistd = os.environ.get("LBTWIST_TWISTD") or _bin("twistd")
        argv = guarded([twistd, "-n", "--pidfile=", "lbtwist", "--config", str(self.config_path)])
        self.child = Child(self.reactor, self.kind, argv, cwd=str(self.workdir), echo=self.echo)
        await self._wait_listening(setup.listen_port)
        await wait_port(self.reactor, setup.admin_port, 10.0)
        await self._wait_workers()

    async def _wait_workers(self, timeout: float = 60.0) -> None:
        """With worker processes (``workers:`` above 1), until every one serves:
        the first to listen must not take a drill's load alone."""
        import yaml

        from lbtwist.workers.count import worker_count

        want = worker_count(yaml.safe_load(self.config_text).get("workers", "auto"))
        if want <= 1:
            return
        deadline = self.reactor.seconds() + timeout
        while True:
            try:
                got = await http_call(self.reactor, "GET", self._admin("/api/workers"), timeout=2.0)
                if len(got.get("workers", [])) >= want:
                    return
            except Exception:
                pass
            if self.reactor.seconds() > deadline:
                raise RuntimeError(f"lbtwist: {want} workers not serving within {timeout:g}s")
            await deferLater(self.reactor, 0.2)

    def _admin(self, path: str) -> str:
        assert self.setup is not None
        return f"http://127.0.0.1:{self.setup.admin_port}{path}"

    async def states(self) -> dict[str, str]:
        pool = await http_call(self.reactor, "GET", self._admin("/api/pools/app?history=0"), timeout=2.0)
        out: dict[str, str] = {}
        for b in pool.get("backends", []):
            word = b.get("state", "?")
            if word in ("healthy", "slow_start") and not b.get("in_rotation", True):
                word = "out"
            out[b.get("name") or b.get("address")] = word
        return out

    async def admin_probe(self) -> bytes:
        """``GET /metrics`` on the admin listener."""
        return await http_call(self.reactor, "GET", self._admin("/metrics"), timeout=2.0, raw=True)

    async def inflight(self, name: str) -> int:
        """Requests the balancer has outstanding on backend ``name``."""
        pool = await http_call(self.reactor, "GET", self._admin("/api/pools/app?history=0"), timeout=2.0)
        for b in pool.get("backends", []):
            if name in (b.get("name"), b.get("address")):
                return int(b.get("active", 0))
        return 0

    async def workers(self) -> list[dict[str, Any]]:
        """``GET /api/workers``: the worker processes (pid, requests, connections, started, rss_bytes)."""
        got = await http_call(self.reactor, "GET", self._admin("/api/workers"), timeout=2.0)
        return list(got.get("workers", [])) if isinstance(got, dict) else []

    async def drain(self, name: str) -> None:
        await http_call(self.reactor, "POST", self._admin(f"/api/pools/app/backends/{name}/drain"))

    async def undrain(self, name: str) -> None:
        await http_call(self.reactor, "POST", self._admin(f"/api/pools/app/backends/{name}/undrain"))

    async def reload(self, setup: Setup) -> Any:
        """Rewrite the config file and ask the admin API to reload it."""
        self._write(setup)
        return await http_call(self.reactor, "POST", self._admin("/api/reload"), timeout=10.0)


class HAProxyTarget(_Target):
    """HAProxy in master-worker mode (``-W``, so SIGUSR2 reloads without
    dropping connections), foreground (``-db``)."""

    kind = "haproxy"

    def __init__(self, reactor: Any, workdir: Path, *, echo: Echo | None = None) -> None:
        super().__init__(reactor, workdir, echo)
        self.config_path = self.workdir / "haproxy.cfg"
        self.socket_path = str(self.workdir / "haproxy.sock")

    @staticmethod
    def available() -> str | None:
        return shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None

    def _write(self, setup: Setup) -> None:
        self.setup = setup
        self.config_text = haproxy_config(setup, self.socket_path)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.config_text)
        os.replace(tmp, self.config_path)

    async def start(self, setup: Setup) -> None:
        exe = self.available()
        if exe is None:
            raise ProcessGone("haproxy is not installed (apt-get install haproxy)")
        self._write(setup)
        argv = guarded([exe, "-W", "-db", "-f", str(self.config_path)])
        self.child = Child(self.reactor, self.kind, argv, cwd=str(self.workdir), echo=self.echo)
        await self._wait_listening(setup.listen_port)
        await wait_port(self.reactor, setup.admin_port, 10.0)

    async def states(self) -> dict[str, str]:
        assert self.setup is not None
        raw = await http_call(self.reactor, "GET", f"http://127.0.0.1:{self.setup.admin_port}/stats;csv",
                              timeout=2.0, raw=True)
        return haproxy_states(raw.decode("utf-8", "replace"))

    async def admin_probe(self) -> bytes:
        """``GET /stats;csv`` on the stats listener (HAProxy's /metrics equivalent)."""
        assert self.setup is not None
        return await http_call(self.reactor, "GET", f"http://127.0.0.1:{self.setup.admin_port}/stats;csv",
                               timeout=2.0, raw=True)

    async def inflight(self, name: str) -> int:
        """Current sessions HAProxy has on server ``name`` (stats ``scur``)."""
        assert self.setup is not None
        raw = await http_call(self.reactor, "GET", f"http://127.0.0.1:{self.setup.admin_port}/stats;csv",
                              timeout=2.0, raw=True)
        lines = raw.decode("utf-8", "replace").splitlines()
        if not lines or not lines[0].startswith("# "):
            return 0
        head = lines[0][2:].split(",")
        ipx, isv, icur = head.index("pxname"), head.index("svname"), head.index("scur")
        for ln in lines[1:]:
            f = ln.split(",")
            if len(f) > icur and f[ipx] == "app" and f[isv] == name:
                return int(f[icur] or 0)
        return 0

    async def command(self, line: str) -> str:
        """One command on the admin socket; returns its answer."""
        ep = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=5)
        done: defer.Deferred = defer.Deferred()

        class P(Protocol):
            buf = b""

            def connectionMade(self) -> None:
                self.transport.write(line.encode() + b"\n")

            def dataReceived(self, data: bytes) -> None:
                self.buf += data

            def connectionLost(self, reason: Any = None) -> None:
                if not done.called:
                    done.callback(self.buf.decode("utf-8", "replace"))

        await ep.connect(Factory.forProtocol(P))
        done.addTimeout(5.0, self.reactor)
        return await done

    async def drain(self, name: str) -> None:
        await self.command(f"set server app/{name} state drain")

    async def undrain(self, name: str) -> None:
        await self.command(f"set server app/{name} state ready")

    async def reload(self, setup: Setup) -> Any:
        self._write(setup)
        assert self.child is not None
        self.child.signal("USR2")
        return {"reloaded": True}


def _bin(name: str) -> str:
    """``name`` installed next to this Python (the venv's twistd), else on PATH."""
    import sys

    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name) or str(here)


def make_target(kind: str, reactor: Any, workdir: Path, echo: Echo | None = None) -> _Target:
    if kind == "lbtwist":
        return LbtwistTarget(reactor, workdir, echo=echo)
    if kind == "naive":
        return LbtwistTarget(reactor, workdir, naive=True, echo=echo)
    if kind == "haproxy":
        return HAProxyTarget(reactor, workdir, echo=echo)
    raise ValueError(f"unknown target {kind!r}; choose lbtwist, naive or haproxy")
