"""The admin listener's HTTP connections, hardened so that the port which can
drain every backend is not itself an attack surface:

  - a request head is judged (token, Host/Origin, declared body size) before
    any body is read; a refusal is answered at once and the connection closed,
    and a body is only ever held in memory, up to the API's 64 KiB cap
    (twisted.web would spool a large one to a temporary file);
  - a request must arrive within ``admin.header_timeout`` of the connection
    (or of its first byte), however slowly its bytes trickle in: a trickle
    would reset an idle timeout forever (slowloris);
  - at most ``admin.max_connections`` connections, and
    ``admin.max_connections_per_client`` from one address, are open at once.
    When full, the oldest connection that has not yet sent an authorized
    request head makes room (it is the one a slowloris holds), at the total
    cap taken from the address holding the most connections; if there is
    none, the new connection is answered 503 and closed. A connection that
    has been served is never pushed out, so a dashboard or a Prometheus
    scraper keeps its keep-alive connection through a flood.
"""
from __future__ import annotations

from io import BytesIO
from typing import Any, Iterator

import attrs
from twisted.logger import Logger
from twisted.web import http, server

from lbtwist.admin.api import MAX_BODY, error_json, refusal_headers

__all__ = ["AdminChannel", "AdminRequest", "ConnectionGate", "limit_problems"]

log = Logger(namespace="lbtwist.admin")

#: A refused peer that does not take its short answer is cut after this.
CLOSE_GRACE = 2.0
#: At most one "connection cap reached" warning per this many seconds.
WARN_EVERY = 10.0


def limit_problems(admin_cfg: Any) -> Iterator[tuple[str, str]]:
    """``(key path, message)`` errors for the admin connection limits."""
    for key in ("header_timeout", "idle_timeout"):
        if getattr(admin_cfg, key) <= 0:
            yield f"admin.{key}", "must be above 0"
    for key in ("max_connections", "max_connections_per_client"):
        if getattr(admin_cfg, key) < 1:
            yield f"admin.{key}", f"is {getattr(admin_cfg, key)}: must be at least 1, or no admin request could be served"


def client_of(transport: Any) -> str:
    """The key connections are counted by: the peer's address (every UNIX
    socket peer is one client)."""
    return getattr(transport.getPeer(), "host", None) or "local"


@attrs.define
class ConnectionGate:
    """Which admin connections may stay open. Connections are kept in arrival
    order; a *trusted* one has sent a request head that passed the checks."""

    max_total: int
    max_per_client: int
    clock: Any
    #: connection -> client key, oldest first
    _open: dict[Any, str] = attrs.field(factory=dict, init=False)
    _per_client: dict[str, int] = attrs.field(factory=dict, init=False)
    _trusted: set[Any] = attrs.field(factory=set, init=False)
    #: What the gate did, for logs and tests.
    refused: int = attrs.field(default=0, init=False)
    evicted: int = attrs.field(default=0, init=False)
    _warned_at: float | None = attrs.field(default=None, init=False)

    def configure(self, max_total: int, max_per_client: int) -> None:
        """New caps (a reload); connections already open stay."""
        self.max_total, self.max_per_client = max_total, max_per_client

    def __len__(self) -> int:
        return len(self._open)

    def count(self, client: str) -> int:
        return self._per_client.get(client, 0)

    def is_trusted(self, conn: Any) -> bool:
        return conn in self._trusted

    def admit(self, conn: Any, client: str) -> bool:
        """Let ``conn`` in, closing (``evict()``) an untrusted older one if a
        cap is reached; False when there is no room (``conn`` is not counted)."""
        if self.count(client) >= self.max_per_client and not self._make_room(client, "max_connections_per_client"):
            return False
        if len(self._open) >= self.max_total and not self._make_room(None, "max_connections"):
            return False
        self._open[conn] = client
        self._per_client[client] = self.count(client) + 1
        return True

    def trust(self, conn: Any) -> None:
        if conn in self._open:
            self._trusted.add(conn)

    def leave(self, conn: Any) -> None:
        """``conn`` is closing: its place is free (safe to call twice)."""
        client = self._open.pop(conn, None)
        if client is None:
            return
        self._trusted.discard(conn)
        n = self._per_client[client] - 1
        if n:
            self._per_client[client] = n
        else:
            del self._per_client[client]

    def _make_room(self, client: str | None, cap: str) -> bool:
        """Close the oldest untrusted connection of ``client`` (at the
        per-client cap) or, at the total cap, of the client holding the most
        connections: a flood from some addresses evicts its own connections,
        never a monitoring client's single one from another address."""
        if client is None:
            busiest = max((who for c, who in self._open.items() if c not in self._trusted),
                          key=self.count, default=None)
            client = busiest
        victim = None if client is None else next(
            (c for c, who in self._open.items() if c not in self._trusted and who == client), None)
        now = self.clock.seconds()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warn("admin: admin.{cap} reached ({what}); {done}; {evicted} evicted and {refused} refused so far",
                     cap=cap, what=f"client {client}" if cap.endswith("per_client") else f"{len(self._open)} open",
                     done="closing the oldest connection still without a request" if victim else "refusing the new connection",
                     evicted=self.evicted, refused=self.refused)
        if victim is None:
            self.refused += 1
            return False
        self.evicted += 1
        self.leave(victim)
        victim.evict()
        return True


class AdminRequest(server.Request):
    """A request whose body only ever lives in memory, within the API's cap.
    Its channel has already refused a declared length above the cap; a
    chunked body is refused as soon as it grows past it."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or channel.closing:
            return
        if self.content.tell() + len(data) > MAX_BODY:
            channel.refuse(413, f"request body larger than {MAX_BODY} bytes")
            return
        self.content.write(data)


class AdminChannel(http.HTTPChannel):
    """One admin HTTP/1.1 connection. The factory is the admin Site, whose
    ``service`` (L{lbtwist.admin.AdminService}) holds the gate and the
    settings, and tracks the connection so that stopping the service (a
    reload that rebuilds it) also closes keep-alive connections instead of
    leaving them served by a detached, stale view."""

    #: Has this connection been answered for good (refused, timed out, evicted)?
    closing = False

    def __init__(self) -> None:
        super().__init__()
        #: The request deadline (admin.header_timeout), while one is being read.
        self._deadline: Any = None
        #: Cuts a refused connection whose peer does not let go.
        self._cut: Any = None
        #: A request has been read whole and is being answered.
        self._busy = False
        #: Method of the request whose head is being read (the first word of its request line).
        self._method: bytes | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        svc = self.factory.service
        svc.track(self)
        if not svc.gate.admit(self, client_of(self.transport)):
            self.refuse(503, f"too many admin connections (admin.max_connections: {svc.gate.max_total}, "
                             f"admin.max_connections_per_client: {svc.gate.max_per_client}); retry later",
                        [(b"retry-after", b"1")])
            return
        self._start_deadline()

    # -- reading, with the request deadline ------------------------------------------

    def _start_deadline(self) -> None:
        if self._deadline is None and not self._busy and not self.closing:
            self._deadline = self.callLater(self.factory.service.admin_cfg.header_timeout, self._too_slow)

    def _stop_deadline(self) -> None:
        d, self._deadline = self._deadline, None
        if d is not None and d.active():
            d.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        timeout = self.factory.service.admin_cfg.header_timeout
        self.refuse(408, f"the request did not arrive within {timeout:g}s (admin.header_timeout)")

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self._start_deadline()  # the first byte of a request on a kept-alive connection
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.closing:
            return
        if not self._busy:
            self._start_deadline()  # also for a pipelined request replayed from the buffer
            if self._method is None and line:
                self._method = line.split(b" ", 1)[0]
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        method, self._method = self._method or b"", None
        svc = self.factory.service
        refused = svc.resource.refuse_head(method, self.requests[-1].requestHeaders, self.length)
        if refused is not None:
            self.refuse(*refused, with_body=method != b"HEAD")
            return
        svc.gate.trust(self)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self.closing:
            return
        self._stop_deadline()
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._busy = False
        super().requestDone(request)

    # -- closing ----------------------------------------------------------------

    def refuse(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None,
               with_body: bool = True) -> None:
        """Answer ``status`` with the API's JSON error (its length only, for
        a HEAD) and close, reading nothing more; used before a request is
        complete, so it writes the response itself."""
        if self.closing:
            return
        self.closing = True
        self._stop_deadline()
        self.factory.service.gate.leave(self)
        self._cut = self.callLater(CLOSE_GRACE, self.transport.abortConnection)
        if self.transport.disconnecting:  # already answered (twisted.web's own 400)
            return
        body = error_json(status, message)
        lines = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error")),
                 b"content-type: application/json",
                 b"content-length: %d" % len(body),
                 b"cache-control: no-store",
                 b"x-content-type-options: nosniff",
                 b"connection: close"]
        lines += [name + b": " + value for name, value in refusal_headers(status) + (headers or [])]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (body if with_body else b""))
        self.loseConnection()

    def evict(self) -> None:
        """Close at once to make room (the gate already forgot it)."""
        self.closing = True
        self._stop_deadline()
        self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._stop_deadline()
        cut, self._cut = self._cut, None
        if cut is not None and cut.active():
            cut.cancel()
        svc = self.factory.service
        svc.gate.leave(self)
        svc.untrack(self)
        super().connectionLost(reason)

    def drain(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()
