"""``twistd lbtwist``: options and the service maker.

Config problems are reported from ``postOptions`` as one line each and a
non-zero exit, never a traceback (twistd prints tracebacks from makeService).
"""
from __future__ import annotations

import sys
from importlib import resources
from typing import Any

from twisted.python import usage

def default_config_path() -> str:
    return str(resources.files("lbtwist") / "data" / "default.yaml")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the lbtwist load balancer. Without --config it serves a built-in "
        "demo config with demo backends (HTTP on 127.0.0.1:8080, TCP echo on "
        "127.0.0.1:8081, admin API on 127.0.0.1:9900). Configuration reference: "
        "docs/configuration.md."
    )
    optParameters = [
        ["config", "c", None, "Path to the YAML config (default: the built-in demo config)."],
    ]
    optFlags = [
        ["check", None, "Validate the config, print problems and exit (0 valid, 2 invalid)."],
    ]

    def postOptions(self) -> None:
        from lbtwist.config import ConfigError, load_config
        from lbtwist.registry import PluginError, Registry

        if not self["check"]:
            install_default_reactor()

        path = self["config"] or default_config_path()
        try:
            registry = Registry.default()
            loaded = load_config(path, registry)
        except PluginError as e:
            raise SystemExit(f"lbtwist: {e}")
        except ConfigError as e:
            raise SystemExit(f"lbtwist: invalid configuration:\n{e}")
        for w in loaded.warnings:
            print(f"lbtwist: {w}", file=sys.stderr)
        if self["check"]:
            print(f"lbtwist: {path}: configuration is valid")
            raise SystemExit(0)
        self["loaded"] = loaded
        self["registry"] = registry
        self["config_path"] = path


def install_default_reactor() -> bool:
    """Install fastio's lean reactor unless a reactor was already chosen
    (``twistd --reactor=NAME`` installs it before this runs) or imported, and
    only on a Twisted it was checked against (else Twisted's default, with a
    line saying so). It is what the speed figures are measured on;
    ``--reactor=epoll`` runs Twisted's own. Returns True when it installed the
    lean reactor."""
    from lbtwist import fastio

    if "twisted.internet.reactor" in sys.modules:
        return False
    return fastio.install_supported_reactor()


def makeService(options: Options) -> Any:
    from twisted.internet import reactor  # the only place the global reactor is touched

    from lbtwist.service import LbtwistService

    from lbtwist.workers.count import worker_count

    config = options["loaded"].config
    # workers: 1 is one process, exactly as before; more: this process is the master
    role = "master" if worker_count(config.workers) > 1 else "single"
    service = LbtwistService(
        config,
        reactor,
        options["registry"],
        config_path=options["config_path"],
        install_signals=True,
        role=role,
    )
    if role == "master":
        from lbtwist.workers.master import Fleet

        Fleet(service).setServiceParent(service)
    return service
