"""Header translation between an HTTP/2 stream and the HTTP/1.1 hop.

hyper-h2 has already checked the block (RFC 9113 8.2: lower-case names, no
CR/LF/NUL, no connection-specific fields, ``te`` only ``trailers``, the
pseudo-headers, ``:authority`` against ``host``) and joined cookie crumbs
into one ``cookie`` field (8.2.3). What is left here is what an HTTP/1.1
backend needs on top of that: a method, target and Host that are safe on a
request line, a Content-Length that is a number, and the fields the proxy
interprets pulled out of the forwarded ones, as L{RequestParser} does."""
from __future__ import annotations

from lbtwist.l7.errors import ParseError
from lbtwist.l7.headers import HOP_BY_HOP
from lbtwist.l7.parser import Request, Response, valid_host, valid_token


def _target_ok(path: bytes) -> bool:
    # Visible ASCII only (a space would split the HTTP/1.1 request line), no fragment.
    return all(0x21 <= c <= 0x7E for c in path) and 35 not in path


def request_from_h2(headers: list[tuple[bytes, bytes]], end_stream: bool) -> Request:
    """A L{Request} as the exchange expects one; L{ParseError} (the status a
    client gets) for what an HTTP/1.1 backend cannot be sent."""
    req = Request()
    fields: list[tuple[bytes, bytes]] = []
    special: list[tuple[bytes, bytes]] = []
    req.headers = fields
    req.special_fields = special
    method = path = authority = scheme = None
    host = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
            elif name == b":protocol":
                raise ParseError(501, "extended CONNECT (:protocol) is not supported")
            continue
        if name == b"host":
            host = value
            continue
        if name in HOP_BY_HOP:  # only te: trailers gets past hyper-h2; not forwarded
            continue
        if name == b"content-length":
            special.append((name, value))
            if not value.isdigit() or len(value) > 18:
                raise ParseError(400, "invalid content-length")
            n = int(value)
            if req.content_length is not None and req.content_length != n:
                raise ParseError(400, "conflicting content-length fields")
            req.content_length = n
        elif name == b"x-forwarded-for":
            special.append((name, value))
            req.x_forwarded_for = value if req.x_forwarded_for is None else req.x_forwarded_for + b", " + value
        elif name == b"forwarded":
            special.append((name, value))
            req.forwarded = value if req.forwarded is None else req.forwarded + b", " + value
        elif name == b"via":
            special.append((name, value))
            req.via = value if req.via is None else req.via + b", " + value
        elif name == b"x-forwarded-proto" or name == b"x-forwarded-host":
            special.append((name, value))  # set by lbtwist
        elif name == b"expect":
            special.append((name, value))  # HTTP/2 has no 100-continue handshake to relay here
        else:
            fields.append((name, value))
            if name == b"x-request-id" and req.request_id is None:
                req.request_id = value
            elif name == b"cookie":  # hyper-h2 joined the crumbs (RFC 9113 8.2.3)
                req.cookie = value if req.cookie is None else req.cookie + b"; " + value
    if method is None:
        raise ParseError(400, "missing :method")
    if method == b"CONNECT":
        raise ParseError(501, "CONNECT is not supported by this reverse proxy")
    if not valid_token(method):
        raise ParseError(400, "invalid method")
    if path is None or scheme is None:
        raise ParseError(400, "missing :path or :scheme")
    if path == b"*":
        if method != b"OPTIONS":
            raise ParseError(400, "asterisk-form target is only valid with OPTIONS")
    elif path[:1] != b"/" or not _target_ok(path):
        raise ParseError(400, "invalid :path")
    h = authority if authority is not None else host
    if h is None or not h or not valid_host(h):
        raise ParseError(400, "missing or invalid :authority")
    special.append((b"host", h))
    req.method = method
    req.target = path
    req.host = h
    if not end_stream:
        req.has_body = True
        if req.content_length is None:
            # Length unknown until END_STREAM: chunked towards the HTTP/1.1 backend.
            req.chunked = True
            req.te = b"chunked"
    elif req.content_length:
        raise ParseError(400, "content-length on a request without a body")
    return req


#: Response fields that do not exist in HTTP/2 (RFC 9113 8.2.2).
_DROP = HOP_BY_HOP | {b"host"}


def response_headers(resp: Response) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block for a response head parsed from HTTP/1.1."""
    out = [(b":status", b"%d" % resp.status)]
    for name, value in resp.all_headers:
        n = name.lower()
        if n in _DROP:
            continue
        out.append((n, value))
    return out
