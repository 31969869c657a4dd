"""Workers forked from the master (no exec), for configs that terminate TLS
with session tickets.

pyOpenSSL cannot set or read a context's ticket key (team notes, twisted-facts
4.3): the only way for N processes to share one is to create the front
contexts once and fork. So when a listener terminates TLS with tickets, the
master builds each such listener's ServerTLS (its ticket key generations,
``FLEET_PREPARE`` of them prepared ahead so the workers agree for that many
rotations) before any worker exists, and forks every worker from itself
instead of ``spawnProcess``. The child forgets the master's reactor and
sockets (closes every inherited socket, pipe and epoll fd but its own,
freezes the garbage collector so no stale object closes a reused fd),
installs a fresh reactor of the same kind and runs the same L{Worker} as an
exec'd child, over a Unix socketpair instead of two pipes. The master
learns of its exit through a pidfd."""
from __future__ import annotations

import gc
import os
import signal
import socket
import stat
import sys
import traceback
from typing import Any, Iterable

import attrs
from twisted.internet import error
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

#: ticket key generations made before forking (12 h rotation: 8 days)
FLEET_PREPARE = 16


def fleet_tls_config(lcfg: Any) -> Any:
    """The listener's TLS settings with at least FLEET_PREPARE keys prepared
    (a listener without TLS session tickets as it is)."""
    if lcfg.tls is None or not lcfg.tls.session_tickets.enabled:
        return lcfg
    t = lcfg.tls.session_tickets
    if t.prepare >= FLEET_PREPARE:
        return lcfg
    tls = attrs.evolve(lcfg.tls, session_tickets=attrs.evolve(t, prepare=FLEET_PREPARE))
    return attrs.evolve(lcfg, tls=tls)


def needs_fork(config: Any) -> bool:
    return any(l.tls is not None and l.tls.session_tickets.enabled for l in config.listeners)


def build_tls(config: Any, clock: Any) -> dict[str, Any]:
    """listener name -> ServerTLS, built in the master before forking."""
    from lbtwist.tls.context import ServerTLS

    return {
        l.name: ServerTLS.for_listener(fleet_tls_config(l), clock)
        for l in config.listeners if l.tls is not None and l.tls.session_tickets.enabled
    }


def refresh_tls(servers: dict[str, Any], config: Any, clock: Any) -> list[str]:
    """Bring the master's ServerTLS (what workers forked from now on inherit)
    to a reloaded ``config``, in place: certificates re-read (a renewed
    certificate reaches replacement workers too), listeners added or dropped.
    Returns the listeners whose protocol or session settings changed: their
    ticket keys are new, and the running workers (each reloading on its own)
    no longer share them, so the caller replaces the workers. Raises
    TLSConfigError naming the file."""
    from lbtwist.tls.context import ServerTLS

    wanted = {l.name: fleet_tls_config(l) for l in config.listeners
              if l.tls is not None and l.tls.session_tickets.enabled}
    changed = []
    for name in [n for n in servers if n not in wanted]:
        servers.pop(name).stop()
    for name, lcfg in wanted.items():
        tls = servers.get(name)
        if tls is None:
            servers[name] = ServerTLS.for_listener(lcfg, clock)
            continue
        if not tls.keeps_sessions(lcfg.tls):
            changed.append(name)
        tls.reload(lcfg.tls)
    return changed


@attrs.define
class ForkedProcess:
    """What the master holds of a forked worker (like IProcessTransport's pid/signalProcess)."""

    pid: int
    ended: bool = False

    def signalProcess(self, sig: str | int) -> None:
        if self.ended:
            raise error.ProcessExitedAlready()
        num = getattr(signal, f"SIG{sig}") if isinstance(sig, str) else sig
        os.kill(self.pid, num)


class PidWatcher:
    """Readable when the process exits (pidfd); then reaps it and calls
    ``on_exit(Failure(ProcessDone|ProcessTerminated))``."""

    def __init__(self, reactor: Any, proc: ForkedProcess, on_exit: Any) -> None:
        self.reactor = reactor
        self.proc = proc
        self.on_exit = on_exit
        self.fd = os.pidfd_open(proc.pid)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "worker-pidfd"

    def doRead(self) -> None:
        self.reactor.removeReader(self)
        os.close(self.fd)
        self.fd = -1
        try:
            _, status = os.waitpid(self.proc.pid, 0)
        except ChildProcessError:
            status = 0
        self.proc.ended = True
        if os.WIFSIGNALED(status):
            reason = Failure(error.ProcessTerminated(None, os.WTERMSIG(status), status))
        elif os.WEXITSTATUS(status):
            reason = Failure(error.ProcessTerminated(os.WEXITSTATUS(status), None, status))
        else:
            reason = Failure(error.ProcessDone(status))
        self.on_exit(reason)

    def connectionLost(self, reason: Any) -> None:
        pass


def fork_worker(reactor: Any, amp_factory: Factory, keep: Iterable[int], reactor_name: str,
                tls_servers: dict[str, Any]) -> ForkedProcess:
    """Fork a worker; the parent's end of its AMP socketpair is connected to
    ``amp_factory``'s protocol. ``keep``: fds the child needs (its sockets)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    keep = set(keep) | {child.fileno()}
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        code = 1
        try:
            parent.detach()  # closed below with the rest, never through this object
            code = _child(child.detach(), keep, reactor_name, tls_servers)
        except BaseException:
            try:
                traceback.print_exc()
            except BaseException:
                pass
        finally:
            os._exit(code)
    child.close()
    reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, amp_factory)
    parent.close()  # Twisted dup()ed it
    return ForkedProcess(pid)


def _close_inherited(keep: set[int]) -> None:
    """Close the master's sockets, pipes and anonymous fds (epoll, eventfd),
    keeping stdio, regular files (a log file) and ``keep``."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd <= 2:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISDIR(mode):
            continue
        try:
            os.close(fd)
        except OSError:
            pass


def _child(amp_fd: int, keep: set[int], reactor_name: str, tls_servers: dict[str, Any]) -> int:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    gc.freeze()  # the master's objects stay as they are: none may close a (reused) fd
    _close_inherited(keep)
    from lbtwist.workers.child import Worker, _amp_class, _die_with_parent, install_reactor

    _die_with_parent()
    import twisted.internet

    sys.modules.pop("twisted.internet.reactor", None)
    if "reactor" in twisted.internet.__dict__:
        del twisted.internet.reactor
    install_reactor(reactor_name)
    from twisted.internet import reactor

    for tls in tls_servers.values():
        tls.clock = reactor
    worker = Worker(reactor, tls_servers=tls_servers)
    proto = _amp_class()(worker)
    worker.proto = proto
    reactor.adoptStreamConnection(amp_fd, socket.AF_UNIX, Factory.forProtocol(lambda: proto))
    os.close(amp_fd)
    reactor.run()
    return 0
