"""Chaos drills: real processes on loopback, a failure injected on a schedule,
what clients experience measured second by second, and a graded verdict.

Modules, one concern each:
  - L{faults}: the sans-IO model of a backend (capacity, queue, faults, counters)
  - L{backend}: Twisted HTTP/TCP servers around that model plus a control API,
    run as separate processes (``python -m lbtwist.drill.backend``)
  - L{loadgen}: the open-loop load generator with 1s timeouts and 2 retries
  - L{recorder}: per-second series of what clients and backends saw
  - L{configs}: balancer configs under test (lbtwist defaults, naive, HAProxy)
  - L{procs}: child processes that die with the drill
  - L{scenarios}: each drill's setup, fault schedule and pass criteria
  - L{runner}: runs a scenario against one target
  - L{report}: HTML page and PNG charts
  - L{cli}: ``lbtwist drill SCENARIO ...``
"""
