"""Fleet state shared through Redis: fleet-scope rate limits and passive
ejections published to the other instances (docs/ha.md, "Fleet state").

One concern per module: L{settings} (the ``fleet:`` block, parsed once for
the validator and the runtime), L{resp} (the wire protocol), L{link}
(connections, timeouts and the up/down state machine), L{ratelimit}
(leased GCRA tokens), L{ejections} (publish/apply ejections) and L{service}
(wiring into a runtime, admin API and /metrics)."""
