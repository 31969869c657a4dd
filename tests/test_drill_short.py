"""The short drills: every scenario against a real ``twistd lbtwist`` with
its defaults, graded by the drill's own criteria; and the naive config on
the gray failure, to prove the drill can tell the difference.

Marked slow (``make quick`` skips them; ``make test`` runs them). Every
process is started by the runner and killed in its ``finally``; ports are
ephemeral; only 127.0.0.1 is used.
"""
from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import defer

from lbtwist.drill.runner import run_target
from lbtwist.drill.scenarios import SCENARIOS, plan_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]


async def _drill(name: str, target: str, tmp_path):
    from twisted.internet import reactor

    plan = plan_for(name, short=True)
    d = defer.ensureDeferred(run_target(reactor, plan, target, tmp_path / target))
    d.addTimeout(plan.duration + 120, reactor)
    result = await d
    assert result.pids and not [p for p in result.pids if _alive(p)], "a drill process outlived the run"
    return plan, result


def _explain(result) -> str:
    lines = [f"{result.scenario} against {result.target}: error={result.error}"]
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['measured']} (want {c['threshold']})"
              for c in result.criteria]
    lines += [f"  note: {n}" for n in result.notes]
    lines.append(f"  events: {result.events}")
    lines.append("  balancer log tail:\n" + "\n".join(result.target_log.splitlines()[-25:]))
    return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest_twisted.ensureDeferred
async def test_short_drill_passes_with_lbtwist_defaults(name, tmp_path):
    plan, result = await _drill(name, "lbtwist", tmp_path)
    assert result.error is None, _explain(result)
    assert [c["name"] for c in result.criteria] == [c.name for c in plan.criteria]
    assert result.load["issued"] == result.load["scheduled"] > plan.rate * plan.duration * 0.8
    for c in result.criteria:
        assert c["passed"], _explain(result)


@pytest_twisted.ensureDeferred
async def test_naive_config_fails_the_gray_failure(tmp_path):
    """The drill is worth something only if it catches the failure: with
    round robin and active checks only, the slow backend keeps its share and
    clients' p99 goes past their 1 s timeout."""
    plan, result = await _drill("gray-failure", "naive", tmp_path)
    assert result.error is None, _explain(result)
    p99 = next(c for c in result.criteria if c["name"].startswith("p99"))
    assert not p99["passed"], _explain(result)
    assert result.phases["fault"]["p99"] > 0.9
    assert result.totals["retries"] > 0
