"""The L7 exchange as a sans-IO state machine (in the manner of h11 and
hyper-h2): one L{Exchange} per client request, whatever protocol the client
speaks. It routes the request, picks a backend, runs the tries (retries,
budgets, breakers, limits, timeouts, buffering) and accounts for the outcome,
and does no I/O itself: events come in as method calls, actions go out as
calls on the objects it was given. Reading the states and the two tables
below is enough to drive it from a new protocol adapter.

States (``Exchange.state``)::

    ROUTING        request head received, route/pool/limits being decided
    AWAITING_BODY  ``buffering: request``: the whole body first
    QUEUED         an attempt waits for a backend connection (pool cap)
    SENDING        the request (body) is being written to the backend
    AWAITING       request written, waiting for the response head
    RELAYING       response head relayed (or held, ``buffering: response``)
    RETRY_WAIT     a try failed; the next one starts when the timer fires
    TUNNEL         101 Switching Protocols: bytes relayed both ways
    DONE           over; every later event is ignored

Events in (methods of L{Exchange}; each also exists as an event class below
for tables and adapters that prefer ``Exchange.handle(event)``):

    from the client adapter        from the backend side
    -----------------------        ---------------------
    start()        RequestHead     connection_ready(att, conn)  ConnectionReady
    body_data(b)   BodyData        connect_failed(att, code, d) Failure
    body_end()     BodyEnd         on_informational(resp)       ResponseHead (1xx)
    client_lost()  ClientGone      on_response(resp)            ResponseHead
    client_write_blocked/unblocked on_body(b)                   ResponseData
    protocol_error(status, why)    on_end()                     ResponseEnd
    abort()        (drain timeout) backend_failed(att, code, d) Failure
    timer_fired(kind) TimerFired   backend_write_blocked/unblocked

Construction: ``Exchange(client, req)``, with ``client.ctx`` the listener's
L{lbtwist.l7.listener.HttpProxyFactory} (router, pools, forwarding policy,
clock) and ``req`` a L{lbtwist.l7.parser.Request} (method, target, host,
``headers`` as (name, value) pairs of end-to-end fields, framing attributes;
an HTTP/2 adapter fills one from its pseudo-headers), then ``start()``.
While it runs, ``ex.request_id``, ``ex.plan`` (the route's L{RoutePlan}:
``response_rewriter``...) and ``ex.req`` are public.

Actions out, on the client side (the L{ClientSide} an adapter implements:
the HTTP/1.1 connection in L{lbtwist.l7.client}, an HTTP/2 stream adapter):

    send_interim(resp)        a 1xx (status, reason, headers); 100 Continue too
    send_head(resp, extra, content_length)
                              the response head: ``resp.status``,
                              ``resp.reason``, ``resp.headers`` (end-to-end
                              fields), plus ``extra`` fields lbtwist adds
                              (Set-Cookie) and the exchange's ``request_id``;
                              ``content_length`` overrides the backend's
                              (buffered response). L{lbtwist.l7.headers.response_fields}
                              gives the same as one neutral field list.
    send_data(data)           response body bytes (unframed)
    send_end(trailers)        the response ended (trailer fields, may be empty)
    send_error(status, cause, extra) -> body bytes
                              lbtwist answers itself (no response byte sent yet)
    flush()                   end of an event: write what was queued
    pause_reading(reason) / resume_reading(reason)
                              request-body flow control (reasons "body", "backend")
    abort()                   the response cannot complete: reset the stream
    exchange_done(ex, clean)  over; ``clean`` False: do not reuse the connection
    start_tunnel(tunnel)      101: hand the client side to the L{Tunnel}

and on the backend side (the connection an attempt holds, L{BackendSide}):
``write`` (write to backend), ``finish(reusable)`` (release the connection),
``abort()`` (discard it), ``set_timeout(delay, kind)`` / ``clear_timeout()``
(start/cancel the connection's response, write and body timers),
``pause_reading()`` / ``resume_reading()``. Exchange-level timers (queue
wait, retry backoff) go through L{Timers} (``start(kind, delay)``,
``cancel(kind)``) and come back as ``timer_fired(kind)``. The outcome is
recorded in one place, L{Exchange.record}: the pool (balancer, passive
health), the breakers and limits, and the access log at the end.

Facts defined once: idempotent methods (L{lbtwist.resilience.retry}), the
hop-by-hop fields (L{lbtwist.l7.headers.HOP_BY_HOP}), the failure codes and
their statuses (L{lbtwist.l7.errors.FAILURE_STATUS}) and how a failure code
maps to the retry policy's kinds (L{FAILURE_KIND}).
"""
from __future__ import annotations

from typing import Any, Protocol

import attrs

from lbtwist.resilience.retry import Failure as RetryFailure

# -- states --------------------------------------------------------------------------------

ROUTING = "routing"
AWAITING_BODY = "awaiting-body"
QUEUED = "queued"
SENDING = "sending"
AWAITING = "awaiting-response"
RELAYING = "relaying"
RETRY_WAIT = "retry-wait"
TUNNEL = "tunnel"
DONE = "done"

STATES = (ROUTING, AWAITING_BODY, QUEUED, SENDING, AWAITING, RELAYING, RETRY_WAIT, TUNNEL, DONE)

#: Timer kinds the exchange starts through L{Timers}.
QUEUE_TIMER = "queue"
RETRY_TIMER = "retry"


@attrs.frozen
class Failed:
    """Why an attempt failed. ``code`` is a key of
    L{lbtwist.l7.errors.FAILURE_STATUS} (connect-refused, connect-timeout,
    reset, closed, garbage, timeout, pool-full...)."""

    code: str
    detail: str
    #: Some request bytes were written to a connection (the backend may have acted).
    sent: bool
    #: The response had started (its head reached us) when it failed.
    after_response: bool = False


#: Attempt failure codes (L{Failed.code}) as the retry policy names them;
#: absent codes (a garbled response...) are never retried.
FAILURE_KIND = {
    "connect-refused": RetryFailure.CONNECT_FAILURE,
    "connect-failed": RetryFailure.CONNECT_FAILURE,
    "connect-timeout": RetryFailure.CONNECT_FAILURE,
    "pool-full": RetryFailure.CONNECT_FAILURE,
    "reset": RetryFailure.RESET,
    "closed": RetryFailure.RESET,
    "timeout": RetryFailure.TIMEOUT,
}


# -- events (for tables and generic adapters; the hot path calls the methods) ----------------

@attrs.frozen
class RequestHead:
    """The request head arrived (the exchange was built with it): start."""


@attrs.frozen
class BodyData:
    data: bytes


@attrs.frozen
class BodyEnd:
    pass


@attrs.frozen
class ConnectionReady:
    attempt: Any
    conn: Any


@attrs.frozen
class ResponseHead:
    """A response head from the backend (1xx ones included)."""

    response: Any


@attrs.frozen
class ResponseData:
    data: bytes


@attrs.frozen
class ResponseEnd:
    trailers: tuple = ()


@attrs.frozen
class FailureEvent:
    """The attempt's connection failed (connect, reset, timeout, garbage)."""

    attempt: Any
    code: str
    detail: str


@attrs.frozen
class TimerFired:
    kind: str


@attrs.frozen
class ClientGone:
    pass


# -- what the machine is given ------------------------------------------------------------------

class ClientSide(Protocol):
    """What a client protocol adapter offers the exchange (see the module doc)."""

    client_ip: bytes
    client_ip_str: str
    client_addr: str
    tls: bool
    #: The connection is draining: the answer must not promise another request.
    draining: bool
    #: True while a client read is being parsed: backend writes are held
    #: until it ends (a request found bad later in that read is never sent).
    feeding: bool

    def tls_info(self) -> Any: ...
    def send_interim(self, resp: Any) -> None: ...
    def send_head(self, resp: Any, extra: tuple, content_length: int | None) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: tuple) -> None: ...
    def send_error(self, status: int, cause: str, extra: tuple) -> int: ...
    def flush(self) -> None: ...
    def pause_reading(self, reason: str) -> None: ...
    def resume_reading(self, reason: str) -> None: ...
    def abort(self) -> None: ...
    def exchange_done(self, ex: Any, clean: bool) -> None: ...
    def start_tunnel(self, tunnel: Any) -> None: ...


class BackendSide(Protocol):
    """The connection an attempt holds (L{lbtwist.l7.backend.BackendConnection})."""

    requests: int
    write_blocked: bool
    #: Any byte of the answer received since the request was sent.
    received: bool

    def start(self, user: Any, sink: Any, head_request: bool, body_timeout: float) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self, reusable: bool) -> None: ...
    def abort(self) -> None: ...
    def set_timeout(self, delay: float, kind: str) -> None: ...
    def clear_timeout(self) -> None: ...
    def timeout_kind(self) -> str | None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def discard_rest(self) -> None: ...


class Timers(Protocol):
    """Exchange-level timers; the adapter calls ``exchange.timer_fired(kind)``."""

    def start(self, kind: str, delay: float) -> None: ...
    def cancel(self, kind: str) -> None: ...
