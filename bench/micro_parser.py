"""Micro-benchmark of the L7 parsers' per-message cost (no sockets).

Feeds N typical keep-alive request heads through one RequestParser and N
typical nginx responses through one ResponseParser, with no-op handlers, and
prints ns per message (min of the repeats: the box is shared and noisy).

    .venv/bin/python bench/micro_parser.py [N] [repeats] [--parser FILE]

``--parser`` measures another copy of parser.py instead of the checkout's,
e.g. ``git show HEAD~1:lbtwist/l7/parser.py > /tmp/old_parser.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, not an installed copy

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class _Sink:
    def on_request(self, r): pass
    def on_informational(self, r): pass
    def on_response(self, r): pass
    def on_body(self, d): pass
    def on_end(self): pass


def requests(mod: ModuleType, n: int) -> float:
    p = mod.RequestParser(_Sink())
    feed, nxt, data = p.feed, p.next, REQUEST
    t = time.perf_counter_ns()
    for _ in range(n):
        feed(data)
        nxt()
    return (time.perf_counter_ns() - t) / n


def responses(mod: ModuleType, n: int) -> float:
    p = mod.ResponseParser(_Sink())
    feed, expect, data = p.feed, p.expect, RESPONSE
    t = time.perf_counter_ns()
    for _ in range(n):
        expect(False)
        feed(data)
    return (time.perf_counter_ns() - t) / n


def _load(path: str | None) -> ModuleType:
    if path is None:
        import lbtwist.l7.parser as mod
        return mod
    spec = importlib.util.spec_from_file_location("parser_under_test", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=100_000)
    ap.add_argument("repeats", type=int, nargs="?", default=5)
    ap.add_argument("--parser", help="another parser.py to measure")
    args = ap.parse_args()
    mod = _load(args.parser)
    print("parser:", mod.__file__)
    for name, fn in (("request", requests), ("response", responses)):
        fn(mod, args.n // 10)  # warm up
        print(f"{name:9s} {min(fn(mod, args.n) for _ in range(args.repeats)):7.0f} ns/message")


if __name__ == "__main__":
    main()
