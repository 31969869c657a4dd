"""SNI passthrough: route a TLS connection to a pool by the server name in its
ClientHello, without terminating it (the backends hold the certificates).

The L4 relay stays in charge of the connection; this module only delays the
choice of its pool until the ClientHello has been read::

    router = router_for_listener(cfg)
    factory = passthrough_factory(router, lambda pool, addr, hello: relay.build_for_pool(pool, addr),
                                  reactor, timeout=cfg.tls_passthrough.client_hello_timeout)

The protocol returned by ``build`` receives ``makeConnection(transport)`` and
then, in one ``dataReceived``, every byte read so far (the ClientHello, which
it must forward to the backend first, unchanged).
"""
from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IAddress, IProtocol, IReactorTime

from lbtwist.tls.clienthello import ClientHello, NotTLS
from lbtwist.tls.peek import ClientHelloPeekFactory
from lbtwist.tls.sni import SNIRouter

__all__ = ["PassthroughStats", "SNIRouter", "passthrough_factory", "router_for_listener"]

#: ``build(pool, addr, hello)``: the relay protocol for a connection routed to ``pool``.
Build = Callable[[str, IAddress, ClientHello], IProtocol | None]


@attrs.define
class PassthroughStats:
    #: Connections routed, per pool.
    routed: dict[str, int] = attrs.Factory(dict)
    #: ClientHellos whose name matched no route and no default.
    unrouted: int = 0
    not_tls: int = 0
    timeouts: int = 0


def router_for_listener(listener: Any) -> SNIRouter:
    """The router of a ``tls_passthrough`` listener (L{lbtwist.config.model.ListenerConfig});
    unrouted names go to ``tls_passthrough.default``, else the listener's pool."""
    tp = listener.tls_passthrough
    return SNIRouter.from_routes(tp.routes, tp.default if tp.default is not None else listener.pool)


def passthrough_factory(
    router: SNIRouter,
    build: Build,
    clock: IReactorTime,
    timeout: float = 10.0,
    stats: PassthroughStats | None = None,
    wrapped: object = None,
) -> ClientHelloPeekFactory:
    """A listening factory that reads each ClientHello, picks the pool with
    ``router`` and hands the connection to ``build(pool, addr, hello)``.
    Connections that are not TLS, or whose name routes nowhere, are closed.
    ``wrapped``: the relay's factory, started and stopped with this one."""
    st = stats if stats is not None else PassthroughStats()

    def decide(hello: ClientHello | NotTLS, addr: IAddress) -> IProtocol | None:
        if isinstance(hello, NotTLS):
            st.not_tls += 1
            return None
        pool = router.route(hello.server_name)
        if pool is None:
            st.unrouted += 1
            return None
        st.routed[pool] = st.routed.get(pool, 0) + 1
        return build(pool, addr, hello)

    def timed_out() -> None:
        st.timeouts += 1

    f = ClientHelloPeekFactory(decide, clock, timeout, wrapped=wrapped, on_timeout=timed_out)
    f.stats = st  # type: ignore[attr-defined]
    return f
