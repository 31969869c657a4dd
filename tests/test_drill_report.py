"""The report: one PNG per chart with target and comparison side by side,
an HTML page with a verdict per criterion and the summary."""
from __future__ import annotations

from lbtwist.drill.report import CHARTS, summary_text, write_report
from lbtwist.drill.scenarios import evaluate, plan_for

from test_drill_scenarios import run_with


def test_report_has_every_chart_and_a_verdict_per_criterion(tmp_path):
    plan = plan_for("gray-failure", short=True)
    good = run_with(lambda s: 0.004, seconds=int(plan.duration),
                    states=lambda s: {f"b{i}": "healthy" for i in range(12)})
    bad = run_with(lambda s: 0.004 if s < 10 else 1.2, seconds=int(plan.duration), fail_at={12, 13})
    bad.target = "naive"
    for r in (good, bad):
        r.window = plan.window
        r.events = [{"t": 10.0, "label": "b3 slow"}]
        r.totals = r.recorder.totals()
        r.phases = {k: r.recorder.totals(a, b) for k, (a, b) in
                    {"before": (0, 10), "fault": (10, 35), "after": (35, 35)}.items()}
        r.criteria = evaluate(plan, r)
    assert good.passed and not bad.passed
    page = write_report(plan, [good, bad], tmp_path)
    for name in CHARTS:
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    html = page.read_text()
    assert "drill <code>gray-failure</code>: <span class=pass>PASS</span>" in html
    for c in plan.criteria:
        assert c.name.replace(">", "&gt;") in html
    assert "lbtwist, naive config" in html and html.count("class=fail>FAIL") >= 1
    text = summary_text(plan, [good, bad])
    assert "verdict: PASS" in text and "FAIL  p99 recovered" in text


def test_report_of_a_failed_run_says_why(tmp_path):
    from lbtwist.drill.runner import RunResult

    plan = plan_for("hard-kill", short=True)
    r = RunResult(scenario=plan.name, target="haproxy", duration=plan.duration, window=plan.window,
                  error="ProcessGone: haproxy is not installed")
    page = write_report(plan, [r], tmp_path)
    assert "haproxy is not installed" in page.read_text()
    assert (tmp_path / "success.png").exists()


def test_worker_kill_report_has_the_workers_chart(tmp_path):
    plan = plan_for("worker-kill", short=True)
    r = run_with(lambda s: 0.004, seconds=int(plan.duration))
    r.scenario, r.window = plan.name, plan.window
    r.marks = {"worker_series": {"t": list(range(14)), "pids": {"11": [None] + [50.0] * 4 + [None] * 9,
                                                              "12": [None] + [50.0] * 13,
                                                              "13": [None] * 6 + [None] + [48.0] * 7}},
               "victim_pid": 11, "replacement_pid": 13, "killed_at": 5.0}
    r.totals = r.recorder.totals()
    r.criteria = evaluate(plan, r)
    page = write_report(plan, [r], tmp_path)
    png = (tmp_path / "workers.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert 'src="workers.png"' in page.read_text()
