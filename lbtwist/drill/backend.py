# -*- test-case-name: tests.test_drill_backend -*-
"""Fault-injectable backends for drills: thin Twisted adapters around
L{lbtwist.drill.faults.ServerModel}, plus a small JSON control API.

One process serves several backends (one port each), so a 12-backend drill
does not cost 12 Python interpreters on a small box; a backend that must die
for real (``hard-kill``) gets a process of its own, which the drill SIGKILLs.

    python -m lbtwist.drill.backend --backend b0:9001 --backend b1:9002 \\
        --capacity 8 --median 2ms --kind http

It prints one line ``DRILL-READY {json}`` (control port, backend ports) once
everything listens. Control API (JSON):

  - ``GET /state``: every backend's counters, queue and faults
  - ``POST /faults`` ``{"targets": ["b0"] | "all", "set": {"latency": 0.9}}``
  - ``POST /reset`` ``{"targets": ...}``: clear faults
  - ``POST /stop`` / ``POST /start`` ``{"targets": ...}``: close the port and
    abort every connection (a crash as clients see it) / listen again (a
    restart: empty queue, cold-start clock reset)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any, Callable

import httptools
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web import resource, server

from lbtwist.drill.faults import HANG, HEALTH, REAL, RESET, RESPOND, ServerModel, ServiceTime

_REASONS = {200: b"OK", 500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout", 429: b"Too Many Requests"}


class _Served:
    """What both backend protocols do when a client goes: forget the
    connection and give back the job it held (so capacity is not leaked)."""

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.backend.connections.discard(self)
        if self.job is not None:
            self.model.abandon(self.job)
            self.job = None


class DrillHTTP(_Served, Protocol):
    """HTTP/1.1 with keep-alive; requests on one connection are answered in order."""

    def __init__(self, backend: "DrillBackend") -> None:
        self.backend = backend
        self.model = backend.model
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.pending: list[tuple[bytes, bool]] = []
        self.job: Any = None
        self.busy = False
        self.closed = False

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.pending.append((self.url, self.parser.should_keep_alive()))
        self.url = b""

    # Twisted
    def connectionMade(self) -> None:
        self.model.counters.connections += 1
        self.backend.connections.add(self)
        if self.model.faults.accept_close:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.loseConnection()
            return
        self._next()

    def _next(self) -> None:
        while not self.busy and self.pending and not self.closed:
            url, keep = self.pending.pop(0)
            path = url.split(b"?", 1)[0]
            kind = HEALTH if path == self.backend.health_path else REAL
            self.busy = True
            decision, job = self.model.submit(kind, lambda status, k=keep: self._reply(status, k))
            if decision.action == RESET:
                self.transport.abortConnection()
                return
            if decision.action == HANG:
                return  # never answered; held until the client gives up
            assert decision.action == RESPOND
            if self.busy:  # reply may already have fired on a zero delay clock
                self.job = job

    def _reply(self, status: int, keep: bool) -> None:
        self.job = None
        self.busy = False
        if self.closed:
            return
        body = self.backend.body
        head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\nx-backend: %s\r\n" % (
            status, _REASONS.get(status, b"Status"), len(body), self.backend.name_bytes,
        )
        if not keep:
            self.transport.write(head + b"connection: close\r\n\r\n" + body)
            self.transport.loseConnection()
            self.closed = True
            return
        self.transport.write(head + b"\r\n" + body)
        self._next()


class DrillLine(_Served, LineOnlyReceiver):
    """TCP backend: each request line is answered with ``NAME <line>``."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, backend: "DrillBackend") -> None:
        self.backend = backend
        self.model = backend.model
        self.pending: list[bytes] = []
        self.busy = False
        self.job: Any = None
        self.closed = False

    def connectionMade(self) -> None:
        self.model.counters.connections += 1
        self.backend.connections.add(self)
        if self.model.faults.accept_close:
            self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        self.pending.append(line)
        self._next()

    def _next(self) -> None:
        while not self.busy and self.pending and not self.closed:
            line = self.pending.pop(0)
            kind = HEALTH if line.strip() == b"HEALTH" else REAL
            self.busy = True
            decision, job = self.model.submit(kind, lambda status, ln=line: self._reply(status, ln))
            if decision.action == RESET:
                self.transport.abortConnection()
                return
            if decision.action == HANG:
                return
            if self.busy:
                self.job = job

    def _reply(self, status: int, line: bytes) -> None:
        self.job = None
        self.busy = False
        if self.closed:
            return
        word = b"OK" if status < 500 else b"ERR%d" % status
        self.transport.write(b"%s %s %s\n" % (word, self.backend.name_bytes, line))
        self._next()


class DrillBackend(Factory):
    """One backend: a port, its model, its live connections."""

    def __init__(self, name: str, port: int, model: ServerModel, reactor: Any, *,
                 kind: str = "http", health_path: bytes = b"/healthz") -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.body = self.name_bytes + b"\n"
        self.port_number = port
        self.model = model
        self.reactor = reactor
        self.kind = kind
        self.health_path = health_path
        self.connections: set[Any] = set()
        self.listening: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> Protocol:
        p = DrillHTTP(self) if self.kind == "http" else DrillLine(self)
        p.factory = self
        return p

    def start(self) -> IListeningPort:
        """Listen (again). A restart empties the model's queue and restarts
        its cold-start clock."""
        if self.listening is None:
            self.model.restarted()
            self.listening = self.reactor.listenTCP(self.port_number, self, interface="127.0.0.1", backlog=1024)
            self.port_number = self.listening.getHost().port
        return self.listening

    def stop(self) -> defer.Deferred:
        """Crash as clients see it: the port closes, connections are reset."""
        port, self.listening = self.listening, None
        for conn in list(self.connections):
            conn.closed = True
            conn.transport.abortConnection()
        self.model.stop()
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    def snapshot(self) -> dict[str, Any]:
        snap = self.model.snapshot()
        snap["port"] = self.port_number
        snap["up"] = self.listening is not None
        snap["open_connections"] = len(self.connections)
        return snap


class ControlAPI(resource.Resource):
    """JSON control API over a group of backends (one process)."""

    isLeaf = True

    def __init__(self, backends: dict[str, DrillBackend], clock: Any) -> None:
        super().__init__()
        self.backends = backends
        self.clock = clock

    def render_GET(self, request: server.Request) -> bytes:
        if request.path != b"/state":
            return self._json(request, {"error": "not found"}, 404)
        return self._json(request, self.state())

    def state(self) -> dict[str, Any]:
        return {
            "time": self.clock.seconds(),
            "backends": [b.snapshot() for b in self.backends.values()],
        }

    def render_POST(self, request: server.Request) -> Any:
        try:
            body = json.loads(request.content.read() or b"{}")
            targets = self._targets(body.get("targets", "all"))
        except (ValueError, KeyError) as e:
            return self._json(request, {"error": str(e)}, 400)
        action = request.path.decode()
        if action == "/faults":
            changes = body.get("set", {})
            for b in targets:
                try:
                    unknown = b.model.faults.update(changes)
                except (TypeError, ValueError) as e:
                    return self._json(request, {"error": str(e)}, 400)
                if unknown:
                    return self._json(request, {"error": f"unknown faults {unknown}"}, 400)
            return self._json(request, self.state())
        if action == "/reset":
            from lbtwist.drill.faults import Faults

            for b in targets:
                b.model.faults = Faults()
            return self._json(request, self.state())
        if action == "/stop":
            d = defer.gatherResults([b.stop() for b in targets])
        elif action == "/start":
            try:
                for b in targets:
                    b.start()
            except Exception as e:  # the port may be taken in the meantime
                return self._json(request, {"error": f"cannot listen: {e}"}, 500)
            d = defer.succeed(None)
        else:
            return self._json(request, {"error": "not found"}, 404)

        def done(_: Any) -> None:
            request.write(self._json(request, self.state()))
            request.finish()

        d.addCallback(done)
        return server.NOT_DONE_YET

    def _targets(self, spec: Any) -> list[DrillBackend]:
        if spec == "all":
            return list(self.backends.values())
        if isinstance(spec, str):
            spec = [spec]
        missing = [t for t in spec if t not in self.backends]
        if missing:
            raise KeyError(f"unknown backends {missing}; have {sorted(self.backends)}")
        return [self.backends[t] for t in spec]

    def _json(self, request: server.Request, obj: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(obj).encode() + b"\n"


def parse_duration(text: str) -> float:
    """``2ms`` / ``1.5s`` / ``0.002`` -> seconds."""
    t = text.strip().lower()
    if t.endswith("ms"):
        return float(t[:-2]) / 1000.0
    if t.endswith("s"):
        return float(t[:-1])
    return float(t)


def build_group(reactor: Any, specs: list[tuple[str, int, int]], *, kind: str, service: ServiceTime,
                seed: int | None, faults: dict[str, Any] | None = None,
                health_path: bytes = b"/healthz") -> dict[str, DrillBackend]:
    """Backends (name, port, capacity) of one process, listening."""
    rng = random.Random(seed)
    out: dict[str, DrillBackend] = {}
    for name, port, capacity in specs:
        model = ServerModel(name, reactor, capacity=capacity, service=service, rng=random.Random(rng.random()))
        if faults:
            model.faults.update(faults)
        b = DrillBackend(name, port, model, reactor, kind=kind, health_path=health_path)
        b.start()
        out[name] = b
    return out


def _parse_spec(text: str, capacity: int) -> tuple[str, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--backend wants NAME:PORT[:CAPACITY], got {text!r}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else capacity


def main(argv: list[str] | None = None, *, _react: Callable[..., Any] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lbtwist.drill.backend", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", action="append", default=[], help="NAME:PORT[:CAPACITY] (port 0: ephemeral)")
    ap.add_argument("--capacity", type=int, default=8, help="workers per backend (requests served at once)")
    ap.add_argument("--median", type=parse_duration, default=0.002, help="median service time, e.g. 2ms")
    ap.add_argument("--sigma", type=float, default=0.5, help="log-normal spread of service times")
    ap.add_argument("--kind", choices=("http", "tcp"), default="http")
    ap.add_argument("--control", type=int, default=0, help="control API port (0: ephemeral)")
    ap.add_argument("--health-path", default="/healthz")
    ap.add_argument("--faults", default="{}", help="initial faults as JSON, e.g. cold start")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.backend:
        ap.error("at least one --backend")
    specs = [_parse_spec(s, args.capacity) for s in args.backend]
    faults = json.loads(args.faults)

    from lbtwist.drill.procs import die_with_parent

    die_with_parent()

    def run(reactor: Any) -> defer.Deferred:
        backends = build_group(reactor, specs, kind=args.kind, service=ServiceTime(args.median, args.sigma),
                               seed=args.seed, faults=faults, health_path=args.health_path.encode())
        site = server.Site(ControlAPI(backends, reactor))
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        ep = endpoints.TCP4ServerEndpoint(reactor, args.control, interface="127.0.0.1")
        d = ep.listen(site)

        def ready(port: IListeningPort) -> defer.Deferred:
            info = {"control": port.getHost().port, "backends": {n: b.port_number for n, b in backends.items()}}
            sys.stdout.write("DRILL-READY " + json.dumps(info) + "\n")
            sys.stdout.flush()
            return defer.Deferred()  # run until killed

        return d.addCallback(ready)

    from twisted.internet import task

    (_react or task.react)(run)


if __name__ == "__main__":
    main()
