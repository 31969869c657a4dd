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


@pytest.mark.slow
@pytest.mark.integration
def test_command_line_run_writes_the_report_and_exits_with_the_verdict(tmp_path):
    """6 s of load ends before the gray failure's onset (10 s): the p99
    recovery cannot be judged, so the drill must fail, not pass by default."""
    out = tmp_path / "rep"
    proc = subprocess.run(
        [sys.executable, "-m", "lbtwist.drill", "gray-failure", "--short", "--duration", "6", "--rate", "100",
         "--quiet", "--out", str(out)],
        cwd=tmp_path, env=source_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "verdict: FAIL" in proc.stdout
    data = json.loads((out / "result.json").read_text())
    run = data["runs"][0]
    assert run["target"] == "lbtwist" and run["error"] is None and not run["passed"]
    assert 400 < run["totals"]["offered"] < 800
    assert (out / "report.html").read_text().count("<img") == 7
    assert (out / "overview.png").read_bytes().startswith(b"\x89PNG")
