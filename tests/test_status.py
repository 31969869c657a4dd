"""``lbtwist status [--check]`` against a real ``twistd lbtwist`` on
127.0.0.1: serving, frozen (SIGSTOP), no backend in rotation, admin down,
no listener accepting; and the probe loop on its own against sockets in
known states (refused, accept queue full, silent)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import urllib.request

import pytest

from support.procs import BIN, REPO, Proc, free_port, twistd_cmd

from lbtwist import status
from lbtwist.config.loader import load

pytestmark = pytest.mark.integration


def _status(cfg, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([str(BIN / "python"), "-m", "lbtwist.cli", "status", "--config", str(cfg), *extra],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _config(tmp_path, web: int, admin: int, backend: int, name: str = "lb.yaml"):
    cfg = tmp_path / name
    cfg.write_text(textwrap.dedent(f"""\
        listeners:
          - name: web
            bind: "tcp:{web}:interface=127.0.0.1"
            mode: http
            pool: app
        pools:
          - name: app
            backends: [{{address: "127.0.0.1:{backend}"}}]
        admin:
          bind: "tcp:{admin}:interface=127.0.0.1"
    """))
    return cfg


@pytest.fixture
def balancer(tmp_path):
    """A running twistd lbtwist whose one backend is a listening socket
    (no active health: assumed healthy, so in rotation)."""
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(16)
    web, admin = free_port(), free_port()
    cfg = _config(tmp_path, web, admin, backend.getsockname()[1])
    proc = Proc(twistd_cmd(cfg), cwd=tmp_path)
    try:
        proc.wait_for("listener web on", timeout=60)
        proc.wait_for(f"{admin}", timeout=60)
        yield proc, cfg, web, admin, backend.getsockname()[1]
    finally:
        if proc.p.poll() is None:
            os.kill(proc.p.pid, signal.SIGCONT)
        proc.terminate(timeout=30)
        backend.close()


def _wait_admin(admin: int) -> None:
    """The admin API answers (the fixture saw it listening)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/pools?history=0", timeout=30) as r:
        assert r.status == 200


def test_check_passes_on_a_serving_balancer(balancer):
    proc, cfg, web, admin, _ = balancer
    _wait_admin(admin)
    r = _status(cfg, "--check")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    r = _status(cfg)
    assert r.returncode == 0, r.stderr
    assert "serving: yes" in r.stdout
    assert "app: 1 of 1 backends in rotation" in r.stdout
    assert f"127.0.0.1:{web}" in r.stdout and "accepts" in r.stdout


def test_frozen_balancer_fails_within_the_deadline(balancer):
    proc, cfg, web, admin, _ = balancer
    _wait_admin(admin)
    os.kill(proc.p.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        r = _status(cfg, "--check", "--timeout", "0.5")
        took = time.monotonic() - t
    finally:
        os.kill(proc.p.pid, signal.SIGCONT)
    assert r.returncode == status.NOT_SERVING
    assert "no answer within 0.5 s" in r.stderr and "frozen" in r.stderr, r.stderr
    # the deadline plus the interpreter's start (generous: a loaded box)
    assert took < 0.5 + 10, took
    # and it serves again once continued
    _wait_admin(admin)
    assert _status(cfg, "--check").returncode == 0


def test_pool_without_a_backend_in_rotation_fails(balancer):
    proc, cfg, web, admin, backend = balancer
    _wait_admin(admin)
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}/api/pools/app/backends/127.0.0.1:{backend}/disable", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    r = _status(cfg, "--check")
    assert r.returncode == status.NOT_SERVING
    assert "no pool has a backend in rotation: app 0 of 1" in r.stderr, r.stderr


def test_admin_down_fails_and_names_it(tmp_path):
    cfg = _config(tmp_path, free_port(), free_port(), free_port())
    r = _status(cfg, "--check")
    assert r.returncode == status.NOT_SERVING
    assert "admin API 127.0.0.1:" in r.stderr and "connection refused" in r.stderr, r.stderr


def test_no_listener_accepting_fails(balancer, tmp_path):
    """The admin answers and the pool is fine, but the listener the config
    names does not accept: not serving."""
    proc, cfg, web, admin, backend = balancer
    _wait_admin(admin)
    other = _config(tmp_path, free_port(), admin, backend, name="other.yaml")
    r = _status(other, "--check")
    assert r.returncode == status.NOT_SERVING
    assert "no listener accepts: listener web" in r.stderr and "refused" in r.stderr, r.stderr


def test_unreadable_config_exits_2(tmp_path):
    r = _status(tmp_path / "missing.yaml", "--check")
    assert r.returncode == status.UNUSABLE
    assert "cannot read the config" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("admin:\n  bind: 12\n  bogus: 1\nlisteners: []\n")
    r = _status(bad, "--check")
    assert r.returncode == status.UNUSABLE
    assert "admin" in r.stderr


# -- the probe loop alone ------------------------------------------------------

def _cfg_text(admin: int, *listeners: int) -> str:
    ls = "".join(f'  - {{name: l{i}, bind: "tcp:{p}:interface=127.0.0.1", pool: app}}\n' for i, p in enumerate(listeners))
    return (f"listeners:\n{ls}pools:\n  - {{name: app, backends: [{{address: '127.0.0.1:1'}}]}}\n"
            f"admin: {{bind: 'tcp:{admin}:interface=127.0.0.1'}}\n")


def test_full_accept_queue_counts_as_not_accepting():
    """A listener whose accept queue is full (nobody calls accept) drops
    SYNs: the connect does not complete within the deadline."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        # fill the queue: these complete (or hang) at the kernel's discretion
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        probes = [status.Probe(status.Target("listener l0", f"tcp:{port}", socket.AF_INET, ("127.0.0.1", port)))]
        t = time.monotonic()
        status.probe_all(probes, 0.3)
        assert time.monotonic() - t < 5
        assert not probes[0].ok
        assert "did not complete within 0.3 s" in probes[0].error
    finally:
        for s in fillers:
            s.close()
        full.close()


def test_silent_admin_and_one_good_listener():
    """An admin socket that accepts but never answers fails as 'no answer';
    one accepting listener of two is enough for the listener check."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    good = socket.socket()
    good.bind(("127.0.0.1", 0))
    good.listen(8)
    try:
        cfg = load(_cfg_text(silent.getsockname()[1], free_port(), good.getsockname()[1])).config
        report = status.check(cfg, timeout=0.3)
        problems = report.problems()
        assert len(problems) == 1, problems
        assert "no answer within 0.3 s" in problems[0]
        assert [p.ok for p in report.listeners] == [False, True]
    finally:
        silent.close()
        good.close()


def test_wildcard_binds_are_checked_on_loopback():
    t = status.connect_target("l", "tcp:8080")
    assert t.address == ("127.0.0.1", 8080)
    t = status.connect_target("l", "tcp6:8080:interface=\\:\\:")
    assert t.address[:2] == ("::1", 8080)
    assert "ephemeral" in status.connect_target("l", "tcp:0")
    assert status.connect_target("l", "unix:/run/lb.sock").address == "/run/lb.sock"


def test_status_does_not_import_twisted():
    """keepalived runs the check every second: it must stay cheap."""
    code = ("import sys; from lbtwist import cli; import lbtwist.status as s; "
            "s.read_config; import lbtwist.config.loader, lbtwist.config.binds; "
            "print(sorted(m for m in sys.modules if m.startswith('twisted.internet')))")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.replace("'", '"')) == []
