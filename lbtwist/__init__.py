"""lbtwist: a load balancer on Twisted that absorbs failures instead of multiplying them."""
import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations (built-ins use it too).
hookimpl = pluggy.HookimplMarker("lbtwist")
