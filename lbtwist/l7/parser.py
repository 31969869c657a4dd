"""Strict HTTP/1.1 message parsing for both sides of the proxy, sans-IO.

Division of labour, and why:
  - *We* frame messages: find the end of the header block (so the request-line
    and header-block limits are exact and answered with 414/431), then count
    Content-Length bodies or run our own strict chunked decoder. httptools
    would otherwise parse straight on into the next pipelined request while we
    are still forwarding this one.
  - *httptools (llhttp, strict mode)* validates and splits each header block:
    it rejects Content-Length with Transfer-Encoding, duplicate or malformed
    Content-Length, obs-fold, bare CR/LF, control characters, whitespace before
    the colon, bad tokens, methods and targets. ``set_dangerous_leniencies`` is
    never called. It calls back only per header field and at the end of the
    head; method, target and reason are sliced from the first line it accepted.
  - *We* add what llhttp leaves out: exactly one Host on HTTP/1.1, only
    HTTP/1.0 and 1.1, a single space between request-line parts, no fragment
    in the target, ``*`` only with OPTIONS, no CONNECT, a Transfer-Encoding
    whose last coding is ``chunked`` (normalised to lower case), none on
    HTTP/1.0, Expect other than 100-continue.

The parsers are push-style: ``feed(bytes)`` calls handler methods and raises
L{ParseError} on a bad message. After a message ends the parser holds further
bytes (pipelined requests) until ``next()`` is called, so requests on one
connection are processed strictly one after the other.
"""
from __future__ import annotations

import re
from typing import Any, Protocol

import httptools

from lbtwist.l7.chunked import ChunkedDecoder
from lbtwist.l7.errors import ParseError
# Methods safe to send twice (RFC 9110 9.2.2), defined once in lbtwist.resilience.retry.
from lbtwist.resilience.retry import IDEMPOTENT_METHODS_BYTES as IDEMPOTENT_METHODS

_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")
_HOST_MATCH = _HOST_RE.fullmatch
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# Parser states.
HEAD, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE, DONE, CLOSED, UPGRADED = range(7)


class Request:
    """A parsed request head. ``headers`` holds the end-to-end fields in
    arrival order with their original names; the fields the proxy interprets
    or rewrites (Host, framing, Connection and its kin, Expect, forwarding and
    request-id headers) are pulled out into attributes instead.

    Attributes default at class level and only what a request carries is set
    on the instance: this object is built for every request."""

    method = b""
    target = b""
    version = b"1.1"
    host: bytes | None = None
    content_length: int | None = None
    chunked = False
    #: chunked or a non-zero Content-Length.
    has_body = False
    #: Normalised Transfer-Encoding value (lower case) when present.
    te: bytes | None = None
    keep_alive = True
    expect_continue = False
    #: The Upgrade header value when Connection lists "upgrade".
    upgrade: bytes | None = None
    connection_tokens: tuple[bytes, ...] = ()
    x_forwarded_for: bytes | None = None
    forwarded: bytes | None = None
    via: bytes | None = None
    request_id: bytes | None = None
    cookie: bytes | None = None
    #: True when the target was in absolute form (it is rewritten to origin form).
    absolute = False

    # No __init__ (one Python frame less per request): the parser sets
    # ``headers`` (end-to-end fields, in order) and ``special_fields`` (the
    # interpreted ones, as received) on every instance it makes.
    headers: list[tuple[bytes, bytes]]
    special_fields: list[tuple[bytes, bytes]]
    # Parse state set by the header callback. ``_rare`` says a field needing
    # the slower checks arrived (framing, Connection, Upgrade, Expect, a
    # second Host), so a plain GET reads none of the others.
    _rare = False
    _more_hosts = False
    _cl: bytes | None = None
    _te: tuple[bytes, ...] = ()
    _upgrade: bytes | None = None
    _expect: bytes | None = None

    @property
    def all_headers(self) -> list[tuple[bytes, bytes]]:
        """Every header field received (routing and hash keys read these);
        the interpreted ones come last."""
        return self.headers + self.special_fields

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    def header(self, name: bytes) -> bytes | None:
        """First value of ``name`` (lower case) among all received fields."""
        for k, v in self.all_headers:
            if k.lower() == name:
                return v
        return None

    @property
    def path(self) -> bytes:
        t = self.target
        q = t.find(b"?")
        return t if q < 0 else t[:q]

    def __repr__(self) -> str:
        return f"<Request {self.method.decode()} {self.target.decode('latin-1')} HTTP/{self.version.decode()}>"


class Response:
    """A parsed response head from a backend; framing fields pulled out as in L{Request}."""

    status = 0
    reason = b""
    version = b"1.1"
    content_length: int | None = None
    chunked = False
    te: bytes | None = None
    keep_alive = True
    connection_tokens: tuple[bytes, ...] = ()
    upgrade: bytes | None = None
    #: True when this response has no body whatever its headers say
    #: (HEAD request, 1xx, 204, 304).
    no_body = False
    #: The backend sent an X-Request-Id of its own.
    request_id: bytes | None = None

    headers: list[tuple[bytes, bytes]]
    special_fields: list[tuple[bytes, bytes]]
    # Parse state: httptools reports straight to the Response being built
    # (no collector to reset per response). The parser sets
    # ``on_headers_complete`` per instance (see L{ResponseParser._head}).
    _te: bytes | None = None
    _cl: bytes | None = None
    _append: Any = None
    on_headers_complete: Any

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = _RESPONSE_KIND(name)
        if kind is None:
            kind = _learn_kind(_RESPONSE_KINDS, _SPECIAL_RESPONSE, name)
        if not kind:
            self._append((name, value))
            return
        if kind == 11:  # x-request-id: kept in the forwarded fields
            self._append((name, value))
            if self.request_id is None:
                self.request_id = value
            return
        self.special_fields.append((name, value))
        if kind == 2:
            self._cl = value
        elif kind == 4:
            tokens = _COMMON_TOKENS(value)
            self.connection_tokens += _connection_tokens(value) if tokens is None else tokens
        elif kind == 3:
            self._te = value if self._te is None else self._te + b"," + value
        elif kind == 6:
            self.upgrade = value

    @property
    def all_headers(self) -> list[tuple[bytes, bytes]]:
        return self.headers + self.special_fields

    def header(self, name: bytes) -> bytes | None:
        """First value of ``name`` (lower case) among all received fields."""
        for k, v in self.all_headers:
            if k.lower() == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


class RequestHandler(Protocol):
    def on_request(self, request: Request) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


class ResponseHandler(Protocol):
    def on_informational(self, response: Response) -> None: ...
    def on_response(self, response: Response) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


def _connection_tokens(value: bytes) -> tuple[bytes, ...]:
    return tuple(t for t in (t.strip(b" \t").lower() for t in value.split(b",")) if t)


#: The usual Connection values, looked up without a call.
_COMMON_TOKENS = {b"keep-alive": (b"keep-alive",), b"close": (b"close",)}.get


def _parse_te(value: bytes) -> tuple[bytes, bool]:
    """Normalise a Transfer-Encoding list; (normalised, chunked-is-last).
    Raises ParseError if chunked appears anywhere but last."""
    codings = [c.strip(b" \t").lower() for c in value.split(b",")]
    codings = [c for c in codings if c]
    if not codings:
        raise ParseError(400, "empty Transfer-Encoding")
    for c in codings:
        if not _TOKEN_RE.fullmatch(c):
            raise ParseError(400, "malformed Transfer-Encoding")
    if b"chunked" in codings[:-1]:
        raise ParseError(400, "Transfer-Encoding: chunked must be the final coding, once")
    return b", ".join(codings), codings[-1] == b"chunked"


class _HeadCollector:
    """httptools callbacks for the request parser, which is reused across a
    connection's requests: sorts each field into the current L{Request}."""

    def __init__(self) -> None:
        self.msg: Any = None
        self.append: Any = None
        #: Non-empty while a head is parsed: llhttp empties it at the end of
        #: the head through the C-level ``list.clear``, not a Python frame.
        self.pending: list[bool] = []
        self.on_headers_complete = self.pending.clear

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = _REQUEST_KIND(name)
        if kind is None:
            kind = _learn_kind(_REQUEST_KINDS, _SPECIAL, name)
        if not kind:
            self.append((name, value))
            return
        msg = self.msg
        if kind == 1:  # host
            msg.special_fields.append((name, value))
            if msg.host is not None:
                msg._more_hosts = msg._rare = True
            msg.host = value
        elif kind < 8:  # framing and hop-by-hop fields; checked by _rare_fields
            msg.special_fields.append((name, value))
            msg._rare = True
            if kind == 2:  # content-length (llhttp rejects duplicates and junk)
                msg._cl = value
            elif kind == 3:
                msg._te += (value,)
            elif kind == 4:  # connection, proxy-connection
                tokens = _COMMON_TOKENS(value)
                msg.connection_tokens += _connection_tokens(value) if tokens is None else tokens
            elif kind == 6:
                msg._upgrade = value
            elif kind == 7:
                msg._expect = value if msg._expect is None else msg._expect + b"," + value
            # kind 5, other hop-by-hop (keep-alive, te, trailer): not forwarded
        elif kind < 11:  # pulled out of the forwarded fields; kept for routing
            msg.special_fields.append((name, value))
            if kind == 8:
                msg.x_forwarded_for = value if msg.x_forwarded_for is None else msg.x_forwarded_for + b", " + value
            elif kind == 9:
                msg.forwarded = value if msg.forwarded is None else msg.forwarded + b", " + value
            else:
                msg.via = value if msg.via is None else msg.via + b", " + value
        elif kind == 11:
            self.append((name, value))
            if msg.request_id is None:
                msg.request_id = value
        elif kind == 12:
            self.append((name, value))
            msg.cookie = value if msg.cookie is None else msg.cookie + b"; " + value
        # kind 13, x-forwarded-proto/host: set by us


#: Fields never forwarded in either direction (names lower case): they
#: describe one connection (RFC 9110 7.6.1); framing is re-declared for the
#: next hop. The parsers pull them out of the forwarded fields (the kinds
#: below); L{lbtwist.l7.headers} re-exports this set.
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
))
#: The hop-by-hop fields the parsers interpret (the rest are only dropped: kind 5).
_HOP_KIND = {b"transfer-encoding": 3, b"connection": 4, b"proxy-connection": 4, b"upgrade": 6}
_HOP = {name: _HOP_KIND.get(name, 5) for name in HOP_BY_HOP}

#: Request fields the proxy interprets or sets, by kind (see _HeadCollector).
_SPECIAL = {
    b"host": 1,
    b"content-length": 2,
    **_HOP,
    b"expect": 7,
    b"x-forwarded-for": 8,
    b"forwarded": 9,
    b"via": 10,
    b"x-request-id": 11,
    b"cookie": 12,
    b"x-forwarded-proto": 13,
    b"x-forwarded-host": 13,
}

#: Response fields the proxy interprets: framing and hop-by-hop ones.
_SPECIAL_RESPONSE = {
    b"content-length": 2,
    **_HOP,
    b"x-request-id": 11,
}

#: Field name as received -> its kind above, 0 for a forwarded field: learned
#: as names arrive, so the usual spellings skip ``lower()``. Bounded, since
#: peers choose the names.
_REQUEST_KINDS: dict[bytes, int] = {}
_RESPONSE_KINDS: dict[bytes, int] = {}
_REQUEST_KIND = _REQUEST_KINDS.get
_RESPONSE_KIND = _RESPONSE_KINDS.get


def _learn_kind(kinds: dict[bytes, int], table: dict[bytes, int], name: bytes) -> int:
    kind = table.get(name.lower(), 0)
    if len(kinds) < 1000 and len(name) <= 64:
        kinds[name] = kind
    return kind


class _Framer:
    """Shared framing: header-block search with limits, body counting, chunked."""

    def __init__(self, max_line: int, max_head: int, max_headers: int) -> None:
        self.max_line = max_line
        self.max_head = max_head
        self.max_headers = max_headers
        # A field line llhttp accepts takes at least 4 bytes ("n:\r\n"), so a
        # head with fewer bytes than this after its first line cannot hold
        # more than max_headers fields and need not be counted.
        self._short_head = 4 * max_headers + 8
        self.state = HEAD
        #: Bytes received but not parsed yet (a pipelined request, or bytes
        #: after a response for the connection to judge).
        self.held = b""
        self._left = 0
        self._chunked: ChunkedDecoder | None = None
        self.body_size = 0
        self._feeding = False

    def buffered(self) -> int:
        """Bytes held but not yet parsed (pipelined data while DONE)."""
        return len(self.held)

    def take_buffer(self) -> bytes:
        """Hand over unparsed bytes (after an upgrade) and stop parsing."""
        b, self.held = self.held, b""
        self.state = UPGRADED
        return b

    def stop(self) -> None:
        """Parse nothing more (the connection is closing)."""
        self.state = CLOSED
        self.held = b""

    #: Skip empty lines before a head (RFC 9112 2.2: requests only).
    _skip_blank = False
    #: States in which further bytes are held for later (pipelining, or for
    #: the connection to judge); in the others (CLOSED...) they are dropped.
    _hold_in: frozenset[int] = frozenset((DONE,))

    def feed(self, data: bytes) -> None:
        """Parse ``data``, calling the handler; raises L{ParseError}."""
        if self.held:
            data = self.held + data
            self.held = b""
        if self._feeding:  # re-entered from a handler callback: queue
            self.held = data
            return
        self._feeding = True
        try:
            while data:
                state = self.state
                if state == HEAD:
                    if self._skip_blank and data[0] in (13, 10):
                        data = data.lstrip(b"\r\n")
                        if not data:
                            return
                    end = data.find(b"\n\r\n") + 3
                    if end < 3 or end > self.max_head:
                        end = self._find_head_end(data)
                        if end < 0:
                            self.held = data
                            return
                    if end == len(data):
                        self._head(data)
                        return
                    head = data[:end]
                    data = data[end:]
                    self._head(head)
                elif state == BODY_LENGTH:
                    left = self._left
                    n = len(data)
                    if n < left:
                        self._left = left - n
                        self.body_size += n
                        self.handler.on_body(data)
                        return
                    self._left = 0
                    self.body_size += left
                    if n == left:
                        self.handler.on_body(data)
                        data = b""
                    else:
                        self.handler.on_body(data[:left])
                        data = data[left:]
                    self.state = DONE  # _end() inline: a frame less per message
                    self.handler.on_end()
                elif state == BODY_CHUNKED:
                    rest = self._chunked.feed(data)  # type: ignore[union-attr]
                    if rest is None:
                        return
                    data = rest
                    self._end()
                elif state == BODY_CLOSE:  # responses only
                    self.body_size += len(data)
                    self.handler.on_body(data)
                    return
                else:
                    if state in self._hold_in:
                        self.held += data
                    return
        finally:
            self._feeding = False

    def _end(self) -> None:
        self.state = DONE
        self.handler.on_end()  # type: ignore[attr-defined]

    def _find_head_end(self, data: bytes) -> int:
        """Index just past the header block, or -1 if incomplete. Raises on limits."""
        end = data.find(b"\n\r\n")
        if end >= 0:
            end += 3
        else:
            end = data.find(b"\n\n")  # a bare-LF head: let llhttp reject it now
            if end >= 0:
                end += 2
        if end < 0:
            if len(data) > self.max_head:
                self._limit_error(data)
            if len(data) > self.max_line + 1 and data.find(b"\n", 0, self.max_line + 2) < 0:
                raise ParseError(self.line_status, "request line too long")
            return -1
        if end > self.max_head:
            self._limit_error(data)
        return end

    line_status = 414

    def _limit_error(self, data: bytes) -> None:
        nl = data.find(b"\n")
        if nl < 0 or nl > self.max_line + 1:
            raise ParseError(self.line_status, "request line too long")
        raise ParseError(431 if self.line_status == 414 else 502, "header block too large")


class RequestParser(_Framer):
    """Client side: bytes in, L{Request}s and body data out."""

    _skip_blank = True

    def __init__(self, handler: RequestHandler, *, max_request_line: int = 8192,
                 max_header_size: int = 32768, max_headers: int = 100) -> None:
        super().__init__(max_request_line, max_header_size, max_headers)
        self.handler = handler
        self._collector = _HeadCollector()
        self._hp: Any = None
        #: The last Host value found valid.
        self._good_host: bytes | None = None
        #: 413 when a body grows past this (set per request by the handler; 0: no limit).
        self.max_body = 0

    def next(self) -> None:
        """Start on the next request (processes any bytes already held)."""
        if self.state != DONE:
            return
        self.state = HEAD
        self.max_body = 0
        self.body_size = 0
        if self.held and not self._feeding:
            data, self.held = self.held, b""
            self.feed(data)

    def _body_data(self, data: bytes) -> None:
        size = self.body_size + len(data)
        self.body_size = size
        if self.max_body and size > self.max_body:
            raise ParseError(413, f"request body larger than {self.max_body} bytes")
        self.handler.on_body(data)

    def _head(self, head: bytes) -> None:
        # One frame for the whole head: the request line is split here, and
        # llhttp only calls back per header field (see _HeadCollector).
        line_end = head.find(b"\r\n")
        if line_end > self.max_line:
            raise ParseError(414, "request line too long")
        version = head[line_end - 9:line_end] if line_end > 9 else b""
        if version == b" HTTP/1.1":
            version = b"1.1"
        elif version == b" HTTP/1.0":
            version = b"1.0"
        else:
            # Decide on the version before llhttp (which knows HTTP/2's
            # preface and RTSP): only 1.0 and 1.1 are spoken here.
            if version[:7] == b" HTTP/2" or version[:7] == b" HTTP/3":
                raise ParseError(505, "HTTP version not supported (only HTTP/1.0 and 1.1)")
            raise ParseError(400, "malformed request line or unsupported HTTP version")
        # Exactly two spaces: the first after the method, the second starting
        # " HTTP/1.x" (bytes.find and count parse their arguments slowly; an
        # int needle with ``in`` is a plain memchr).
        sp = head.find(b" ")
        target = head[sp + 1:line_end - 9]
        if sp == line_end - 9 or 32 in target:
            raise ParseError(400, "malformed request line")
        req = Request()
        headers = req.headers = []
        req.special_fields = []
        col = self._collector
        col.msg = req
        col.append = headers.append
        pending = col.pending
        pending.append(True)
        hp = self._hp
        if hp is None:
            hp = self._hp = httptools.HttpRequestParser(col)
        try:
            # llhttp validates the method and target without an on_url
            # callback; they are sliced from the request line below.
            hp.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._hp = None
        except httptools.HttpParserInvalidMethodError:
            self._hp = None
            raise ParseError(400, "invalid method") from None
        except httptools.HttpParserInvalidURLError:
            self._hp = None
            raise ParseError(400, "invalid request target") from None
        except httptools.HttpParserError as e:
            self._hp = None
            raise ParseError(400, str(e) or "malformed request") from None
        if pending:
            pending.clear()
            self._hp = None
            raise ParseError(400, "malformed request head")
        if len(head) - line_end >= self._short_head and head.count(b"\n") - 2 > self.max_headers:
            self._hp = None
            raise ParseError(431, f"more than {self.max_headers} header fields")
        if version != b"1.1":
            req.version = version
        method = req.method = head[:sp]
        if method == b"CONNECT":
            raise ParseError(501, "CONNECT is not supported by this reverse proxy")
        if 35 in target:  # b"#"
            raise ParseError(400, "fragment in request target")
        if target[:1] == b"/":
            req.target = target
        elif target == b"*":
            if method != b"OPTIONS":
                raise ParseError(400, "asterisk-form target is only valid with OPTIONS")
            req.target = target
        else:
            self._absolute_target(req, target)  # its authority replaces Host
        rare = req._rare
        if rare and req._more_hosts:
            raise ParseError(400, "more than one Host header")
        host = req.host
        if host is None:
            if version == b"1.1":
                raise ParseError(400, "missing Host header")
        elif host != self._good_host:  # a keep-alive connection repeats its Host
            if _HOST_MATCH(host) is None:
                raise ParseError(400, "invalid Host header")
            self._good_host = host
        if not rare:  # no body, no upgrade
            if version == b"1.0":
                req.keep_alive = False
            self.state = DONE
            self.handler.on_request(req)
            if self.state == DONE:
                self.handler.on_end()
            return
        self._rare_fields(req, version)
        if req.has_body or req.upgrade is not None:
            # llhttp now waits for a body we frame ourselves (or paused on an
            # upgrade): start the next head on a fresh parser.
            self._hp = None
        if req.chunked:
            self.state = BODY_CHUNKED
            self._chunked = ChunkedDecoder(self._body_data, max_trailer=self.max_head)
        elif req.has_body:
            self.state = BODY_LENGTH
            self._left = req.content_length
        else:
            self.state = DONE
        self.handler.on_request(req)
        if self.state == DONE and not req.has_body:
            self.handler.on_end()
        elif self.state == BODY_CHUNKED:
            self._chunked.limit = self.max_body  # type: ignore[union-attr]

    @staticmethod
    def _rare_fields(req: Request, version: bytes) -> None:
        """Framing, Connection, Upgrade and Expect checks."""
        if req._te:
            if version == b"1.0":
                raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
            te, chunked_last = _parse_te(b",".join(req._te))
            if not chunked_last:
                raise ParseError(400, "Transfer-Encoding whose final coding is not chunked")
            if req._cl is not None:  # llhttp checks this too; belt and braces
                raise ParseError(400, "both Content-Length and Transfer-Encoding")
            req.te = te
            req.chunked = True
            req.has_body = True
        elif req._cl is not None:
            cl = req._cl.strip(b" \t")
            if not cl.isdigit() or len(cl) > 18:
                raise ParseError(400, "invalid Content-Length")
            n = int(cl)
            req.content_length = n
            if n:
                req.has_body = True
        tokens = req.connection_tokens
        if tokens:
            if version == b"1.1":
                if b"close" in tokens:
                    req.keep_alive = False
            else:
                req.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
            if req._upgrade is not None and b"upgrade" in tokens and version == b"1.1" and not req.has_body:
                req.upgrade = req._upgrade
        elif version == b"1.0":
            req.keep_alive = False
        expect = req._expect
        if expect is not None:
            if expect.strip(b" \t").lower() != b"100-continue":
                raise ParseError(417, "only Expect: 100-continue is supported")
            req.expect_continue = version == b"1.1"

    @staticmethod
    def _absolute_target(req: Request, target: bytes) -> None:
        lower = target[:8].lower()
        if lower.startswith(b"http://"):
            rest = target[7:]
        elif lower.startswith(b"https://"):
            rest = target[8:]
        else:
            raise ParseError(400, "invalid request target")
        slash = rest.find(b"/")
        q = rest.find(b"?")
        cut = min(x for x in (slash, q, len(rest)) if x >= 0)
        authority = rest[:cut]
        if b"@" in authority or not authority:
            raise ParseError(400, "invalid authority in absolute-form target")
        path = rest[cut:]
        req.target = path if path[:1] == b"/" else b"/" + path
        req.absolute = True
        # RFC 9112 3.2.2: the target's authority replaces Host.
        req.host = authority


class ResponseParser(_Framer):
    """Backend side: bytes in, L{Response}s and body data out. Told per
    request whether it was HEAD (no body whatever the headers say), which
    httptools cannot be told. Errors are ParseError(502)."""

    line_status = 502
    # After a response: held for the connection to judge; after a 101: the tunnel's.
    _hold_in = frozenset((DONE, UPGRADED))

    def __init__(self, handler: ResponseHandler, *, max_header_size: int = 65536, max_headers: int = 200) -> None:
        super().__init__(max_header_size, max_header_size, max_headers)
        self.handler = handler
        self.head_request = False
        self.state = DONE  # until a request is sent
        self._pending: list[bool] = []
        self._head_done = self._pending.clear

    def expect(self, head_request: bool) -> None:
        """A request was sent: parse its response (processes held bytes)."""
        self.head_request = head_request
        self.state = HEAD
        self.body_size = 0
        if self.held and not self._feeding:
            data, self.held = self.held, b""
            self.feed(data)

    def eof(self) -> bool:
        """The connection closed. Returns True if that completed a
        close-delimited body (the response is whole), False otherwise."""
        if self.state == BODY_CLOSE:
            self._end()
            return True
        return False

    def _chunk_data(self, data: bytes) -> None:
        self.body_size += len(data)
        self.handler.on_body(data)

    def _head(self, head: bytes) -> None:
        resp = Response()
        headers = resp.headers = []
        resp._append = headers.append
        resp.special_fields = []
        # End of head reported through the C-level list.clear, as for requests.
        pending = self._pending
        pending.append(True)
        resp.on_headers_complete = self._head_done
        hp = httptools.HttpResponseParser(resp)
        try:
            hp.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            raise ParseError(502, f"malformed response head ({e})") from None
        line_end = head.find(b"\r\n")
        if pending or len(head) - line_end >= self._short_head and head.count(b"\n") - 2 > self.max_headers:
            pending.clear()
            raise ParseError(502, "malformed response head")
        v = head[:9]
        if v == b"HTTP/1.1 ":
            v10 = False
        elif v == b"HTTP/1.0 ":
            v10 = True
            resp.version = b"1.0"
            resp.keep_alive = False
        else:
            raise ParseError(502, f"unsupported response version {hp.get_http_version()}")
        status = resp.status = hp.get_status_code()
        # llhttp took "HTTP/1.x NNN" and, after one more space, the reason
        # (no on_status callback needed).
        reason = head[13:line_end]
        if reason:
            resp.reason = reason
        tokens = resp.connection_tokens
        if tokens:
            if b"close" in tokens:
                resp.keep_alive = False
            elif v10:
                resp.keep_alive = b"keep-alive" in tokens
        cl = resp._cl
        te = resp._te
        chunked = False
        length = None
        if te is not None:
            te, chunked = _parse_te(te)
            if cl is not None:
                raise ParseError(502, "response with both Content-Length and Transfer-Encoding")
            resp.te = te
            if chunked:
                resp.chunked = True
        elif cl is not None:
            cl = cl.strip(b" \t")
            if not cl.isdigit() or len(cl) > 18:
                raise ParseError(502, "invalid Content-Length in response")
            length = resp.content_length = int(cl)
        if status < 200:
            if status == 101:
                resp.no_body = True
                self.state = UPGRADED
                self.handler.on_response(resp)
                return
            resp.no_body = True
            self.handler.on_informational(resp)
            return  # stay in HEAD for the final response
        if self.head_request or status == 204 or status == 304:
            resp.no_body = True
            self.state = DONE
            self.handler.on_response(resp)
            if self.state == DONE:
                self.handler.on_end()
            return
        if chunked:
            self.state = BODY_CHUNKED
            self._chunked = ChunkedDecoder(self._chunk_data, max_trailer=self.max_head, status=502)
        elif te is not None:
            self.state = BODY_CLOSE  # a transfer coding we do not decode: until close
            resp.keep_alive = False
        elif length is not None:
            if length:
                self.state = BODY_LENGTH
                self._left = length
            else:
                self.state = DONE
        else:
            self.state = BODY_CLOSE
            resp.keep_alive = False
        self.handler.on_response(resp)
        if self.state == DONE:
            self.handler.on_end()
