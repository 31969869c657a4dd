"""``lbtwist drill balancer-failover``: the grading on made-up records, the
shipped keepalived example in step with what the drill runs, the refusal to
run without root/ip netns/keepalived, and (slow) the real drill."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from support.procs import BIN, REPO

from lbtwist.drill import failover
from lbtwist.drill import netns
from lbtwist.drill.failover import Case, Req, grade_case

ADDR = {"a": "10.77.0.11", "b": "10.77.0.12"}
EXAMPLE = REPO / "etc" / "keepalived" / "keepalived.conf.example"


def _reqs(start: float, end: float, rate: float, outcome_via):
    """One request every 1/rate s in [start, end); outcome_via(t) -> (outcome, via, latency)."""
    out = []
    t = start
    while t < end:
        outcome, via, lat = outcome_via(t)
        out.append(Req(t, t, t + lat, outcome, via))
        t += 1.0 / rate
    return out


def _case(**kw) -> Case:
    c = Case("kill", "a", "b", start=0.0, fault_at=5.0, taken_over_at=6.0, returned_at=10.0, backup_at=12.0, end=15.0)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _polls(holder_after_fault: str = "b", flap_at: float | None = None):
    polls = []
    t = 0.0
    while t < 15.0:
        h = ["a"] if t < 6.0 else [holder_after_fault]
        if flap_at is not None and flap_at <= t < flap_at + 0.5:
            h = ["a"]
        polls.append((t, h))
        t += 0.2
    return polls


def _clean(t: float):
    if t < 5.0:
        return ("200", ADDR["a"], 0.004) if t < 4.999 else ("200", ADDR["a"], 0.010)
    if t < 6.2:
        return ("refused", "", 0.001)
    return ("200", ADDR["b"], 0.004)


def test_a_clean_failover_passes_with_its_figures():
    reqs = _reqs(0.0, 15.0, 100, _clean)
    reqs.append(Req(4.995, 4.995, 5.5, "timeout", ""))  # in flight on a at the fault
    g = grade_case(_case(), reqs, _polls(), ADDR)
    assert g["passed"], g["criteria"]
    assert g["failover_seconds"] == pytest.approx(1.2, abs=0.011)
    assert g["in_flight_at_fault"] >= 1
    assert g["failed_requests"] == g["sent_during_gap"] + 1
    assert g["offered_rate"] == pytest.approx(100, rel=0.02)
    assert set(g) >= {"fault", "failover_seconds", "failed_requests", "in_flight_at_fault", "offered_rate", "requests"}


def test_slow_failover_fails():
    def slow(t):
        if 5.0 <= t < 8.5:
            return ("refused", "", 0.001)
        return _clean(t) if t < 5.0 else ("200", ADDR["b"], 0.004)

    g = grade_case(_case(), _reqs(0.0, 15.0, 100, slow), _polls(), ADDR)
    assert not g["criteria"][0]["passed"]
    assert g["failover_seconds"] == pytest.approx(3.5, abs=0.011)


def test_failures_after_recovery_or_before_the_fault_fail():
    def late(t):
        if 9.0 <= t < 9.05:
            return ("timeout", "", 1.0)
        if 2.0 <= t < 2.02:
            return ("502", ADDR["a"], 0.01)
        return _clean(t)

    g = grade_case(_case(), _reqs(0.0, 15.0, 100, late), _polls(), ADDR)
    crit = g["criteria"][1]
    assert not crit["passed"]
    assert g["failed_after_recovery"] == 5 and g["failed_before_fault"] == 2
    assert "after the VIP served again" in crit["measured"]


def test_a_flap_when_the_old_node_returns_fails():
    g = grade_case(_case(), _reqs(0.0, 15.0, 100, _clean), _polls(flap_at=11.0), ADDR)
    assert not g["criteria"][2]["passed"]
    assert "VIP elsewhere" in g["criteria"][2]["measured"]
    # served through the old node again after recovery: also a flap
    def back_to_a(t):
        return ("200", ADDR["a"], 0.004) if 11.0 <= t < 11.5 else _clean(t)

    g = grade_case(_case(), _reqs(0.0, 15.0, 100, back_to_a), _polls(), ADDR)
    assert not g["criteria"][2]["passed"]
    assert "served through the old node" in g["criteria"][2]["measured"]
    # the old node never reported BACKUP
    g = grade_case(_case(backup_at=None), _reqs(0.0, 15.0, 100, _clean), _polls(), ADDR)
    assert not g["criteria"][2]["passed"]


def test_never_recovering_fails_every_criterion():
    def dead(t):
        return _clean(t) if t < 5.0 else ("refused", "", 0.001)

    g = grade_case(_case(taken_over_at=None), _reqs(0.0, 15.0, 100, dead), _polls("a"), ADDR)
    assert g["failover_seconds"] is None
    assert not g["passed"]
    assert not g["criteria"][0]["passed"] and not g["criteria"][2]["passed"]


def test_records_parse():
    r = failover.parse_record("R 100.0000 100.0010 100.0050 200 10.77.0.11")
    assert r == Req(100.0, 100.001, 100.005, "200", "10.77.0.11") and r.ok
    assert not failover.parse_record("R 1 2 3 refused -").ok
    assert failover.parse_record("client ready") is None


def _example_settings(text: str) -> dict[str, str]:
    text = re.sub(r"#.*", "", text)
    out = {}
    for key in ("interval", "timeout", "fall", "rise", "advert_int", "state"):
        m = re.search(rf"^\s*{key}\s+(\S+)", text, re.M)
        out[key] = m.group(1) if m else None
    out["priorities"] = re.findall(r"^\s*priority\s+(\d+)", text, re.M)
    out["nopreempt"] = bool(re.search(r"^\s*nopreempt\s*$", text, re.M))
    out["security"] = bool(re.search(r"^\s*enable_script_security\s*$", text, re.M))
    out["script"] = re.search(r'^\s*script\s+"([^"]+)"', text, re.M).group(1)
    return out


def test_the_example_and_the_drill_use_the_same_settings():
    ex = _example_settings(EXAMPLE.read_text())
    drill = _example_settings(failover.keepalived_config(
        priority=failover.PRIORITIES["a"], src="10.77.0.11", peer="10.77.0.12", vip="10.77.0.100", prefixlen=24,
        check=failover.check_command(Path("/x/lbtwist.yaml"))))
    for key in ("interval", "timeout", "fall", "rise", "advert_int", "state", "nopreempt", "security"):
        assert ex[key] == drill[key], key
    assert ex["state"] == "BACKUP" and ex["nopreempt"]
    assert ex["priorities"] == [str(failover.PRIORITIES["a"])]
    assert f"# B: {failover.PRIORITIES['b']}" in EXAMPLE.read_text()
    for flag in (f"--timeout {failover.STATUS_TIMEOUT:g}", "--cache", f"nice -n {failover.CHECK_NICE}", "status --check"):
        assert flag in ex["script"] and flag in drill["script"], flag


def test_the_example_parses_with_keepalived(tmp_path):
    """keepalived -t accepts the example (its script path aside)."""
    if netns.missing_requirements():
        pytest.skip("keepalived or root missing (the drill's exit-2 path is tested below)")
    conf = tmp_path / "k.conf"
    conf.write_text(EXAMPLE.read_text().replace("/usr/local/bin/lbtwist", str(BIN / "python")))
    r = subprocess.run(["keepalived", "-t", "-f", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _args(**kw) -> argparse.Namespace:
    base = dict(short=True, duration=None, rate=None, out=None, quiet=True, verbose=False, seed=1,
                compare=[], target="lbtwist", scenario=failover.NAME)
    base.update(kw)
    return argparse.Namespace(**base)


def _run_coro(coro):
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    raise AssertionError("the drill went on past its checks")


def test_exit_2_without_root_ip_netns_or_keepalived(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(failover, "missing_requirements",
                        lambda: ["it must run as root (network namespaces, keepalived)", "'keepalived' is not installed"])
    assert _run_coro(failover.drill(None, _args(out=str(tmp_path / "r")))) == 2
    err = capsys.readouterr().err
    assert "cannot run here" in err and "root" in err and "keepalived" in err
    assert not (tmp_path / "r").exists()


def test_missing_requirements_names_each(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns.shutil, "which", lambda t: None)
    got = netns.missing_requirements()
    assert any("root" in m for m in got) and any("'keepalived'" in m for m in got) and any("'ip'" in m for m in got)


def test_duration_below_the_phases_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(failover, "missing_requirements", lambda: [])
    assert _run_coro(failover.drill(None, _args(duration=3))) == 2
    assert "minimum is" in capsys.readouterr().err
    assert failover.timeline(True, None) == failover.SHORT
    w, h, s = failover.timeline(False, 60)
    assert h >= failover.FAILOVER_LIMIT + 1 and w + h + s >= 60


def test_compare_is_refused():
    from lbtwist.drill.cli import main

    assert main([failover.NAME, "--compare", "haproxy"]) == 2


@pytest.mark.slow
def test_drill_runs_and_grades(tmp_path):
    """The real drill, short: two faults, each graded, the lab gone after."""
    if netns.missing_requirements():
        pytest.skip("needs root, ip netns and keepalived")
    out = tmp_path / "report"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([str(BIN / "python"), "-m", "lbtwist.cli", "drill", failover.NAME, "--short", "--rate", "50",
                        "--out", str(out), "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["error"] is None, res["error"]
    assert [c["fault"] for c in res["cases"]] == ["kill", "freeze"]
    for c in res["cases"]:
        for key in ("failover_seconds", "failed_requests", "in_flight_at_fault", "offered_rate", "requests"):
            assert key in c, key
        assert c["requests"] > 100
        crit = {k["name"]: k for k in c["criteria"]}
        assert crit[f"the VIP serves again within {failover.FAILOVER_LIMIT:g} s"]["passed"], (c["fault"], crit)
        assert c["failover_seconds"] <= failover.FAILOVER_LIMIT
        # every failure is one in flight at the fault or sent in the gap
        assert c["failed_requests"] <= c["in_flight_at_fault"] + c["sent_during_gap"] + c["failed_after_recovery"]
        assert crit["no flap when the old node returns"]["passed"], (c["fault"], crit)
    assert (out / "report.html").exists() and (out / "case-kill.png").exists() and (out / "case-freeze.png").exists()
    assert not [n for n in netns.existing() if any(n == x for x in res["lab"]["namespaces"])]
    assert r.returncode == (0 if res["passed"] else 1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_drill_leaves_nothing(tmp_path, sig):
    """Ctrl-C (or SIGTERM) in the middle of a case: the processes and the
    namespaces are gone."""
    if netns.missing_requirements():
        pytest.skip("needs root, ip netns and keepalived")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.Popen([str(BIN / "python"), "-m", "lbtwist.cli", "drill", failover.NAME, "--short",
                          "--out", str(tmp_path / "r")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tag = None
    try:
        for line in p.stdout:  # bounded by the drill's own start-up deadlines
            m = re.search(r"namespaces (lbtw-\d+-[0-9a-f]+)-", line)
            if m:
                tag = m.group(1)
            if ">> kill" in line:
                break
        assert tag, "the drill never built its lab"
        p.send_signal(sig)
        p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    assert not [n for n in netns.existing() if n.startswith(tag + "-")]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "r") not in ps
