"""TLS for lbtwist: termination with SNI and resumption, ticket-key rotation,
certificate reload, TLS to backends, and SNI passthrough.

Each concern lives in its own module; the names a listener, a pool or the
service tree needs are re-exported here:

  - L{ServerTLS} (context.py): a terminating listener's contexts, SNI
    selection, resumption state, rotation (tickets.py) and ``reload()``.
  - L{wrap_server_factory}, L{tls_info} (server.py): terminate TLS in front
    of any listener factory; read what a connection negotiated.
  - L{passthrough_factory}, L{router_for_listener} (passthrough.py) on the
    ClientHello reader (clienthello.py) and peek adapter (peek.py).
  - L{BackendTLS}, L{connect_tls}, L{probe_tls} (client.py): TLS to backends.
  - checks.py: config checks; files.py: PEM loading; testing.py: test certificates.
"""
from lbtwist.tls.client import (
    BackendTLS,
    BackendVerificationError,
    client_connection_creator,
    connect_tls,
    is_verification_failure,
    probe_tls,
)
from lbtwist.tls.clienthello import NEED_MORE, ClientHello, NotTLS, parse_client_hello
from lbtwist.tls.context import ServerTLS, TLSConfigError, TLSStats
from lbtwist.tls.passthrough import PassthroughStats, SNIRouter, passthrough_factory, router_for_listener
from lbtwist.tls.peek import ClientHelloPeekFactory
from lbtwist.tls.server import TLSInfo, tls_info, wrap_server_factory

__all__ = [
    "BackendTLS",
    "BackendVerificationError",
    "ClientHello",
    "ClientHelloPeekFactory",
    "NEED_MORE",
    "NotTLS",
    "PassthroughStats",
    "SNIRouter",
    "ServerTLS",
    "TLSConfigError",
    "TLSInfo",
    "TLSStats",
    "client_connection_creator",
    "connect_tls",
    "is_verification_failure",
    "parse_client_hello",
    "passthrough_factory",
    "probe_tls",
    "router_for_listener",
    "tls_info",
    "wrap_server_factory",
]
