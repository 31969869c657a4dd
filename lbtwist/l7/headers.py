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

import functools
import itertools
import os
from typing import Any, Callable

import attrs

from lbtwist.config.model import HeaderRewrite
from lbtwist.l7.errors import status_line
from lbtwist.l7.parser import HOP_BY_HOP, Request, Response  # noqa: F401  (HOP_BY_HOP: re-exported)

VIA_NAME = b"lbtwist"


def check_header_value(value: str) -> None:
    """A value lbtwist may write into a header (CR, LF and NUL would split or
    end the field: response splitting). ValueError names it. The validator
    calls this too, so a config check accepts exactly what compiles."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"invalid header value {value!r}")


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
            check_header_value(value)
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
        self.prefix = os.urandom(6).hex().encode()
        #: ``new()``: the next id, ``b"<prefix>-<counter in hex>"``. Built from
        #: C-level callables only (next over a map of a bound ``%``), so the
        #: exchange's call per request runs no Python frame.
        self.new: Callable[[], bytes] = functools.partial(next, map((self.prefix + b"-%x").__mod__, itertools.count(1)))


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
    #: Strict-Transport-Security value (TLS listeners with ``tls.hsts``), else None.
    hsts: bytes | None = None
    #: Fields lbtwist adds to every response it sends, and the same serialised
    #: (``b"\r\nname: value"...``), both made once here.
    response_fields: tuple[tuple[bytes, bytes], ...] = attrs.field(init=False)
    response_tail: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.response_fields = ((STS, self.hsts),) if self.hsts is not None else ()
        self.response_tail = _lines(list(self.response_fields)) if self.response_fields else b""


#: The HSTS field name (RFC 6797 6.1).
STS = b"strict-transport-security"


def hsts_value(cfg: Any) -> bytes:
    """``max-age=N[; includeSubDomains][; preload]`` from a
    L{lbtwist.config.model.HSTSConfig}."""
    value = b"max-age=%d" % max(0, int(cfg.max_age))
    if cfg.include_subdomains:
        value += b"; includeSubDomains"
    if cfg.preload:
        value += b"; preload"
    return value


def _drop_sts(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The backend's own Strict-Transport-Security fields removed (lbtwist's
    replaces them; a browser would obey only the first)."""
    return [f for f in fields if len(f[0]) != 25 or f[0].lower() != STS]


def _lines(fields: list[tuple[bytes, bytes]]) -> bytes:
    """``b"\\r\\nName: value"`` for each field (the cheapest serialisation
    CPython offers: two C-level joins, no per-field formatting)."""
    return b"\r\n" + b"\r\n".join(map(_COLON_JOIN, fields))


def _drop_named(fields: list[tuple[bytes, bytes]], tokens: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """Drop the fields a Connection header named (they are hop-by-hop too)."""
    named = set(tokens) - {b"close", b"keep-alive", b"upgrade"}
    if not named:
        return fields
    return [(n, v) for n, v in fields if n.lower() not in named]


_VIA = {b"1.1": b"1.1 " + VIA_NAME, b"1.0": b"1.0 " + VIA_NAME}
_COMMON_REQUEST = (b"%s %s HTTP/1.1\r\nhost: %s%s\r\nx-forwarded-for: %s\r\nx-forwarded-proto: %s"
                   b"\r\nx-forwarded-host: %s\r\nvia: %s\r\nx-request-id: %s\r\n\r\n")
_COMMON_RESPONSE = b"HTTP/1.1 %d %s\r\n%s\r\ncontent-length: %d\r\nvia: %s\r\nx-request-id: %s%s\r\n\r\n"
_COLON_JOIN = b": ".join
_KEEP_ALIVE = (b"keep-alive",)
_CLOSE = (b"close",)


def backend_request_head(
    req: Request,
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
    if rewriter is not None:
        return _serialise(b"%s %s HTTP/1.1" % (req.method, req.target),
                          rewriter.apply(request_fields(req, client_ip, tls, request_id, policy, upgrade)))
    fields = req.headers
    tokens = req.connection_tokens
    if tokens and tokens != _KEEP_ALIVE and tokens != _CLOSE:
        fields = _drop_named(fields, tokens)
    host = req.host
    if (
        host is not None and req.content_length is None and not req.chunked and not req.expect_continue
        and not (upgrade and req.upgrade is not None) and policy.mode == "x-forwarded"
        and req.x_forwarded_for is None and req.forwarded is None and req.via is None and policy.via
        and req.request_id is None and policy.request_id_header == b"x-request-id"
    ):
        # The common request (no body, no forwarding fields of its own, default
        # policy), in one formatting call: what the general path below builds.
        return _COMMON_REQUEST % (
            req.method, req.target, host, b"\r\n" + b"\r\n".join(map(_COLON_JOIN, fields)) if fields else b"",
            client_ip, b"https" if tls else b"http", host, _VIA[req.version], request_id)
    parts = [req.method, b" ", req.target, b" HTTP/1.1"]
    if host is not None:
        parts += (b"\r\nhost: ", host)
    if fields:
        parts += (b"\r\n", b"\r\n".join(map(_COLON_JOIN, fields)))  # _lines(), inlined
    if req.chunked:
        parts += (b"\r\ntransfer-encoding: ", req.te)  # type: ignore[list-item]
    elif req.content_length is not None:
        parts.append(b"\r\ncontent-length: %d" % req.content_length)
    if req.expect_continue:
        parts.append(b"\r\nexpect: 100-continue")
    if upgrade and req.upgrade is not None:
        parts += (b"\r\nconnection: upgrade\r\nupgrade: ", req.upgrade)
    mode = policy.mode
    if mode == "x-forwarded" or mode == "both":
        xff = req.x_forwarded_for
        parts += (b"\r\nx-forwarded-for: ", xff + b", " + client_ip if xff else client_ip,
                  b"\r\nx-forwarded-proto: https" if tls else b"\r\nx-forwarded-proto: http")
        if host is not None:
            parts += (b"\r\nx-forwarded-host: ", host)
    elif req.x_forwarded_for is not None:
        parts += (b"\r\nx-forwarded-for: ", req.x_forwarded_for)
    if mode == "forwarded" or mode == "both":
        parts += (b"\r\nforwarded: ", _forwarded(req, client_ip, tls))
    elif req.forwarded is not None:
        parts += (b"\r\nforwarded: ", req.forwarded)
    if policy.via:
        via = _VIA[req.version]
        parts += (b"\r\nvia: ", req.via + b", " + via if req.via else via)
    elif req.via is not None:
        parts += (b"\r\nvia: ", req.via)
    rid_name = policy.request_id_header
    if rid_name == b"x-request-id":
        if req.request_id is None:
            parts += (b"\r\nx-request-id: ", request_id)
    elif req.header(rid_name) is None:
        parts += (b"\r\n", rid_name, b": ", request_id)
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


def _forwarded(req: Request, client_ip: bytes, tls: bool) -> bytes:
    node = b"for=%s;proto=%s" % (_forwarded_node(client_ip), b"https" if tls else b"http")
    if req.host:
        node += b';host="%s"' % req.host
    prev = req.forwarded
    return prev + b", " + node if prev else node


def request_fields(req: Request, client_ip: bytes, tls: bool, request_id: bytes, policy: ForwardingPolicy,
                   upgrade: bool = False) -> list[tuple[bytes, bytes]]:
    """The backend request's fields as a list (the path with route rewrites)."""
    fields = req.headers
    if req.connection_tokens:
        fields = _drop_named(fields, req.connection_tokens)
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
    if mode == "x-forwarded" or mode == "both":
        xff = req.x_forwarded_for
        out.append((b"x-forwarded-for", xff + b", " + client_ip if xff else client_ip))
        out.append((b"x-forwarded-proto", b"https" if tls else b"http"))
        if host is not None:
            out.append((b"x-forwarded-host", host))
    elif req.x_forwarded_for is not None:
        out.append((b"x-forwarded-for", req.x_forwarded_for))
    if mode == "forwarded" or mode == "both":
        out.append((b"forwarded", _forwarded(req, client_ip, tls)))
    elif req.forwarded is not None:
        out.append((b"forwarded", req.forwarded))
    if policy.via:
        via = _VIA[req.version]
        out.append((b"via", req.via + b", " + via if req.via else via))
    elif req.via is not None:
        out.append((b"via", req.via))
    rid_name = policy.request_id_header
    if rid_name == b"x-request-id":
        if req.request_id is None:
            out.append((rid_name, request_id))
    elif req.header(rid_name) is None:
        out.append((rid_name, request_id))
    return out


def _serialise(first_line: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    return first_line + (_lines(fields) if fields else b"") + b"\r\n\r\n"


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
    tokens = resp.connection_tokens
    if tokens and tokens != _KEEP_ALIVE and tokens != _CLOSE:
        fields = _drop_named(fields, tokens)
    if policy.hsts is not None:
        fields = _drop_sts(fields)
    reason = resp.reason
    if (
        framing == FRAME_LENGTH and keep_alive and client_version == b"1.1" and reason and fields
        and rewriter is None and not extra and content_length is None and request_id is not None
        and resp.request_id is None and policy.via and policy.request_id_header == b"x-request-id"
    ):
        # The common answer (length-framed, keep-alive, HTTP/1.1 client, no
        # rewrites), in one formatting call: what the general path below builds.
        return _COMMON_RESPONSE % (resp.status, reason, b"\r\n".join(map(_COLON_JOIN, fields)),
                                   resp.content_length, _VIA[resp.version], request_id, policy.response_tail)
    parts = [b"HTTP/1.1 %d %s" % (resp.status, reason) if reason else status_line(resp.status)[:-2]]
    if fields:
        parts += (b"\r\n", b"\r\n".join(map(_COLON_JOIN, fields)))  # _lines(), inlined
    if content_length is not None:
        parts.append(b"\r\ncontent-length: %d" % content_length)
    elif framing == FRAME_LENGTH or (framing == FRAME_NONE and resp.content_length is not None):
        parts.append(b"\r\ncontent-length: %d" % resp.content_length)  # type: ignore[str-format]
    elif framing == FRAME_CHUNKED:
        if resp.te is None:
            parts.append(b"\r\ntransfer-encoding: chunked")
        else:  # keep other codings (e.g. gzip) and end with chunked
            parts += (b"\r\ntransfer-encoding: ", resp.te if resp.chunked else resp.te + b", chunked")
    if resp.status == 101:
        parts.append(b"\r\nconnection: upgrade")
        if resp.upgrade is not None:
            parts += (b"\r\nupgrade: ", resp.upgrade)
    elif not keep_alive:
        parts.append(b"\r\nconnection: close")
    elif client_version == b"1.0":
        parts.append(b"\r\nconnection: keep-alive")
    if policy.via:
        parts += (b"\r\nvia: ", _VIA[resp.version])
    if request_id is not None:
        rid_name = policy.request_id_header
        if rid_name == b"x-request-id":
            if resp.request_id is None:
                parts += (b"\r\nx-request-id: ", request_id)
        elif resp.header(rid_name) is None:
            parts += (b"\r\n", rid_name, b": ", request_id)
    if policy.response_tail:
        parts.append(policy.response_tail)
    if extra:
        parts.append(_lines(list(extra)))
    if rewriter is not None:
        line, _, rest = b"".join(parts).partition(b"\r\n")
        return _serialise(line, rewriter.apply([(n, v.strip()) for n, _, v in
                                                (f.partition(b":") for f in rest.split(b"\r\n"))]))
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


def response_fields(
    resp: Response,
    request_id: bytes | None,
    policy: ForwardingPolicy,
    rewriter: Rewriter | None = None,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> list[tuple[bytes, bytes]]:
    """The response's fields for the client as one protocol-neutral list:
    what L{client_response_head} writes minus the HTTP/1.1 framing and
    connection fields (Content-Length, Transfer-Encoding, Connection), for
    a client protocol that frames and serialises itself (HTTP/2)."""
    fields = resp.headers
    if resp.connection_tokens:
        fields = _drop_named(fields, resp.connection_tokens)
    if policy.hsts is not None:
        fields = _drop_sts(fields)
    out = list(fields)
    if policy.via:
        out.append((b"via", _VIA[resp.version]))
    if request_id is not None:
        rid_name = policy.request_id_header
        if rid_name == b"x-request-id":
            if resp.request_id is None:
                out.append((rid_name, request_id))
        elif resp.header(rid_name) is None:
            out.append((rid_name, request_id))
    out += policy.response_fields
    out += extra
    return rewriter.apply(out) if rewriter is not None else out


def interim_head(resp: Response) -> bytes:
    """A 1xx response relayed as is (minus hop-by-hop fields)."""
    return _serialise(b"HTTP/1.1 %d %s" % (resp.status, resp.reason or b"Continue"), resp.headers)
