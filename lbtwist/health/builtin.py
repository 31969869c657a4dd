"""The built-in probe kinds, offered through the same hook as plugin kinds,
and the one place that turns an ``active:`` config block into a probe."""
from __future__ import annotations

from typing import Any, Iterable

from lbtwist import hookimpl
from lbtwist.config.model import ActiveHealthConfig
from lbtwist.health.probes import http_factory, tcp_factory
from lbtwist.registry import ProbeSpec, Registry, suggest

#: Top-level ``active:`` keys handed to the ``http`` kind (plugin kinds get ``options:``).
HTTP_FIELDS = ("path", "method", "host", "expected_statuses", "body_match")


@hookimpl
def lbtwist_health_probes() -> Iterable[ProbeSpec]:
    return [
        ProbeSpec("tcp", tcp_factory, "passes when a TCP connect succeeds within timeout"),
        ProbeSpec("http", http_factory, "one HTTP request; passes on an expected status (and body match)"),
    ]


def probe_options(cfg: ActiveHealthConfig) -> dict[str, Any]:
    """What a probe factory receives: ``options:`` plus ``timeout`` (seconds);
    the ``http`` kind also gets path, method, host, expected_statuses, body_match."""
    opts: dict[str, Any] = dict(cfg.options)
    if cfg.kind == "http":
        for name in HTTP_FIELDS:
            value = getattr(cfg, name)
            if value is not None:
                opts[name] = value
    opts["timeout"] = float(cfg.timeout)
    return opts


def make_probe(registry: Registry, cfg: ActiveHealthConfig, *, reactor: Any) -> Any:
    """Build the probe for ``cfg``. KeyError/ValueError messages are user-facing
    (config validation calls this too, so a bad option fails at load)."""
    try:
        spec = registry.probes[cfg.kind]
    except KeyError:
        raise KeyError(
            f"unknown health probe kind {cfg.kind!r}{suggest(cfg.kind, registry.probes)}; "
            f"registered: {', '.join(sorted(registry.probes))}"
        ) from None
    try:
        return spec.factory(probe_options(cfg), reactor=reactor)
    except ValueError as e:
        raise ValueError(f"health probe {cfg.kind!r}: {e}") from None
