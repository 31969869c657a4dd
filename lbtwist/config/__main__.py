"""``python -m lbtwist.config FILE``: check a config file without starting anything.

Prints one line per problem; exits 2 when the file cannot be used, else 0."""
from __future__ import annotations

import sys
from typing import Any, Sequence

from lbtwist.config import ConfigError, load_config


def main(argv: Sequence[str] | None = None, registry: Any = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m lbtwist.config FILE", file=sys.stderr)
        return 2
    try:
        loaded = load_config(args[0], registry, source_name=args[0])
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    for w in loaded.warnings:
        print(str(w), file=sys.stderr)
    cfg = loaded.config
    print(f"{args[0]}: ok ({len(cfg.listeners)} listeners, {len(cfg.pools)} pools)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
