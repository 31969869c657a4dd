"""A standalone HTTP reverse proxy process: ``python -m lbtwist.l7 --backend ...``.

For benchmarks and process-level tests (memory under load) that need the L7
proxy alone, without a config file and the whole service tree. Prints
``LISTENING <port>`` once bound, then runs until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lbtwist.l7", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="tcp:0:interface=127.0.0.1", help="endpoint description")
    p.add_argument("--backend", action="append", required=True, help="host:port (repeatable)")
    p.add_argument("--algorithm", default="round_robin")
    p.add_argument("--max-connections", type=int, default=10000)
    p.add_argument("--max-per-backend", type=int, default=256, help="backend connection cap")
    p.add_argument("--max-body-size", type=int, default=1 << 30, help="0: unlimited")
    p.add_argument("--body-timeout", type=float, default=60.0)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--no-eager", action="store_true", help="disable the eager-write lever")
    p.add_argument("--http2", action="store_true", help="also accept HTTP/2 with prior knowledge (h2c)")
    p.add_argument("--lean-reactor", action="store_true", help="use fastio's lean epoll reactor")
    p.add_argument("--no-batch", action="store_true",
                   help="lean reactor: send each write at once instead of at the end of the poll pass")
    return p.parse_args(argv)


def _main(reactor: Any, args: argparse.Namespace) -> Any:
    from lbtwist.config.model import BackendConfig, ConnectionPoolConfig, HttpConfig, ListenerConfig, PoolConfig
    from lbtwist.registry import Registry
    from lbtwist.service import serve_one_listener

    pcfg = PoolConfig(name="bench", algorithm=args.algorithm, drain_timeout=1.0,
                      backends=[BackendConfig(address=a) for a in args.backend],
                      connection_pool=ConnectionPoolConfig(max_per_backend=args.max_per_backend))
    lcfg = ListenerConfig(
        name="http", bind=args.listen, mode="http", pool="bench", max_connections=args.max_connections,
        http2=args.http2,
        http=HttpConfig(max_body_size=args.max_body_size, body_timeout=args.body_timeout,
                        request_timeout=args.request_timeout),
    )
    svc, forever = serve_one_listener(reactor, lcfg, pcfg, Registry.default(entry_points=False))
    if args.no_eager:
        svc.proxy.eager = False
        svc.proxy.connection_pools.eager = False
    return forever


def main(argv: list[str] | None = None) -> None:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.lean_reactor:
        from lbtwist import fastio

        if fastio.install_supported_reactor() and args.no_batch:
            fastio.BATCH_MAX = 0
    from twisted.internet import task

    task.react(_main, (args,))


if __name__ == "__main__":
    main()
