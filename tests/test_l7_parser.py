"""The sans-IO parsers, the chunked coding and header serialisation."""
from __future__ import annotations

import httptools
import pytest

from lbtwist.config.model import HeaderRewrite
from lbtwist.l7.chunked import ChunkedDecoder, encode_chunk
from lbtwist.l7.errors import ParseError, error_page
from lbtwist.l7.headers import (
    FRAME_CHUNKED,
    FRAME_CLOSE,
    FRAME_LENGTH,
    FRAME_NONE,
    ForwardingPolicy,
    Rewriter,
    backend_request_head,
    client_framing,
    client_response_head,
)
from lbtwist.l7.parser import _SPECIAL, RequestParser, ResponseParser, _learn_kind


class Rec:
    def __init__(self):
        self.ev = []

    def on_request(self, r):
        self.ev.append(("req", r))

    def on_informational(self, r):
        self.ev.append(("info", r.status))

    def on_response(self, r):
        self.ev.append(("resp", r))

    def on_body(self, d):
        if self.ev and self.ev[-1][0] == "body":
            self.ev[-1] = ("body", self.ev[-1][1] + d)
        else:
            self.ev.append(("body", d))

    def on_end(self):
        self.ev.append(("end",))


PIPELINE = (
    b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nT: v\r\n\r\n"
    b"PUT /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz"
    b"\r\nGET /c?q=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 50, len(PIPELINE)])
def test_request_parser_any_split_holds_pipelined_until_next(step):
    rec = Rec()
    p = RequestParser(rec)
    for i in range(0, len(PIPELINE), step):
        p.feed(PIPELINE[i:i + step])
    kinds = [e[0] for e in rec.ev]
    assert kinds == ["req", "body", "end"]  # the next request waits for next()
    assert rec.ev[1][1] == b"wikipedia"
    assert p.buffered() > 0
    p.next()
    assert [e[0] for e in rec.ev] == ["req", "body", "end", "req", "body", "end"]
    assert rec.ev[4][1] == b"xyz"
    p.next()  # the stray CRLF before the third request line is ignored (RFC 9112 2.2)
    req = rec.ev[-2][1]
    assert (req.method, req.target, req.keep_alive, req.path) == (b"GET", b"/c?q=1", False, b"/c")


def test_request_fields_are_pulled_out():
    rec = Rec()
    p = RequestParser(rec)
    p.feed(b"GET / HTTP/1.1\r\nHost: Ex.com\r\nX-A: 1\r\nConnection: keep-alive, X-A\r\nCookie: a=1\r\n"
           b"cookie: b=2\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nExpect: 100-continue\r\n\r\n")
    req = rec.ev[0][1]
    assert req.host == b"Ex.com"
    assert req.connection_tokens == (b"keep-alive", b"x-a")
    assert req.cookie == b"a=1; b=2"
    assert req.x_forwarded_for == b"1.1.1.1, 2.2.2.2"
    assert req.expect_continue
    assert [n for n, _ in req.headers] == [b"X-A", b"Cookie", b"cookie"]
    assert len(req.all_headers) == 8


def test_chunked_limit_applies_from_the_size_line():
    rec = Rec()
    p = RequestParser(rec)

    def on_request(r):
        p.max_body = 10

    rec.on_request = on_request
    with pytest.raises(ParseError) as e:
        p.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nff\r\n")
    assert e.value.status == 413


def test_header_limits():
    p = RequestParser(Rec(), max_request_line=20, max_header_size=100, max_headers=3)
    with pytest.raises(ParseError) as e:
        p.feed(b"GET /" + b"a" * 30)
    assert e.value.status == 414
    p = RequestParser(Rec(), max_request_line=20, max_header_size=100, max_headers=3)
    with pytest.raises(ParseError) as e:
        p.feed(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: " + b"y" * 100)
    assert e.value.status == 431
    p = RequestParser(Rec(), max_request_line=20, max_header_size=1000, max_headers=3)
    with pytest.raises(ParseError) as e:
        p.feed(b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert e.value.status == 431


def test_chunked_decoder_strictness_and_split_points():
    body = encode_chunk(b"hello") + encode_chunk(b" world") + b"0\r\n\r\nNEXT"
    for step in (1, 2, 5, len(body)):
        out = []
        d = ChunkedDecoder(out.append)
        rest = None
        for i in range(0, len(body), step):
            rest = d.feed(body[i:i + step])
            if rest is not None:
                rest += body[i + step:]
                break
        assert b"".join(out) == b"hello world" and rest == b"NEXT" and d.done
    for bad in (b"5 \r\nhello\r\n", b"5\r\nhelloX", b"g\r\n", b"5;\r\nhello\r\n", b"5;a=\r\n",
                b"5\nhello\r\n", b"0\r\nbad trailer\r\n\r\n", b"12345678901234567\r\n"):
        with pytest.raises(ParseError):
            ChunkedDecoder(lambda d: None).feed(bad)


def test_response_parser_head_204_304_and_informational():
    rec = Rec()
    p = ResponseParser(rec)
    p.expect(head_request=True)
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert [e[0] for e in rec.ev] == ["resp", "end"]  # no wait for 1000 bytes
    for status in (204, 304):
        rec.ev.clear()
        p.expect(head_request=False)
        p.feed(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
        assert [e[0] for e in rec.ev] == ["resp", "end"]
    rec.ev.clear()
    p.expect(head_request=False)
    p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.ev[:2] == [("info", 100), ("info", 103)]
    assert [e[0] for e in rec.ev[2:]] == ["resp", "body", "end"]


def test_response_parser_framings():
    rec = Rec()
    p = ResponseParser(rec)
    p.expect(False)
    p.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil")
    p.feed(b" close")
    assert p.eof()
    assert rec.ev[1] == ("body", b"until close") and rec.ev[-1] == ("end",)
    resp = rec.ev[0][1]
    assert not resp.keep_alive
    for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"NOT HTTP\r\n\r\n",
                b"HTTP/2.0 200 OK\r\n\r\n"):
        p = ResponseParser(Rec())
        p.expect(False)
        with pytest.raises(ParseError) as e:
            p.feed(bad)
        assert e.value.status == 502


def _req(raw):
    rec = Rec()
    RequestParser(rec).feed(raw)
    return rec.ev[0][1]


def test_backend_request_head_rewrites_and_framing():
    req = _req(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
               b"User-Agent: u\r\nX-Request-Id: rid\r\n\r\n")
    rw = Rewriter.compile(HeaderRewrite(add={"X-Add": "a"}, set={"User-Agent": "lb"}, remove=["X-Request-Id"]))
    head = backend_request_head(req, client_ip=b"::1", tls=True, request_id=b"unused",
                                policy=ForwardingPolicy(mode="both"), rewriter=rw)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /x HTTP/1.1"
    assert b"transfer-encoding: chunked" in lines
    assert not any(line.lower().startswith(b"x-hop") for line in lines)
    assert b"x-forwarded-proto: https" in lines
    assert b'forwarded: for="[::1]";proto=https;host="h"' in lines
    assert b"User-Agent: lb" in lines and b"User-Agent: u" not in lines
    assert b"X-Add: a" in lines
    assert not any(line.lower().startswith(b"x-request-id") for line in lines)
    assert head.endswith(b"\r\n\r\n")


def test_client_framing_choices():
    p = ResponseParser(Rec())
    rec = Rec()
    p = ResponseParser(rec)
    p.expect(False)
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    resp = rec.ev[0][1]
    assert client_framing(resp, b"1.1") == FRAME_CHUNKED
    assert client_framing(resp, b"1.0") == FRAME_CLOSE
    head = client_response_head(resp, framing=FRAME_CHUNKED, keep_alive=True, client_version=b"1.1",
                                request_id=None, policy=ForwardingPolicy(via=False))
    assert b"transfer-encoding: gzip, chunked\r\n" in head
    resp.content_length, resp.te = 5, None
    assert client_framing(resp, b"1.0") == FRAME_LENGTH
    resp.no_body = True
    assert client_framing(resp, b"1.1") == FRAME_NONE


def test_rewriter_rejects_bad_names_and_values():
    with pytest.raises(ValueError):
        Rewriter.compile(HeaderRewrite(add={"Bad Name": "x"}))
    with pytest.raises(ValueError):
        Rewriter.compile(HeaderRewrite(set={"X": "a\r\nInjected: 1"}))
    assert Rewriter.compile(HeaderRewrite()) is None


def test_error_page_is_small_and_names_the_cause():
    page = error_page(502, "backend 10.0.0.1:80: connection refused")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"content-length: %d" % len(body) in head
    assert body == b"502 Bad Gateway: backend 10.0.0.1:80: connection refused\n"
    assert error_page(503, "x", head_only=True).endswith(b"\r\n\r\n")


# -- the hot path's shortcuts: each one agrees with what llhttp saw ----------------------------


class _Spans:
    """httptools callbacks recording what llhttp itself reports."""

    def __init__(self):
        self.url = self.status = b""

    def on_url(self, url):
        self.url += url

    def on_status(self, status):
        self.status += status


@pytest.mark.parametrize("target", [
    b"/", b"/a/b?c=d&e=%41", b"*", b"//x", b"/a;b:c@d", b"/?", b"/a\"<>{}|\\^`", b"/" + b"p" * 300,
])
def test_target_is_sliced_exactly_as_llhttp_reports_it(target):
    """No on_url callback: the target is cut from the request line."""
    raw = b"OPTIONS " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    spans = _Spans()
    httptools.HttpRequestParser(spans).feed_data(raw)
    assert _req(raw).target == spans.url == target


@pytest.mark.parametrize("target", [b"/a\x01b", b"/a\x7f", b"/caf\xc3\xa9", b"/a\tb", b"", b"/a b", b"index.html"])
def test_bad_targets_are_still_rejected_by_llhttp(target):
    with pytest.raises(ParseError) as e:
        RequestParser(Rec()).feed(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert e.value.status == 400


@pytest.mark.parametrize("line", [
    b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.1 404  Not  Found ", b"HTTP/1.0 503 a\tb",
    b"HTTP/1.1 200 \xe9t\xe9",
])
def test_reason_is_sliced_exactly_as_llhttp_reports_it(line):
    """No on_status callback: the reason is cut from the status line."""
    raw = line + b"\r\nContent-Length: 0\r\n\r\n"
    spans = _Spans()
    httptools.HttpResponseParser(spans).feed_data(raw)
    rec = Rec()
    p = ResponseParser(rec)
    p.expect(False)
    p.feed(raw)
    assert rec.ev[0][1].reason == spans.status


def test_head_that_llhttp_leaves_unfinished_is_rejected():
    """The end of the head is signalled by llhttp (through list.clear); a head
    it has not finished is refused. Framing never hands over such a head, so
    call _head directly."""
    with pytest.raises(ParseError) as e:
        RequestParser(Rec())._head(b"GET / HTTP/1.1\r\nHost: h\r\n")
    assert e.value.status == 400
    p = ResponseParser(Rec())
    p.expect(False)
    with pytest.raises(ParseError) as e:
        p._head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")
    assert e.value.status == 502


def _response_parser(**kw):
    p = ResponseParser(Rec(), **kw)
    p.expect(False)
    return p


@pytest.mark.parametrize("make, first_line, status", [
    (lambda: RequestParser(Rec(), max_headers=3), b"GET / HTTP/1.0\r\n", 431),
    (lambda: _response_parser(max_headers=3), b"HTTP/1.1 200 OK\r\n", 502),
])
def test_header_count_limit_holds_for_the_shortest_field_lines(make, first_line, status):
    """Short heads skip counting (a field line is at least 4 bytes): the
    limit must still bite exactly at max_headers + 1 of the shortest lines."""
    make().feed(first_line + b"a:\r\n" * 3 + b"\r\n")
    with pytest.raises(ParseError) as e:
        make().feed(first_line + b"a:\r\n" * 4 + b"\r\n")
    assert e.value.status == status


def test_every_host_is_checked_on_a_keep_alive_connection():
    """Host validity is remembered for the last value only."""
    rec = Rec()
    p = RequestParser(rec)
    for _ in range(2):
        p.feed(b"GET / HTTP/1.1\r\nHost: a.test:80\r\n\r\n")
        p.next()
    with pytest.raises(ParseError) as e:
        p.feed(b"GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n")
    assert e.value.status == 400
    assert [e[1].host for e in rec.ev if e[0] == "req"] == [b"a.test:80"] * 2


def test_field_names_in_any_case_every_time():
    """Names are looked up as received once learned; every spelling keeps
    its meaning on later messages."""
    rec = Rec()
    p = RequestParser(rec)
    for name in (b"cOnTeNt-LeNgTh", b"cOnTeNt-LeNgTh", b"CONTENT-LENGTH"):
        p.feed(b"POST / HTTP/1.1\r\nhOsT: h\r\n" + name + b": 2\r\n\r\nab")
        p.next()
    reqs = [e[1] for e in rec.ev if e[0] == "req"]
    assert [(r.host, r.content_length, r.headers) for r in reqs] == [(b"h", 2, [])] * 3
    for _ in range(2):
        with pytest.raises(ParseError) as e:
            RequestParser(Rec()).feed(b"GET / HTTP/1.1\r\nHOST: a\r\nhost: b\r\n\r\n")
        assert e.value.status == 400
    rec = Rec()
    p = ResponseParser(rec)
    for _ in range(2):
        p.expect(False)
        p.feed(b"HTTP/1.1 200 OK\r\nCONNECTION: close\r\ncontent-length: 1\r\nX-Other: y\r\n\r\nz")
    resps = [e[1] for e in rec.ev if e[0] == "resp"]
    assert [(r.keep_alive, r.content_length, r.headers) for r in resps] == [(False, 1, [(b"X-Other", b"y")])] * 2


def test_learned_field_names_are_bounded():
    kinds = {b"x-%d" % i: 0 for i in range(1000)}
    assert _learn_kind(kinds, _SPECIAL, b"Content-Length") == 2
    assert _learn_kind({}, _SPECIAL, b"X-" + b"n" * 100) == 0
    assert len(kinds) == 1000 and b"Content-Length" not in kinds


@pytest.mark.parametrize("raw,expected", [
    # (keep_alive, connection_tokens, upgrade, expect_continue, has_body)
    (b"GET / HTTP/1.0\r\n\r\n", (False, (), None, False, False)),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", (True, (b"keep-alive",), None, False, False)),
    (b"GET / HTTP/1.1\r\nHost: h\r\nProxy-Connection: close\r\n\r\n", (False, (b"close",), None, False, False)),
    (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n",
     (True, (b"upgrade",), b"ws", False, False)),
    (b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: ws\r\n\r\n", (True, (), None, False, False)),
    (b"POST / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: ws\r\nContent-Length: 1\r\n\r\nx",
     (True, (b"upgrade",), None, False, True)),
    (b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx", (False, (), None, False, True)),
    (b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 0\r\n\r\n", (True, (), None, True, False)),
])
def test_connection_upgrade_and_expect(raw, expected):
    r = _req(raw)
    assert (r.keep_alive, r.connection_tokens, r.upgrade, r.expect_continue, r.has_body) == expected
