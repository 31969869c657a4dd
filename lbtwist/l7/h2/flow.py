"""Outbound flow control shared by both HTTP/2 sides (client streams and
backend streams): the next DATA frame's payload, cut from the queue of
pending body chunks to what the peer's window and frame size allow."""
from __future__ import annotations

from collections import deque


def take_piece(pending: deque, limit: int) -> bytes:
    """Pop up to ``limit`` bytes from the first pending chunk (``limit`` > 0):
    the whole chunk when it fits, else its head, leaving the rest queued."""
    chunk = pending[0]
    if limit < len(chunk):
        pending[0] = chunk[limit:]
        return chunk[:limit]
    return pending.popleft()
