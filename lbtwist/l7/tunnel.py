"""The byte tunnel after a successful ``Upgrade`` (101 Switching Protocols),
e.g. WebSocket: from then on the two connections are relayed both ways with
the same backpressure as HTTP bodies, until either side closes or the tunnel
stays idle for ``idle_timeout``."""
from __future__ import annotations

from typing import Any, Callable

from lbtwist.l7.timers import Deadline


class Tunnel:
    def __init__(self, client: Any, conn: Any, clock: Any, idle_timeout: float,
                 on_close: Callable[["Tunnel"], None]) -> None:
        self.client = client
        self.conn = conn
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        self._idle = Deadline(clock, self._expired)
        self._idle.set(idle_timeout, "idle")

    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._idle.set(self.idle_timeout, "idle")
        self.conn.write(data)

    def from_backend(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._idle.set(self.idle_timeout, "idle")
        self.client.write(data)

    # flow control: each side's full write buffer pauses the other side's reads
    def client_write_blocked(self) -> None:
        self.conn.pause_reading()

    def client_write_unblocked(self) -> None:
        self.conn.resume_reading()

    def backend_write_blocked(self) -> None:
        self.client.pause_reading("tunnel")

    def backend_write_unblocked(self) -> None:
        self.client.resume_reading("tunnel")

    def client_lost(self) -> None:
        self._close()
        self.conn.close()

    def backend_lost(self) -> None:
        self._close()
        self.client.close()

    def abort(self) -> None:
        self._close()
        self.conn.abort()
        self.client.abort()

    def _expired(self, kind: str) -> None:
        self.abort()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._idle.cancel()
            self.on_close(self)
