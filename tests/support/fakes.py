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


class Logged:
    """Collects twisted.logger events while the ``with`` block runs."""

    def __init__(self):
        self.events = []

    def __enter__(self):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *a):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.events.append)

    def texts(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]
