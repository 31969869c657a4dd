"""A standalone L4 relay process: ``python -m lbtwist.l4 --listen ... --backend ...``.

For benchmarks and process-level tests (memory under load) that need the relay
alone, without the config file and the whole service tree. Prints
``LISTENING <port>`` once bound, then runs until SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lbtwist.l4", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--listen", default="tcp:0:interface=127.0.0.1", help="endpoint description (udp:PORT:interface=ADDR for udp)")
    p.add_argument("--backend", action="append", required=True, help="host:port (repeatable)")
    p.add_argument("--algorithm", default="round_robin")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--connect-attempts", type=int, default=3)
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--max-connections", type=int, default=10000)
    p.add_argument("--proxy-accept", action="store_true")
    p.add_argument("--proxy-send", choices=("none", "v1", "v2"), default="none")
    p.add_argument("--no-eager", action="store_true", help="disable the eager-write lever")
    p.add_argument("--read-size", type=int, default=None, help="bytes per read (default: fastio.L4_READ_SIZE; 0 = Twisted's 64 KiB)")
    p.add_argument("--lean-reactor", action="store_true", help="use fastio's lean epoll reactor")
    p.add_argument("--log", action="store_true", help="write the relay's log (connect failures, closes) to stderr")
    return p.parse_args(argv)


def _main(reactor: Any, args: argparse.Namespace) -> Any:
    from lbtwist.config.model import BackendConfig, ListenerConfig, PoolConfig, ProxyProtocolConfig
    from lbtwist.registry import Registry
    from lbtwist.service import serve_one_listener

    pcfg = PoolConfig(
        name="bench",
        algorithm=args.algorithm,
        backends=[BackendConfig(address=a) for a in args.backend],
        connect_timeout=args.connect_timeout,
        connect_attempts=args.connect_attempts,
        drain_timeout=1.0,
    )
    lcfg = ListenerConfig(
        name="relay",
        bind=args.listen,
        mode=args.mode,
        pool="bench",
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        proxy_protocol=ProxyProtocolConfig(accept=args.proxy_accept, send=args.proxy_send),
    )
    svc, forever = serve_one_listener(reactor, lcfg, pcfg, Registry.default(entry_points=False))
    if args.mode == "tcp":
        # levers apply to connections accepted from now on
        if args.no_eager:
            svc.relay.eager = False
        if args.read_size is not None:
            svc.relay.read_size = args.read_size or None
    return forever


def main(argv: list[str] | None = None) -> None:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.log:
        from twisted.logger import globalLogBeginner, textFileLogObserver

        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    if args.lean_reactor:
        from lbtwist.fastio import install_supported_reactor

        install_supported_reactor()
    from twisted.internet import task

    task.react(_main, (args,))


if __name__ == "__main__":
    main()
