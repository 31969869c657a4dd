"""Backends from DNS (``twisted.names``): SRV (target, port, weight,
priority) or A/AAAA (every address, at the configured port).

Re-resolved at the answer's TTL (the smallest in it) clamped to
[refresh_min, refresh_max]; after a failure (timeout, SERVFAIL, NXDOMAIN, an
empty answer) every ``refresh``. SRV targets are looked up in the
additional section first, else with their own A/AAAA queries.
"""
from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import client, dns, error

from lbtwist.discovery.base import Endpoint, Tracker
from lbtwist.pool import join_address, split_address

log = Logger(namespace="lbtwist.discovery.dns")


def clamp_ttl(ttl: float | None, refresh: float, low: float, high: float) -> float:
    """When to resolve again after a good answer."""
    if ttl is None:
        ttl = refresh
    return min(max(float(ttl), low), high)


def make_resolver(resolver: str | None, reactor: Any) -> Any:
    if resolver is None:
        return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)
    host, port = split_address(resolver)
    return client.Resolver(servers=[(host, port)], reactor=reactor)


def describe_dns_failure(f: Any) -> str:
    if f.check(error.DNSNameError):
        return "NXDOMAIN"
    if f.check(error.DNSServerError):
        return "SERVFAIL"
    if f.check(defer.TimeoutError, error.DNSQueryTimeoutError):
        return "timeout"
    if f.check(error.DNSQueryRefusedError):
        return "REFUSED"
    return f"{type(f.value).__name__}: {f.getErrorMessage()}"


class DnsSource:
    kind = "dns"

    def __init__(self, cfg: Any, reactor: Any, resolver: Any = None) -> None:
        self.cfg = cfg
        self.target = f"{cfg.type} {cfg.name}"
        self.reactor = reactor
        self.resolver = resolver if resolver is not None else make_resolver(cfg.resolver, reactor)
        self._tracker: Tracker | None = None
        self._call: Any = None
        self._query: defer.Deferred | None = None
        self._stopped = False
        #: When the next resolution is due (for the admin API and tests).
        self.next_in: float | None = None

    def start(self, tracker: Tracker) -> None:
        self._tracker = tracker
        self.resolve()

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        if self._query is not None:
            q, self._query = self._query, None
            q.cancel()

    def resolve(self) -> defer.Deferred:
        d = defer.maybeDeferred(self._lookup)
        self._query = d
        d.addCallbacks(self._answered, self._failed)
        d.addErrback(lambda f: log.failure("discovery dns {t}: unexpected", f, t=self.target))
        return d

    def _timeout(self) -> tuple[int, ...]:
        return (max(1, int(round(self.cfg.timeout))),)

    @defer.inlineCallbacks
    def _lookup(self) -> Any:
        cfg = self.cfg
        if cfg.type == "SRV":
            answers, _auth, additional = yield self.resolver.lookupService(cfg.name, timeout=self._timeout())
            srvs = [rr for rr in answers if rr.type == dns.SRV]
            if not srvs:
                return [], None
            known: dict[str, list[tuple[str, int]]] = {}
            for rr in additional:
                if rr.type in (dns.A, dns.AAAA):
                    known.setdefault(str(rr.name).lower(), []).append((_address(rr), rr.ttl))
            ttls = [rr.ttl for rr in srvs]
            out = []
            for rr in srvs:
                p = rr.payload
                target = str(p.target).lower()
                if target in ("", "."):
                    continue  # RFC 2782: "." means the service is not offered here
                addrs = known.get(target)
                if addrs is None:
                    addrs = yield self._addresses(target)
                for addr, ttl in addrs:
                    ttls.append(ttl)
                    out.append(Endpoint(address=join_address(addr, p.port), weight=float(p.weight),
                                        name=None, priority=p.priority))
            return out, min(ttls)
        addrs = yield self._addresses(cfg.name, cfg.type)
        if not addrs:
            return [], None
        return [Endpoint(address=join_address(a, cfg.port)) for a, _ in addrs], min(t for _, t in addrs)

    @defer.inlineCallbacks
    def _addresses(self, name: str, kind: str | None = None) -> Any:
        """[(address, ttl)] of ``name``; both families for SRV targets."""
        out: list[tuple[str, int]] = []
        kinds = [kind] if kind else ["A", "AAAA"]
        failures = []
        for k in kinds:
            lookup = self.resolver.lookupAddress if k == "A" else self.resolver.lookupIPV6Address
            try:
                answers, _, _ = yield lookup(name, timeout=self._timeout())
            except Exception as e:
                failures.append(e)
                continue
            want = dns.A if k == "A" else dns.AAAA
            out.extend((_address(rr), rr.ttl) for rr in answers if rr.type == want)
        if not out and failures and len(failures) == len(kinds):
            raise failures[0]
        return out

    def _answered(self, result: tuple[list[Endpoint], float | None]) -> None:
        self._query = None
        endpoints, ttl = result
        assert self._tracker is not None
        if not endpoints:
            self._tracker.failed("empty answer")
            self._schedule(self.cfg.refresh)
            return
        self._tracker.update(endpoints)
        self._schedule(clamp_ttl(ttl, self.cfg.refresh, self.cfg.refresh_min, self.cfg.refresh_max))

    def _failed(self, f: Any) -> None:
        self._query = None
        if self._stopped:
            return
        assert self._tracker is not None
        self._tracker.failed(describe_dns_failure(f))
        self._schedule(self.cfg.refresh)

    def _schedule(self, delay: float) -> None:
        if self._stopped:
            return
        self.next_in = delay
        self._call = self.reactor.callLater(delay, self.resolve)


def _address(rr: Any) -> str:
    p = rr.payload
    if rr.type == dns.A:
        return p.dottedQuad()
    return socket.inet_ntop(socket.AF_INET6, p.address)
