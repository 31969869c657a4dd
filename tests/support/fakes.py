"""Small test doubles shared by several test files."""
from __future__ import annotations


class FirstBalancer:
    """Always the first candidate: tests that are not about balancing get a
    predictable backend."""

    def pick(self, candidates, ctx):
        return candidates[0] if candidates else None

    def on_start(self, backend, now):
        pass

    def on_finish(self, backend, now, latency, ok):
        pass
