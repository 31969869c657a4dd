# -*- test-case-name: tests.test_drill_cli -*-
"""``lbtwist drill SCENARIO [--compare naive|haproxy|naive,haproxy] [--duration S] [--out DIR]``

Runs the scenario against lbtwist (defaults), then, with ``--compare``,
against the comparison target on fresh processes; shows progress while
running; writes ``result.json``, ``report.html`` and PNG charts to ``--out``;
exits 0 when every criterion passed for lbtwist, 1 when one failed, 2 when
the drill itself could not run (a ``--duration`` shorter than the
scenario's phases is refused with 2 before anything starts).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lbtwist.drill.scenarios import SCENARIOS, Plan, plan_for

#: The HA pair drill (lbtwist.drill.failover): its own lab, not a Plan.
FAILOVER = "balancer-failover"

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", choices=[*SCENARIOS, "all", FAILOVER],
                   help=f"which drill ('all' runs every one but {FAILOVER}, which needs root and keepalived)")
    p.add_argument("--compare", type=_compare, default=[],
                   help="also run the scenario against naive, haproxy or both (naive,haproxy), side by side in the report")
    p.add_argument("--target", choices=("lbtwist", "naive", "haproxy"), default="lbtwist",
                   help="the target graded by the exit status (default: lbtwist with its defaults)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load (default: the scenario's)")
    p.add_argument("--rate", type=float, default=None, help="requests per second offered (default: the scenario's)")
    p.add_argument("--short", action="store_true", help="the short variant the test suite runs")
    p.add_argument("--out", default=None, help="report directory (default: drill-reports/SCENARIO-TIME)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet", "-q", action="store_true", help="no per-second progress")
    p.add_argument("--verbose", "-v", action="store_true", help="echo the balancer's and backends' output")


def _compare(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip() and k.strip() != "none"]
    bad = [k for k in kinds if k not in ("naive", "haproxy", "lbtwist")]
    if bad:
        raise argparse.ArgumentTypeError(f"--compare takes naive, haproxy or both, not {', '.join(bad)}")
    return kinds


def plans_for(args: argparse.Namespace) -> list[Plan]:
    """Every plan the command asks for, built (and so checked) before anything
    starts: a ``--duration`` shorter than a scenario's phases raises
    ValueError naming the minimum."""
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    plans, problems = [], []
    for name in names:
        try:
            plans.append(plan_for(name, short=args.short, duration=args.duration, rate=args.rate))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return plans


def run(args: argparse.Namespace) -> int:
    """Entry point for ``lbtwist drill`` (argparse namespace from L{add_arguments})."""
    from twisted.internet import defer, task

    if args.scenario == FAILOVER:
        if args.compare or args.target != "lbtwist":
            print(f"lbtwist drill {FAILOVER}: --compare and --target do not apply (it drills an lbtwist pair)",
                  file=sys.stderr)
            return EXIT_ERROR
        return _react(lambda reactor: _failover(reactor, args))
    try:
        plans = plans_for(args)
    except ValueError as e:
        print(f"lbtwist drill: {e}", file=sys.stderr)
        return EXIT_ERROR
    rc: list[int] = []

    async def main(reactor: Any) -> None:
        rc.append(await drill(reactor, args, plans))

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_ERROR
    return rc[0] if rc else EXIT_ERROR


async def drill(reactor: Any, args: argparse.Namespace, plans: list[Plan] | None = None) -> int:
    from lbtwist.drill.report import summary_text, write_report
    from lbtwist.drill.runner import run_target

    if plans is None:
        plans = plans_for(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(args.out) if args.out else Path("drill-reports") / f"{args.scenario}-{stamp}"

    def progress(line: str) -> None:
        if not args.quiet or ">>" in line or "error" in line or "FAILED" in line:
            print(line, flush=True)

    def echo(who: str, line: str) -> None:
        if args.verbose:
            print(f"    {who}| {line}", flush=True)

    worst = EXIT_PASS
    for plan in plans:
        out = base / plan.name if len(plans) > 1 else base
        out.mkdir(parents=True, exist_ok=True)
        print(f"== drill {plan.name}: {plan.title}", flush=True)
        results = []
        kinds = [args.target] + [k for k in dict.fromkeys(args.compare) if k != args.target]
        for kind in kinds:
            r = await run_target(reactor, plan, kind, out / f"work-{kind}", progress=progress, seed=args.seed, echo=echo)
            results.append(r)
        (out / "result.json").write_text(json.dumps(
            {"scenario": plan.name, "title": plan.title, "story": plan.story, "short": args.short,
             "duration": args.duration, "rate": args.rate,
             "runs": [r.as_json() for r in results]}, indent=1, default=str))
        try:
            write_report(plan, results, out)
        except Exception as e:  # a report problem must not hide the verdict
            print(f"report failed: {e.__class__.__name__}: {e}", file=sys.stderr)
        print(summary_text(plan, results), flush=True)
        print(f"report: {out / 'report.html'}", flush=True)
        main = results[0]
        code = EXIT_ERROR if main.error else (EXIT_PASS if main.passed else EXIT_FAIL)
        worst = max(worst, code)
    return worst


async def _failover(reactor: Any, args: argparse.Namespace) -> int:
    from lbtwist.drill.failover import drill as failover_drill

    return await failover_drill(reactor, args)


def _react(fn: Any) -> int:
    from twisted.internet import defer, task

    rc: list[int] = []

    async def main(reactor: Any) -> None:
        rc.append(await fn(reactor))

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return rc[0] if rc else EXIT_ERROR
    return rc[0] if rc else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lbtwist drill", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))
