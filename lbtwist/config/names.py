"""Names and small syntaxes that the validator and the runtime both parse,
defined once so ``lbtwist check`` accepts exactly what the runtime can build."""
from __future__ import annotations

import re

#: RFC 9110 token: header field names and cookie names.
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

HASH_KEY_SYNTAX = "source | header:NAME | cookie:NAME"


def parse_hash_key(key: str) -> tuple[str, str | None]:
    """``"source"`` -> ("source", None); ``"header:X-User"`` -> ("header", "x-user");
    ``"cookie:sid"`` -> ("cookie", "sid"). The kind is case-insensitive and
    blanks around either part are ignored; header names are lower-cased,
    cookie names kept as written. Raises ValueError saying what is wrong."""
    kind, sep, name = key.partition(":")
    kind = kind.strip().lower()
    if kind == "source" and not sep:
        return "source", None
    if kind in ("header", "cookie") and sep:
        name = name.strip()
        if not TOKEN.match(name):
            raise ValueError(f"hash_key {key!r}: {name!r} is not a valid {kind} name")
        return kind, name.lower() if kind == "header" else name
    raise ValueError(f"hash_key {key!r} is not one of {HASH_KEY_SYNTAX}")
