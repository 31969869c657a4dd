"""Which worker runs in which slot, when a dead one is replaced and when a
silent one is killed: the master's supervision decisions, sans-IO.

The master process wires the effects (``spawn`` starts a process for a slot
and returns its worker id; ``kill`` SIGKILLs a worker) and reports what
happened (``heard`` on every heartbeat reply, ``exited`` when a process
ended). Everything is timed on the injected clock, so the rules are tested
on ``task.Clock``:

- A worker that exits is replaced at once, unless its slot is crash-looping:
  ``burst`` exits within ``window`` seconds back the slot off (``backoff``
  doubling up to ``backoff_max``); other slots are never touched.
- A worker not heard from for ``heartbeat_timeout`` is killed (a wedged
  process is the balancer's own gray failure); its exit then replaces it.
- ``replace(slot)`` starts a new worker for a slot whose old one is retired
  (a reload that moves a listener): the retired one's exit is not replaced.
- ``stop()``: shutdown; nothing is replaced any more.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import attrs

__all__ = ["Supervisor", "WorkerRecord"]


@attrs.define
class WorkerRecord:
    wid: int
    slot: int
    started: float
    last_heard: float
    #: a retired worker finishes its work and exits; it is not replaced
    retired: bool = False
    exited: bool = False
    #: heard from at least once (until then ``startup_timeout`` applies)
    ready: bool = False


@attrs.define(eq=False)
class Supervisor:
    clock: Any
    slots: int
    #: spawn(slot) -> worker id (a new process for the slot)
    spawn: Callable[[int], int]
    #: kill(wid, why): SIGKILL the worker
    kill: Callable[[int, str], None]
    #: log(message): decisions worth a log line
    log: Callable[[str], None] = print
    heartbeat_timeout: float = 5.0
    #: a new worker's first answer may take this long (imports, config, TLS keys on a loaded box)
    startup_timeout: float = 30.0
    window: float = 10.0
    burst: int = 3
    backoff: float = 1.0
    backoff_max: float = 30.0

    workers: dict[int, WorkerRecord] = attrs.field(factory=dict, init=False)
    #: slot -> the worker id serving it now (None: waiting for a respawn)
    current: dict[int, int | None] = attrs.field(factory=dict, init=False)
    _exits: dict[int, deque] = attrs.field(factory=dict, init=False)
    _pending: dict[int, Any] = attrs.field(factory=dict, init=False)
    stopping: bool = attrs.field(default=False, init=False)

    def start(self) -> None:
        for slot in range(self.slots):
            self._spawn(slot)

    def _spawn(self, slot: int) -> int:
        self._pending.pop(slot, None)
        wid = self.spawn(slot)
        now = self.clock.seconds()
        self.workers[wid] = WorkerRecord(wid, slot, now, now)
        self.current[slot] = wid
        return wid

    def heard(self, wid: int) -> None:
        rec = self.workers.get(wid)
        if rec is not None:
            rec.last_heard = self.clock.seconds()
            rec.ready = True

    def live(self) -> list[WorkerRecord]:
        """Workers not yet exited, retired ones included, by slot."""
        return sorted((r for r in self.workers.values() if not r.exited), key=lambda r: (r.slot, r.wid))

    def exited(self, wid: int, why: str) -> float | None:
        """A worker's process ended. Returns the delay before its slot gets a
        new worker, or None when it is not replaced (retired, stopping)."""
        rec = self.workers.pop(wid, None)
        if rec is None:
            return None
        rec.exited = True
        if rec.retired or self.stopping or self.current.get(rec.slot) != wid:
            self.log(f"worker {wid} (slot {rec.slot}) exited: {why}")
            return None
        self.current[rec.slot] = None
        now = self.clock.seconds()
        exits = self._exits.setdefault(rec.slot, deque())
        exits.append(now)
        while exits and exits[0] < now - self.window:
            exits.popleft()
        delay = 0.0
        if len(exits) >= self.burst:
            delay = min(self.backoff_max, self.backoff * 2 ** (len(exits) - self.burst))
            self.log(f"worker {wid} (slot {rec.slot}) exited: {why}; {len(exits)} exits within "
                     f"{self.window:g}s: crash loop, replacing it in {delay:g}s (other workers keep serving)")
        else:
            self.log(f"worker {wid} (slot {rec.slot}) exited: {why}; replacing it")
        self._pending[rec.slot] = self.clock.callLater(delay, self._spawn, rec.slot)
        return delay

    def tick(self) -> list[int]:
        """Kill workers silent for ``heartbeat_timeout``; returns their ids."""
        now = self.clock.seconds()
        killed = []
        for rec in list(self.workers.values()):
            limit = self.heartbeat_timeout if rec.ready else self.startup_timeout
            if not rec.exited and now - rec.last_heard >= limit:
                why = f"no {'heartbeat answer' if rec.ready else 'first answer'} for {now - rec.last_heard:.1f}s"
                self.log(f"worker {rec.wid} (slot {rec.slot}): {why}; killing it")
                rec.last_heard = now  # one kill per silence; its exit replaces it
                self.kill(rec.wid, why)
                killed.append(rec.wid)
        return killed

    def replace(self, slot: int) -> tuple[int | None, int]:
        """A new worker for ``slot``; the old one (returned first, or None) is
        retired: the caller tells it to finish and exit."""
        old = self.current.get(slot)
        if old is not None and old in self.workers:
            self.workers[old].retired = True
        return old, self._spawn(slot)

    def stop(self) -> None:
        self.stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
