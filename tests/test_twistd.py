"""The product as users run it: ``twistd -n lbtwist --config FILE`` as a real
process, the installed dropin, clean config errors, graceful stop."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from zope.interface.verify import verifyObject

from support.procs import BIN, REPO, Proc, free_port, source_env, twistd_cmd


def _clean_env() -> dict:
    """Environment where only the *installed* lbtwist is importable."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_dropin_provides_service_maker():
    from twisted.application.service import IServiceMaker
    from twisted.plugin import IPlugin

    sys.path.insert(0, str(REPO))
    try:
        import importlib

        mod = importlib.import_module("twisted.plugins.lbtwist_plugin")
    finally:
        sys.path.remove(str(REPO))
    assert verifyObject(IServiceMaker, mod.lbtwist)
    assert IPlugin.providedBy(mod.lbtwist)
    assert mod.lbtwist.tapname == "lbtwist"


def test_installed_package_is_discoverable(tmp_path):
    """From outside the checkout, the installed wheel alone provides the subcommand."""
    code = (
        "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"
    )
    out = subprocess.run(
        [str(BIN / "python"), "-c", code], cwd=tmp_path, env=_clean_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "'lbtwist'" in out.stdout
    # the wheel ships the dropin without an __init__.py under twisted/plugins
    code = "import twisted.plugins.lbtwist_plugin as m, os; print(m.__file__)"
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert "site-packages" in out.stdout, out.stdout + out.stderr


def test_twistd_help_documents_options(tmp_path):
    out = subprocess.run([str(BIN / "twistd"), "lbtwist", "--help"], cwd=tmp_path,
                         env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--check" in out.stdout


def test_bad_config_exits_nonzero_with_one_line_per_problem(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(textwrap.dedent("""\
        listeners:
          - name: edge
            bind: "tcp:8080:interface=127.0.0.1"
            mode: tcp
            pool: ap
        pools:
          - name: app
            algoritm: round_robin
            backends:
              - address: "127.0.0.1:9001"
    """))
    out = subprocess.run(twistd_cmd(cfg), cwd=tmp_path, env=source_env(), capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Traceback" not in text
    assert "bad.yaml:5: listeners[0].pool" in text and "'app'" in text
    assert "bad.yaml:8: pools[0]" in text and "algorithm" in text


def _http_get(port: int, path: str = "/") -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, json.loads(r.read())


def test_twistd_serves_demo_config_and_stops_cleanly(tmp_path):
    web, echo, admin, b1, b2, e1 = (free_port() for _ in range(6))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        listeners:
          - name: web
            bind: "tcp:{web}:interface=127.0.0.1"
            mode: http
            pool: web
          - name: echo
            bind: "tcp:{echo}:interface=127.0.0.1"
            mode: tcp
            pool: echo
        pools:
          - name: web
            algorithm: round_robin
            backends: [{{address: "127.0.0.1:{b1}"}}, {{address: "127.0.0.1:{b2}"}}]
          - name: echo
            backends: [{{address: "127.0.0.1:{e1}"}}]
        demo:
          http: ["tcp:{b1}:interface=127.0.0.1", "tcp:{b2}:interface=127.0.0.1"]
          tcp_echo: ["tcp:{e1}:interface=127.0.0.1"]
    """))
    proc = Proc(twistd_cmd(cfg), cwd=tmp_path)
    try:
        proc.wait_for(f"listener echo on", timeout=30)
        proc.wait_for(f"listener web on", timeout=30)
        seen = set()
        for _ in range(4):
            status, body = _http_get(web)
            assert status == 200
            seen.add(body["backend"])
        assert len(seen) == 2, seen  # round robin across both demo backends
        with socket.create_connection(("127.0.0.1", echo), timeout=10) as s:
            s.sendall(b"ping\n")
            assert s.recv(100) == b"ping\n"
        rc = proc.terminate(timeout=30)
        assert rc == 0, proc.output()
        assert "Traceback" not in proc.output()
    finally:
        proc.kill()


def test_default_config_is_the_sample():
    """The embedded default `twistd lbtwist` serves is etc/lbtwist.yaml."""
    packaged = (REPO / "lbtwist" / "data" / "default.yaml").read_text()
    assert packaged == (REPO / "etc" / "lbtwist.yaml").read_text()


@pytest.mark.parametrize("reactor_arg, reactor_class", [
    (None, "LeanEPollReactor"),  # what plain ``twistd lbtwist`` picks
    ("--reactor=lbtwist-lean", "LeanEPollReactor"),
    ("--reactor=epoll", "twisted.internet.epollreactor.EPollReactor"),  # Twisted's own, still served
])
def test_reactor_choice_runs_the_balancer(tmp_path, reactor_arg, reactor_class):
    """Without ``--reactor`` twistd lbtwist runs fastio's lean reactor; an
    explicit choice is kept, and serves the same config."""
    web, echo, b1, e1 = (free_port() for _ in range(4))
    cfg = tmp_path / "lean.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        listeners:
          - {{name: web, bind: "tcp:{web}:interface=127.0.0.1", mode: http, pool: web}}
          - {{name: echo, bind: "tcp:{echo}:interface=127.0.0.1", mode: tcp, pool: echo}}
        pools:
          - {{name: web, backends: [{{address: "127.0.0.1:{b1}"}}]}}
          - {{name: echo, backends: [{{address: "127.0.0.1:{e1}"}}]}}
        demo: {{http: ["tcp:{b1}:interface=127.0.0.1"], tcp_echo: ["tcp:{e1}:interface=127.0.0.1"]}}
    """))
    argv = twistd_cmd(cfg)
    if reactor_arg:
        argv.insert(1, reactor_arg)
    proc = Proc(argv, cwd=tmp_path)
    try:
        proc.wait_for("listener web on", timeout=30)
        line = next(x for x in proc.output().splitlines() if "reactor class:" in x)
        assert reactor_class in line, line
        assert _http_get(web)[0] == 200
        with socket.create_connection(("127.0.0.1", echo), timeout=10) as s:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
        assert proc.terminate(timeout=30) == 0, proc.output()
    finally:
        proc.kill()
