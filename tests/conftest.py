"""Shared pytest setup: tests import helpers from tests/support."""
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
