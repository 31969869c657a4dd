"""Session-ticket key rotation without a cliff, within what pyOpenSSL allows.

pyOpenSSL offers no ticket-key API: each ``SSL_CTX`` draws a random ticket key
when it is created and keeps it for life (see the team notes, section 4.3). So
a *generation* here is one whole front context, and rotating means creating
a new one. To avoid the cliff where every client falls back to a full
handshake at once, the last ``keep`` generations stay alive: the newest issues
tickets, older ones still accept theirs. Which generation a connection needs is
decided before OpenSSL sees it, from the key name at the start of the ticket
the ClientHello offers (L{lbtwist.tls.clienthello.ClientHello.ticket_key_name}).

A generation's key name is not readable through the API either; it is learnt
once, at creation, from a ticket the context issues to an in-memory client
(two handshakes, no sockets).

Generations made *before* worker processes fork are shared by all of them, so
workers resume each other's tickets. ``prepare`` future generations can be made
up front for the same reason: workers then agree on the key for that many
rotations, and a ticket from a worker that rotated a moment earlier is still
recognised (prepared generations decrypt too).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import attrs
from OpenSSL import SSL

from lbtwist.tls.clienthello import ClientHello, parse_client_hello

__all__ = ["Generation", "TicketKeyRing", "ticket_key_name"]


@attrs.define(eq=False)
class Generation:
    """One front context and the name of the ticket key it issues with."""

    context: SSL.Context
    #: None when tickets are off or the name could not be learnt.
    key_name: bytes | None
    number: int


def _pump(client: SSL.Connection, server: SSL.Connection, first_flight: list[bytes] | None = None) -> None:
    """Run an in-memory handshake to completion (bounded)."""
    for _ in range(8):
        moved = False
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = a.bio_read(1 << 17)
            except SSL.WantReadError:
                data = b""
            if data:
                if first_flight is not None and a is client and not first_flight:
                    first_flight.append(data)
                b.bio_write(data)
                moved = True
        if not moved:
            return


def ticket_key_name(front: SSL.Context, cert_context: SSL.Context) -> bytes | None:
    """Learn the ticket key name of ``front``: get a ticket from it in memory,
    then read the name back from the ClientHello that offers the ticket."""
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)

    def handshake(session: SSL.Session | None) -> tuple[SSL.Connection, bytes]:
        server = SSL.Connection(front)
        server.set_context(cert_context)
        server.set_accept_state()
        client = SSL.Connection(client_ctx)
        client.set_connect_state()
        if session is not None:
            client.set_session(session)
        flight: list[bytes] = []
        _pump(client, server, flight)
        # TLS 1.3 tickets arrive after the handshake: let the client read them.
        server.send(b"x")
        client.bio_write(server.bio_read(1 << 17))
        client.recv(16)
        return client, flight[0] if flight else b""

    try:
        client, _ = handshake(None)
        _, hello_bytes = handshake(client.get_session())
    except SSL.Error:
        return None
    hello = parse_client_hello(hello_bytes)
    return hello.ticket_key_name if isinstance(hello, ClientHello) else None


class TicketKeyRing:
    """The generations of one resumption domain: oldest first, newest (the one
    that issues tickets) last, plus prepared future ones."""

    def __init__(
        self,
        make_front: Callable[[], SSL.Context],
        learn_key_name: Callable[[SSL.Context], bytes | None] | None,
        keep: int = 2,
        prepare: int = 0,
    ) -> None:
        self._make = make_front
        self._learn = learn_key_name
        self.keep = max(1, keep)
        self.prepare = max(0, prepare)
        self._next = 0
        self.generations: list[Generation] = [self._new()]
        self.ahead: deque[Generation] = deque(self._new() for _ in range(self.prepare))
        self._by_name: dict[bytes, Generation] = {}
        self._index()

    def _new(self) -> Generation:
        ctx = self._make()
        name = self._learn(ctx) if self._learn is not None else None
        self._next += 1
        return Generation(ctx, name, self._next - 1)

    def _index(self) -> None:
        self._by_name = {
            g.key_name: g for g in (*self.generations, *self.ahead) if g.key_name is not None
        }

    @property
    def current(self) -> Generation:
        return self.generations[-1]

    def for_key_name(self, key_name: bytes | None) -> Generation:
        """The generation that can decrypt a ticket with ``key_name``; the
        current one when none can (the client then gets a full handshake and
        a fresh ticket)."""
        if key_name is not None:
            g = self._by_name.get(key_name)
            if g is not None:
                return g
        return self.generations[-1]

    def knows(self, key_name: bytes) -> bool:
        return key_name in self._by_name

    def rotate(self) -> Generation:
        """Start issuing with a new key; forget the oldest beyond ``keep``."""
        g = self.ahead.popleft() if self.ahead else self._new()
        self.generations.append(g)
        del self.generations[: -self.keep]
        while len(self.ahead) < self.prepare:
            self.ahead.append(self._new())
        self._index()
        return g
