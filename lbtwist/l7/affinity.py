"""Sticky sessions by a cookie lbtwist sets.

The cookie holds an opaque token per backend (a hash of its address, so it
survives restarts and says nothing about the network). A request carrying a
token for a backend the pool would still choose from goes there; a token for
a backend that is gone, draining, ejected or unhealthy is ignored and the
request is balanced as usual, and the response re-pins the client: a pinned
backend becoming unavailable is a re-pin, never an error.
"""
from __future__ import annotations

import hashlib

from lbtwist.l7.plan import cookie_value
from lbtwist.pool import Backend, Pool


class StickyCookie:
    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self._tokens: dict[str, bytes] = {}
        #: pool -> (version, {token: backend})
        self._maps: dict[int, tuple[int, dict[bytes, Backend]]] = {}

    def token(self, backend: Backend) -> bytes:
        t = self._tokens.get(backend.address)
        if t is None:
            t = hashlib.blake2b(backend.address.encode(), digest_size=8).hexdigest().encode()
            self._tokens[backend.address] = t
        return t

    def pinned(self, pool: Pool, cookie: bytes | None, now: float) -> Backend | None:
        """The backend the client's cookie names, if the pool would still use it."""
        value = cookie_value(cookie, self.name)
        if value is None:
            return None
        cached = self._maps.get(id(pool))
        if cached is None or cached[0] != pool.version:
            table = {self.token(b): b for b in pool.backends()}
            self._maps[id(pool)] = (pool.version, table)
        else:
            table = cached[1]
        backend = table.get(value)
        if backend is None or backend not in pool.candidates(now):
            return None
        return backend

    def header(self, backend: Backend) -> tuple[bytes, bytes]:
        return (b"set-cookie", b"%s=%s; Path=/; HttpOnly; SameSite=Lax" % (self.name, self.token(backend)))
