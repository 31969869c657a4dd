"""``lbtwist drill``: arguments, and one real run through the command line
(report files written, exit status from the verdict)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lbtwist.cli import main as lbtwist_main
from lbtwist.drill.cli import _compare
from lbtwist.drill.scenarios import SCENARIOS

from support.procs import source_env


def test_drill_is_a_subcommand_listing_every_scenario(capsys):
    with pytest.raises(SystemExit) as e:
        lbtwist_main(["drill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SCENARIOS:
        assert name in out
    assert "--compare" in out and "--duration" in out and "--out" in out


def test_compare_accepts_one_or_both_targets():
    assert _compare("naive") == ["naive"]
    assert _compare("naive,haproxy") == ["naive", "haproxy"]
    assert _compare("none") == []
    with pytest.raises(Exception):
        _compare("nginx")


def test_unknown_scenario_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        lbtwist_main(["drill", "grey-failure"])
    assert e.value.code == 2


def test_a_duration_shorter_than_the_phases_is_refused_before_anything_starts(capsys, monkeypatch):
    """The bug: ``--duration 8`` ran the gray failure, judged an empty window
    ("p99 n/a ... for arrivals t=30s..8s") and reported FAIL."""
    import lbtwist.drill.runner

    def must_not_run(*a, **k):
        raise AssertionError("the drill started")

    monkeypatch.setattr(lbtwist.drill.runner, "run_target", must_not_run)
    assert lbtwist_main(["drill", "gray-failure", "--duration", "8"]) == 2
    err = capsys.readouterr().err
    assert "gray-failure: --duration 8 is shorter than the scenario's phases; the minimum is 35 s" in err
    assert lbtwist_main(["drill", "gray-failure", "--short", "--duration", "20"]) == 2
    assert "the minimum is 25 s" in capsys.readouterr().err
    assert lbtwist_main(["drill", "all", "--duration", "40"]) == 2
    err = capsys.readouterr().err
    assert "hard-kill: --duration 40" in err and "the minimum is 70 s" in err and "retry-storm" in err
    assert "gray-failure" not in err  # 40 s is enough for that one


@pytest.mark.slow
@pytest.mark.integration
def test_command_line_run_writes_the_report_and_exits_with_the_verdict(tmp_path):
    """The shortest gray failure the drill accepts, graded on the naive
    config (round robin keeps the slow backend): the report is written and
    the exit status is the verdict."""
    out = tmp_path / "rep"
    proc = subprocess.run(
        [sys.executable, "-m", "lbtwist.drill", "gray-failure", "--short", "--duration", "25", "--rate", "100",
         "--target", "naive", "--quiet", "--out", str(out)],
        cwd=tmp_path, env=source_env(), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verdict: FAIL" in proc.stdout
    data = json.loads((out / "result.json").read_text())
    run = data["runs"][0]
    assert run["target"] == "naive" and run["error"] is None and not run["passed"]
    assert 2000 < run["totals"]["offered"] < 3000
    assert (out / "report.html").read_text().count("<img") == 7
    assert (out / "overview.png").read_bytes().startswith(b"\x89PNG")
