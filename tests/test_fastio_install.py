"""Every entry point installs its reactor through fastio.install_supported_reactor:
the lean reactor only on a Twisted version fastio was checked against, else
Twisted's default reactor and one line saying so.

Each case runs in a fresh interpreter (a reactor is installed once per process)
with ``fastio.CHECKED_TWISTED_MAJOR`` emptied to stand for an unchecked Twisted,
and reports the reactor class that ends up installed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PRELUDE = """
import sys
from lbtwist import fastio
if {unsupported}:
    fastio.CHECKED_TWISTED_MAJOR = ()
from twisted.internet import task
task.react = lambda f, args=(): None  # the entry points' run loop: not needed to see the choice
"""

_ENTRY = {
    "l4": "from lbtwist.l4.__main__ import main\nmain(['--backend', '127.0.0.1:1', '--lean-reactor'])",
    "l7": "from lbtwist.l7.__main__ import main\nmain(['--backend', '127.0.0.1:1', '--lean-reactor'])",
    "tap": "from lbtwist.tap import install_default_reactor\ninstall_default_reactor()",
    "twistd-reactor-plugin": "fastio.install()",
    "conftest": f"import runpy\nrunpy.run_path({str(ROOT / 'tests' / 'conftest.py')!r})",
}


def _installed(entry: str, unsupported: bool) -> tuple[str, str]:
    code = _PRELUDE.format(unsupported=unsupported) + _ENTRY[entry] + (
        "\nfrom twisted.internet import reactor\nprint(type(reactor).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LBTWIST_TEST_REACTOR"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


@pytest.mark.parametrize("entry", sorted(_ENTRY))
def test_unchecked_twisted_gets_twisteds_reactor_and_a_line_saying_so(entry):
    reactor, err = _installed(entry, unsupported=True)
    assert reactor == "EPollReactor"
    assert "is not a version lbtwist.fastio was checked against" in err
    assert "using Twisted's default reactor" in err


@pytest.mark.parametrize("entry", sorted(_ENTRY))
def test_checked_twisted_gets_the_lean_reactor_silently(entry):
    reactor, err = _installed(entry, unsupported=False)
    assert reactor == "LeanEPollReactor"
    assert "checked against" not in err
