# -*- test-case-name: tests.test_drill_configs -*-
"""The balancer configs a drill runs against, generated per run.

  - ``lbtwist``: lbtwist's defaults. Only what any user must write is set
    (listener, pool, backends, an HTTP probe of ``/healthz``, the admin API);
    everything else, algorithm, passive outlier detection, breakers, retry
    policy and budgets, is the shipped default. A scenario may add keys it is
    *about* (``slow_start`` for cold-start) and says so.
  - ``naive``: the field guide's setup: round robin, active checks only (no
    passive detection, no breakers), retries with no budget.
  - ``haproxy``: HAProxy with the closest equivalent: ``leastconn`` (lbtwist's
    p2c also balances on requests in flight), the same active check, passive
    ``observe layer7``, one retry with redispatch.
"""
from __future__ import annotations

from typing import Any

import attrs
import yaml

from lbtwist.config.model import HttpConfig

TARGETS = ("lbtwist", "naive", "haproxy")


@attrs.frozen
class BackendRef:
    name: str
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@attrs.frozen
class Setup:
    """Everything a config needs to know about one run."""

    listen_port: int
    admin_port: int
    backends: tuple[BackendRef, ...]
    mode: str = "http"
    #: Extra pool keys for the lbtwist target (merged over the defaults).
    pool_overrides: dict[str, Any] = attrs.field(factory=dict)
    health_path: str = "/healthz"
    #: Extra top-level keys for lbtwist targets (``workers: 2`` for worker-kill).
    config_overrides: dict[str, Any] = attrs.field(factory=dict)


def _pool_backends(backends: tuple[BackendRef, ...]) -> list[dict[str, Any]]:
    return [{"address": b.address, "name": b.name} for b in backends]


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def lbtwist_config(setup: Setup, *, naive: bool = False) -> dict[str, Any]:
    """The config as a plain mapping (dump it with L{to_yaml})."""
    active = {"kind": "http", "path": setup.health_path} if setup.mode == "http" else {"kind": "tcp"}
    pool: dict[str, Any] = {
        "name": "app",
        "backends": _pool_backends(setup.backends),
        "health": {"active": active},
    }
    listener: dict[str, Any] = {
        "name": "web",
        "bind": f"tcp:{setup.listen_port}:interface=127.0.0.1",
        "mode": setup.mode,
        "pool": "app",
    }
    if naive:
        pool["algorithm"] = "round_robin"
        pool["health"]["passive"] = {"enabled": False}
        pool["circuit_breaker"] = {"consecutive_failures": 0}
        pool["limits"] = {"max_retries": 100000}
        if setup.mode == "http":
            listener["routes"] = [{
                "pool": "app",
                "retry": {"budget_percent": 100.0, "min_retries_per_second": 100000.0},
            }]
    else:
        pool = _deep_merge(pool, setup.pool_overrides)
    return {
        **setup.config_overrides,
        "listeners": [listener],
        "pools": [pool],
        "admin": {"bind": f"tcp:{setup.admin_port}:interface=127.0.0.1"},
    }


def to_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


#: lbtwist's default header timeout, so both cut a slowloris at the same moment.
_HEADER_TIMEOUT = HttpConfig().header_timeout


def haproxy_config(setup: Setup, socket_path: str) -> str:
    """An HAProxy config equivalent to L{lbtwist_config} (see module doc).
    ``admin_port`` serves HAProxy's stats page (CSV at ``/stats;csv``)."""
    mode = "http" if setup.mode == "http" else "tcp"
    check = f"option httpchk GET {setup.health_path}" if mode == "http" else "option tcp-check"
    observe = " observe layer7 error-limit 5 on-error mark-down" if mode == "http" else " observe layer4 error-limit 5 on-error mark-down"
    servers = "\n".join(f"    server {b.name} {b.address} check" for b in setup.backends)
    return f"""\
global
    maxconn 8000
    stats socket {socket_path} mode 600 level admin
    log stdout format raw local0 warning

defaults
    mode {mode}
    log global
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout http-request {_HEADER_TIMEOUT:g}s
    retries 1
    option redispatch 1

frontend web
    bind 127.0.0.1:{setup.listen_port}
    default_backend app

backend app
    balance leastconn
    {check}
    default-server inter 5s fastinter 5s downinter 5s fall 3 rise 2{observe}
{servers}

listen stats
    mode http
    bind 127.0.0.1:{setup.admin_port}
    stats enable
    stats uri /stats
"""


def haproxy_states(csv_text: str, backend: str = "app") -> dict[str, str]:
    """Server name -> lbtwist-style state word, from HAProxy's ``/stats;csv``."""
    lines = [ln for ln in csv_text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    try:
        ipx, isv, ist = header.index("pxname"), header.index("svname"), header.index("status")
    except ValueError:
        return {}
    out: dict[str, str] = {}
    for ln in lines[1:]:
        f = ln.split(",")
        if len(f) <= ist or f[ipx] != backend or f[isv] in ("FRONTEND", "BACKEND"):
            continue
        st = f[ist]
        if st.startswith("UP") or st == "no check":
            word = "healthy"
        elif st.startswith("DOWN"):
            word = "unhealthy"
        elif st.startswith("DRAIN") or st == "NOLB":
            word = "draining"
        elif st.startswith("MAINT"):
            word = "disabled"
        else:
            word = st.lower()
        out[f[isv]] = word
    return out
