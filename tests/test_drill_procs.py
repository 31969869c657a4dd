"""Drill child processes: waits are bounded, and nothing outlives the drill."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest
import pytest_twisted

from lbtwist.drill.procs import Child, ProcessGone, child_env, cpu_seconds, guarded

IDLE = "import select; select.select([], [], [], 60)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_guarded_children_die_with_the_drill():
    """The drill process (here a middle process) is SIGKILLed: the kernel
    kills its guarded child too, so an interrupted drill leaves nothing."""
    middle_code = (
        "import subprocess, sys;"
        f"p = subprocess.Popen({guarded([sys.executable, '-c', IDLE])!r});"
        "print(p.pid, flush=True);"
        "p.wait()"
    )
    middle = subprocess.Popen([sys.executable, "-c", middle_code], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        grandchild = int(middle.stdout.readline())
        assert _alive(grandchild)
        gone = os.pidfd_open(grandchild)  # readable once the process has exited: an event, not a poll
        try:
            middle.send_signal(signal.SIGKILL)
            middle.wait(10)
            # bounded by the event (a loaded box may take a while to schedule the dying child)
            readable, _, _ = select.select([gone], [], [], 30)
        finally:
            os.close(gone)
        assert readable and not _alive(grandchild)
    finally:
        middle.kill()
        middle.wait(10)


@pytest_twisted.ensureDeferred
async def test_child_waits_are_bounded_and_kill_is_final():
    from twisted.internet import reactor

    c = Child(reactor, "idler", [sys.executable, "-u", "-c", "print('hello', flush=True);" + IDLE])
    try:
        assert await c.wait_for("hello", 20) == "hello"
        with pytest.raises(ProcessGone, match="not seen within"):
            await c.wait_for("never printed", 0.3)
        assert cpu_seconds(c.pid) is not None
        await c.terminate(10)
        assert c.ended and c.exit_signal == signal.SIGTERM
        with pytest.raises(ProcessGone, match="already exited"):
            await c.wait_for("anything", 1)
    finally:
        c.kill()


@pytest_twisted.ensureDeferred
async def test_no_longer_waiting_for_an_exit_does_not_kill():
    """Regression: a start-up wait that stopped waiting for the process to
    exit must not kill it later (the balancer died 45 s into full drills)."""
    from twisted.internet import defer, reactor
    from twisted.internet.task import deferLater

    c = Child(reactor, "idler", [sys.executable, "-c", IDLE])
    try:
        d = c.when_ended()
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.cancel()
        await deferLater(reactor, 0.3, lambda: None)
        assert not c.ended and _alive(c.pid)
        code = await c.wait_exit(0.2)  # this one does kill at its deadline
        assert code is None
        await c.when_ended()
        assert c.ended and c.exit_signal == signal.SIGKILL
    finally:
        c.kill()
