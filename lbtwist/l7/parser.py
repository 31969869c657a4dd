"""Strict HTTP/1.1 message parsing for both sides of the proxy, sans-IO.

Division of labour, and why:
  - *We* frame messages: find the end of the header block (so the request-line
    and header-block limits are exact and answered with 414/431), then count
    Content-Length bodies or run our own strict chunked decoder. httptools
    would otherwise parse straight on into the next pipelined request while we
    are still forwarding this one.
  - *httptools (llhttp, strict mode)* validates each header block: it rejects
    Content-Length with Transfer-Encoding, duplicate or malformed
    Content-Length, obs-fold, bare CR/LF, control characters, whitespace before
    the colon, bad tokens, methods and targets. ``set_dangerous_leniencies`` is
    never called. It is given no per-header callbacks: once llhttp has accepted
    the block, its line structure is known to be clean, so the fields the
    proxy interprets are found with one regular-expression scan of the block
    and cut out, and the rest is forwarded as the raw bytes it arrived as
    (per-header Python work was the largest cost of the proxy's hot path).
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

_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

#: Methods safe to send twice (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# Parser states.
HEAD, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE, DONE, CLOSED, UPGRADED = range(7)

# What the proxy does with a field it interprets.
(HOST, CONTENT_LENGTH, TRANSFER_ENCODING, CONNECTION, HOP, UPGRADE, EXPECT, XFF, FORWARDED, VIA,
 REQUEST_ID, COOKIE, DROP) = range(13)

_REQUEST_SPECIAL = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"proxy-connection": CONNECTION,
    b"keep-alive": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
    b"x-forwarded-for": XFF,
    b"forwarded": FORWARDED,
    b"via": VIA,
    b"x-request-id": REQUEST_ID,
    b"cookie": COOKIE,
    b"x-forwarded-proto": DROP,
    b"x-forwarded-host": DROP,
}
_RESPONSE_SPECIAL = {
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"proxy-connection": CONNECTION,
    b"keep-alive": HOP,
    b"te": HOP,
    b"trailer": HOP,
    b"upgrade": UPGRADE,
    b"x-request-id": REQUEST_ID,
}
#: Kinds that stay in the forwarded block (read, not rewritten).
_KEPT = (REQUEST_ID, COOKIE)


def _special_re(names: dict[bytes, int]) -> "re.Pattern[bytes]":
    alts = b"|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rb"\r\n(" + alts + rb"):")


_REQUEST_SPECIAL_RE = _special_re(_REQUEST_SPECIAL)
_RESPONSE_SPECIAL_RE = _special_re(_RESPONSE_SPECIAL)


def parse_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """``b"\\r\\nName: value..."`` (a validated block) -> [(name, value)]."""
    out = []
    for line in block.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            out.append((name, value.strip(b" \t")))
    return out


def _cut(head: bytes, start: int, end: int, cuts: list[tuple[int, int]]) -> bytes:
    """``head[start:end]`` without the ``cuts`` (sorted, disjoint) ranges."""
    if not cuts:
        return head[start:end]
    parts = []
    pos = start
    for a, b in cuts:
        parts.append(head[pos:a])
        pos = b
    parts.append(head[pos:end])
    return b"".join(parts)


class Request:
    """A parsed request head.

    ``fields`` holds the end-to-end header lines exactly as received, each
    prefixed by CRLF (``b"\\r\\nAccept: */*\\r\\nUser-Agent: x"``), ready to
    forward; the fields the proxy interprets or rewrites (Host, framing,
    Connection and its kin, Expect, forwarding headers) are cut out of it and
    held in attributes. Attributes default at class level and only what a
    request carries is set on the instance: this object is built per request."""

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
    #: End-to-end header lines as received (see the class docstring).
    fields = b""
    #: The whole head as received.
    raw = b""
    _all: list[tuple[bytes, bytes]] | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The forwarded end-to-end fields as (name, value) pairs."""
        return parse_fields(self.fields)

    @property
    def all_headers(self) -> list[tuple[bytes, bytes]]:
        """Every header field as received (routing and hash keys read these)."""
        if self._all is None:
            raw = self.raw
            self._all = parse_fields(raw[raw.find(b"\r\n"):-2])
        return self._all

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
    """A parsed response head from a backend; ``fields`` as in L{Request}."""

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
    #: The backend's own X-Request-Id (kept in ``fields``).
    request_id: bytes | None = None
    fields = b""
    raw = b""

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return parse_fields(self.fields)

    @property
    def all_headers(self) -> list[tuple[bytes, bytes]]:
        raw = self.raw
        return parse_fields(raw[raw.find(b"\r\n"):-2])

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
    value = value.lower()
    if value == b"keep-alive" or value == b"close":  # the usual case
        return (value,)
    return tuple(t for t in (t.strip(b" \t") for t in value.split(b",")) if t)


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


class _Fields:
    """The interpreted fields found in one validated header block."""

    __slots__ = ("hosts", "cl", "te", "conn", "upgrade", "expect")

    def __init__(self) -> None:
        self.hosts = 0
        self.cl: bytes | None = None
        self.te: bytes | None = None
        self.conn: tuple[bytes, ...] = ()
        self.upgrade: bytes | None = None
        self.expect: bytes | None = None


def _scan(head: bytes, msg: Any, pattern: "re.Pattern[bytes]", table: dict[bytes, int],
          start: int) -> tuple[_Fields | None, bytes]:
    """Find the interpreted fields of ``msg``'s validated ``head`` (the field
    block starts at ``start``, the CRLF ending the first line); returns them
    and the block of the remaining end-to-end fields."""
    end = len(head) - 4  # the block ends before the CRLF of its last line
    found = None
    cuts: list[tuple[int, int]] = []
    for m in pattern.finditer(head.lower(), start, end):
        if found is None:
            found = _Fields()
        kind = table[m.group(1)]
        a = m.end()
        b = head.find(b"\r\n", a)
        value = head[a:b].strip(b" \t")
        if kind == HOST:
            found.hosts += 1
            msg.host = value
        elif kind == CONTENT_LENGTH:
            found.cl = value
        elif kind == TRANSFER_ENCODING:
            found.te = value if found.te is None else found.te + b"," + value
        elif kind == CONNECTION:
            found.conn += _connection_tokens(value)
        elif kind == UPGRADE:
            found.upgrade = value
        elif kind == EXPECT:
            found.expect = value if found.expect is None else found.expect + b"," + value
        elif kind == XFF:
            msg.x_forwarded_for = value if msg.x_forwarded_for is None else msg.x_forwarded_for + b", " + value
        elif kind == FORWARDED:
            msg.forwarded = value if msg.forwarded is None else msg.forwarded + b", " + value
        elif kind == VIA:
            msg.via = value if msg.via is None else msg.via + b", " + value
        elif kind == REQUEST_ID:
            if msg.request_id is None:
                msg.request_id = value
            continue  # kept in the block
        elif kind == COOKIE:
            msg.cookie = value if msg.cookie is None else msg.cookie + b"; " + value
            continue
        cuts.append((m.start(), b))
    return found, _cut(head, start, end, cuts)


class _Done:
    """httptools callback target: only "the header block is complete"."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


_NO_FIELDS = _Fields()


class _Framer:
    """Shared framing: header-block search with limits, body counting, chunked."""

    def __init__(self, max_line: int, max_head: int, max_headers: int) -> None:
        self.max_line = max_line
        self.max_head = max_head
        self.max_headers = max_headers
        self.state = HEAD
        self._buf = b""
        self._left = 0
        self._chunked: ChunkedDecoder | None = None
        self.body_size = 0
        self._feeding = False

    def buffered(self) -> int:
        """Bytes held but not yet parsed (pipelined data while DONE)."""
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Hand over unparsed bytes (after an upgrade) and stop parsing."""
        b, self._buf = self._buf, b""
        self.state = UPGRADED
        return b

    def stop(self) -> None:
        """Parse nothing more (the connection is closing)."""
        self.state = CLOSED
        self._buf = b""

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

    def __init__(self, handler: RequestHandler, *, max_request_line: int = 8192,
                 max_header_size: int = 32768, max_headers: int = 100) -> None:
        super().__init__(max_request_line, max_header_size, max_headers)
        self.handler = handler
        self._done = _Done()
        self._hp: Any = None
        #: 413 when a body grows past this (set per request by the handler; 0: no limit).
        self.max_body = 0

    def feed(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._feeding:  # re-entered from a handler callback: queue
            self._buf = data
            return
        self._feeding = True
        try:
            self._feed(data)
        finally:
            self._feeding = False

    def _feed(self, data: bytes) -> None:
        handler = self.handler
        while data:
            state = self.state
            if state == BODY_LENGTH:
                left = self._left
                if len(data) <= left:
                    self._left = left - len(data)
                    handler.on_body(data)
                    if self._left:
                        return
                    data = b""
                else:
                    self._left = 0
                    handler.on_body(data[:left])
                    data = data[left:]
                self._end()
            elif state == HEAD:
                if data[0] in (13, 10):  # empty lines before a request-line (RFC 9112 2.2)
                    data = data.lstrip(b"\r\n")
                    if not data:
                        return
                end = self._find_head_end(data)
                if end < 0:
                    self._buf = data
                    return
                head = data[:end]
                data = data[end:]
                self._head(head)
            elif state == BODY_CHUNKED:
                rest = self._chunked.feed(data)  # type: ignore[union-attr]
                if rest is None:
                    return
                data = rest
                self._end()
            else:  # DONE (hold pipelined bytes until next()), CLOSED, UPGRADED
                if state == DONE:
                    self._buf += data
                return

    def next(self) -> None:
        """Start on the next request (processes any bytes already held)."""
        if self.state != DONE:
            return
        self.state = HEAD
        self.max_body = 0
        self.body_size = 0
        if self._buf and not self._feeding:
            data, self._buf = self._buf, b""
            self.feed(data)

    def _end(self) -> None:
        self.state = DONE
        self.handler.on_end()

    def _body_data(self, data: bytes) -> None:
        size = self.body_size + len(data)
        self.body_size = size
        if self.max_body and size > self.max_body:
            raise ParseError(413, f"request body larger than {self.max_body} bytes")
        self.handler.on_body(data)

    def _head(self, head: bytes) -> None:
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
        sp1 = head.find(b" ")
        sp2 = head.find(b" ", sp1 + 1)
        if head.find(b" ", sp2 + 1, line_end) >= 0:
            raise ParseError(400, "malformed request line")
        done = self._done
        done.complete = False
        hp = self._hp
        if hp is None:
            hp = self._hp = httptools.HttpRequestParser(done)
        try:
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
        if not done.complete:
            self._hp = None
            raise ParseError(400, "malformed request head")
        if head.count(b"\r\n") - 2 > self.max_headers:
            self._hp = None
            raise ParseError(431, f"more than {self.max_headers} header fields")
        req = Request()
        req.raw = head
        if version != b"1.1":
            req.version = version
        req.method = head[:sp1]
        found, req.fields = _scan(head, req, _REQUEST_SPECIAL_RE, _REQUEST_SPECIAL, line_end)
        self._validate(req, found or _NO_FIELDS, head[sp1 + 1:sp2])
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

    def _validate(self, req: Request, f: _Fields, target: bytes) -> None:
        method = req.method
        if method == b"CONNECT":
            raise ParseError(501, "CONNECT is not supported by this reverse proxy")
        if b"#" in target:
            raise ParseError(400, "fragment in request target")
        if target[:1] == b"/":
            req.target = target
        elif target == b"*":
            if method != b"OPTIONS":
                raise ParseError(400, "asterisk-form target is only valid with OPTIONS")
            req.target = target
        else:
            self._absolute_target(req, target)
        if f.hosts != 1:
            if f.hosts > 1:
                raise ParseError(400, "more than one Host header")
            if not req.absolute and req.version == b"1.1":
                raise ParseError(400, "missing Host header")
        host = req.host
        if host is not None and _HOST_RE.fullmatch(host) is None:
            raise ParseError(400, "invalid Host header")
        if f.te is not None:
            if req.version == b"1.0":
                raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
            te, chunked_last = _parse_te(f.te)
            if not chunked_last:
                raise ParseError(400, "Transfer-Encoding whose final coding is not chunked")
            if f.cl is not None:  # llhttp checks this too; belt and braces
                raise ParseError(400, "both Content-Length and Transfer-Encoding")
            req.te = te
            req.chunked = True
            req.has_body = True
        elif f.cl is not None:
            cl = f.cl
            if not cl.isdigit() or len(cl) > 18:
                raise ParseError(400, "invalid Content-Length")
            n = int(cl)
            req.content_length = n
            if n:
                req.has_body = True
        tokens = f.conn
        if tokens:
            req.connection_tokens = tokens
            if req.version == b"1.1":
                if b"close" in tokens:
                    req.keep_alive = False
            else:
                req.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
            if f.upgrade is not None and b"upgrade" in tokens and req.version == b"1.1" and not req.has_body:
                req.upgrade = f.upgrade
        elif req.version == b"1.0":
            req.keep_alive = False
        if f.expect is not None:
            if f.expect.lower() != b"100-continue":
                raise ParseError(417, "only Expect: 100-continue is supported")
            req.expect_continue = req.version == b"1.1"

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

    def __init__(self, handler: ResponseHandler, *, max_header_size: int = 65536, max_headers: int = 200) -> None:
        super().__init__(max_header_size, max_header_size, max_headers)
        self.handler = handler
        self._done = _Done()
        self.head_request = False
        self.state = DONE  # until a request is sent

    def expect(self, head_request: bool) -> None:
        """A request was sent: parse its response (processes held bytes)."""
        self.head_request = head_request
        self.state = HEAD
        self.body_size = 0
        if self._buf and not self._feeding:
            data, self._buf = self._buf, b""
            self.feed(data)

    def feed(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._feeding:
            self._buf = data
            return
        self._feeding = True
        try:
            self._feed(data)
        finally:
            self._feeding = False

    def _feed(self, data: bytes) -> None:
        handler = self.handler
        while data:
            state = self.state
            if state == BODY_LENGTH:
                left = self._left
                if len(data) <= left:
                    self._left = left - len(data)
                    self.body_size += len(data)
                    handler.on_body(data)
                    if self._left:
                        return
                    data = b""
                else:
                    self._left = 0
                    self.body_size += left
                    handler.on_body(data[:left])
                    data = data[left:]
                self._end()
            elif state == HEAD:
                end = self._find_head_end(data)
                if end < 0:
                    self._buf = data
                    return
                head = data[:end]
                data = data[end:]
                self._head(head)
            elif state == BODY_CHUNKED:
                rest = self._chunked.feed(data)  # type: ignore[union-attr]
                if rest is None:
                    return
                data = rest
                self._end()
            elif state == BODY_CLOSE:
                self.body_size += len(data)
                handler.on_body(data)
                return
            else:  # DONE, UPGRADED: hold (the connection judges extra bytes); CLOSED: drop
                if state != CLOSED:
                    self._buf += data
                return

    def eof(self) -> bool:
        """The connection closed. Returns True if that completed a
        close-delimited body (the response is whole), False otherwise."""
        if self.state == BODY_CLOSE:
            self._end()
            return True
        return False

    def _end(self) -> None:
        self.state = DONE
        self.handler.on_end()

    def _chunk_data(self, data: bytes) -> None:
        self.body_size += len(data)
        self.handler.on_body(data)

    def _head(self, head: bytes) -> None:
        v = head[:9]
        if v == b"HTTP/1.1 ":
            version = b"1.1"
        elif v == b"HTTP/1.0 ":
            version = b"1.0"
        else:
            raise ParseError(502, f"malformed status line or unsupported version ({head[:16]!r})")
        done = self._done
        done.complete = False
        hp = httptools.HttpResponseParser(done)
        try:
            hp.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            raise ParseError(502, f"malformed response head ({e})") from None
        if not done.complete or head.count(b"\r\n") - 2 > self.max_headers:
            raise ParseError(502, "malformed response head")
        resp = Response()
        resp.raw = head
        line_end = head.find(b"\r\n")
        status = hp.get_status_code()
        resp.status = status
        resp.reason = head[13:line_end]
        found, resp.fields = _scan(head, resp, _RESPONSE_SPECIAL_RE, _RESPONSE_SPECIAL, line_end)
        if version == b"1.0":
            resp.version = version
            resp.keep_alive = False
        if found is not None:
            tokens = found.conn
            if tokens:
                resp.connection_tokens = tokens
                if b"close" in tokens:
                    resp.keep_alive = False
                elif version == b"1.0":
                    resp.keep_alive = b"keep-alive" in tokens
            if found.upgrade is not None:
                resp.upgrade = found.upgrade
            if found.te is not None:
                try:
                    te, chunked_last = _parse_te(found.te)
                except ParseError as e:
                    raise ParseError(502, e.reason) from None
                if found.cl is not None:
                    raise ParseError(502, "response with both Content-Length and Transfer-Encoding")
                resp.te = te
                resp.chunked = chunked_last
            elif found.cl is not None:
                cl = found.cl
                if not cl.isdigit() or len(cl) > 18:
                    raise ParseError(502, "invalid Content-Length in response")
                resp.content_length = int(cl)
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
        if resp.chunked:
            self.state = BODY_CHUNKED
            self._chunked = ChunkedDecoder(self._chunk_data, max_trailer=self.max_head, status=502)
        elif resp.te is not None:
            self.state = BODY_CLOSE  # a transfer coding we do not decode: until close
            resp.keep_alive = False
        elif resp.content_length is not None:
            if resp.content_length:
                self.state = BODY_LENGTH
                self._left = resp.content_length
            else:
                self.state = DONE
        else:
            self.state = BODY_CLOSE
            resp.keep_alive = False
        self.handler.on_response(resp)
        if self.state == DONE:
            self.handler.on_end()
