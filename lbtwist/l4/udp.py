"""The L4 UDP relay: datagrams from each client address go to the backend that
address was pinned to (L{lbtwist.l4.flows}), replies come back to that client.

Each flow has its own connected UDP socket towards its backend, so the kernel
routes a backend's reply to the right flow without a lookup and drops stray
datagrams from anyone else; an ICMP port-unreachable from the backend closes
that flow's socket, which ends the flow as a gateway failure so the next
datagram picks again.
"""
from __future__ import annotations

import time
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from lbtwist.config.model import ListenerConfig
from lbtwist.l4.flows import Flow, FlowTable
from lbtwist.pool import PickContext
from lbtwist.traffic import TrafficRecord

log = Logger(namespace="lbtwist.l4.udp")

#: Flow idle timeout when the listener sets none.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Largest datagram relayed (Twisted's default of 8192 would truncate).
MAX_DATAGRAM = 65535
DROP_LOG_INTERVAL = 10.0


def parse_udp_bind(bind: str) -> tuple[int, str]:
    """``udp:PORT[:interface=ADDR]`` (or ``port=PORT``) -> (port, interface).

    Colons inside values are escaped as in Twisted endpoint strings
    (``interface=\\:\\:1``). Raises ValueError with a readable message."""
    parts: list[str] = []
    cur = []
    it = iter(bind)
    for ch in it:
        if ch == "\\":
            cur.append(next(it, ""))
        elif ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if parts[0] != "udp" or len(parts) < 2:
        raise ValueError(f"udp bind {bind!r}: expected udp:PORT[:interface=ADDR]")
    port: int | None = None
    interface = ""
    for i, p in enumerate(parts[1:]):
        key, eq, value = p.partition("=")
        if not eq:
            if i != 0:
                raise ValueError(f"udp bind {bind!r}: unexpected {p!r}")
            key, value = "port", p
        if key == "port":
            if not value.isdigit() or int(value) > 65535:
                raise ValueError(f"udp bind {bind!r}: bad port {value!r}")
            port = int(value)
        elif key == "interface":
            interface = value
        else:
            raise ValueError(f"udp bind {bind!r}: unknown option {key!r} (port, interface)")
    if port is None:
        raise ValueError(f"udp bind {bind!r}: no port")
    return port, interface


class _Upstream(DatagramProtocol):
    """A flow's connected socket towards its backend."""

    noisy = False

    def __init__(self, relay: "UDPRelay", flow: Flow) -> None:
        self.relay = relay
        self.flow = flow

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.relay._reply(self.flow, data)

    def connectionRefused(self) -> None:
        self.relay._flow_refused(self.flow)

    def stopProtocol(self) -> None:
        # Twisted closes a UDP port whose socket reports an error (epoll says
        # EPOLLERR for a pending ICMP port-unreachable, before any read), so a
        # port stopping under a live flow means the backend refused it.
        self.relay._flow_refused(self.flow)


class UDPRelay(DatagramProtocol):
    """The listening side: demultiplexes client datagrams onto flows."""

    noisy = False

    def __init__(self, cfg: ListenerConfig, runtime: Any) -> None:
        if cfg.pool is None:
            raise ValueError(f"listener {cfg.name}: mode udp needs a pool")
        if cfg.hash_key != "source":
            raise ValueError(
                f"listener {cfg.name}: hash_key {cfg.hash_key!r} is not available at L4 (use 'source')"
            )
        pp = cfg.proxy_protocol
        if pp.accept or pp.send != "none":
            raise ValueError(f"listener {cfg.name}: proxy_protocol is not supported for mode udp")
        self.cfg = cfg
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.pool_name = cfg.pool
        idle = cfg.idle_timeout if cfg.idle_timeout is not None else DEFAULT_IDLE_TIMEOUT
        self.flows = FlowTable(idle, cfg.max_connections)
        self._timer: Any = None
        self.dropped = 0
        self.total_flows = 0
        self._drop_logged_at = float("-inf")
        self._drops_since_log = 0

    # -- client datagrams -------------------------------------------------------

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        now = self.reactor.seconds()
        flow = self.flows.touch(addr, now)
        if flow is None:
            flow = self._open_flow(addr, now)
            if flow is None:
                return
        flow.datagrams_in += 1
        flow.bytes_in += len(data)
        try:
            flow.handle.transport.write(data)
        except (OSError, error.MessageLengthError) as e:
            self._drop(f"to {flow.backend.address}: {e}", now)

    def _open_flow(self, addr: Any, now: float) -> Flow | None:
        if self.flows.full:
            self._drop(f"at max_connections={self.flows.max_flows} flows", now)
            return None
        pool = self.runtime.pools.get(self.pool_name)
        if pool is None:
            self._drop(f"pool {self.pool_name!r} does not exist", now)
            return None
        host = addr[0]
        backend = pool.select(PickContext(now=now, key=host.encode(), client=host))
        if backend is None:
            self._drop("no usable backend", now)
            return None
        flow = Flow(client=addr, backend=backend, created=now, last_seen=now, wall_start=time.time())
        upstream = _Upstream(self, flow)
        try:
            self.reactor.listenUDP(
                0, upstream, interface="::" if ":" in backend.host else "", maxPacketSize=MAX_DATAGRAM
            )
            upstream.transport.connect(backend.host, backend.port)
        except (OSError, ValueError, error.CannotListenError) as e:
            if upstream.transport is not None:
                upstream.transport.stopListening()
            self._drop(f"cannot open a socket to {backend.address}: {e}", now)
            return None
        flow.handle = upstream
        self.flows.add(flow)
        self.total_flows += 1
        pool.on_start(backend)
        self._schedule()
        return flow

    # -- backend datagrams --------------------------------------------------------

    def _reply(self, flow: Flow, data: bytes) -> None:
        flow.datagrams_out += 1
        flow.bytes_out += len(data)
        self.flows.activity(flow, self.reactor.seconds())
        try:
            self.transport.write(data, flow.client)
        except (OSError, error.MessageLengthError) as e:
            self._drop(f"reply to {flow.client[0]}:{flow.client[1]}: {e}", self.reactor.seconds())

    def _flow_refused(self, flow: Flow) -> None:
        if self.flows.discard(flow):
            log.info(
                "listener {listener}: backend {backend} refused datagrams from flow {client}",
                listener=self.cfg.name, backend=flow.backend.address, client=f"{flow.client[0]}:{flow.client[1]}",
            )
            self._end(flow, "gateway", "port unreachable")

    # -- expiry and shutdown ------------------------------------------------------

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        due = self.flows.next_expiry()
        if due is None:
            return
        self._timer = self.reactor.callLater(max(0.0, due - self.reactor.seconds()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        for flow in self.flows.expire(self.reactor.seconds()):
            self._end(flow, "ok", None)
        self._schedule()

    def _end(self, flow: Flow, outcome: str, why: str | None) -> None:
        now = self.reactor.seconds()
        upstream = flow.handle
        if upstream is not None and upstream.transport is not None:
            upstream.transport.stopListening()
        pool = self.runtime.pools.get(self.pool_name)
        if pool is not None:
            pool.on_finish(flow.backend, now - flow.created, outcome != "gateway", outcome)
        traffic = getattr(self.runtime, "traffic", None)
        if traffic is not None and traffic.subscribers:
            traffic.publish(
                TrafficRecord(
                    kind="udp",
                    listener=self.cfg.name,
                    start=flow.wall_start,
                    duration=now - flow.created,
                    client=f"{flow.client[0]}:{flow.client[1]}",
                    pool=self.pool_name,
                    backend=flow.backend.address,
                    bytes_in=flow.bytes_in,
                    bytes_out=flow.bytes_out,
                    tries=1,
                    outcome=outcome,
                    error=why,
                )
            )

    def close_all(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for flow in list(self.flows):
            self.flows.remove(flow.client)
            self._end(flow, "ok", None)

    def _drop(self, why: str, now: float) -> None:
        self.dropped += 1
        self._drops_since_log += 1
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL:
            log.warn(
                "listener {listener}: dropped {n} datagram(s): {why}",
                listener=self.cfg.name, n=self._drops_since_log, why=why,
            )
            self._drop_logged_at = now
            self._drops_since_log = 0


class UDPListenerService(Service):
    """Binds the relay's port on start; on stop closes it and every flow (UDP
    has no in-flight work to drain)."""

    def __init__(self, cfg: ListenerConfig, runtime: Any) -> None:
        self.setName(cfg.name)
        self.cfg = cfg
        self.reactor = runtime.reactor
        self.port_number, self.interface = parse_udp_bind(cfg.bind)
        self.relay = UDPRelay(cfg, runtime)
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()
        log.info("listener {name} on {bind} ({address})", name=self.name, bind=self.cfg.bind, address=self.address)

    def _listen(self) -> None:
        self.port = self.reactor.listenUDP(
            self.port_number, self.relay, interface=self.interface, maxPacketSize=MAX_DATAGRAM
        )

    @property
    def address(self) -> Any:
        return self.port.getHost() if self.port is not None else None

    def stopService(self) -> defer.Deferred:
        super().stopService()
        port, self.port = self.port, None
        self.relay.close_all()
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


def udp_listener(cfg: ListenerConfig, runtime: Any) -> UDPListenerService:
    """The service for a ``mode: udp`` listener (the lead's service tree calls this)."""
    return UDPListenerService(cfg, runtime)
