# -*- test-case-name: tests.test_status -*-
"""``lbtwist status [--check]``: can this instance serve right now?

Asked by keepalived's track script every second (docs/ha.md), so it answers
the question a VIP depends on from the outside, as a client would, and not
from the process table: a frozen balancer still has a pid.

Serving means all three, within one deadline (``--timeout``, 1 s):
  1. the admin API answers ``GET /api/pools`` with 200 and JSON;
  2. at least one TCP/TLS/unix listener of the config completes a TCP
     connect (a listener whose accept queue is full, or that is not
     listening, does not);
  3. at least one pool has a backend in rotation (from the admin API).

Listeners get a connect only, never a request: a request through a listener
reaches a real backend (a request on the user's application, in its logs and
rate limits), and backend health is already judged by the pool state. A
frozen event loop is caught by the admin request, which the frozen process
cannot answer although its sockets still complete handshakes.

Stdlib sockets and the config loader only: no reactor, no Twisted endpoint
import, so one run costs little more than the interpreter's start.
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import sys
import time
from typing import Any, Callable

from dataclasses import dataclass, field

# dataclasses, not attrs (the project's habit): keepalived runs this every
# second on each node and importing attrs was half of a cached run's CPU.

#: Deadline of the whole check, seconds (admin answer and listener connects).
DEFAULT_TIMEOUT = 1.0
#: The admin request: pool figures without their per-second history.
ADMIN_PATH = "/api/pools?history=0"
#: Exit statuses: serving, not serving, cannot tell (config unreadable).
OK, NOT_SERVING, UNUSABLE = 0, 1, 2
#: The most of an admin answer read (a pool overview without history).
MAX_ANSWER = 8 << 20


@dataclass(frozen=True)
class Target:
    """Where to connect: ``family`` AF_INET/AF_INET6 with ``(host, port)``,
    or AF_UNIX with a path."""

    what: str
    bind: str
    family: int
    address: Any

    def show(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.address}"
        host, port = self.address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_target(what: str, bind: str) -> Target | str:
    """The address a client on this machine reaches ``bind`` at, or a reason
    it cannot be checked (port 0, a plugin endpoint type). A wildcard
    interface is reached on loopback."""
    from lbtwist.config.binds import bind_key

    try:
        key = bind_key(bind)
    except (ValueError, IndexError) as e:
        return f"cannot read bind {bind!r}: {e}"
    if key is None:
        return f"bind {bind!r}: endpoint type not checkable (only tcp, ssl, tls and unix are)"
    if key.proto == "unix":
        return Target(what, bind, socket.AF_UNIX, str(key.where))
    if key.where == 0:
        return f"bind {bind!r}: port 0 is ephemeral, nothing to connect to"
    host = key.interface
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return Target(what, bind, family, (host, int(key.where)))


@dataclass
class Probe:
    """One connection the check made and how it ended."""

    target: Target
    request: bytes = b""
    sock: socket.socket | None = None
    connected_after: float | None = None
    answered_after: float | None = None
    error: str | None = None
    buf: bytearray = field(default_factory=bytearray)
    sent: int = 0
    done: bool = False
    answer_status: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.done


@dataclass
class Report:
    """What one check found; L{problems} names everything that failed."""

    timeout: float
    admin: Probe | None
    listeners: list[Probe]
    skipped: list[str]
    pools: list[dict[str, Any]] = field(default_factory=list)
    admin_problem: str | None = None
    config_problem: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.config_problem:
            out.append(self.config_problem)
            return out
        if self.admin_problem:
            out.append(self.admin_problem)
        if not self.listeners:
            out.append("no TCP/TLS/unix listener to check in the config" + (
                " (" + "; ".join(self.skipped) + ")" if self.skipped else ""))
        elif not any(p.ok for p in self.listeners):
            out.append("no listener accepts: " + "; ".join(
                f"{p.target.what} {p.target.show()}: {p.error}" for p in self.listeners))
        if self.admin_problem is None:
            if not self.pools:
                out.append("the admin API lists no pool")
            elif not any(int(p.get("backends_in_rotation") or 0) > 0 for p in self.pools):
                out.append("no pool has a backend in rotation: " + ", ".join(
                    f"{p.get('name')} 0 of {p.get('backends_total')}" for p in self.pools))
        return out

    @property
    def serving(self) -> bool:
        return not self.problems()


def _admin_request(target: Target, token: str | None) -> bytes:
    host = "localhost" if target.family == socket.AF_UNIX else target.show()
    head = [f"GET {ADMIN_PATH} HTTP/1.1", f"Host: {host}", "User-Agent: lbtwist-status", "Accept: application/json",
            "Connection: close"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def _parse_answer(buf: bytes) -> tuple[int, bytes] | None:
    """``(status, body)`` once a whole HTTP/1.1 answer is in ``buf``, else None.
    Raises ValueError on something that is not HTTP."""
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {lines[0][:60]!r}")
    status = int(parts[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        return _dechunk(body, status)
    if length is None:
        return None  # Connection: close: the body ends at EOF (see run())
    if len(body) < length:
        return None
    return status, body[:length]


def _dechunk(data: bytes, status: int) -> tuple[int, bytes] | None:
    out = bytearray()
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return None
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return status, bytes(out)
        if len(rest) < size + 2:
            return None
        out += rest[:size]
        data = rest[size + 2:]


def probe_all(probes: list[Probe], timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Connect every probe at once (non-blocking), send each its request,
    read answers, all before one deadline; every probe ends ``done`` or with
    an ``error`` saying how far it got."""
    sel = selectors.DefaultSelector()
    start = clock()
    deadline = start + timeout
    try:
        for p in probes:
            try:
                s = socket.socket(p.target.family, socket.SOCK_STREAM)
            except OSError as e:
                p.error = f"socket: {e.strerror or e}"
                continue
            s.setblocking(False)
            p.sock = s
            rc = s.connect_ex(p.target.address)
            if rc not in (0, errno.EINPROGRESS, errno.EAGAIN):
                p.error = _connect_error(rc)
                continue
            sel.register(s, selectors.EVENT_WRITE, p)
        while sel.get_map():
            left = deadline - clock()
            if left <= 0:
                break
            for key, events in sel.select(left):
                p = key.data
                s = p.sock
                if p.connected_after is None:
                    rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if rc:
                        p.error = _connect_error(rc)
                        sel.unregister(s)
                        continue
                    p.connected_after = clock() - start
                    if not p.request:
                        p.done = True
                        sel.unregister(s)
                        continue
                if p.sent < len(p.request):
                    try:
                        p.sent += s.send(p.request[p.sent:])
                    except OSError as e:
                        p.error = f"sending the request: {e.strerror or e}"
                        sel.unregister(s)
                        continue
                    if p.sent >= len(p.request):
                        sel.modify(s, selectors.EVENT_READ, p)
                    continue
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    p.error = f"reading the answer: {e.strerror or e}"
                    sel.unregister(s)
                    continue
                if chunk:
                    p.buf += chunk
                if len(p.buf) > MAX_ANSWER:
                    p.error = f"answer larger than {MAX_ANSWER} bytes"
                    sel.unregister(s)
                    continue
                try:
                    whole = _parse_answer(p.buf)
                except ValueError as e:
                    p.error = str(e)
                    sel.unregister(s)
                    continue
                if whole is None and not chunk:  # EOF: a close-delimited body, or a cut answer
                    head, sep, body = bytes(p.buf).partition(b"\r\n\r\n")
                    if not sep:
                        p.error = "connection closed before an answer" if not p.buf else "answer cut short"
                        sel.unregister(s)
                        continue
                    whole = (int(head.split(b" ", 2)[1]), body)
                if whole is not None:
                    p.answered_after = clock() - start
                    p.buf = bytearray(whole[1])
                    p.answer_status = whole[0]
                    p.done = True
                    sel.unregister(s)
        for key in list(sel.get_map().values()):
            p = key.data
            if p.connected_after is None:
                p.error = f"connect did not complete within {timeout:g} s (accept queue full, or packets dropped)"
            else:
                p.error = (f"connected in {p.connected_after * 1000:.0f} ms but no answer within {timeout:g} s "
                           "(the balancer is frozen or its event loop is stuck)")
            sel.unregister(key.fileobj)
    finally:
        sel.close()
        for p in probes:
            if p.sock is not None:
                p.sock.close()
                p.sock = None


def _connect_error(rc: int) -> str:
    name = errno.errorcode.get(rc, str(rc))
    if rc == errno.ECONNREFUSED:
        return "connection refused (nothing listening)"
    if rc == errno.ENOENT:
        return "no such socket file"
    return f"connect failed: {os.strerror(rc)} ({name})"


def read_config(path: str) -> tuple[Any, str | None]:
    """``(config, problem)`` from the file with the runtime's own loader.
    Problems elsewhere in the file do not stop the check; an admin or
    listener section the loader could not read does."""
    from lbtwist.config.loader import load

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return None, f"cannot read the config {path!r}: {e.strerror or e}"
    except UnicodeDecodeError as e:
        return None, f"the config {path!r} is not UTF-8 text: {e.reason}"
    result = load(text, path)
    if result.config is None:
        return None, "cannot read the config: " + "; ".join(str(p) for p in result.problems[:3])
    bad = [b for b in result.bad if b == "admin" or b.startswith("admin.") or b.startswith("listeners")]
    if bad:
        mine = [str(p) for p in result.problems if any(p.path.startswith(b) for b in bad)] or bad
        return None, "the config's admin or listener section has errors: " + "; ".join(mine[:3])
    if result.config.admin is None:
        return None, f"the config {path!r} has no admin section: the check needs the admin API"
    return result.config, None


@dataclass(frozen=True)
class CheckPlan:
    """What to probe, read from the config: the admin target (or why there
    is none), its token, the listeners to connect and the ones skipped."""

    admin: Target | None
    token: str | None
    listeners: tuple[Target, ...]
    skipped: tuple[str, ...]
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        def t(x: Target) -> list[Any]:
            return [x.what, x.bind, x.family, list(x.address) if isinstance(x.address, tuple) else x.address]

        return {"admin": t(self.admin) if self.admin else None, "listeners": [t(x) for x in self.listeners],
                "skipped": list(self.skipped), "problem": self.problem}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CheckPlan":
        def t(x: list[Any]) -> Target:
            what, bind, family, addr = x
            return Target(what, bind, int(family), tuple(addr) if isinstance(addr, list) else addr)

        return cls(t(d["admin"]) if d["admin"] else None, None, tuple(t(x) for x in d["listeners"]),
                   tuple(d["skipped"]), d.get("problem"))


def plan_for(config: Any) -> CheckPlan:
    """The probes ``config`` calls for (the admin's token read here)."""
    admin = connect_target("admin", config.admin.bind)
    token = None
    if config.admin.token or config.admin.token_file:
        from lbtwist.admin.auth import read_token  # only then: it imports the admin package

        try:
            token = read_token(config.admin)
        except ValueError as e:
            return CheckPlan(None, None, (), (), problem=str(e))
    listeners: list[Target] = []
    skipped: list[str] = []
    for lc in config.listeners:
        if lc.mode == "udp":
            skipped.append(f"listener {lc.name}: udp, nothing to connect")
            continue
        t = connect_target(f"listener {lc.name}", lc.bind)
        if isinstance(t, str):
            skipped.append(f"listener {lc.name}: {t}")
        else:
            listeners.append(t)
    if isinstance(admin, str):
        return CheckPlan(None, token, tuple(listeners), tuple(skipped), problem=f"admin: {admin}")
    return CheckPlan(admin, token, tuple(listeners), tuple(skipped))


def check(config: Any, timeout: float = DEFAULT_TIMEOUT, clock: Callable[[], float] = time.monotonic) -> Report:
    """Run the three checks against the instance ``config`` describes."""
    return check_plan(plan_for(config), timeout, clock)


def check_plan(plan: CheckPlan, timeout: float = DEFAULT_TIMEOUT,
               clock: Callable[[], float] = time.monotonic) -> Report:
    listeners = [Probe(t) for t in plan.listeners]
    if plan.problem is not None or plan.admin is None:
        return Report(timeout, None, listeners, list(plan.skipped), config_problem=plan.problem or "admin: no target")
    admin = plan.admin
    ap = Probe(admin, request=_admin_request(admin, plan.token))
    probe_all([ap, *listeners], timeout, clock)
    report = Report(timeout, ap, listeners, list(plan.skipped))
    if not ap.ok:
        report.admin_problem = f"admin API {admin.show()}: {ap.error}"
        return report
    status = ap.answer_status
    if status != 200:
        report.admin_problem = f"admin API {admin.show()} answered {status}: {bytes(ap.buf[:200]).decode('utf-8', 'replace').strip()}"
        return report
    try:
        data = json.loads(bytes(ap.buf))
        report.pools = [p for p in data["pools"] if isinstance(p, dict)]
    except (ValueError, KeyError, TypeError) as e:
        report.admin_problem = f"admin API {admin.show()}: answer is not the pools JSON ({e.__class__.__name__}: {e})"
    return report


# -- the plan cache ------------------------------------------------------------
# Loading the config (YAML, the typed model) is two thirds of a run's CPU;
# keepalived runs the check every second on each node. With --cache FILE the
# plan is kept there, keyed by the config file's identity (path, inode, size,
# mtime): any edit of the file, or a new file renamed over it, reads it again.

CACHE_FORMAT = 1


def _identity(config_path: str) -> list[Any]:
    st = os.stat(config_path)
    return [CACHE_FORMAT, os.path.realpath(config_path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def load_cached(cache: str, config_path: str) -> CheckPlan | None:
    """The cached plan when it was made from this very file, else None."""
    try:
        with open(cache, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("key") != _identity(config_path):
            return None
        return CheckPlan.from_json(d["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cached(cache: str, config_path: str, plan: CheckPlan) -> None:
    """Keep ``plan`` for the next runs (not when the admin has a token: a
    secret is not copied into a cache file; best effort otherwise)."""
    if plan.token is not None or plan.problem is not None:
        return
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": _identity(config_path), "plan": plan.as_json()}, f)
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def summary(report: Report) -> str:
    """The human view (``lbtwist status`` without ``--check``)."""
    out = []
    a = report.admin
    if a is not None:
        state = f"answered in {a.answered_after * 1000:.0f} ms" if a.ok and report.admin_problem is None else (
            report.admin_problem or a.error or "?")
        out.append(f"admin     {a.target.show():<22} {state}")
    for p in report.listeners:
        state = f"accepts (connect {p.connected_after * 1000:.0f} ms)" if p.ok else p.error
        out.append(f"{p.target.what:<30} {p.target.show():<22} {state}")
    for s in report.skipped:
        out.append(f"skipped   {s}")
    for pool in report.pools:
        out.append(f"pool      {pool.get('name')}: {pool.get('backends_in_rotation')} of "
                   f"{pool.get('backends_total')} backends in rotation" + ("  (panic)" if pool.get("panic") else ""))
    problems = report.problems()
    out.append("serving: yes" if not problems else "serving: NO: " + "; ".join(problems))
    return "\n".join(out)


def run(config_path: str, *, check_only: bool, timeout: float = DEFAULT_TIMEOUT, cache: str | None = None) -> int:
    """Entry point of ``lbtwist status``; returns the exit status."""
    if not timeout > 0:
        print(f"lbtwist status: --timeout {timeout:g} must be above 0 seconds", file=sys.stderr)
        return UNUSABLE
    plan = load_cached(cache, config_path) if cache else None
    if plan is None:
        config, problem = read_config(config_path)
        if problem is not None:
            print(f"lbtwist status: {problem}", file=sys.stderr)
            return UNUSABLE
        plan = plan_for(config)
        if cache:
            save_cached(cache, config_path, plan)
    report = check_plan(plan, timeout)
    if report.config_problem:
        print(f"lbtwist status: {report.config_problem}", file=sys.stderr)
        return UNUSABLE
    problems = report.problems()
    if check_only:
        if problems:
            print("lbtwist status --check: NOT SERVING: " + "; ".join(problems), file=sys.stderr)
        return NOT_SERVING if problems else OK
    print(summary(report))
    return NOT_SERVING if problems else OK
