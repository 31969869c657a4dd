"""``python -m lbtwist.drill SCENARIO ...`` (same as ``lbtwist drill``)."""
from lbtwist.drill.cli import main

raise SystemExit(main())
