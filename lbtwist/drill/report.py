# -*- test-case-name: tests.test_drill_report -*-
"""The drill's report: PNG charts (matplotlib, Agg) with the target and the
comparison side by side and the fault window shaded, a summary table, and a
verdict per criterion, in one static HTML page."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from lbtwist.drill.runner import RunResult
    from lbtwist.drill.scenarios import Plan

#: Chart files written per scenario, in page order ("overview" stacks the
#: main ones into one picture, the one docs/drills.md shows).
CHARTS = ("overview", "success", "latency", "load", "retries", "share", "rotation")

_TITLES = {
    "lbtwist": "lbtwist (defaults)",
    "naive": "lbtwist, naive config",
    "haproxy": "HAProxy (equivalent config)",
}


def _title(kind: str) -> str:
    return _TITLES.get(kind, kind)


def _none_to_nan(xs: Sequence[Any]) -> list[float]:
    return [math.nan if x is None else float(x) for x in xs]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: A second in which the drill's own schedule ran this late: the box starved
#: every process, so what the target did then says little about the target.
STARVED = 0.100


def starved_seconds(r: "RunResult") -> list[int]:
    return [i for i, lag in enumerate(r.series.get("lag", [])) if lag is not None and lag > STARVED]


def _decorate(ax: Any, r: "RunResult", ylabel: str | None) -> None:
    a, b = r.window
    ax.axvspan(a, b, color="#f59e0b", alpha=0.13, lw=0, label="_fault window")
    for i in starved_seconds(r):
        ax.axvspan(i, i + 1, facecolor="none", edgecolor="#64748b", hatch="////", lw=0, alpha=0.6)
    for ev in r.events:
        ax.axvline(ev["t"], color="#92400e", lw=0.7, ls=":", alpha=0.8)
    ax.set_xlim(0, r.duration)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("seconds")
    if ylabel:
        ax.set_ylabel(ylabel)


def _figure(results: Sequence["RunResult"], title: str, draw: Callable[[Any, "RunResult"], None],
            ylabel: str, path: Path, *, sharey: bool = True, legend: bool = True) -> None:
    plt = _plt()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, 3.6), squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[0], results)):
        if r.series.get("t"):
            draw(ax, r)
        else:
            ax.text(0.5, 0.5, f"no data: {r.error or 'run failed'}", ha="center", va="center",
                    transform=ax.transAxes, wrap=True, fontsize=9)
        _decorate(ax, r, ylabel if i == 0 else None)
        verdict = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        ax.set_title(f"{_title(r.target)}: {verdict}", fontsize=11,
                     color="#166534" if r.passed else "#991b1b")
        if legend and i == n - 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if sharey and n > 1:
        lims = [ax.get_ylim() for ax in axes[0]]
        for ax in axes[0]:
            ax.set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
    import textwrap

    fig.suptitle(textwrap.fill(title, width=int(75 * n)), fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _success(ax: Any, r: "RunResult") -> None:
    s = r.series
    ax.plot(s["t"], _none_to_nan(s["success_rate"]), color="#16a34a", lw=1.6, label="success %")
    ax.axhline(99.5, color="#64748b", lw=0.8, ls="--", label="99.5%")
    vals = [v for v in s["success_rate"] if v is not None]
    low = min(vals) if vals else 0.0
    ax.set_ylim(max(0.0, min(low, 99.0) - 2), 100.5)


def _latency(ax: Any, r: "RunResult") -> None:
    s = r.series
    ax.plot(s["t"], [x * 1000 if x == x else x for x in _none_to_nan(s["p50"])], color="#2563eb", lw=1.2, label="p50")
    ax.plot(s["t"], [x * 1000 if x == x else x for x in _none_to_nan(s["p99"])], color="#dc2626", lw=1.6, label="p99")
    ax.plot(s["t"], [x * 1000 if x == x else x for x in _none_to_nan(s["p999"])], color="#7c3aed", lw=1.0, alpha=0.7, label="p99.9")
    ax.axhline(1000, color="#64748b", lw=0.8, ls="--", label="client timeout 1 s")
    ax.set_yscale("log")
    ax.set_ylim(0.5, 5000)


def _load(ax: Any, r: "RunResult") -> None:
    s = r.series
    ax.plot(s["t"], s["offered"], color="#0f172a", lw=1.4, label="offered (new requests)")
    ax.plot(s["t"], s["goodput"], color="#16a34a", lw=1.4, label="served OK")
    ax.plot(s["t"], s["attempts"], color="#f97316", lw=1.0, ls="--", label="client tries")
    ax.plot(s["t"], _none_to_nan(s["backend_attempts"]), color="#dc2626", lw=1.0, alpha=0.8, label="attempts seen by backends")
    ax.set_ylim(bottom=0)


def _retries(ax: Any, r: "RunResult") -> None:
    s = r.series
    ax.bar(s["t"], s["retries"], width=1.0, color="#f97316", alpha=0.8, label="client retries")
    ax.plot(s["t"], s["failed"], color="#991b1b", lw=1.4, label="failed requests (after retries)")
    ax.set_ylim(bottom=0)


def _share(ax: Any, r: "RunResult", focus: Sequence[str] = ()) -> None:
    s = r.series
    names = s.get("backends", [])
    if not names:
        return
    ordered = [n for n in names if n not in focus] + [n for n in names if n in focus]
    ys = [_none_to_nan(s["share"][n]) for n in ordered]
    others = ["#93c5fd", "#cbd5e1"]
    hot = ["#dc2626", "#f97316", "#a21caf", "#ca8a04"]
    colors, labels = [], []
    k = 0
    for n in ordered:
        if n in focus:
            colors.append(hot[len([c for c in colors if c in hot]) % len(hot)])
            labels.append(n)
        else:
            colors.append(others[k % 2])
            labels.append("other backends" if k == 0 else "_" + n)
            k += 1
    ax.stackplot(s["t"], ys, labels=labels, colors=colors, alpha=0.95, lw=0.3, edgecolor="white")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower left", framealpha=0.8)


def _rotation(ax: Any, r: "RunResult") -> None:
    s = r.series
    ax.step(s["t"], _none_to_nan(s["healthy"]), where="post", color="#16a34a", lw=1.6, label="in rotation")
    ax.step(s["t"], _none_to_nan(s["out_of_rotation"]), where="post", color="#dc2626", lw=1.2, label="out (unhealthy, ejected, draining...)")
    n = max((len(st) for st in s["lb_states"] if st), default=1)
    ax.set_ylim(-0.3, n + 0.5)


def _has_workers(results: Sequence["RunResult"]) -> bool:
    return any((r.marks or {}).get("worker_series", {}).get("t") for r in results)


def _workers(ax: Any, r: "RunResult") -> None:
    """Requests per second served by each worker process (marks
    ``worker_series`` of the worker-kill drill); the kill as a red line."""
    ws = (r.marks or {}).get("worker_series") or {}
    ts = ws.get("t") or []
    victim, fresh = str(r.marks.get("victim_pid")), str(r.marks.get("replacement_pid"))
    palette = ["#2563eb", "#16a34a", "#a21caf", "#ca8a04"]
    for i, (pid, col) in enumerate(sorted((ws.get("pids") or {}).items())):
        label = f"worker {pid}" + (" (killed)" if pid == victim else " (replacement)" if pid == fresh else "")
        color = "#dc2626" if pid == victim else "#f97316" if pid == fresh else palette[i % len(palette)]
        ax.step(ts[:len(col)], _none_to_nan(col), where="post", color=color, lw=1.5, label=label)
    killed = r.marks.get("killed_at")
    if killed is not None:
        ax.axvline(killed, color="#dc2626", lw=1.0, ls=":")
    ax.set_ylim(bottom=0)


def write_overview(plan: "Plan", results: Sequence["RunResult"], path: Path) -> Path:
    """One picture per scenario: a row per metric, a column per target."""
    plt = _plt()
    rows = [
        ("client latency, incl. retries (ms, log)", _latency),
        ("client success rate (%)", _success),
        ("load per second", _load),
        ("share of backend attempts (%)" + (f": {', '.join(plan.focus)} highlighted" if plan.focus else ""),
         lambda ax, r: _share(ax, r, plan.focus)),
        ("backends in rotation", _rotation),
    ]
    if _has_workers(results):
        rows.append(("requests/s per worker process", _workers))
    n = len(results)
    fig, axes = plt.subplots(len(rows), n, figsize=(6.2 * n, 2.7 * len(rows)), squeeze=False, sharex="col")
    for j, r in enumerate(results):
        for i, (label, draw) in enumerate(rows):
            ax = axes[i][j]
            if r.series.get("t"):
                draw(ax, r)
            elif i == 0:
                ax.text(0.5, 0.5, f"no data: {r.error or 'run failed'}", ha="center", va="center",
                        transform=ax.transAxes, wrap=True, fontsize=9)
            _decorate(ax, r, label if j == 0 else None)
            if i < len(rows) - 1:
                ax.set_xlabel("")
            if j == n - 1 and i not in (3,) and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
            elif i != 3 and ax.get_legend() is not None:
                ax.get_legend().remove()
        verdict = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        axes[0][j].set_title(f"{_title(r.target)}: {verdict}", fontsize=12,
                             color="#166534" if r.passed else "#991b1b")
    for i in range(len(rows)):
        axes[i][0].yaxis.label.set_size(9)
        # the same scale across targets, wide enough for each
        lims = [axes[i][j].get_ylim() for j in range(n)]
        for j in range(n):
            axes[i][j].set_ylim(min(lo for lo, _ in lims), max(hi for _, hi in lims))
    import textwrap

    fig.suptitle(textwrap.fill(f"drill {plan.name}: {plan.title}", width=int(70 * n)), fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def write_charts(plan: "Plan", results: Sequence["RunResult"], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        ("success", f"{plan.name}: client success rate per second (by arrival)", _success, "% of requests", True),
        ("latency", f"{plan.name}: client latency incl. retries (from the scheduled arrival)", _latency, "ms (log)", True),
        ("load", f"{plan.name}: offered vs served load", _load, "per second", True),
        ("retries", f"{plan.name}: client retries and failures", _retries, "per second", True),
        ("share", f"{plan.name}: share of backend attempts per backend" + (f" ({', '.join(plan.focus)} highlighted)" if plan.focus else ""),
         lambda ax, r: _share(ax, r, plan.focus), "% of attempts", True),
        ("rotation", f"{plan.name}: backends in rotation, as the balancer reports them", _rotation, "backends", True),
    ]
    if _has_workers(results):
        specs.append(("workers", f"{plan.name}: requests per second served by each worker process", _workers,
                      "requests/s", True))
    paths = [write_overview(plan, results, out / "overview.png")]
    for name, title, draw, ylabel, sharey in specs:
        p = out / f"{name}.png"
        _figure(results, title, draw, ylabel, p, sharey=sharey, legend=name != "share")
        paths.append(p)
    return paths


def _fmt_ms(x: Any) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f} ms"


def _fmt_pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}%"


def summary_rows(results: Sequence["RunResult"]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Callable[["RunResult"], str]) -> None:
        vals = []
        for r in results:
            try:
                vals.append(fn(r))
            except Exception:
                vals.append("n/a")
        rows.append((label, vals))

    add("requests offered", lambda r: f"{r.totals['offered']}")
    add("success (whole run)", lambda r: _fmt_pct(r.totals["success_rate"]))
    add("success before / during / after the fault", lambda r: " / ".join(
        _fmt_pct(r.phases[k]["success_rate"]) for k in ("before", "fault", "after")))
    add("failed requests (after client retries)", lambda r: f"{r.totals['failed']}")
    add("client retries", lambda r: f"{r.totals['retries']}")
    add("failed tries by cause", lambda r: _failed_tries(r))
    add("p50 / p99 / p99.9 before the fault", lambda r: " / ".join(_fmt_ms(r.phases["before"][k]) for k in ("p50", "p99", "p999")))
    add("p50 / p99 / p99.9 during the fault", lambda r: " / ".join(_fmt_ms(r.phases["fault"][k]) for k in ("p50", "p99", "p999")))
    add("p50 / p99 / p99.9 after the fault", lambda r: " / ".join(_fmt_ms(r.phases["after"][k]) for k in ("p50", "p99", "p999")))
    add("peak backend attempts / offered (3 s)", lambda r: _peak_ratio(r))
    add("balancer CPU (mean)", lambda r: _mean_cpu(r, "balancer"))
    add("backends CPU (mean) / load generator CPU (mean)", lambda r: f"{_mean_cpu(r, 'backends')} / {_mean_cpu(r, 'loadgen')}")
    add("load generator max lag", lambda r: f"{r.load.get('max_lag', 0) * 1000:.0f} ms ({r.load.get('late_arrivals', 0)} late)")
    add("seconds the box starved the drill (lag > 100 ms)", lambda r: ", ".join(map(str, starved_seconds(r))) or "none")
    add("marks", lambda r: ", ".join(f"{k}={v}" for k, v in r.marks.items()) or "-")
    return rows


def _failed_tries(r: "RunResult") -> str:
    agg: dict[str, int] = {}
    for o in r.series.get("try_outcomes", []):
        for k, v in o.items():
            if not (k.isdigit() and int(k) < 400):
                agg[k] = agg.get(k, 0) + v
    return ", ".join(f"{k}: {v}" for k, v in sorted(agg.items(), key=lambda kv: -kv[1])) or "none"


def _peak_ratio(r: "RunResult") -> str:
    off, seen = r.series["offered"], r.series["backend_attempts"]
    worst = 0.0
    for i in range(0, max(0, len(off) - 2)):
        o = sum(off[i:i + 3])
        s = sum(x for x in seen[i:i + 3] if x is not None)
        if o:
            worst = max(worst, s / o)
    return f"{worst:.2f}x"


def _mean_cpu(r: "RunResult", who: str) -> str:
    vals = [v for v in r.series.get("cpu", {}).get(who, []) if v is not None]
    return f"{sum(vals) / len(vals):.0f}%" if vals else "n/a"


def summary_text(plan: "Plan", results: Sequence["RunResult"]) -> str:
    lines = [f"-- {plan.name} --"]
    heads = [_title(r.target) for r in results]
    rows = summary_rows(results)
    w0 = max(len(k) for k, _ in rows)
    widths = [max(len(h), *(len(v[i]) for _, v in rows)) for i, h in enumerate(heads)]
    lines.append(" " * w0 + "  " + "  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for k, vals in rows:
        lines.append(k.ljust(w0) + "  " + "  ".join(v.ljust(w) for v, w in zip(vals, widths)))
    for r in results:
        lines.append(f"criteria for {_title(r.target)}:")
        if r.error:
            lines.append(f"  ERROR  {r.error}")
        for c in r.criteria:
            lines.append(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['measured']} (want {c['threshold']})")
        for n in r.notes:
            if not n.startswith("Traceback"):
                lines.append(f"  note: {n}")
    lines.append(f"verdict: {'PASS' if results and results[0].passed else 'FAIL'}")
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#0f172a}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #cbd5e1;padding:4px 10px;text-align:left;font-size:14px}
th{background:#f1f5f9}.pass{color:#166534;font-weight:bold}.fail{color:#991b1b;font-weight:bold}
img{max-width:100%;border:1px solid #e2e8f0;margin:6px 0}pre{background:#f8fafc;padding:8px;font-size:12px;overflow:auto}
"""


def write_report(plan: "Plan", results: Sequence["RunResult"], out: Path) -> Path:
    """Charts plus ``report.html`` in ``out``; returns the HTML path."""
    charts = write_charts(plan, results, out)
    e = html.escape
    main = results[0]
    verdict = "PASS" if main.passed else "FAIL"
    parts = [f"<!doctype html><meta charset=utf-8><title>drill {e(plan.name)}: {verdict}</title><style>{_CSS}</style>",
             f"<h1>drill <code>{e(plan.name)}</code>: <span class={verdict.lower()}>{verdict}</span></h1>",
             f"<p><b>{e(plan.title)}.</b> {e(plan.story)}</p>",
             f"<p>Open-loop load: {plan.rate:g} requests/s (Poisson) for {plan.duration:g} s; clients time out after 1 s "
             "and retry twice at once. The shaded band is the fault window; dotted lines mark the drill's actions; "
             f"hatched seconds are seconds in which the drill's own schedule ran more than {STARVED * 1000:.0f} ms late "
             "(the box starved every process: read the target's behaviour there with care).</p>",
             "<h2>Verdict per criterion</h2><table><tr><th>criterion</th>"
             + "".join(f"<th>{e(_title(r.target))}</th>" for r in results) + "<th>threshold</th></tr>"]
    for i, c in enumerate(main.criteria):
        cells = []
        for r in results:
            rc = r.criteria[i] if i < len(r.criteria) else None
            if rc is None:
                cells.append(f"<td>{e(r.error or 'n/a')}</td>")
            else:
                cls = "pass" if rc["passed"] else "fail"
                cells.append(f"<td><span class={cls}>{'PASS' if rc['passed'] else 'FAIL'}</span> {e(rc['measured'])}</td>")
        parts.append(f"<tr><td>{e(c['name'])}</td>{''.join(cells)}<td>{e(c['threshold'])}</td></tr>")
    for r in results:
        if r.error:
            parts.append(f"<tr><td colspan={len(results) + 2}><span class=fail>ERROR</span> {e(_title(r.target))}: {e(r.error)}</td></tr>")
    parts.append("</table><h2>Summary</h2><table><tr><th></th>" + "".join(f"<th>{e(_title(r.target))}</th>" for r in results) + "</tr>")
    for k, vals in summary_rows(results):
        parts.append(f"<tr><td>{e(k)}</td>" + "".join(f"<td>{e(v)}</td>" for v in vals) + "</tr>")
    parts.append("</table><h2>Charts</h2>")
    for p in charts:
        parts.append(f'<img src="{e(p.name)}" alt="{e(p.stem)}">')
    parts.append("<h2>Timeline</h2>")
    for r in results:
        parts.append(f"<h3>{e(_title(r.target))}</h3><pre>" + e("\n".join(f"t={ev['t']:7.2f}s  {ev['label']}" for ev in r.events) or "-") + "</pre>")
        notes = [n for n in r.notes if not n.startswith("Traceback")]
        if notes:
            parts.append("<p>Notes:</p><pre>" + e("\n".join(notes)) + "</pre>")
    parts.append("<h2>Configs</h2>")
    for r in results:
        parts.append(f"<h3>{e(_title(r.target))}</h3><pre>{e(r.config)}</pre>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def rerender(directory: Path) -> Path:
    """Rewrite the charts and page of a finished drill from its result.json."""
    import json

    from lbtwist.drill.runner import RunResult
    from lbtwist.drill.scenarios import plan_for

    data = json.loads((directory / "result.json").read_text())
    plan = plan_for(data["scenario"], short=bool(data.get("short")), duration=data.get("duration"),
                    rate=data.get("rate"))
    results = []
    for run in data["runs"]:
        run = dict(run)
        run.pop("passed", None)
        run["window"] = tuple(run["window"])
        results.append(RunResult(**run))
    return write_report(plan, results, directory)


if __name__ == "__main__":
    import sys

    for d in sys.argv[1:]:
        print(rerender(Path(d)))
