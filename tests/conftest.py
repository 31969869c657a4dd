"""Shared pytest setup: tests import helpers from tests/support."""
import os
import sys
from pathlib import Path

_here = str(Path(__file__).parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
# The checkout's lbtwist, not an installed copy (which may be stale when the
# suite is run as ``.venv/bin/pytest`` rather than ``python -m pytest``).
_root = str(Path(__file__).parent.parent)
if sys.path[0] != _root:
    sys.path.insert(0, _root)

# The suite runs on the reactor production runs (``twistd --reactor=lbtwist-lean``,
# see the Makefile), so its levers (inline reads, sends batched per poll pass)
# are exercised by every socket test. LBTWIST_TEST_REACTOR=stock runs it on
# Twisted's own epoll reactor instead (pytest-twisted accepts either: the lean
# one is an EPollReactor).
if os.environ.get("LBTWIST_TEST_REACTOR", "lean") == "lean":
    from lbtwist import fastio

    fastio.install_supported_reactor()
