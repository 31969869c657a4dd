"""Request routing, sans-IO: routes are lists of matchers (built-in and plugin
kinds, all registered through the ``lbtwist_routing_rules`` hook), first match wins."""
from __future__ import annotations

import attrs


@attrs.frozen
class RequestHead:
    """What a matcher may look at. Built once per request by the L7 adapter."""

    method: str
    #: The raw request target as received (``/a/b?x=1``).
    target: str
    #: The path part of the target (percent-encoding kept).
    path: str
    #: Lower-cased host without port, from Host (or the absolute target).
    host: str
    #: (lower-case name, value) pairs, in order.
    headers: tuple[tuple[str, str], ...] = ()
    #: Client IP address.
    client: str = ""
    #: True when the client connection is TLS.
    tls: bool = False

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None
