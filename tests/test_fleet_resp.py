"""RESP: a strict parser (garbage is an error, never a guess) and in-order replies."""
import pytest
from twisted.internet.testing import StringTransport

from lbtwist.fleet.resp import ProtocolError, ReplyError, RespParser, RespProtocol, encode


def test_encode_is_an_array_of_bulk_strings():
    assert encode("EVALSHA", "ab", 1, b"k") == b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n"


def test_parser_takes_replies_in_fragments():
    p = RespParser()
    data = b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n-ERR no\r\n"
    got = []
    for i in range(len(data)):  # one byte at a time
        got += p.feed(data[i:i + 1])
    assert got[:5] == [b"OK", 42, b"hello", None, [1, [b""]]]
    assert isinstance(got[5], ReplyError) and str(got[5]) == "ERR no"
    assert p.buf == b""


@pytest.mark.parametrize("junk", [
    b"HTTP/1.1 200 OK\r\n",      # not Redis at all
    b":12x\r\n",                  # integer that is not one
    b"$3\r\nabcd\r\n",            # bulk without its CRLF where it should be
    b"$-5\r\n",                   # negative length
    b"*-2\r\n",
    b"$999999999\r\n",            # absurd size
    b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",  # too deep
])
def test_garbage_is_a_protocol_error(junk):
    with pytest.raises(ProtocolError):
        RespParser().feed(junk)


def test_endless_line_is_refused_not_buffered():
    p = RespParser()
    with pytest.raises(ProtocolError):
        for _ in range(100):
            p.feed(b"+" + b"x" * 4096)


def _proto(**kw):
    lost = []
    p = RespProtocol(on_lost=lost.append, **kw)
    t = StringTransport()
    p.makeConnection(t)
    return p, t, lost


def test_replies_pair_with_calls_in_order_and_errors_errback():
    p, t, _ = _proto()
    a, b, c = p.call("PING"), p.call("GET", "k"), p.call("X")
    assert t.value() == encode("PING") + encode("GET", "k") + encode("X")
    got = []
    for d in (a, b):
        d.addCallback(got.append)
    c.addErrback(lambda f: got.append(f.type))
    p.dataReceived(b"+PONG\r\n$1\r\nv\r\n-ERR unknown\r\n")
    assert got == [b"PONG", b"v", ReplyError]


def test_garbage_fails_every_pending_call_and_drops_the_connection():
    p, t, lost = _proto()
    errs = []
    for _ in range(2):
        p.call("PING").addErrback(lambda f: errs.append(f.type))
    p.dataReceived(b"<html>")
    assert errs == [ProtocolError, ProtocolError]
    assert t.disconnecting or t.disconnected is not False
    assert lost and lost[0].startswith("garbage")


def test_an_unrequested_reply_is_garbage():
    p, t, lost = _proto()
    p.dataReceived(b"+OK\r\n")
    assert lost and "nobody asked" in lost[0]


def test_push_messages_are_claimed_between_replies():
    pushed = []
    p, t, _ = _proto(on_push=lambda r: (isinstance(r, list) and r[0] == b"message" and not pushed.append(r)) or
                     (isinstance(r, list) and r[0] == b"message"))
    got = []
    p.call("PING").addCallback(got.append)
    p.dataReceived(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert pushed == [[b"message", b"c", b"hi"]]
    assert got == [[b"pong", b""]]
