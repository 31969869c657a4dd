"""gRPC over the HTTP/2 client side: when lbtwist itself ends a call it
answers as gRPC does (trailers-only: one HEADERS frame with END_STREAM,
``grpc-status`` and a percent-encoded ``grpc-message``), not with an HTML or
text page the client library could only report as UNKNOWN; and the
``grpc-timeout`` a client sends bounds the whole call."""
from __future__ import annotations

import re
from urllib.parse import quote

# Status codes (grpc/grpc doc/statuscodes.md).
OK = 0
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

#: lbtwist's own HTTP status for a failed request -> the gRPC status it
#: answers instead: no backend or connect failure UNAVAILABLE, a timeout
#: DEADLINE_EXCEEDED, a rate or size limit RESOURCE_EXHAUSTED.
_FROM_HTTP = {
    400: INTERNAL,
    404: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    501: UNIMPLEMENTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc``, ``application/grpc+proto``, ``application/grpc;...``."""
    if content_type is None:
        return False
    ct = content_type.lower()
    return ct == b"application/grpc" or ct[:17] in (b"application/grpc+", b"application/grpc;")


def status_for(http_status: int) -> int:
    return _FROM_HTTP.get(http_status, UNAVAILABLE if http_status >= 500 else INTERNAL)


def trailers_only(http_status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> list[tuple[bytes, bytes]]:
    """The single header block of a call lbtwist failed (HTTP status 200,
    as gRPC requires for a trailers-only response)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status_for(http_status)),
        (b"grpc-message", encode_message(message)),
        *extra,
    ]


def encode_message(message: str) -> bytes:
    """grpc-message: percent-encoded UTF-8 (PROTOCOL-HTTP2.md); everything
    but unreserved characters is encoded, which every decoder accepts."""
    return quote(message.encode("utf-8"), safe="").encode("ascii")


_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes | None) -> float | None:
    """``grpc-timeout`` (``1*8DIGIT unit``) in seconds; None when absent or malformed."""
    if value is None:
        return None
    m = _TIMEOUT.fullmatch(value.strip())
    if m is None:
        return None
    return int(m.group(1)) * _UNIT[m.group(2)]
