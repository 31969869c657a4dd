"""A small HTTP client for the drill's side channels: the backends' control
API, lbtwist's admin API, HAProxy's stats page. Low rate, so Twisted's Agent
(non-persistent) is plenty; every call has a deadline."""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers


class ControlError(Exception):
    """A side-channel call failed or answered an error status."""


async def http_call(reactor: Any, method: str, url: str, body: Any = None, *, timeout: float = 5.0,
                    raw: bool = False, ok: tuple[int, ...] = (200,)) -> Any:
    """``method url`` with an optional JSON ``body``; the answer parsed as
    JSON (or bytes with ``raw``). Raises L{ControlError} on a status not in
    ``ok`` or after ``timeout`` seconds."""
    if not url.startswith("http://127."):
        raise ValueError("drill side channels are on 127.0.0.0/8 only")
    agent = Agent(reactor, connectTimeout=timeout)
    producer = None
    headers = Headers({b"user-agent": [b"lbtwist-drill"]})
    if body is not None:
        from twisted.web.client import FileBodyProducer
        import io

        data = json.dumps(body).encode()
        producer = FileBodyProducer(io.BytesIO(data), cooperator=_ImmediateCooperator())
        headers.addRawHeader(b"content-type", b"application/json")
    d = agent.request(method.encode(), url.encode(), headers, producer)
    d.addTimeout(timeout, reactor)
    try:
        resp = await d
        rd = _read_body(resp)
        rd.addTimeout(timeout, reactor)
        data = await rd
    except (defer.TimeoutError, defer.CancelledError) as e:
        raise ControlError(f"{method} {url}: no answer within {timeout:g}s") from e
    except Exception as e:
        raise ControlError(f"{method} {url}: {e.__class__.__name__}: {e}") from e
    if resp.code not in ok:
        raise ControlError(f"{method} {url}: {resp.code} {data[:300]!r}")
    if raw:
        return data
    try:
        return json.loads(data)
    except ValueError as e:
        raise ControlError(f"{method} {url}: not JSON: {data[:200]!r}") from e


class _Body(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def _read_body(response: Any) -> defer.Deferred:
    """The whole body (small answers only)."""
    d: defer.Deferred = defer.Deferred()
    response.deliverBody(_Body(d))
    return d


class _ImmediateCooperator:
    """FileBodyProducer cooperator that runs the copy at once (bodies are tiny),
    instead of the global cooperator, which schedules on the global reactor."""

    def cooperate(self, iterator: Any) -> Any:
        for _ in iterator:
            pass
        return _DoneTask()


class _DoneTask:
    def whenDone(self) -> defer.Deferred:
        return defer.succeed(None)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def stop(self) -> None:
        pass
