"""The ``lbtwist`` command: ``run`` (twistd in the foreground), ``check``
(validate and review a config), ``status`` (can this instance serve? the HA
pair's track script, docs/ha.md) and ``drill`` (chaos drills)."""
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


def _status(args: argparse.Namespace) -> int:
    from lbtwist.status import run

    return run(args.config, check_only=args.check, timeout=args.timeout, cache=args.cache)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="lbtwist", description="lbtwist load balancer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the balancer in the foreground (twistd -n lbtwist)")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--pidfile", default="")
    p.set_defaults(func=_run)
    p = sub.add_parser("check", help="validate a config and review it against the operational checklist; exit 0 clean, 1 warnings, 2 errors")
    p.add_argument("config")
    p.set_defaults(func=_check)
    from lbtwist.status import DEFAULT_TIMEOUT

    p = sub.add_parser("status", help="is this instance serving? admin API answers, a listener accepts, a pool has a "
                                      "backend in rotation; exit 0 yes, 1 no, 2 cannot tell (docs/ha.md)")
    p.add_argument("--config", "-c", required=True, help="the instance's config file (admin bind, listeners)")
    p.add_argument("--check", action="store_true",
                   help="print nothing when serving, the reason on stderr when not (keepalived's track script)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds for the whole check (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--cache", default=None, metavar="FILE",
                   help="keep what the config says to probe in FILE, re-read when the config file changes "
                        "(a third of the CPU per run; not used when the admin has a token)")
    p.set_defaults(func=_status)
    p = sub.add_parser("drill", help="run a chaos drill against a real balancer and grade it (docs/drills.md)")
    if argv[:1] == ["drill"]:
        # the drill's options import its modules (Twisted and all): only when
        # asked for, so `lbtwist status --check`, run every second, stays light
        from lbtwist.drill.cli import add_arguments as _drill_arguments, run as _drill

        _drill_arguments(p)
        p.set_defaults(func=_drill)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
