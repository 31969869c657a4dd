"""Forward one request to one backend: the step a retry policy wraps.

An L{Attempt} gets a connection (an idle keep-alive or a new one), sends the
request head and the body as it arrives, and reports exactly one outcome to
its owner (the exchange):

  - the response: the connection's parser reports ``on_response(response)``
    (the head), ``on_body(data)`` and ``on_end()`` straight to the owner (one
    call per event instead of three on the hot path); the owner marks the
    attempt RESPONDING / DONE. Nothing has reached the client when
    ``on_response`` is called, so a retry policy may still discard the answer
    (``attempt.abandon()``).
  - ``attempt_failed(attempt, failure)`` with a L{Failed}: before any response
    byte (``failure.after_response`` False, ``failure.sent`` says whether any
    request byte reached a connection) or after the response started.

The keep-alive race is handled here, below any retry policy: a request sent
on a *reused* connection that the backend closed before answering a single
byte is re-sent once on a fresh connection, but only when it is idempotent
(RFC 9110 9.2.2) or carries an idempotency key, and its body is still held in
full. Otherwise the failure is reported, and a non-idempotent request is
never sent twice.
"""
from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from lbtwist.l7.backend import BackendConnection
from lbtwist.l7.chunked import LAST_CHUNK
from lbtwist.l7.connpool import BackendConnections
from lbtwist.pool import Backend

log = Logger(namespace="lbtwist.l7.forward")

WAITING, SENDING, SENT, RESPONDING, DONE, FAILED = range(6)


@attrs.frozen
class Failed:
    """Why an attempt failed. ``code`` is a key of
    L{lbtwist.l7.errors.FAILURE_STATUS} (connect-refused, connect-timeout,
    reset, closed, garbage, timeout, pool-full...)."""

    code: str
    detail: str
    #: Some request bytes were written to a connection (the backend may have acted).
    sent: bool
    #: The response had started (its head reached us) when it failed.
    after_response: bool = False


class RequestBody:
    """The request body as it arrives from the client: bytes not yet given to
    a connection (``unsent``), and a replay copy while the body fits in
    ``replay_limit`` (so a fresh connection can get it all again)."""

    __slots__ = ("chunked", "unsent", "unsent_size", "replay", "size", "complete", "replay_limit")

    def __init__(self, chunked: bool, replay_limit: int) -> None:
        self.chunked = chunked
        self.unsent: list[bytes] = []
        self.unsent_size = 0
        self.replay: list[bytes] | None = []
        self.size = 0
        self.complete = False
        self.replay_limit = replay_limit

    def add(self, data: bytes, taken: bool) -> None:
        """``taken``: a connection already received ``data`` directly."""
        self.size += len(data)
        replay = self.replay
        if replay is not None:
            if self.size <= self.replay_limit:
                replay.append(data)
            else:
                self.replay = None
        if not taken:
            self.unsent.append(data)
            self.unsent_size += len(data)

    @property
    def replayable(self) -> bool:
        return self.replay is not None

    def encoded(self, pieces: list[bytes]) -> list[bytes]:
        if not self.chunked:
            return pieces
        out = []
        for p in pieces:
            if p:
                out.append(b"%x\r\n" % len(p))
                out.append(p)
                out.append(b"\r\n")
        return out


class Attempt:
    """One try of one request on one backend (see the module docstring)."""

    # Built per request: what varies is passed in, the rest defaults here.
    conn: BackendConnection | None = None
    state = WAITING
    cancelled = False
    resent = False
    #: The connection had served requests before (the keep-alive race is possible).
    reused = False
    #: Some request bytes were written.
    sent = False
    #: A retry: send the body from the replay copy (set before ``start``).
    replay = False
    #: The pool's max_pending slot while queued for a connection.
    pending_slot = None

    def __init__(
        self,
        owner: Any,
        backend: Backend,
        conns: BackendConnections,
        head: bytes,
        head_request: bool,
        timeout: float,
        body: RequestBody | None,
        now: float,
    ) -> None:
        self.owner = owner
        self.backend = backend
        self.conns = conns
        self.head = head
        self.head_request = head_request
        #: Response head must arrive within this after the request is sent.
        self.timeout = timeout
        self.body = body
        self.started = now
        #: The whole request (body included) was written.
        self.body_done = body is None

    def __repr__(self) -> str:
        return f"<Attempt {self.backend.address} state={self.state}>"

    def start(self) -> bool:
        """Ask for a connection. False if the attempt is queued behind the
        backend's connection cap (the caller bounds that wait)."""
        return self.conns.acquire(self)

    # -- from the connection pool -------------------------------------------------

    def connection_ready(self, conn: BackendConnection) -> None:
        body = self.body
        if body is None:  # the common case: a request without a body
            self.conn = conn
            self.reused = conn.requests > 0
            self.state = SENT
            self.sent = True
            owner = self.owner
            conn.start(self, owner, self.head_request, owner.ctx.http.body_timeout)
            # No corking needed: the head was validated whole, and bytes after
            # it (pipelined requests) wait in the parser until this exchange ends.
            conn.transport.write(self.head)
            conn.deadline.set(self.timeout, "response")  # counted from the send, not from a wait for a connection
            return
        replaying = self.resent or self.replay
        if replaying and body.replay is None:
            # The body outgrew the replay copy while the fresh connection was
            # being opened: it can no longer be sent whole.
            self.conns.release(conn, True)
            self.state = FAILED
            self.owner.attempt_failed(self, Failed("closed", "backend closed a reused connection before responding", sent=True))
            return
        self.conn = conn
        self.reused = conn.requests > 0
        self.state = SENDING
        conn.start(self, self.owner, self.head_request, self.owner.ctx.http.body_timeout)
        if replaying:
            pieces = body.replay or []
        else:
            pieces = body.unsent
        body.unsent = []
        body.unsent_size = 0
        out = [self.head]
        out.extend(body.encoded(pieces))
        if body.complete:
            if body.chunked:
                out.append(LAST_CHUNK)
            self.body_done = True
        self._send(b"".join(out))
        self.sent = True
        if self.body_done:
            self._request_written()
        else:
            self.owner.attempt_connected(self)
            if conn.write_blocked:
                self.owner.backend_write_blocked()

    def connect_failed(self, code: str, detail: str) -> None:
        self.state = FAILED
        self.owner.attempt_failed(self, Failed(code, detail, sent=self.sent))

    # -- from the exchange ------------------------------------------------------------

    @property
    def accepting_body(self) -> bool:
        """Body data goes straight to the connection (else the exchange holds it)."""
        return self.state >= SENDING and self.state <= RESPONDING and not self.body_done

    def _send(self, data: bytes) -> None:
        """Write to the backend, or hold it while the client's read is still
        being parsed (the owner flushes at its end): a request found bad later
        in the same read then never reaches the backend at all."""
        owner = self.owner
        if owner.client.feeding:
            if owner.req_out:
                owner.req_out.append(data)
            else:
                owner.req_out = [data]
        else:
            self.conn.write(data)  # type: ignore[union-attr]

    def body_data(self, data: bytes) -> None:
        if self.body.chunked:  # type: ignore[union-attr]
            self._send(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._send(data)

    def body_end(self) -> None:
        if self.body_done or self.conn is None:
            return
        if self.body.chunked:  # type: ignore[union-attr]
            self._send(LAST_CHUNK)
        self.body_done = True
        self._request_written()

    def _request_written(self) -> None:
        self.sent = True
        if self.state == SENDING:
            self.state = SENT
            self.conn.set_timeout(self.timeout, "response")  # type: ignore[union-attr]

    def cancel(self) -> None:
        """The exchange gave up (client left, it failed elsewhere): drop the
        connection unless the response already ended."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.state == WAITING:
            self.conns.cancel(self)
        conn, self.conn = self.conn, None
        if conn is not None and self.state != DONE:
            conn.abort()
        if self.state != DONE:
            self.state = FAILED

    abandon = cancel

    def finish(self, reusable: bool) -> None:
        """The response ended and was relayed: hand the connection back."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.finish(reusable and self.body_done)

    # -- from the connection --------------------------------------------------------------
    # (response events go from the connection's parser straight to the owner,
    # which marks ``state`` RESPONDING and DONE; failures come through here)

    def backend_failed(self, conn: BackendConnection, code: str, detail: str) -> None:
        if self.cancelled:
            return
        self.conn = None
        if self.state == RESPONDING:
            self.state = FAILED
            self.owner.attempt_failed(self, Failed(code, detail, sent=True, after_response=True))
            return
        if (
            code in ("closed", "reset")
            and self.reused
            and not conn.received
            and not self.resent
            and self.owner.resend_ok()
            and (self.body is None or self.body.replayable)
        ):
            # The keep-alive race: the backend closed this reused connection
            # before answering. Safe to send again, once, on a fresh one.
            log.debug("backend {backend}: reused connection closed before the response; re-sending on a fresh one",
                      backend=self.backend.address)
            self.resent = True
            self.state = WAITING
            self.body_done = self.body is None
            self.conns.acquire(self, fresh=True)
            return
        self.state = FAILED
        self.owner.attempt_failed(self, Failed(code, detail, sent=self.sent))

    def backend_write_blocked(self) -> None:
        self.owner.backend_write_blocked()

    def backend_write_unblocked(self) -> None:
        self.owner.backend_write_unblocked()

