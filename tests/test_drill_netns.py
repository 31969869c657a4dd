"""The balancer-failover drill's lab: namespaces made and removed, nothing
left behind when a step fails; process trees signalled whole."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lbtwist.drill import netns
from lbtwist.drill.netns import Lab, LabError
from lbtwist.drill.procs import descendants, signal_tree

root_only = pytest.mark.skipif(os.geteuid() != 0 or netns.missing_requirements(("ip",)) != [],
                               reason="needs root and ip netns (the drill exits 2 there, tested below)")


class Recorder:
    """A fake ``ip`` that records commands and fails the ``fail_at``-th."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, argv):
        self.calls.append(list(argv))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise LabError(f"{' '.join(argv)}: exit 2: boom")
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_setup_builds_everything_inside_its_own_namespaces():
    rec = Recorder()
    lab = Lab(("a", "b"), run=rec, tag="1-abc").setup()
    assert lab.addresses == {"a": "10.77.0.11", "b": "10.77.0.12"}
    assert lab.created == ["lbtw-1-abc-br", "lbtw-1-abc-a", "lbtw-1-abc-b"]
    for argv in rec.calls:
        assert argv[0] == "ip"
        # every link/addr command names one of the lab's namespaces: nothing in the host's
        if argv[1] != "netns":
            assert argv[1] == "-n" and argv[2].startswith("lbtw-1-abc-"), argv
        else:
            assert argv[2] in ("add", "exec", "del") and argv[3].startswith("lbtw-1-abc-"), argv
    veth = [c for c in rec.calls if "veth" in c]
    assert all(c[2] == "lbtw-1-abc-br" and c[-2:] in (["netns", "lbtw-1-abc-a"], ["netns", "lbtw-1-abc-b"]) for c in veth)
    rec.calls.clear()
    assert lab.teardown() == []
    assert rec.calls == [["ip", "netns", "del", n] for n in ("lbtw-1-abc-b", "lbtw-1-abc-a", "lbtw-1-abc-br")]
    assert lab.teardown() == [] and len(rec.calls) == 3  # idempotent


@pytest.mark.parametrize("fail_at", [1, 2, 4, 7, 9, 12])
def test_a_failing_step_removes_what_was_made(fail_at):
    rec = Recorder(fail_at)
    lab = Lab(("a", "b"), run=rec, tag="2-def")
    with pytest.raises(LabError, match="boom"):
        lab.setup()
    made = [c[3] for c in rec.calls[:fail_at - 1] if c[:3] == ["ip", "netns", "add"]]
    deleted = [c[3] for c in rec.calls[fail_at:] if c[:3] == ["ip", "netns", "del"]]
    assert sorted(deleted) == sorted(made)
    assert lab.created == []


def test_public_subnets_are_refused():
    with pytest.raises(LabError, match="not a private range"):
        Lab(("a",), subnet="8.8.8.0/24", run=Recorder()).setup()


def test_has_address_reads_ip_json():
    out = '[{"ifname":"eth0","addr_info":[{"family":"inet","local":"10.77.0.11"},{"family":"inet","local":"10.77.0.100"}]}]'
    assert netns.has_address(out, "10.77.0.100")
    assert not netns.has_address(out, "10.77.0.12")
    assert not netns.has_address("not json", "10.77.0.100")


@root_only
def test_real_lab_up_and_down():
    lab = Lab(("x", "y"))
    lab.setup()
    try:
        names = set(netns.existing())
        assert {lab.ns("x"), lab.ns("y"), lab.bridge_ns} <= names
        # the two nodes reach each other through the bridge
        code = ("import socket,sys; s=socket.socket(); s.bind(('0.0.0.0',0)); s.listen(); "
                "print(s.getsockname()[1], flush=True); c,a=s.accept(); print(a[0], flush=True)")
        srv = subprocess.Popen(lab.exec_argv("y", [sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True)
        try:
            port = int(srv.stdout.readline())
            r = subprocess.run(lab.exec_argv("x", [sys.executable, "-c",
                               f"import socket; socket.create_connection(('{lab.address('y')}', {port}), timeout=10)"]),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert srv.stdout.readline().strip() == lab.address("x")
        finally:
            srv.kill()
            srv.wait(10)
    finally:
        assert lab.teardown() == []
    assert lab.leftovers() == []


@root_only
def test_real_lab_failing_midway_leaves_nothing():
    calls = []

    def flaky(argv):
        calls.append(argv)
        if "addr" in argv and len([c for c in calls if "addr" in c]) == 2:
            raise LabError("injected failure on the second address")
        return netns.run_ip(argv)

    lab = Lab(("x", "y", "z"), run=flaky)
    with pytest.raises(LabError, match="injected"):
        lab.setup()
    assert lab.leftovers() == []
    assert not [n for n in netns.existing() if n.startswith(f"{netns.PREFIX}{lab.tag}")]


@root_only
def test_stale_labs_of_dead_drills_are_swept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # exited: its pid is gone (reuse within the test is unlikely)
    name = f"{netns.PREFIX}{pid}-0abc12-x"
    netns.run_ip(["ip", "netns", "add", name])
    try:
        assert name in netns.sweep_stale()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert name not in netns.existing()


def _tree() -> tuple[subprocess.Popen, int]:
    """A parent (like a master) with one child (a worker); returns the
    parent and the child's pid once both run."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(c.pid, flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _wait_state(pid: int, want: tuple, timeout: float = 30.0) -> str | None:
    """Signals land asynchronously: poll /proc until ``pid`` is in one of
    ``want`` (bounded)."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while True:
        st = _state(pid)
        if st in want or time.monotonic() > deadline:
            return st
        tick.wait(0.01)


def test_signal_tree_kills_master_and_workers():
    p, child = _tree()
    try:
        assert descendants(p.pid) == [child]
        sent = signal_tree(p.pid, signal.SIGKILL)
        assert sorted(sent) == sorted([p.pid, child])
        p.wait(10)
        # the orphaned worker is gone too (a zombie at most until init reaps it)
        assert _wait_state(child, (None, "Z")) in (None, "Z")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_signal_tree_freezes_and_continues_all():
    p, child = _tree()
    try:
        signal_tree(p.pid, signal.SIGSTOP)
        assert _wait_state(p.pid, ("T",)) == "T" and _wait_state(child, ("T",)) == "T"
        signal_tree(p.pid, signal.SIGCONT)
        assert _wait_state(p.pid, ("S", "R")) in ("S", "R") and _wait_state(child, ("S", "R")) in ("S", "R")
    finally:
        signal_tree(p.pid, signal.SIGKILL)
        p.wait(10)
