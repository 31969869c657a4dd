"""lbtwist: a load balancer on Twisted that absorbs failures instead of multiplying them."""
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``hookimpl``: the marker for plugin hook implementations (built-ins use
    # it too). Made on first use, so that ``lbtwist status --check`` (run by
    # keepalived every second) does not import pluggy.
    if name == "hookimpl":
        import pluggy

        marker = pluggy.HookimplMarker("lbtwist")
        globals()["hookimpl"] = marker
        return marker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
