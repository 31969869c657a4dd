"""Start a whole lbtwist service tree without binding anything: the real
LbtwistService on a memory reactor (listenTCP/listenUDP are recorded)."""
from __future__ import annotations

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from lbtwist.registry import Registry
from lbtwist.service import LbtwistService


@attrs.define
class _UDPPort:
    address: IPv4Address

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        return None


class MemoryReactor(MemoryReactorClock):
    """MemoryReactorClock, plus listenUDP recorded the way listenTCP is."""

    def __init__(self) -> None:
        super().__init__()
        self.udpServers: list[tuple] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        return _UDPPort(IPv4Address("UDP", interface or "0.0.0.0", port))


def start_and_stop(config, registry: Registry) -> LbtwistService:
    """Build the whole service tree for ``config`` as twistd does, start it
    on a memory reactor (listeners 'listen' without binding) and stop it."""
    reactor = MemoryReactor()
    svc = LbtwistService(config, reactor, registry)
    svc.privilegedStartService()
    svc.startService()
    done = svc.stopService()
    for _ in range(100):  # drains end on timers: move the clock until stopped
        if done.called:
            break
        reactor.advance(1.0)
    assert done.called
    failures = []
    done.addErrback(failures.append)
    assert not failures, failures[0].getTraceback()
    return svc
