"""Listening sockets the master opens for its workers.

Each worker slot gets its own ``SO_REUSEPORT`` socket per listener, bound by
the master and passed down at spawn (``childFDs``); the worker puts it in
listening state when it is ready to accept (L{lbtwist.listener.adopt_stream}),
so connections never queue for a worker that is still starting. The kernel spreads new
connections across the sockets of one port by hash (even, unlike one shared
socket), and because the master keeps its copy open, the connections queued on
a dead worker's socket wait for the replacement instead of being reset (the
measurements are in docs/operations.md, "Workers")."""
from __future__ import annotations

import socket
from typing import Iterable

import attrs

from lbtwist.config.binds import bind_key, parse_udp_bind, split_description

__all__ = ["ListenSocket", "open_socket", "shareable"]


def shareable(bind: str, udp: bool) -> str | None:
    """None when the master can open ``bind`` for workers, else why not."""
    if udp:
        return None
    kind = split_description(bind)[0]
    if kind not in ("tcp", "tcp6"):
        return f"bind {bind!r}: only tcp, tcp6 and udp binds can be shared by worker processes, not {kind!r}"
    if bind_key(bind) is None:
        return f"bind {bind!r}: no numeric port"
    return None


def _address(bind: str, udp: bool) -> tuple[int, str, int]:
    """(family, interface, port) of a shareable bind."""
    if udp:
        port, interface = parse_udp_bind(bind)
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        return family, interface, port
    kind, args, kwargs = split_description(bind)
    key = bind_key(bind)
    assert key is not None
    interface = key.interface
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    if not interface:
        interface = "::" if family == socket.AF_INET6 else "0.0.0.0"
    return family, interface, int(key.where)


@attrs.define(eq=False)
class ListenSocket:
    """One listener's socket for one worker slot (the master's copy)."""

    listener: str
    bind: str
    udp: bool
    sock: socket.socket

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def listen(self, backlog: int) -> None:
        """Start queueing connections now (a reload's new port: it accepts
        from the moment the reload is applied, like one process's would)."""
        if not self.udp:
            self.sock.listen(backlog)


def open_socket(listener: str, bind: str, udp: bool, port: int | None = None) -> ListenSocket:
    """Bind (and listen) one SO_REUSEPORT socket; ``port`` overrides the
    bind's port (a ``:0`` bind: the first slot's ephemeral port for the rest).
    OSError propagates (the caller names the listener)."""
    family, interface, bport = _address(bind, udp)
    s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if interface != "::" else 0)
        s.bind((interface, bport if port is None else port))
        # not listen()ed here: the worker does when it starts accepting, so no
        # connection queues on a socket whose first worker is still starting
        s.setblocking(False)
        s.set_inheritable(False)
    except OSError:
        s.close()
        raise
    return ListenSocket(listener, bind, udp, s)


def close_all(socks: Iterable[ListenSocket]) -> None:
    for s in socks:
        s.close()
