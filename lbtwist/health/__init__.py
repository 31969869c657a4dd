"""Health: the balancer's beliefs about its backends.

Active probes (L{lbtwist.health.probes}, scheduled by
L{lbtwist.health.scheduler}) catch dead backends; passive outlier detection
(L{lbtwist.health.outlier}) catches the gray ones whose probe stays green;
L{lbtwist.health.service.HealthService} runs both for every pool. State lives
on L{lbtwist.pool.Pool}; this package only decides when to change it.
"""
from __future__ import annotations

import attrs


@attrs.frozen
class ProbeResult:
    """One probe's verdict. ``reason`` is short and user-facing ("connection
    refused", "status 503", "timed out after 2s"); it ends up in the log line
    that takes a backend out."""

    ok: bool
    reason: str = ""
    #: Seconds the probe took, when it got an answer.
    latency: float | None = None


__all__ = ["ProbeResult"]
