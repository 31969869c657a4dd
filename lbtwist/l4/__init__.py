"""L4 relays: ``tcp`` (connection relay with backpressure, half-close,
failover, PROXY protocol), ``udp`` (per-client flows), their sans-IO parts
``failover``, ``flows`` and ``proxy_protocol``, and ``python -m lbtwist.l4``,
a standalone relay process for benchmarks."""
