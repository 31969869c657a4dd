"""The ``lbtwist`` command: ``run`` (twistd in the foreground), ``check``
(validate and review a config) and ``drill`` (chaos drills)."""
from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    argv = ["twistd", "-n", f"--pidfile={args.pidfile}", "lbtwist"]
    if args.config:
        argv += ["--config", args.config]
    sys.argv = argv
    run()
    return 0


def _check(args: argparse.Namespace) -> int:
    """Validate as twistd would, then review against the operational checklist."""
    from lbtwist.check import run

    return run(args.config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbtwist", description="lbtwist load balancer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the balancer in the foreground (twistd -n lbtwist)")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--pidfile", default="")
    p.set_defaults(func=_run)
    p = sub.add_parser("check", help="validate a config and review it against the operational checklist; exit 0 clean, 1 warnings, 2 errors")
    p.add_argument("config")
    p.set_defaults(func=_check)
    p = sub.add_parser("drill", help="run a chaos drill against a real balancer and grade it (docs/drills.md)")
    from lbtwist.drill.cli import add_arguments as _drill_arguments, run as _drill

    _drill_arguments(p)
    p.set_defaults(func=_drill)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
