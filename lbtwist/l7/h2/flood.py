"""Allowances for frames a client may send cheaply and lbtwist must act on
(RST_STREAM, SETTINGS, PING): a token bucket per connection. Spent, it means
the client is flooding: GOAWAY ENHANCE_YOUR_CALM and close."""
from __future__ import annotations

import attrs


@attrs.define
class Allowance:
    """``burst`` events at once, refilled at ``rate`` per second."""

    burst: int
    rate: float
    tokens: float = attrs.field(init=False)
    at: float = attrs.field(init=False, default=0.0)
    started: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        """Spend one; False when none is left (the flood threshold)."""
        if self.started:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.started = True
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True
