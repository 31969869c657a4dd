"""The one-format fast paths of backend_request_head / client_response_head
produce exactly what the general path builds (forced here with a rewriter
that changes nothing)."""
import pytest

from lbtwist.l7.headers import (
    FRAME_LENGTH,
    ForwardingPolicy,
    Rewriter,
    backend_request_head,
    client_response_head,
)
from lbtwist.l7.parser import RequestParser, ResponseParser

NOOP = Rewriter()


class _Sink:
    def __init__(self):
        self.msgs = []

    def on_request(self, r):
        self.msgs.append(r)

    on_response = on_informational = on_request

    def on_body(self, d):
        pass

    def on_end(self):
        pass


def _request(raw: bytes):
    sink = _Sink()
    RequestParser(sink).feed(raw)
    return sink.msgs[0]


def _response(raw: bytes):
    sink = _Sink()
    p = ResponseParser(sink)
    p.expect(False)
    p.feed(raw)
    return sink.msgs[0]


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nCookie: s=1\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD /h HTTP/1.0\r\nHost: a\r\nUser-Agent: t\r\n\r\n",
    b"DELETE /d HTTP/1.1\r\nhost: a\r\nX-Custom: v\r\nX-Custom: w\r\n\r\n",
])
@pytest.mark.parametrize("tls", [False, True])
def test_request_fast_path_equals_general_path(raw, tls):
    req = _request(raw)
    pol = ForwardingPolicy()
    fast = backend_request_head(req, b"10.0.0.9", tls, b"rid-1", pol)
    general = backend_request_head(req, b"10.0.0.9", tls, b"rid-1", pol, NOOP)
    assert fast == general
    assert fast.startswith(req.method + b" " + req.target + b" HTTP/1.1\r\nhost: ")


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\nx",
])
def test_response_fast_path_equals_general_path(raw):
    resp = _response(raw)
    pol = ForwardingPolicy()
    fast = client_response_head(resp, FRAME_LENGTH, True, b"1.1", b"rid-1", pol)
    general = client_response_head(resp, FRAME_LENGTH, True, b"1.1", b"rid-1", pol, NOOP)
    assert fast == general
    assert b"\r\nvia: " in fast and fast.endswith(b"\r\nx-request-id: rid-1\r\n\r\n")


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\nok",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nSet-Cookie: a=1\r\nX-Request-Id: theirs\r\n"
    b"Strict-Transport-Security: max-age=1\r\n\r\n",
])
@pytest.mark.parametrize("rewriter", [None, Rewriter(frozenset((b"server",)), ((b"x-added", b"1"),))])
def test_neutral_response_fields_are_the_http1_head_without_framing(raw, rewriter):
    from lbtwist.l7.headers import response_fields

    resp = _response(raw)
    pol = ForwardingPolicy(hsts=b"max-age=9")
    extra = ((b"set-cookie", b"lb=1"),)
    head = client_response_head(resp, FRAME_LENGTH, True, b"1.1", b"rid-1", pol, rewriter, extra)
    lines = head.split(b"\r\n")[1:-2]
    wire = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines]
    framing = (b"content-length", b"transfer-encoding", b"connection")
    expected = [(n, v) for n, v in wire if n.lower() not in framing]
    assert response_fields(resp, b"rid-1", pol, rewriter, extra) == expected
    assert all(n.lower() != b"x-hop" for n, _ in expected)


def test_request_ids_are_prefix_and_counter_and_never_repeat():
    from lbtwist.l7.headers import RequestIds

    ids = RequestIds()
    got = [ids.new() for _ in range(300)]
    assert len(set(got)) == 300
    assert got[0] == ids.prefix + b"-1" and got[255] == ids.prefix + b"-100"
    assert RequestIds().prefix != ids.prefix


@pytest.mark.parametrize("name", sorted(__import__("lbtwist.l7.parser", fromlist=["HOP_BY_HOP"]).HOP_BY_HOP))
def test_no_hop_by_hop_field_is_forwarded_either_way(name):
    """Every name in the one HOP_BY_HOP set is pulled out of the forwarded
    fields by both parsers (so neither head builder can copy it on)."""
    value = b"chunked" if name == b"transfer-encoding" else b"x"
    req = _request(b"GET / HTTP/1.1\r\nHost: a\r\n%s: %s\r\nX-Keep: 1\r\n\r\n" % (name, value)
                   if name != b"transfer-encoding" else
                   b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\nX-Keep: 1\r\n\r\n")
    assert [n for n, _ in req.headers] == [b"X-Keep"]
    resp = _response(b"HTTP/1.1 200 OK\r\n%s: %s\r\nX-Keep: 1\r\ncontent-length: 0\r\n\r\n" % (name, value)
                     if name != b"transfer-encoding" else
                     b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nX-Keep: 1\r\n\r\n")
    assert [n for n, _ in resp.headers] == [b"X-Keep"]
