# -*- test-case-name: tests.test_fleet_ejections -*-
"""Passive ejections shared by the fleet.

Where an L{lbtwist.health.outlier.OutlierDetector} runs, this watches its
own decisions (``observe_ejections``: never the ejections it applied for
others) and publishes each ejection and its end: one atomic script sets a
key ``lbtwist:NAME:ej:POOL:ADDRESS`` that expires with the ejection (so an
instance that starts or reconnects later learns what is out) and publishes
the same JSON on ``lbtwist:NAME:ejections``. The other instances apply what
they receive through the detector's public L{apply_remote_ejection} (under
their own ``max_ejection_percent`` cap) and L{end_remote_ejection}; what an
instance applied is never published again, and its own messages coming back
on the channel are recognised by ``origin`` and ignored: no echo loops.
Active health stays per instance. Redis down: ejections stay local, and the
ones still running are published when it is back.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="lbtwist.fleet")

PUBLISH_SCRIPT = """
-- lbtwist fleet ejection: KEYS[1] the ejection's key, ARGV[1] channel,
-- ARGV[2] message (JSON), ARGV[3] "ejected" | "returned", ARGV[4] TTL in ms, ARGV[5] origin.
if ARGV[3] == 'ejected' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[4]))
else
  local held = redis.call('GET', KEYS[1])
  if held then
    local ok, v = pcall(cjson.decode, held)
    if ok and type(v) == 'table' and v['origin'] == ARGV[5] then redis.call('DEL', KEYS[1]) end
  end
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""

SYNC_SCRIPT = """
-- lbtwist fleet ejections still running: {message, ttl_ms, ...} for keys matching ARGV[1].
local out = {}
local cursor = '0'
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local v = redis.call('GET', k)
    local t = redis.call('PTTL', k)
    if v and t > 0 then
      out[#out + 1] = v
      out[#out + 1] = t
    end
  end
until cursor == '0' or #out >= 20000
return out
"""

EVENTS = ("ejected", "returned")


def instance_id() -> str:
    """Unique per process: host, pid and a random part (a restarted instance is another)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def parse_message(data: bytes) -> dict[str, Any]:
    """A published ejection, checked field by field; ValueError when it is not one."""
    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(m, dict):
        raise ValueError("not an object")
    for k in ("origin", "pool", "backend", "event", "reason"):
        if not isinstance(m.get(k), str):
            raise ValueError(f"{k} missing or not a string")
    if m["event"] not in EVENTS:
        raise ValueError(f"event {m['event']!r} is not ejected or returned")
    ttl = m.get("ttl_ms")
    if m["event"] == "ejected" and (type(ttl) is not int or ttl <= 0):
        raise ValueError("ttl_ms missing or not a positive integer")
    return m


class FleetEjections:
    """Publishes local ejections, applies the fleet's."""

    def __init__(self, link: Any, clock: Any, prefix: str, origin: str | None = None) -> None:
        self.link = link
        self.clock = clock
        self.prefix = prefix
        self.origin = origin or instance_id()
        self.channel = f"{prefix}ejections"
        #: pool name -> (detector, its observer)
        self.detectors: dict[str, tuple[Any, Any]] = {}
        #: (pool, address) -> (until, reason): this instance's running ejections
        self._mine: dict[tuple[str, str], tuple[float, str]] = {}
        self.counts = {"published": 0, "publish_failed": 0, "received": 0, "applied": 0, "returned": 0,
                       "echoes_ignored": 0, "not_applied": 0, "bad_messages": 0, "synced": 0}
        link.add_script("eject", PUBLISH_SCRIPT)
        link.add_script("sync", SYNC_SCRIPT)
        link.subscribe(self.channel, self.on_message)
        link.on_up.append(self.on_up)

    def key(self, pool: str, address: str) -> str:
        return f"{self.prefix}ej:{pool}:{address}"

    # -- detectors ------------------------------------------------------------------

    def attach(self, detector: Any) -> None:
        """Share ``detector``'s decisions (a pool's health started)."""
        name = detector.pool.name
        old = self.detectors.get(name)
        if old is not None:
            self.detach(old[0])

        def observer(backend: Any, event: str, until: float | None, reason: str) -> None:
            self.local_event(name, backend.address, event, until, reason)

        self.detectors[name] = (detector, observer)
        detector.observe_ejections(observer)

    def detach(self, detector: Any) -> None:
        """Stop sharing ``detector`` (its pool's health stopped)."""
        name = detector.pool.name
        got = self.detectors.get(name)
        if got is not None and got[0] is detector:
            del self.detectors[name]
            detector.unobserve_ejections(got[1])

    # -- out ------------------------------------------------------------------------

    def local_event(self, pool: str, address: str, event: str, until: float | None, reason: str) -> None:
        """This instance's detector ejected (or returned) a backend."""
        now = self.clock.seconds()
        if event == "ejected" and until is not None:
            self._mine[(pool, address)] = (until, reason)
        else:
            self._mine.pop((pool, address), None)
        self._publish(pool, address, event, until, reason, now)

    def _publish(self, pool: str, address: str, event: str, until: float | None, reason: str, now: float) -> None:
        if not self.link.up:
            return  # published when Redis is back (on_up), if still running
        ttl = max(1, int(((until or now) - now) * 1000)) if event == "ejected" else 0
        msg = {"origin": self.origin, "pool": pool, "backend": address, "event": event, "reason": reason}
        if event == "ejected":
            msg["ttl_ms"] = ttl
        data = json.dumps(msg, separators=(",", ":"))
        d = self.link.evalsha("eject", [self.key(pool, address)], [self.channel, data, event, ttl, self.origin])

        def done(reply: Any) -> None:
            if type(reply) is not int:
                self.link.failed("garbage", f"ejection script answered {str(reply)[:60]}")
                self.counts["publish_failed"] += 1
            else:
                self.counts["published"] += 1

        def failed(f: Any) -> None:
            self.counts["publish_failed"] += 1

        d.addCallbacks(done, failed)

    def on_up(self) -> Any:
        """Redis (back) up: publish our running ejections, learn the fleet's."""
        now = self.clock.seconds()
        for (pool, address), (until, reason) in list(self._mine.items()):
            if until > now:
                self._publish(pool, address, "ejected", until, reason, now)
            else:
                del self._mine[(pool, address)]
        d = self.link.evalsha("sync", [], [f"{self.prefix}ej:*"])

        def got(reply: Any) -> None:
            if not isinstance(reply, list) or len(reply) % 2:
                self.link.failed("garbage", f"ejection sync answered {str(reply)[:60]}")
                return
            for i in range(0, len(reply), 2):
                data, ttl = reply[i], reply[i + 1]
                if not isinstance(data, bytes) or type(ttl) is not int:
                    self.link.failed("garbage", "ejection sync answered a wrong pair")
                    return
                self.counts["synced"] += 1
                self._receive(data, ttl_ms=ttl)

        return d.addCallback(got)

    # -- in -------------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        self._receive(data)

    def _receive(self, data: bytes, ttl_ms: int | None = None) -> None:
        self.counts["received"] += 1
        try:
            m = parse_message(data)
        except ValueError as e:
            self.counts["bad_messages"] += 1
            log.debug("fleet: ignored a message on {channel}: {why}", channel=self.channel, why=str(e))
            return
        if m["origin"] == self.origin:
            self.counts["echoes_ignored"] += 1
            return
        got = self.detectors.get(m["pool"])
        if got is None:
            self.counts["not_applied"] += 1
            return
        det = got[0]
        now = self.clock.seconds()
        if m["event"] == "ejected":
            ttl = m["ttl_ms"] if ttl_ms is None else ttl_ms
            if det.apply_remote_ejection(m["backend"], now + ttl / 1000.0, m["reason"], m["origin"], now):
                self.counts["applied"] += 1
            else:
                self.counts["not_applied"] += 1
        elif det.end_remote_ejection(m["backend"], "returned by the fleet", now):
            self.counts["returned"] += 1
        else:
            self.counts["not_applied"] += 1

    def status(self) -> dict[str, Any]:
        return {"origin": self.origin, "channel": self.channel, "running_here": len(self._mine),
                **{f"{k}_total": v for k, v in self.counts.items()}}
