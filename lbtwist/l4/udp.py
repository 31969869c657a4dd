"""The L4 UDP relay: datagrams from each client address go to the backend that
address was pinned to (L{lbtwist.l4.flows}), replies come back to that client.

Each flow has its own connected UDP socket towards its backend, so the kernel
routes a backend's reply to the right flow without a lookup and drops stray
datagrams from anyone else; an ICMP port-unreachable from the backend shows
up as an error on that flow's socket, which ends the flow as a gateway
failure so the next datagram picks again.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from lbtwist.config.binds import parse_udp_bind
from lbtwist.config.model import ListenerConfig
from lbtwist.config.names import parse_hash_key
from lbtwist.l4.flows import Flow, FlowTable
from lbtwist.pool import PickContext
from lbtwist.traffic import TrafficRecord

log = Logger(namespace="lbtwist.l4.udp")

#: Flow idle timeout when the listener sets none.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Largest datagram relayed (Twisted's default of 8192 would truncate).
MAX_DATAGRAM = 65535
DROP_LOG_INTERVAL = 10.0
#: Datagrams read from one flow's socket per reactor event (fairness between flows).
READS_PER_EVENT = 64


@implementer(IReadDescriptor)
class _Upstream:
    """A flow's connected UDP socket towards its backend.

    Registered with the reactor directly (public IReactorFDSet) rather than
    as a Twisted UDP port, which would log two lines per flow and cost a
    port object per flow."""

    def __init__(self, relay: "UDPRelay", flow: Flow, sock: socket.socket) -> None:
        self.relay = relay
        self.flow = flow
        self.sock: socket.socket | None = sock

    @classmethod
    def open(cls, relay: "UDPRelay", flow: Flow) -> "_Upstream":
        """Raises ValueError for a backend host that is not an IP address
        (connect() would resolve it, blocking), OSError if the socket fails."""
        host, port = flow.backend.host, flow.backend.port
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        up = cls(relay, flow, sock)
        relay.reactor.addReader(up)
        return up

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def logPrefix(self) -> str:
        return "lbtwist.l4.udp.flow"

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except ConnectionRefusedError:
            self.relay._flow_refused(self.flow)

    def doRead(self) -> None:
        sock = self.sock
        for _ in range(READS_PER_EVENT):
            if sock is None:
                return
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self.relay._flow_refused(self.flow)
                return
            except OSError as e:
                self.relay._flow_failed(self.flow, str(e))
                return
            self.relay._reply(self.flow, data)
            sock = self.sock

    def connectionLost(self, reason: Any) -> None:
        # The reactor calls this when epoll reports an error on the socket
        # (EPOLLERR, e.g. a pending ICMP port-unreachable) before any read.
        err = 0
        if self.sock is not None:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.ECONNREFUSED:
            self.relay._flow_refused(self.flow)
        else:
            self.relay._flow_failed(self.flow, os.strerror(err) if err else "socket closed")

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.relay.reactor.removeReader(self)
            sock.close()


class UDPRelay(DatagramProtocol):
    """The listening side: demultiplexes client datagrams onto flows."""

    noisy = False

    def __init__(self, cfg: ListenerConfig, runtime: Any) -> None:
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.flows = FlowTable(DEFAULT_IDLE_TIMEOUT, cfg.max_connections)
        self._timer: Any = None
        self.configure(cfg)
        self.dropped = 0
        self.total_flows = 0
        self._drop_logged_at = float("-inf")
        self._drops_since_log = 0

    def configure(self, cfg: ListenerConfig) -> None:
        """Take (new) settings. Live flows keep their backend; the new idle
        timeout and cap apply to every flow from now on."""
        if cfg.pool is None:
            raise ValueError(f"listener {cfg.name}: mode udp needs a pool")
        if parse_hash_key(cfg.hash_key)[0] != "source":  # as the validator reads it
            raise ValueError(
                f"listener {cfg.name}: hash_key {cfg.hash_key!r} is not available at L4 (use 'source')"
            )
        pp = cfg.proxy_protocol
        if pp.accept or pp.send != "none":
            raise ValueError(f"listener {cfg.name}: proxy_protocol is not supported for mode udp")
        self.cfg = cfg
        self.pool_name = cfg.pool
        idle = cfg.idle_timeout if cfg.idle_timeout is not None else DEFAULT_IDLE_TIMEOUT
        if idle <= 0:
            raise ValueError(f"listener {cfg.name}: idle_timeout must be > 0 for mode udp")
        self.flows.idle_timeout = idle
        self.flows.max_flows = cfg.max_connections
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
            self._schedule()

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
            flow.handle.send(data)
        except OSError as e:
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
        try:
            flow.handle = _Upstream.open(self, flow)
        except (OSError, ValueError) as e:
            self._drop(f"cannot open a socket to {backend.address}: {e}", now)
            return None
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
        self._flow_failed(flow, "port unreachable")

    def _flow_failed(self, flow: Flow, why: str) -> None:
        if self.flows.discard(flow):
            log.info(
                "listener {listener}: flow {client} to {backend} failed: {why}",
                listener=self.cfg.name, backend=flow.backend.address,
                client=f"{flow.client[0]}:{flow.client[1]}", why=why,
            )
            self._end(flow, "gateway", why)

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
        if flow.handle is not None:
            flow.handle.close()
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
        self._inherited: int | None = None

    def inherit_socket(self, fd: int) -> None:
        """Read ``fd`` (a bound socket the master passed down) instead of binding."""
        self._inherited = fd

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind_port()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()
        log.info("listener {name} on {bind} ({address})", name=self.name, bind=self.cfg.bind, address=self.address)

    #: See L{lbtwist.listener.ListenerService.port_kind}.
    port_kind = "datagram"

    def bind_port(self) -> None:
        """Bind now, unless bound already (a reload binds before it swaps)."""
        if self.port is None:
            self._listen()

    def hand_over_port(self) -> Any:
        """Give up the socket without closing it; the flows end here (their
        replies would leave through a port this relay no longer reads)."""
        port, self.port = self.port, None
        self.relay.close_all()
        return port

    def adopt_port(self, other: Any) -> None:
        """Read ``other``'s socket from now on (same bind text across a
        reload): the port is never closed and reopened."""
        port = other.hand_over_port()
        if port is None:
            self.bind_port()
            return
        old = port.protocol
        if old is not None and old.numPorts > 0:
            old.doStop()
        port.protocol = self.relay
        self.relay.makeConnection(port)
        self.port = port

    def _listen(self) -> None:
        if self._inherited is not None:
            from lbtwist.listener import socket_family

            self.port = self.reactor.adoptDatagramPort(
                self._inherited, socket_family(self._inherited), self.relay, maxPacketSize=MAX_DATAGRAM
            )
            return
        self.port = self.reactor.listenUDP(
            self.port_number, self.relay, interface=self.interface, maxPacketSize=MAX_DATAGRAM
        )

    @property
    def address(self) -> Any:
        return self.port.getHost() if self.port is not None else None

    def prepare_reconfigure(self, cfg: ListenerConfig) -> Any:
        """Check ``cfg`` (ValueError names what is wrong) without changing
        the running listener; the callable returned applies it."""
        UDPRelay(cfg, self.relay.runtime)  # configure() checks before it sets anything
        return lambda: self.reconfigure(cfg)

    def reconfigure(self, cfg: ListenerConfig) -> None:
        """Hot reload with the same bind."""
        self.relay.configure(cfg)
        self.cfg = cfg

    def stop_accepting(self) -> defer.Deferred:
        """Release the port (fires once a replacement may bind it). Replies
        leave through this port, so the flows end with it: UDP has no
        in-flight work to drain."""
        port, self.port = self.port, None
        self.relay.close_all()
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.stop_accepting()


def udp_listener(cfg: ListenerConfig, runtime: Any) -> UDPListenerService:
    """The service for a ``mode: udp`` listener (the lead's service tree calls this)."""
    return UDPListenerService(cfg, runtime)
