"""Chunked transfer coding (RFC 9112 section 7.1), sans-IO and strict.

The decoder is ours rather than llhttp's so the proxy knows exactly where a
chunked body ends inside a buffer that may already hold the next pipelined
request (httptools would parse straight on into it). It is stricter than the
RFC where leniency has been used for request smuggling: no whitespace in the
chunk-size line, no bare CR or LF, extensions must be well-formed tokens or
quoted strings, a size of at most 16 hex digits, CRLF right after each chunk's
data, and trailer fields with the same grammar as header fields.
"""
from __future__ import annotations

import re
from typing import Callable

from lbtwist.l7.errors import ParseError

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t !-~\x80-\xff])*"'
_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
_FIELD_LINE = re.compile(_TOKEN + rb":[ \t]*(?:[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?[ \t]*")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Feed raw bytes; ``on_data`` receives decoded data. ``feed`` returns the
    bytes that follow the body once it is complete, else None. Raises
    L{ParseError} (400 by default) on any framing error."""

    __slots__ = ("_on_data", "_state", "_left", "_buf", "_trailer_size", "max_line", "max_trailer", "status",
                 "limit", "total")

    def __init__(self, on_data: Callable[[bytes], None], *, max_line: int = 4096,
                 max_trailer: int = 32768, status: int = 400) -> None:
        self._on_data = on_data
        self._state = _SIZE
        self._left = 0
        self._buf = b""
        self._trailer_size = 0
        self.max_line = max_line
        self.max_trailer = max_trailer
        #: Status used for errors (400 towards clients; callers map it for backends).
        self.status = status
        #: 413 as soon as a chunk-size line announces more than this in total (0: no limit).
        self.limit = 0
        self.total = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes | None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._left, n - pos)
                self._on_data(data[pos:pos + take] if (pos or take < n) else data)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
            elif state == _SIZE:
                eol = data.find(b"\r\n", pos, pos + self.max_line + 2)
                if eol < 0:
                    if n - pos > self.max_line or b"\n" in data[pos:]:
                        raise ParseError(self.status, "malformed chunk size line")
                    break
                m = _SIZE_LINE.fullmatch(data, pos, eol)
                if m is None:
                    raise ParseError(self.status, "malformed chunk size or extension")
                size = int(m.group(1), 16)
                pos = eol + 2
                self.total += size
                if self.limit and self.total > self.limit:
                    raise ParseError(413, f"request body larger than {self.limit} bytes")
                if size:
                    self._left = size
                    self._state = _DATA
                else:
                    self._state = _TRAILER
            elif state == _DATA_END:
                if n - pos < 2:
                    if data[pos:] != b"\r":
                        raise ParseError(self.status, "chunk data not followed by CRLF")
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise ParseError(self.status, "chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _TRAILER:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if self._trailer_size + n - pos > self.max_trailer or b"\n" in data[pos:]:
                        raise ParseError(self.status, "malformed or oversized trailer section")
                    break
                self._trailer_size += eol + 2 - pos
                if self._trailer_size > self.max_trailer:
                    raise ParseError(self.status, "trailer section too large")
                if eol == pos:
                    self._state = _DONE
                    return data[eol + 2:]
                if _FIELD_LINE.fullmatch(data, pos, eol) is None:
                    raise ParseError(self.status, "malformed trailer field")
                # Trailers are validated and dropped: a proxy may discard them
                # (RFC 9110 6.5.1) and none of lbtwist's backends rely on them.
                pos = eol + 2
            else:  # _DONE
                return data[pos:]
        if pos < n:
            self._buf = data[pos:]
        return None


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked coding (never the last-chunk: use L{LAST_CHUNK})."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
