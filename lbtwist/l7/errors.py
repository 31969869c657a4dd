"""Errors the proxy answers itself, and their status pages.

Every page is short plain text naming the cause (for example which backend
refused), so whoever reads it in a terminal or a log knows where to look; the
same cause is logged with the backend address.
"""
from __future__ import annotations

from http import HTTPStatus


class ParseError(Exception):
    """A message could not be accepted: ``status`` is what the client gets
    (400, 413, 414, 431, 501, 505...) and ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


_PHRASES = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Unknown"))


def error_page(status: int, cause: str, *, close: bool = True, head_only: bool = False,
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete response: status line, a few headers and a one-line body
    ``"502 Bad Gateway: <cause>"``. ``head_only`` for HEAD requests."""
    phrase = _PHRASES.get(status, b"Unknown")
    body = b"%d %s: %s\n" % (status, phrase, cause.encode("utf-8", "replace"))
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, phrase),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"cache-control: no-store\r\n",
    ]
    for name, value in extra:
        parts.append(b"%s: %s\r\n" % (name, value))
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def page_body_size(page: bytes) -> int:
    """Body bytes of a complete response built by L{error_page} (what the
    access log counts as ``bytes_out``, like a relayed body)."""
    end = page.find(b"\r\n\r\n")
    return 0 if end < 0 else len(page) - end - 4


#: Why an attempt failed before any response byte, and what the client gets.
#: connect-refused / reset / closed / garbage -> 502, connect-timeout /
#: timeout -> 504, pool-full / no-backend -> 503.
FAILURE_STATUS = {
    "connect-refused": 502,
    "connect-failed": 502,
    "connect-timeout": 504,
    "reset": 502,
    "closed": 502,
    "garbage": 502,
    "timeout": 504,
    "pool-full": 503,
    "no-backend": 503,
}
