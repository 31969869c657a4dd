"""UDP flow affinity, sans-IO: which backend each client address is pinned to,
and when an idle flow expires.

UDP has no connection, so "a client keeps its backend" must be remembered by
the relay: a datagram-oriented protocol (DNS over several packets, QUIC, game
or VPN sessions) breaks if consecutive datagrams land on different servers.
The table is ordered by last activity, so finding what expired is a look at
its head rather than a scan, whatever the number of flows.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import attrs

from lbtwist.pool import Backend

ClientAddr = tuple[str, int]


@attrs.define(eq=False)
class Flow:
    """One client address pinned to one backend."""

    client: ClientAddr
    backend: Backend
    created: float
    last_seen: float
    #: The adapter's upstream endpoint (a connected UDP port) for this flow.
    handle: Any = None
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: Wall-clock start, for traffic records.
    wall_start: float = 0.0


class FlowTable:
    """Flows keyed by client address, least recently active first."""

    def __init__(self, idle_timeout: float, max_flows: int) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self._flows: OrderedDict[ClientAddr, Flow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    @property
    def full(self) -> bool:
        return len(self._flows) >= self.max_flows

    def touch(self, client: ClientAddr, now: float) -> Flow | None:
        """The live flow of ``client``, marked active at ``now``; None if it has none."""
        flow = self._flows.get(client)
        if flow is not None:
            flow.last_seen = now
            self._flows.move_to_end(client)
        return flow

    def activity(self, flow: Flow, now: float) -> None:
        """Traffic in the backend-to-client direction keeps a flow alive too."""
        if self._flows.get(flow.client) is flow:
            flow.last_seen = now
            self._flows.move_to_end(flow.client)

    def add(self, flow: Flow) -> None:
        if flow.client in self._flows:
            raise ValueError(f"flow for {flow.client} exists")
        if self.full:
            raise OverflowError("flow table full")
        self._flows[flow.client] = flow

    def remove(self, client: ClientAddr) -> Flow | None:
        return self._flows.pop(client, None)

    def discard(self, flow: Flow) -> bool:
        """Remove ``flow`` if it is still its client's live flow (a newer flow
        of the same client is left alone)."""
        if self._flows.get(flow.client) is flow:
            del self._flows[flow.client]
            return True
        return False

    def expire(self, now: float) -> list[Flow]:
        """Remove and return the flows idle for ``idle_timeout`` or longer."""
        out = []
        flows = self._flows
        limit = now - self.idle_timeout
        while flows:
            client, flow = next(iter(flows.items()))
            if flow.last_seen > limit:
                break
            del flows[client]
            out.append(flow)
        return out

    def next_expiry(self) -> float | None:
        """When the least recently active flow expires, if nothing touches it."""
        if not self._flows:
            return None
        return next(iter(self._flows.values())).last_seen + self.idle_timeout
