# -*- test-case-name: tests.test_drill_scenarios -*-
"""Runs one scenario against one target: backend processes, the balancer
process, the open-loop load, the fault schedule, a poll of every side channel
once a second, then a clean stop of everything it started.

Everything is bounded: start-up waits have deadlines, the load stops by
itself (each try has a 1 s timeout and there are at most 3), and every child
is killed in a ``finally`` (and by the kernel if the drill itself dies).
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater

from lbtwist.drill.configs import Setup
from lbtwist.drill.control import ControlError
from lbtwist.drill.fleet import BackendFleet
from lbtwist.drill.loadgen import ClientPolicy, LoadGenerator
from lbtwist.drill.flood import raise_nofile
from lbtwist.drill.procs import Child, cpu_seconds, free_port
from lbtwist.drill.recorder import Recorder
from lbtwist.drill.scenarios import Plan, evaluate
from lbtwist.drill.targets import make_target

Progress = Callable[[str], None]

#: How long steps still running when the load ends may take to finish.
STEP_GRACE = 20.0


@attrs.define
class RunResult:
    """One scenario run against one target (JSON-ready via L{as_json})."""

    scenario: str
    target: str
    duration: float
    window: tuple[float, float]
    series: dict[str, Any] = attrs.Factory(dict)
    totals: dict[str, Any] = attrs.Factory(dict)
    phases: dict[str, Any] = attrs.Factory(dict)
    events: list[dict[str, Any]] = attrs.Factory(list)
    notes: list[str] = attrs.Factory(list)
    load: dict[str, Any] = attrs.Factory(dict)
    marks: dict[str, Any] = attrs.Factory(dict)
    config: str = ""
    error: str | None = None
    criteria: list[dict[str, Any]] = attrs.Factory(list)
    target_log: str = ""
    #: Every process the run started (all gone when it returns).
    pids: list[int] = attrs.Factory(list)
    #: The raw recorder (latencies of every request), for criteria over any
    #: window; not serialised.
    recorder: Recorder | None = attrs.field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.criteria) and all(c["passed"] for c in self.criteria)

    def as_json(self) -> dict[str, Any]:
        d = attrs.asdict(self, filter=lambda a, v: a.name != "recorder")
        d["passed"] = self.passed
        return d


class DrillContext:
    """What a scenario's scheduled actions may do while the load runs."""

    def __init__(self, reactor: Any, fleet: BackendFleet, target: Any, recorder: Recorder, setup: Setup,
                 plan: Plan, progress: Progress) -> None:
        self.reactor = reactor
        self.fleet = fleet
        self.target = target
        self.recorder = recorder
        self.setup = setup
        self.plan = plan
        self.progress = progress
        self.marks: dict[str, Any] = {}
        self.current_fault = ""
        #: Processes the scenario's steps started (the runner ends them).
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str]) -> Child:
        """Start a helper process (an attacker) that the runner kills at the end."""
        child = Child(self.reactor, name, argv)
        self.children.append(child)
        return child

    def now(self) -> float:
        """Seconds since the load started."""
        return self.reactor.seconds() - self.recorder.t0

    def event(self, label: str) -> None:
        self.recorder.event(self.reactor.seconds(), label)
        self.progress(f"[{self.target.kind}] t={self.now():5.1f}s  >> {label}")

    def mark(self, key: str, value: Any) -> None:
        self.marks[key] = value

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)

    async def faults(self, targets: list[str], **changes: Any) -> None:
        await self.fleet.set_faults(targets, **changes)

    async def reset(self, targets: list[str]) -> None:
        await self.fleet.reset_faults(targets)

    async def kill(self, group: str) -> None:
        await self.fleet.kill_group(group)

    async def start_group(self, group: str, **faults: Any) -> None:
        await self.fleet.start_group(group, faults or None)

    async def drain(self, name: str) -> None:
        await self.target.drain(name)

    async def undrain(self, name: str) -> None:
        await self.target.undrain(name)

    async def states(self) -> dict[str, str]:
        return await self.target.states()

    async def reload(self, names: list[str]) -> Any:
        """Reload the balancer with ``names`` as the pool's backends."""
        self.setup = attrs.evolve(self.setup, backends=self.fleet.refs(names))
        return await self.target.reload(self.setup)

    async def wait_until(self, pred: Callable[[], Awaitable[bool]], timeout: float, step: float = 0.1) -> bool:
        """Poll ``pred`` until true (True) or ``timeout`` (False)."""
        deadline = self.reactor.seconds() + timeout
        while True:
            try:
                if await pred():
                    return True
            except ControlError:
                pass
            if self.reactor.seconds() >= deadline:
                return False
            await self.sleep(step)


async def run_target(reactor: Any, plan: Plan, target_kind: str, workdir: Path, *,
                     progress: Progress = lambda s: None, seed: int = 1,
                     echo: Callable[[str, str], None] | None = None) -> RunResult:
    """Run ``plan`` against ``target_kind`` (lbtwist, naive, haproxy)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = RunResult(scenario=plan.name, target=target_kind, duration=plan.duration, window=plan.window)
    fleet = BackendFleet(reactor, plan.groups, seed=seed, echo=echo)
    target = make_target(target_kind, reactor, workdir, echo=echo)
    poller: task.LoopingCall | None = None
    step_calls: list[IDelayedCall] = []
    gen: LoadGenerator | None = None
    ctx: DrillContext | None = None
    limit_notes: list[str] = []
    if plan.open_files:
        limit = raise_nofile(plan.open_files)
        limit_notes.append(f"open-file limit (RLIMIT_NOFILE) {limit} for the drill and the processes it starts")
        if limit < plan.open_files:
            limit_notes.append(f"open-file limit {limit} is below the {plan.open_files} this drill wants")
    try:
        progress(f"[{target_kind}] starting {sum(len(g.backends) for g in plan.groups)} backends")
        await fleet.start()
        setup = Setup(
            listen_port=free_port(), admin_port=free_port(),
            backends=fleet.refs(plan.in_pool), mode=plan.mode,
            pool_overrides=plan.pool_overrides if target_kind == "lbtwist" else {},
            config_overrides=plan.config_overrides if target_kind in ("lbtwist", "naive") else {},
        )
        progress(f"[{target_kind}] starting the balancer on 127.0.0.1:{setup.listen_port}")
        await target.start(setup)
        result.config = target.config_text
        expect = {n for n in plan.in_pool if fleet.running(fleet.group_of(n))}
        await target.wait_in_rotation(expect, 45.0)
        progress(f"[{target_kind}] {len(expect)} backends in rotation; load {plan.rate:g}/s for {plan.duration:g}s")

        t0 = reactor.seconds() + 0.2
        rec = Recorder(t0, int(plan.duration))
        ctx = DrillContext(reactor, fleet, target, rec, setup, plan, progress)
        gen = LoadGenerator(reactor, "127.0.0.1", setup.listen_port, rate=plan.rate_fn or plan.rate,
                            duration=plan.duration, sink=rec, policy=ClientPolicy(), seed=seed, start_at=t0)
        my_pid = os.getpid()
        poll_failures = _Repeats()

        async def poll() -> None:
            t = reactor.seconds()
            try:
                rows, gone = await fleet.state()
                rec.backend_sample(reactor.seconds(), rows)
                rec.backend_gone(reactor.seconds(), gone)
            except Exception as e:  # never let the poll loop die
                poll_failures.note(t - t0, f"backend poll failed: {e}")
            try:
                rec.lb_sample(reactor.seconds(), await target.states())
            except Exception as e:
                poll_failures.note(t - t0, f"balancer poll failed: {e}")
            now = reactor.seconds()
            rec.cpu_sample(now, "balancer", target.cpu())
            rec.cpu_sample(now, "backends", fleet.cpu())
            rec.cpu_sample(now, "loadgen", cpu_seconds(my_pid))
            rec.box_sample(now, _loadavg())
            _progress_line(progress, target_kind, rec, now, ctx)

        poller = task.LoopingCall(lambda: defer.ensureDeferred(poll()))
        poller.clock = reactor
        poller_done = poller.start(1.0, now=False)

        def run_step(step: Any) -> None:
            async def go() -> None:
                ctx.event(step.label)
                try:
                    await step.action(ctx)
                except Exception as e:
                    rec.notes.append(f"step {step.label!r} failed: {e.__class__.__name__}: {e}")
                    progress(f"[{target_kind}] step {step.label!r} FAILED: {e}")
            running.append(defer.ensureDeferred(go()))

        running: list[defer.Deferred] = []
        for step in plan.steps:
            step_calls.append(reactor.callLater(max(0.0, t0 + step.at - reactor.seconds()), run_step, step))

        stats = await gen.run()
        poller.stop()
        await poller_done
        poller = None
        # let steps still running (a restart, a flood phase) finish before
        # stopping everything and reading their marks: bounded
        unfinished = [d for d in running if not d.called]
        if unfinished:
            waiting = defer.DeferredList(unfinished, consumeErrors=True)
            waiting.addTimeout(STEP_GRACE, reactor)
            try:
                await waiting
            except defer.TimeoutError:
                rec.notes.append(f"a step was still running {STEP_GRACE:g}s after the load ended")
        result.series = rec.series()
        result.totals = rec.totals()
        a, b = plan.window
        result.phases = {
            "before": rec.totals(0, a), "fault": rec.totals(a, b), "after": rec.totals(b, plan.duration),
        }
        result.events = rec.events
        result.notes = limit_notes + rec.notes + poll_failures.lines()
        result.load = attrs.asdict(stats)
        result.marks = ctx.marks
        result.recorder = rec
        if stats.late_arrivals:
            result.notes.append(
                f"load generator fell behind: {stats.late_arrivals} of {stats.issued} arrivals more than "
                f"{LoadGenerator.LATE * 1000:.0f} ms late (max {stats.max_lag * 1000:.0f} ms); latency is "
                "still measured from the scheduled time")
        box = [v for v in rec.box.values() if v is not None]
        cores = os.cpu_count() or 1
        if box and max(box) > cores:
            result.notes.append(
                f"the box was busy: 1-minute load average up to {max(box):.1f} on {cores} cores during the run "
                "(other work shares the CPUs); latency spikes may be the box, not the target")
        if stats.client_limit:
            result.notes.append(f"load generator hit its connection cap {stats.client_limit} times")
        result.criteria = evaluate(plan, result)
    except Exception as e:
        result.error = f"{e.__class__.__name__}: {e}"
        progress(f"[{target_kind}] drill error: {result.error}")
        result.notes.append(traceback.format_exc())
    finally:
        for c in step_calls:
            if c.active():
                c.cancel()
        if poller is not None and poller.running:
            poller.stop()
        if gen is not None:
            gen.close()
        if target.child is not None:
            result.target_log = target.child.tail(200)
        try:
            await target.stop()
        except Exception as e:
            result.notes.append(f"stopping {target_kind}: {e}")
        await fleet.shutdown()
        helpers = ctx.children if ctx is not None else []
        for c in helpers:
            if not c.ended:
                await c.terminate(5.0)
        result.pids = [c.pid for c in helpers] + [c.pid for c in fleet.all_children] + ([target.child.pid] if target.child is not None else [])
        # processes the target started itself that a step saw (worker processes)
        if ctx is not None:
            result.pids += [p for p in ctx.marks.get("pids_seen", []) if p not in result.pids]
    return result


class _Repeats:
    """Side-channel failures, one note per distinct message (a dead balancer
    fails every poll; one line says so)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def note(self, t: float, message: str) -> None:
        self.seen.setdefault(message, []).append(t)

    def lines(self) -> list[str]:
        out = []
        for msg, ts in self.seen.items():
            when = f"t={ts[0]:.1f}s" if len(ts) == 1 else f"{len(ts)} times, t={ts[0]:.1f}s..{ts[-1]:.1f}s"
            out.append(f"{msg} ({when})")
        return out


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _progress_line(progress: Progress, kind: str, rec: Recorder, now: float, ctx: DrillContext) -> None:
    sec = int(now - rec.t0) - 1
    if sec < 0:
        return
    s = rec._s.get(sec)
    offered = s.offered if s else 0
    good = s.goodput if s else 0
    failed = s.failed_done if s else 0
    retries = s.retries if s else 0
    st = rec.lb_state.get(sec + 1) or rec.lb_state.get(sec) or {}
    inrot = sum(1 for v in st.values() if v in ("healthy", "slow_start"))
    bad = ",".join(f"{k}:{v}" for k, v in sorted(st.items()) if v not in ("healthy", "slow_start"))
    progress(f"[{kind}] t={sec:3d}s offered {offered:4d}/s  ok {good:4d}/s  failed {failed:3d}  "
             f"retries {retries:3d}  in rotation {inrot}/{len(st)}" + (f"  ({bad})" if bad else ""))
