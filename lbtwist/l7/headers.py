"""Header work between the two hops: serialise the request sent to a backend
and the response sent to a client.

What changes in transit, and why:
  - Hop-by-hop fields (Connection and every field it names, Keep-Alive,
    Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) describe one
    connection and are never forwarded; framing is re-declared for the next hop.
  - The backend learns who asked: X-Forwarded-For/-Proto/-Host or RFC 7239
    Forwarded (appended to, never trusted as the client address), and Via.
  - A request id is generated when absent and passed through when present, and
    echoed on the response, so one id follows a request through every log.
  - Routes may add, set or remove request and response fields; rewrites run
    last, on the final field list, so they can also override what lbtwist set.
"""
from __future__ import annotations

import os
import itertools
from typing import Iterable

import attrs

from lbtwist.config.model import HeaderRewrite
from lbtwist.l7.errors import status_line
from lbtwist.l7.parser import Request, Response

VIA_NAME = b"lbtwist"

#: Fields never forwarded in either direction (names lower case).
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
))


@attrs.frozen
class Rewriter:
    """A compiled L{HeaderRewrite}: drop ``remove`` names, then append ``append``."""

    remove: frozenset[bytes] = frozenset()
    append: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def compile(cls, rw: HeaderRewrite | None) -> "Rewriter | None":
        if rw is None or not (rw.add or rw.set or rw.remove):
            return None
        for name in [*rw.add, *rw.set, *rw.remove]:
            if not name or any(c in name for c in " \t\r\n:") or not name.isascii():
                raise ValueError(f"invalid header name {name!r}")
        for value in [*rw.add.values(), *rw.set.values()]:
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"invalid header value {value!r}")
        remove = frozenset(n.lower().encode() for n in [*rw.remove, *rw.set])
        append = tuple((n.encode(), v.encode()) for n, v in [*rw.set.items(), *rw.add.items()])
        return cls(remove, append)

    def apply(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        if self.remove:
            fields = [(n, v) for n, v in fields if n.lower() not in self.remove]
        if self.append:
            fields.extend(self.append)
        return fields


class RequestIds:
    """Cheap unique ids: a random per-process prefix and a counter (a uuid4
    per request costs more than the rest of the header work)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode()
        self._count = itertools.count(1)

    def new(self) -> bytes:
        return b"%s-%x" % (self._prefix, next(self._count))


def _forwarded_node(ip: bytes) -> bytes:
    if b":" in ip:
        return b'"[%s]"' % ip
    return ip


@attrs.define
class ForwardingPolicy:
    """Per-listener choices for the forwarding fields."""

    mode: str = "x-forwarded"  # x-forwarded | forwarded | both | none
    request_id_header: bytes = b"x-request-id"
    via: bool = True


def _join(fields: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([b"%s: %s\r\n" % nv for nv in fields])


def backend_request_head(
    req: Request,
    *,
    client_ip: bytes,
    tls: bool,
    request_id: bytes,
    policy: ForwardingPolicy,
    rewriter: Rewriter | None = None,
    upgrade: bool = False,
) -> bytes:
    """The request head sent to a backend (HTTP/1.1, origin-form target):
    Host first, the client's end-to-end fields in arrival order, then the
    framing, forwarding and request-id fields lbtwist sets."""
    fields = req.headers
    if req.connection_tokens:
        named = set(req.connection_tokens) - {b"close", b"keep-alive", b"upgrade"}
        if named:
            fields = [(n, v) for n, v in fields if n.lower() not in named]
    host = req.host
    out: list[tuple[bytes, bytes]] = [(b"host", host)] if host is not None else []
    out += fields
    if req.chunked:
        out.append((b"transfer-encoding", req.te))  # type: ignore[arg-type]
    elif req.content_length is not None:
        out.append((b"content-length", b"%d" % req.content_length))
    if req.expect_continue:
        out.append((b"expect", b"100-continue"))
    if upgrade and req.upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", req.upgrade))
    mode = policy.mode
    proto = b"https" if tls else b"http"
    if mode == "x-forwarded" or mode == "both":
        xff = req.x_forwarded_for
        out.append((b"x-forwarded-for", xff + b", " + client_ip if xff else client_ip))
        out.append((b"x-forwarded-proto", proto))
        if host is not None:
            out.append((b"x-forwarded-host", host))
    elif req.x_forwarded_for is not None:
        out.append((b"x-forwarded-for", req.x_forwarded_for))
    if mode == "forwarded" or mode == "both":
        node = b"for=%s;proto=%s" % (_forwarded_node(client_ip), proto)
        if host:
            node += b';host="%s"' % host
        prev = req.forwarded
        out.append((b"forwarded", prev + b", " + node if prev else node))
    elif req.forwarded is not None:
        out.append((b"forwarded", req.forwarded))
    if policy.via:
        via = b"%s %s" % (req.version, VIA_NAME)
        out.append((b"via", req.via + b", " + via if req.via else via))
    elif req.via is not None:
        out.append((b"via", req.via))
    rid_name = policy.request_id_header
    if rid_name == b"x-request-id":
        if req.request_id is None:
            out.append((rid_name, request_id))
    elif req.header(rid_name) is None:
        out.append((rid_name, request_id))
    if rewriter is not None:
        out = rewriter.apply(out)
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (req.method, req.target, _join(out))


#: How a response body travels to the client.
FRAME_NONE, FRAME_LENGTH, FRAME_CHUNKED, FRAME_CLOSE = range(4)


def client_framing(resp: Response, client_version: bytes) -> int:
    """Pick the framing of the response towards the client (RFC 9112 6)."""
    if resp.no_body:
        return FRAME_NONE
    if resp.content_length is not None and resp.te is None:
        return FRAME_LENGTH
    if client_version == b"1.1":
        return FRAME_CHUNKED
    return FRAME_CLOSE


def client_response_head(
    resp: Response,
    *,
    framing: int,
    keep_alive: bool,
    client_version: bytes,
    request_id: bytes | None,
    policy: ForwardingPolicy,
    rewriter: Rewriter | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
    content_length: int | None = None,
) -> bytes:
    """The response head sent to the client: the backend's end-to-end fields,
    then framing, connection, Via and request id. ``content_length``
    overrides the backend's (full response buffering)."""
    fields = resp.headers
    if resp.connection_tokens:
        named = set(resp.connection_tokens) - {b"close", b"keep-alive", b"upgrade"}
        if named:
            fields = [(n, v) for n, v in fields if n.lower() not in named]
    out = list(fields)
    if content_length is not None:
        out.append((b"content-length", b"%d" % content_length))
    elif framing == FRAME_LENGTH or (framing == FRAME_NONE and resp.content_length is not None):
        out.append((b"content-length", b"%d" % resp.content_length))  # type: ignore[str-format]
    elif framing == FRAME_CHUNKED:
        if resp.te is None:
            out.append((b"transfer-encoding", b"chunked"))
        else:  # keep other codings (e.g. gzip) and end with chunked
            out.append((b"transfer-encoding", resp.te if resp.chunked else resp.te + b", chunked"))
    if resp.status == 101:
        out.append((b"connection", b"upgrade"))
        if resp.upgrade is not None:
            out.append((b"upgrade", resp.upgrade))
    elif not keep_alive:
        out.append((b"connection", b"close"))
    elif client_version == b"1.0":
        out.append((b"connection", b"keep-alive"))
    if policy.via:
        out.append((b"via", b"%s %s" % (resp.version, VIA_NAME)))
    if request_id is not None:
        rid_name = policy.request_id_header
        if rid_name == b"x-request-id":
            if resp.request_id is None:
                out.append((rid_name, request_id))
        elif resp.header(rid_name) is None:
            out.append((rid_name, request_id))
    out.extend(extra)
    if rewriter is not None:
        out = rewriter.apply(out)
    reason = resp.reason
    if reason:
        line = b"HTTP/1.1 %d %s\r\n" % (resp.status, reason)
    else:
        line = status_line(resp.status)
    return line + _join(out) + b"\r\n"


def interim_head(resp: Response) -> bytes:
    """A 1xx response relayed as is (minus hop-by-hop fields)."""
    return (b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason or b"Continue")) + _join(resp.headers) + b"\r\n"
