# -*- test-case-name: tests.test_drill_procs -*-
"""Child processes of a drill: spawned on the reactor, their output read line
by line, every wait bounded, and none outliving the drill.

Children ask the kernel to SIGKILL them when the drill process dies
(``PR_SET_PDEATHSIG``), so an interrupted drill leaves nothing behind; programs
we cannot change (twistd, haproxy) are started through
``python -m lbtwist.drill.procs PROGRAM ARGS...``, which sets the flag and
``exec``s them.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

log = Logger(namespace="lbtwist.drill.procs")

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # the parent may already be gone (reparented to init before prctl)
    if os.getppid() == 1:
        os._exit(1)
    return True


def free_port() -> int:
    """An ephemeral port on 127.0.0.1, free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_root() -> Path:
    """The directory holding the ``lbtwist`` package this drill runs from, so
    children run the same code (a checkout under test or the installed one)."""
    import lbtwist

    return Path(lbtwist.__file__).resolve().parents[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(source_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def python() -> str:
    return sys.executable


def guarded(argv: list[str]) -> list[str]:
    """``argv`` run through the die-with-parent wrapper."""
    return [python(), "-m", "lbtwist.drill.procs", *argv]


class _LineCollector(ProcessProtocol):
    def __init__(self, child: "Child") -> None:
        self.child = child
        self.buf = b""

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            self.child._line(raw.decode("utf-8", "replace"))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if self.buf:
            self.child._line(self.buf.decode("utf-8", "replace"))
            self.buf = b""
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.child._ended(code, sig)


class Child:
    """A process spawned on ``reactor``. Output is kept (last ``keep`` lines)
    and can be waited on; ``kill``/``terminate`` are idempotent."""

    def __init__(self, reactor: Any, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 cwd: str | None = None, keep: int = 2000, echo: Callable[[str, str], None] | None = None) -> None:
        self.reactor = reactor
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.keep = keep
        self.echo = echo
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.ended = False
        self._waiters: list[tuple[Callable[[str], bool], defer.Deferred]] = []
        self._end_waiters: list[defer.Deferred] = []
        self.proto = _LineCollector(self)
        self.transport = reactor.spawnProcess(self.proto, argv[0], argv, env=env or child_env(), path=cwd)
        self.pid: int = self.transport.pid

    def _line(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) > self.keep:
            del self.lines[: len(self.lines) - self.keep]
        if self.echo is not None:
            self.echo(self.name, line)
        for pred, d in list(self._waiters):
            if pred(line):
                self._waiters.remove((pred, d))
                d.callback(line)

    def _ended(self, code: int | None, sig: int | None) -> None:
        self.ended = True
        self.exit_code, self.exit_signal = code, sig
        for pred, d in self._waiters:
            d.errback(ProcessGone(f"{self.name} exited (code {code}, signal {sig}) before the expected output:\n" + self.tail()))
        self._waiters = []
        for d in self._end_waiters:
            d.callback(code)
        self._end_waiters = []

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, text: str | Callable[[str], bool], timeout: float) -> defer.Deferred:
        """Fires with the first line (already seen or to come) that contains
        ``text`` (or satisfies it); fails after ``timeout`` or on exit."""
        pred = (lambda line: text in line) if isinstance(text, str) else text
        for line in self.lines:
            if pred(line):
                return defer.succeed(line)
        if self.ended:
            return defer.fail(ProcessGone(f"{self.name} already exited:\n" + self.tail()))
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((pred, d))

        def on_timeout(f: Any) -> Any:
            if f.check(defer.TimeoutError, defer.CancelledError):
                if (pred, d) in self._waiters:
                    self._waiters.remove((pred, d))
                raise ProcessGone(f"{self.name}: {text!r} not seen within {timeout:g}s:\n" + self.tail())
            return f

        d.addTimeout(timeout, self.reactor)
        return d.addErrback(on_timeout)

    def wait_exit(self, timeout: float) -> defer.Deferred:
        """Fires with the exit code once the process ended; on timeout it is SIGKILLed."""
        if self.ended:
            return defer.succeed(self.exit_code)
        d: defer.Deferred = defer.Deferred()
        self._end_waiters.append(d)

        def late(f: Any) -> Any:
            f.trap(defer.TimeoutError, defer.CancelledError)
            if d in self._end_waiters:
                self._end_waiters.remove(d)
            self.kill()
            return None

        d.addTimeout(timeout, self.reactor)
        return d.addErrback(late)

    def when_ended(self) -> defer.Deferred:
        """Fires with the exit code when the process ends. Cancelling it only
        stops waiting (unlike L{wait_exit}, which kills on its deadline)."""
        if self.ended:
            return defer.succeed(self.exit_code)

        def forget(d: defer.Deferred) -> None:
            if d in self._end_waiters:
                self._end_waiters.remove(d)

        d: defer.Deferred = defer.Deferred(canceller=forget)
        self._end_waiters.append(d)
        return d

    def signal(self, sig: str) -> None:
        if self.ended:
            return
        try:
            self.transport.signalProcess(sig)
        except error.ProcessExitedAlready:
            pass

    def kill(self) -> None:
        self.signal("KILL")

    def terminate(self, timeout: float = 10.0) -> defer.Deferred:
        """SIGTERM, then SIGKILL after ``timeout``."""
        self.signal("TERM")
        return self.wait_exit(timeout)


class ProcessGone(Exception):
    """A child did not produce what the drill waited for."""


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds used so far by ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (Linux /proc), None when gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children of any of its threads, and
    theirs), from /proc; empty when it has none or is gone."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to ``pid`` and all its descendants (a balancer's master
    and its workers); returns the pids signalled. SIGKILL first stops the
    whole tree, so no member can fork or respawn a worker between the scan
    and the kill; SIGSTOP rescans until nothing new appears."""
    def send(p: int, s: int) -> bool:
        try:
            os.kill(p, s)
            return True
        except ProcessLookupError:
            return False

    if sig == signal.SIGCONT:
        done = [p for p in [pid, *descendants(pid)] if send(p, sig)]
        return done
    stopped: list[int] = []
    for _ in range(10):  # a stopped process cannot fork: a few rounds settle it
        new = [p for p in [pid, *descendants(pid)] if p not in stopped]
        if not new:
            break
        stopped += [p for p in new if send(p, signal.SIGSTOP)]
    if sig == signal.SIGSTOP:
        return stopped
    return [p for p in stopped if send(p, sig)]


def wait_port(reactor: Any, port: int, timeout: float, host: str = "127.0.0.1") -> defer.Deferred:
    """Fires once ``host:port`` accepts a TCP connection; fails after ``timeout``."""
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Protocol, Factory
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout

    async def attempt() -> None:
        while True:
            ep = TCP4ClientEndpoint(reactor, host, port, timeout=1)
            try:
                p = await ep.connect(Factory.forProtocol(Protocol))
                p.transport.loseConnection()
                return
            except defer.CancelledError:
                raise
            except Exception:
                if reactor.seconds() > deadline:
                    raise ProcessGone(f"nothing accepts on {host}:{port} after {timeout:g}s")
                await deferLater(reactor, 0.05, lambda: None)

    return defer.ensureDeferred(attempt())


def _exec_main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m lbtwist.drill.procs PROGRAM [ARGS...]")
    die_with_parent()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _exec_main(sys.argv[1:])
