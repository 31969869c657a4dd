"""Shared pytest setup: tests import helpers from tests/support."""
import sys
from pathlib import Path

_here = str(Path(__file__).parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
