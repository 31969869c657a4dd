# -*- test-case-name: tests.test_drill_backend -*-
"""The drill's backends as processes: groups of backends per process, their
control APIs, and process-level faults (SIGKILL, restart)."""
from __future__ import annotations

import json
import zlib
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import defer

from lbtwist.drill.configs import BackendRef
from lbtwist.drill.control import http_call
from lbtwist.drill.procs import Child, cpu_seconds, free_port, python


@attrs.frozen
class GroupSpec:
    """One backend process. ``start=False``: started later by the scenario."""

    name: str
    backends: tuple[str, ...]
    capacity: int = 8
    median: float = 0.002
    sigma: float = 0.5
    faults: dict[str, Any] = attrs.field(factory=dict)
    start: bool = True
    kind: str = "http"


class BackendFleet:
    """Starts, polls, faults and kills the drill's backend processes."""

    READY_TIMEOUT = 30.0

    def __init__(self, reactor: Any, groups: Iterable[GroupSpec], *, seed: int = 1,
                 echo: Callable[[str, str], None] | None = None) -> None:
        self.reactor = reactor
        self.groups = {g.name: g for g in groups}
        self.seed = seed
        self.echo = echo
        self.ports: dict[str, int] = {}
        self._group_of: dict[str, str] = {}
        for g in self.groups.values():
            for b in g.backends:
                if b in self._group_of:
                    raise ValueError(f"backend {b} in two groups")
                self._group_of[b] = g.name
                self.ports[b] = free_port()
        self.children: dict[str, Child] = {}
        #: Every process ever started (restarts included).
        self.all_children: list[Child] = []
        self.control: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self._cpu_last: dict[int, float] = {}

    def refs(self, names: Iterable[str] | None = None) -> tuple[BackendRef, ...]:
        names = list(self.ports) if names is None else list(names)
        return tuple(BackendRef(n, self.ports[n]) for n in names)

    def group_of(self, backend: str) -> str:
        return self._group_of[backend]

    def running(self, group: str) -> bool:
        c = self.children.get(group)
        return c is not None and not c.ended

    async def start_group(self, group: str, faults: dict[str, Any] | None = None) -> None:
        g = self.groups[group]
        if self.running(group):
            raise RuntimeError(f"backend group {group} already running")
        n = self.starts.get(group, 0)
        self.starts[group] = n + 1
        argv = [python(), "-m", "lbtwist.drill.backend", "--kind", g.kind,
                "--capacity", str(g.capacity), "--median", repr(g.median), "--sigma", repr(g.sigma),
                "--seed", str(self.seed * 1000 + zlib.crc32(group.encode()) % 997 + n)]
        f = dict(g.faults)
        if faults:
            f.update(faults)
        if f:
            argv += ["--faults", json.dumps(f)]
        for b in g.backends:
            argv += ["--backend", f"{b}:{self.ports[b]}"]
        child = Child(self.reactor, f"backends[{group}]", argv, echo=self.echo)
        self.children[group] = child
        self.all_children.append(child)
        line = await child.wait_for("DRILL-READY ", self.READY_TIMEOUT)
        info = json.loads(line.split("DRILL-READY ", 1)[1])
        self.control[group] = int(info["control"])

    async def start(self) -> None:
        """Start every group marked ``start`` (in parallel)."""
        await defer.gatherResults(
            [defer.ensureDeferred(self.start_group(g.name)) for g in self.groups.values() if g.start],
            consumeErrors=True,
        )

    async def _post(self, group: str, action: str, body: dict[str, Any]) -> Any:
        return await http_call(self.reactor, "POST", f"http://127.0.0.1:{self.control[group]}/{action}", body)

    def _by_group(self, targets: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for t in targets:
            out.setdefault(self._group_of[t], []).append(t)
        return out

    async def set_faults(self, targets: Iterable[str], **changes: Any) -> None:
        for group, names in self._by_group(targets).items():
            await self._post(group, "faults", {"targets": names, "set": changes})

    async def reset_faults(self, targets: Iterable[str]) -> None:
        for group, names in self._by_group(targets).items():
            await self._post(group, "reset", {"targets": names})

    async def stop_backends(self, targets: Iterable[str]) -> None:
        """Close the ports and reset connections (the process lives on)."""
        for group, names in self._by_group(targets).items():
            await self._post(group, "stop", {"targets": names})

    async def start_backends(self, targets: Iterable[str]) -> None:
        for group, names in self._by_group(targets).items():
            await self._post(group, "start", {"targets": names})

    async def kill_group(self, group: str) -> None:
        """SIGKILL the process: the kernel resets its connections."""
        child = self.children.get(group)
        if child is None or child.ended:
            return
        child.kill()
        await child.wait_exit(10.0)

    async def state(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Rows of every running group's backends, and the backends whose
        process is not running."""
        rows: list[dict[str, Any]] = []
        gone: list[str] = []
        calls = []
        for name, g in self.groups.items():
            if self.running(name) and name in self.control:
                calls.append(defer.ensureDeferred(
                    http_call(self.reactor, "GET", f"http://127.0.0.1:{self.control[name]}/state", timeout=2.0)))
            else:
                gone.extend(g.backends)
        results = await defer.DeferredList(calls, consumeErrors=True)
        for ok, value in results:
            if ok:
                rows.extend(value["backends"])
        return rows, gone

    async def inflight(self, backends: Iterable[str]) -> int:
        """Requests being served or queued on ``backends`` right now."""
        rows, _ = await self.state()
        want = set(backends)
        return sum(int(r["busy"]) + int(r["queued"]) for r in rows if r["name"] in want)

    def cpu(self) -> float:
        """CPU seconds used by every backend process so far (dead ones
        included at their last reading), so per-second deltas stay sane
        across kills and restarts."""
        for c in self.children.values():
            if not c.ended:
                v = cpu_seconds(c.pid)
                if v is not None:
                    self._cpu_last[c.pid] = v
        return sum(self._cpu_last.values())

    async def shutdown(self) -> None:
        for c in self.all_children:
            c.kill()
        await defer.gatherResults([defer.ensureDeferred(_exit(c)) for c in self.all_children],
                                  consumeErrors=True)


async def _exit(child: Child) -> None:
    await child.wait_exit(10.0)

