"""The L7 exchange as a sans-IO state machine (in the manner of h11 and
hyper-h2): one L{Exchange} per client request, whatever protocol the client
speaks. It routes the request, picks a backend, runs the tries (retries,
budgets, breakers, limits, timeouts, buffering) and accounts for the outcome,
and does no I/O itself: events come in as method calls, actions go out as
calls on the objects it was given. Reading the states and the two tables
below is enough to drive it from a new protocol adapter.

States (``Exchange.state``)::

    ROUTING        request head received, route/pool/limits being decided
    RATE_WAIT      the route's rate limiter answers later (the fleet limiter
                   asking Redis, at most its timeout): the body is held
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
    rate_decided(d) RateDecided    (the late rate decision, from the context)

Construction: ``Exchange(client, req)``, with ``client.ctx`` the listener's
L{lbtwist.l7.listener.HttpProxyFactory} (router, pools, forwarding policy,
clock) and ``req`` a L{lbtwist.l7.parser.Request} (method, target, host,
``headers`` as (name, value) pairs of end-to-end fields, framing attributes;
an HTTP/2 adapter fills one from its pseudo-headers), then ``start()``.
While it runs, ``ex.request_id``, ``ex.plan`` (the route's L{RoutePlan}:
``response_rewriter``...) and ``ex.req`` are public.

Actions out, on the client side (the L{ClientSide} an adapter implements:
the HTTP/1.1 connection in L{lbtwist.l7.client}, an HTTP/2 stream adapter):

    send_interim(resp) -> bool a 1xx (status, reason, headers); 100 Continue too;
                              False when this client cannot take it (HTTP/1.0)
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
    limit_body(n)             the route's max_body_size: refuse more (413)
    reset()                   the response cannot complete: drop the
                              connection / reset the stream (the exchange
                              ends itself; do not call back into it)
    pause_reading(reason) / resume_reading(reason)
                              request-body flow control (reasons "body", "backend")
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

A rate limiter's ``check_request`` returns a
L{lbtwist.resilience.ratelimit.RateDecision} at once, or a pending one (a
Deferred: the fleet limiter waiting on Redis). Pending, the machine enters
RATE_WAIT and hands it to ``ctx.await_rate_decision(exchange, pending)``
(L{lbtwist.l7.listener.HttpProxyFactory}), which calls
``rate_decided(decision)`` when it comes (None: the limiter failed, a 503).
Body bytes arriving meanwhile are held (the client paused past
L{BODY_PAUSE}); a client gone meanwhile ends the exchange and the late
decision is ignored; a body complete meanwhile is forwarded at once, also
under ``buffering: request``.

Facts defined once: idempotent methods (L{lbtwist.resilience.retry}), the
hop-by-hop fields (L{lbtwist.l7.parser.HOP_BY_HOP}), the failure codes and
their statuses (L{lbtwist.l7.errors.FAILURE_STATUS}) and how a failure code
maps to the retry policy's kinds (L{FAILURE_KIND}).
"""
from __future__ import annotations

import time
from typing import Any, Protocol

import attrs
from twisted.logger import Logger

from lbtwist.l7.chunked import LAST_CHUNK
from lbtwist.l7.errors import FAILURE_STATUS
from lbtwist.l7.headers import backend_request_head
from lbtwist.l7.parser import Request
from lbtwist.l7.plan import RoutePlan
from lbtwist.l7.tunnel import Tunnel
from lbtwist.pool import Backend, PickContext, Pool
from lbtwist.resilience.limits import Limit, overflow_headers
from lbtwist.resilience.ratelimit import RateDecision
from lbtwist.resilience.retry import IDEMPOTENT_METHODS_BYTES as IDEMPOTENT, Failure as RetryFailure
from lbtwist.routing import RequestHead as RoutingHead, host_without_port
from lbtwist.traffic import TrafficRecord

# -- states --------------------------------------------------------------------------------

ROUTING = "routing"
RATE_WAIT = "rate-wait"
AWAITING_BODY = "awaiting-body"
QUEUED = "queued"
SENDING = "sending"
AWAITING = "awaiting-response"
RELAYING = "relaying"
RETRY_WAIT = "retry-wait"
TUNNEL = "tunnel"
DONE = "done"

STATES = (ROUTING, RATE_WAIT, AWAITING_BODY, QUEUED, SENDING, AWAITING, RELAYING, RETRY_WAIT, TUNNEL, DONE)

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


@attrs.frozen
class RateDecided:
    """The route's rate limiter decided later (None: it failed)."""

    decision: Any


_EVENTS = frozenset((RequestHead, BodyData, BodyEnd, ConnectionReady, ResponseHead, ResponseData, ResponseEnd,
                     FailureEvent, TimerFired, ClientGone, RateDecided))


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
    def send_interim(self, resp: Any) -> bool: ...
    def send_head(self, resp: Any, extra: tuple, content_length: int | None) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: tuple) -> None: ...
    def send_error(self, status: int, cause: str, extra: tuple) -> int: ...
    def flush(self) -> None: ...
    def pause_reading(self, reason: str) -> None: ...
    def resume_reading(self, reason: str) -> None: ...
    def limit_body(self, max_body: int) -> None: ...
    def reset(self) -> None: ...
    def exchange_done(self, ex: Any, clean: bool) -> None: ...
    def start_tunnel(self, tunnel: Any) -> None: ...


class BackendSide(Protocol):
    """The connection an attempt holds (L{lbtwist.l7.backend.BackendConnection})."""

    requests: int
    write_blocked: bool
    #: Any byte of the answer received since the request was sent.
    received: bool

    def start(self, user: Any, sink: Any, head_request: bool, body_timeout: float) -> None: ...
    def send_request(self, user: Any, sink: Any, head_request: bool, body_timeout: float, head: bytes,
                     response_timeout: float) -> None: ...
    def start_tunnel(self, tunnel: Any) -> None: ...
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


# -- the machine ----------------------------------------------------------------------------------

log = Logger(namespace="lbtwist.l7")

#: Request body bytes held (no connection yet) before the client's reads pause.
BODY_PAUSE = 256 * 1024
#: Cap on a response held whole for ``buffering: response``.
MAX_BUFFERED_RESPONSE = 64 * 1024 * 1024


class _Continue:
    """The 100 Continue lbtwist answers itself (``buffering: request``)."""

    status = 100
    reason = b"Continue"
    headers: list = []


CONTINUE = _Continue()


class RequestBody:
    """The request body as it arrives from the client: bytes not yet given to
    a connection (``unsent``), and a replay copy while the body fits in
    ``replay_limit`` (so a fresh connection can get it all again)."""

    __slots__ = ("chunked", "unsent", "unsent_size", "replay", "size", "complete", "replay_limit")

    def __init__(self, chunked: bool, replay_limit: int) -> None:
        self.chunked = chunked
        self.unsent: list[bytes] = []
        self.unsent_size = 0
        self.replay: list[bytes] | None = []
        self.size = 0
        self.complete = False
        self.replay_limit = replay_limit

    def add(self, data: bytes, taken: bool) -> None:
        """``taken``: a connection already received ``data`` directly."""
        self.size += len(data)
        replay = self.replay
        if replay is not None:
            if self.size <= self.replay_limit:
                replay.append(data)
            else:
                self.replay = None
        if not taken:
            self.unsent.append(data)
            self.unsent_size += len(data)

    @property
    def replayable(self) -> bool:
        return self.replay is not None

    def encoded(self, pieces: list[bytes]) -> list[bytes]:
        if not self.chunked:
            return pieces
        out = []
        for p in pieces:
            if p:
                out.append(b"%x\r\n" % len(p))
                out.append(p)
                out.append(b"\r\n")
        return out


class Attempt:
    """One try of the request on one backend: the record the connection
    pool queues (``cancelled``, ``started``, ``pending_slot``) and the
    connection reports to. It decides nothing: every event goes on to its
    exchange, which ignores those of an attempt it no longer runs."""

    conn: Any = None
    cancelled = False
    #: Re-sent once on a fresh connection after the keep-alive race.
    resent = False
    #: The connection had served requests before (the keep-alive race is possible).
    reused = False
    #: Some request bytes were written.
    sent = False
    #: A retry: send the body from the replay copy.
    replay = False
    #: The response head arrived / the response ended.
    responding = False
    ended = False
    #: The pool's max_pending slot while queued for a connection.
    pending_slot = None

    def __init__(self, owner: "Exchange", backend: Backend, conns: Any, timeout: float, now: float,
                 body_done: bool) -> None:
        self.owner = owner
        self.backend = backend
        self.conns = conns
        #: The response head must arrive within this after the request is written.
        self.timeout = timeout
        self.started = now
        #: The whole request (body included) was written.
        self.body_done = body_done

    def __repr__(self) -> str:
        return f"<Attempt {self.backend.address} conn={self.conn!r} cancelled={self.cancelled}>"

    # events, passed on
    def connection_ready(self, conn: Any) -> None:
        self.owner.connection_ready(self, conn)

    def connect_failed(self, code: str, detail: str) -> None:
        self.owner.connect_failed(self, code, detail)

    def backend_failed(self, conn: Any, code: str, detail: str) -> None:
        self.owner.backend_failed(self, conn, code, detail)

    def backend_write_blocked(self) -> None:
        if self.owner.attempt is self:
            self.owner.backend_write_blocked()

    def backend_write_unblocked(self) -> None:
        if self.owner.attempt is self:
            self.owner.backend_write_unblocked()

    def cancel(self) -> None:
        """Stop this try: leave the pool's queue, discard the connection
        unless the response already ended on it."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.conn is None and not self.ended:
            self.conns.cancel(self)
        conn, self.conn = self.conn, None
        if conn is not None and not self.ended:
            conn.abort()


class Exchange:
    """One request/response exchange (see the module docstring)."""

    # Per-request state; class-level defaults so construction only sets what
    # every request needs (an Exchange is built per request).
    state = ROUTING
    done = False
    plan: RoutePlan | None = None
    pool: Pool | None = None
    backend: Backend | None = None
    attempt: Attempt | None = None
    tries = 0
    body: RequestBody | None = None
    request_complete = True
    response: Any = None
    status = 0
    bytes_out = 0
    request_id = b""
    error: str | None = None
    outcome = "ok"
    set_cookie: tuple[bytes, bytes] | None = None
    resp_buffer: list[bytes] | None = None
    resp_buffered = 0
    head = b""
    tunnel: Tunnel | None = None
    #: lbtwist.resilience RequestRetryState: retry decisions, breakers, limits.
    st: Any = None
    #: Exchange-level timers (L{Timers}); built on first use unless given.
    timers: Any = None
    _queue_armed = False
    _retry_armed = False
    #: Where the retry waiting in RETRY_WAIT goes.
    _next: Backend | None = None
    #: The breaker/limits layer was told how the current attempt ended.
    _reported = False
    #: An interim (1xx) response was relayed: the client saw response bytes.
    _interim = False
    #: The last response held back for a retry (its status is answered if none is left).
    _withheld: Any = None
    #: When the last attempt was recorded (saves another clock read).
    ended = 0.0
    #: Backends tried without a retry state (with one, ``st.tried`` is the list).
    exclude: "list[Backend] | tuple" = ()
    #: Backend-bound bytes held until the client's current read is parsed.
    req_out: "list[bytes] | tuple" = ()

    def __init__(self, client: ClientSide, req: Request) -> None:
        self.client = client
        ctx = self.ctx = client.ctx  # type: ignore[attr-defined]
        self.req = req
        clock = self.clock = ctx.clock
        self.started = clock.seconds()
        if req.has_body:
            self.body = RequestBody(req.chunked, 0)
            self.request_complete = False

    def handle(self, event: Any) -> None:
        """Dispatch an event object (tables, generic adapters); after DONE
        every event is ignored."""
        t = type(event)
        if self.done and t is not RequestHead and t in _EVENTS:
            return
        if t is RequestHead:
            self.start()
        elif t is BodyData:
            self.body_data(event.data)
        elif t is BodyEnd:
            self.body_end()
        elif t is ConnectionReady:
            self.connection_ready(event.attempt, event.conn)
        elif t is ResponseHead:
            if event.response.status < 200 and event.response.status != 101:
                self.on_informational(event.response)
            else:
                self.on_response(event.response)
        elif t is ResponseData:
            self.on_body(event.data)
        elif t is ResponseEnd:
            self.on_end(event.trailers)
        elif t is FailureEvent:
            self.backend_failed(event.attempt, event.attempt.conn, event.code, event.detail)
        elif t is TimerFired:
            self.timer_fired(event.kind)
        elif t is ClientGone:
            self.client_lost()
        elif t is RateDecided:
            self.rate_decided(event.decision)
        else:
            raise TypeError(f"not an exchange event: {event!r}")
        self.flush()

    # -- ROUTING ----------------------------------------------------------------------

    def request_head(self) -> RoutingHead:
        """The routing view of the request (built only when routes need it)."""
        req = self.req
        client = self.client
        target = req.target.decode("latin-1")
        q = target.find("?")
        info = client.tls_info()
        tls = {} if info is None else {"tls_version": info.version, "tls_cipher": info.cipher,
                                       "sni": info.server_name or ""}
        return RoutingHead(
            method=req.method.decode("ascii"),
            target=target,
            path=target if q < 0 else target[:q],
            host=host_without_port(req.host.decode("latin-1")) if req.host else "",
            headers=tuple((n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in req.all_headers),
            client=client.client_ip_str,
            tls=client.tls,
            **tls,
        )

    def start(self) -> None:
        """The request head arrived: route, admit, pick, forward."""
        ctx = self.ctx
        req = self.req
        route = ctx.fixed_route
        if route is None:
            route = ctx.router.route(self.request_head())
        if route is None:
            host = req.host.decode("latin-1") if req.host else ""
            self.reject(404, f"no route for {host}{req.path.decode('latin-1')}")
            return
        plan: RoutePlan = route.target
        self.plan = plan
        if plan.max_body and req.has_body:
            if req.content_length is not None and req.content_length > plan.max_body:
                self.reject(413, f"request body of {req.content_length} bytes is larger than {plan.max_body}")
                return
            self.client.limit_body(plan.max_body)
        pool = ctx.runtime.pools.get(plan.pool)
        if pool is None:
            self.reject(503, f"pool {plan.pool!r} does not exist", outcome="gateway")
            return
        self.pool = pool
        rid = req.request_id
        self.request_id = rid if rid is not None else ctx.ids.new()
        rr = plan.resilience
        if rr is not None:
            limiter = rr.rate_limiter
            if limiter is not None:
                d = limiter.check_request(self.request_head(), self.started)
                if d.__class__ is not RateDecision:  # pending: the fleet limiter asks Redis
                    self.state = RATE_WAIT
                    ctx.await_rate_decision(self, d)
                    return
                if not d.allowed:
                    self._rate_limited(d)
                    return
        self._admitted()

    def rate_decided(self, decision: RateDecision | None) -> None:
        """The late rate decision (RATE_WAIT); None: the limiter failed."""
        if self.done or self.state != RATE_WAIT:
            return  # the client went away meanwhile
        if decision is None:
            self.reject(503, f"route {self.plan.name!r}: the rate limit could not be decided",  # type: ignore[union-attr]
                        outcome="gateway")
        elif not decision.allowed:
            self._rate_limited(decision)
        else:
            self.state = ROUTING
            self._admitted(waited=True)
        if not self.client.feeding:  # a decision inside a client read: its end flushes
            self.flush()

    def _rate_limited(self, d: RateDecision) -> None:
        self.reject(429, f"route {self.plan.name!r}: rate limit exceeded",  # type: ignore[union-attr]
                    extra=((b"retry-after", d.retry_after_header().encode()),))

    def _admitted(self, waited: bool = False) -> None:
        """Past the rate limit: admission limits, then balance and forward."""
        ctx = self.ctx
        req = self.req
        plan: RoutePlan = self.plan  # type: ignore[assignment]
        pool: Pool = self.pool  # type: ignore[assignment]
        rr = plan.resilience
        st = None
        if rr is not None:
            method = req.method
            st = self.st = rr.start_request(ctx.resilience.pool(plan.pool), self.clock, ctx.rng, method=method,
                                            headers=() if method in IDEMPOTENT else req.all_headers,
                                            now=self.started, admit=True)
            refused = st.refused
            if refused is not None:
                self.reject(503, f"pool {plan.pool!r}: {refused.value} reached",
                            extra=tuple(overflow_headers(refused)))
                return
        body = self.body
        if body is not None:
            body.replay_limit = plan.replay_limit
            if plan.buffer_request and not body.complete:  # complete: it came during RATE_WAIT
                self.state = AWAITING_BODY
                if waited:
                    self.client.resume_reading("body")  # held past BODY_PAUSE while waiting
                if req.expect_continue:
                    req.expect_continue = False  # answered here; the backend gets the whole body
                    self.client.send_interim(CONTINUE)
                return
        if ctx.sticky is None:  # the common case, inline: balance, forward
            client = self.client
            hk = plan.hash_key
            backend = pool.select(PickContext(
                self.started, client.client_ip if hk.kind == "source" else hk.key(req, client.client_ip),
                self.exclude if st is None else st.pick_exclude(self.started),
                client.client_ip_str))
            if backend is None:
                self.forward()  # no backend, or all held out: pick() decides
                return
            self.forward_to(backend)
            return
        self.forward()

    def pick(self) -> Backend | None:
        pool = self.pool
        now = self.clock.seconds() if self.tries else self.started
        sticky = self.ctx.sticky
        st = self.st
        client = self.client
        exclude = self.exclude if st is None else st.pick_exclude(now)
        if sticky is not None:
            b = sticky.pinned(pool, self.req.cookie, now)
            if b is not None and b not in exclude:
                return b
        key = self.plan.hash_key.key(self.req, client.client_ip)  # type: ignore[union-attr]
        b = pool.select(PickContext(now, key, exclude, client.client_ip_str))  # type: ignore[union-attr]
        if b is None and st is not None and not self.tries and exclude:
            # Every backend left is held out by a breaker or a Retry-After:
            # like panic mode, rather answer from them than fail the whole pool.
            b = pool.select(PickContext(now, key, st.exclude, client.client_ip_str))  # type: ignore[union-attr]
        if b is not None and sticky is not None:
            self.set_cookie = sticky.header(b)
        return b

    def forward(self) -> None:
        """Choose a backend and start an attempt on it (503 if there is none)."""
        backend = self.pick()
        if backend is None:
            self.reject(503, f"no backend available in pool {self.plan.pool!r}", outcome="gateway")  # type: ignore[union-attr]
            return
        self.forward_to(backend)

    def forward_to(self, backend: Backend) -> Attempt:
        """Start an attempt on ``backend`` (QUEUED until a connection is ready)."""
        ctx = self.ctx
        plan = self.plan
        pool = self.pool
        pools = ctx.connection_pools
        conns = pools.by_backend.get(backend)  # for_backend()'s common case, without the call
        if conns is None:
            conns = pools.for_backend(pool, backend, ctx.runtime.pool_configs.get(pool.name),  # type: ignore[union-attr]
                                      ctx.default_connection_pool)
        st = self.st
        timeout = plan.timeout  # type: ignore[union-attr]
        if st is not None:
            limits = st.limits
            if conns.limits is not limits:
                conns.limits = limits
            if self.tries or st.policy.per_try_timeout is not None:  # first try: the route timeout
                t = st.try_timeout()
                if t is not None and t < timeout:
                    timeout = max(t, 0.001)
        if not self.head:
            req = self.req
            client = self.client
            self.head = backend_request_head(req, client.client_ip, client.tls, self.request_id, ctx.forwarding,
                                             plan.request_rewriter, req.upgrade is not None)  # type: ignore[union-attr]
        self.backend = backend
        tries = self.tries = self.tries + 1
        if st is None:
            if self.exclude:
                self.exclude.append(backend)  # type: ignore[union-attr]
            else:
                self.exclude = [backend]
        now = self.started if tries == 1 else self.clock.seconds()
        att = Attempt(self, backend, conns, timeout, now, self.body is None)
        if tries > 1:
            att.replay = True  # a retry: the whole body again, from the replay copy
        self.attempt = att
        self.state = QUEUED
        self._reported = False
        if st is not None:
            st.on_attempt_start(backend, now)
        pool.on_start(backend, now)  # type: ignore[union-attr]
        if conns.idle:  # the common case: a pooled connection, without the callback
            conn = conns.take_idle(now)
            if conn is not None:
                self.connection_ready(att, conn)
                return att
        if not conns.acquire(att) and self.attempt is att:
            # Queued behind the backend's connection cap: bound the wait.
            self._start_timer(QUEUE_TIMER, timeout)
        return att

    def resend_ok(self) -> bool:
        """May this request be sent again (RFC 9110 9.2.2, or an idempotency key)?"""
        req = self.req
        if req.method in IDEMPOTENT:
            return True
        name = self.plan.idempotency_header  # type: ignore[union-attr]
        return name is not None and req.header(name) is not None

    # -- QUEUED -> SENDING / AWAITING ----------------------------------------------------

    def connection_ready(self, att: Attempt, conn: Any) -> None:
        """The pool handed ``att`` a connection: write the request."""
        if self._queue_armed:
            self._cancel_timer(QUEUE_TIMER)
        body = self.body
        http = self.ctx.http
        if body is None:  # the common case: a request without a body
            att.conn = conn
            att.reused = conn.requests > 0
            att.sent = True
            self.state = AWAITING
            # No holding back: the head was validated whole, and bytes after
            # it (pipelined requests) wait in the parser until this exchange
            # ends. The response timeout counts from the send.
            conn.send_request(att, self, self.req.method == b"HEAD", http.body_timeout, self.head, att.timeout)
            return
        replaying = att.resent or att.replay
        if replaying and body.replay is None:
            # The body outgrew the replay copy while the fresh connection was
            # being opened: it can no longer be sent whole.
            att.conns.release(conn, True)
            self.attempt_failed(att, Failed("closed", "backend closed a reused connection before responding", sent=True))
            return
        att.conn = conn
        att.reused = conn.requests > 0
        self.state = SENDING
        conn.start(att, self, self.req.method == b"HEAD", http.body_timeout)
        pieces = (body.replay or []) if replaying else body.unsent
        body.unsent = []
        body.unsent_size = 0
        out = [self.head]
        out.extend(body.encoded(pieces))
        if body.complete:
            if body.chunked:
                out.append(LAST_CHUNK)
            att.body_done = True
        self._to_backend(att, b"".join(out))
        att.sent = True
        if att.body_done:
            self._request_written(att)
        else:
            self.client.resume_reading("body")
            if conn.write_blocked:
                self.backend_write_blocked()

    def connect_failed(self, att: Attempt, code: str, detail: str) -> None:
        self.attempt_failed(att, Failed(code, detail, sent=att.sent))

    def _to_backend(self, att: Attempt, data: bytes) -> None:
        """Write to the backend, or hold it while the client's read is still
        being parsed (flushed at its end): a request found bad later in the
        same read then never reaches the backend at all."""
        if self.client.feeding:
            if self.req_out:
                self.req_out.append(data)  # type: ignore[union-attr]
            else:
                self.req_out = [data]
        else:
            att.conn.write(data)

    def _request_written(self, att: Attempt) -> None:
        att.sent = True
        if self.state == SENDING:
            self.state = AWAITING
            att.conn.set_timeout(att.timeout, "response")

    # -- request body, from the client ------------------------------------------------------

    def body_data(self, data: bytes) -> None:
        if self.done:
            return
        body = self.body
        att = self.attempt
        if att is not None and att.conn is not None and not att.body_done:
            self._to_backend(att, b"%x\r\n%b\r\n" % (len(data), data) if body.chunked else data)  # type: ignore[union-attr]
            body.add(data, True)  # type: ignore[union-attr]
        else:
            body.add(data, False)  # type: ignore[union-attr]
            if self.state != AWAITING_BODY and body.unsent_size > BODY_PAUSE:  # type: ignore[union-attr]
                self.client.pause_reading("body")

    def body_end(self) -> None:
        self.request_complete = True
        if self.done:
            return
        body = self.body
        if body is None:
            return
        body.complete = True
        if self.state == AWAITING_BODY:
            self.forward()
            return
        att = self.attempt
        if att is not None and att.conn is not None and not att.body_done:
            if body.chunked:
                self._to_backend(att, LAST_CHUNK)
            att.body_done = True
            self._request_written(att)

    # -- response, straight from the backend connection's parser ----------------------------

    def on_informational(self, resp: Any) -> None:
        if resp.status == 100:
            if self.req.expect_continue:
                self.client.send_interim(resp)
            self._interim = True
        elif self.client.send_interim(resp):
            self._interim = True

    def on_response(self, resp: Any) -> None:
        att = self.attempt
        att.responding = True  # type: ignore[union-attr]
        if self._queue_armed:
            self._cancel_timer(QUEUE_TIMER)
        if resp.status == 101:
            if self.req.upgrade is None:
                att.cancel()  # type: ignore[union-attr]
                self.attempt_failed(att, Failed("garbage", "backend switched protocols without an Upgrade request",  # type: ignore[arg-type]
                                                sent=True))
                return
            self._start_tunnel(att, resp)  # type: ignore[arg-type]
            return
        st = self.st
        if st is not None and st.policy.statuses and resp.status in st.policy.statuses and self._withhold(att, resp):  # type: ignore[arg-type]
            return
        self.response = resp
        self.status = resp.status
        self.state = RELAYING
        if self.plan.buffer_response and not resp.no_body:  # type: ignore[union-attr]
            self.resp_buffer = []
            return
        self.client.send_head(resp, (self.set_cookie,) if self.set_cookie is not None else (), None)

    def on_body(self, data: bytes) -> None:
        n = len(data)
        self.bytes_out += n
        buf = self.resp_buffer
        if buf is not None:
            self.resp_buffered += n
            if self.resp_buffered > MAX_BUFFERED_RESPONSE:
                att = self.attempt
                if att is not None:
                    if att.conn is not None:
                        att.conn.discard_rest()  # the rest of this read (the end, too) belongs to no one
                    att.cancel()
                    self.attempt_failed(att, Failed("garbage", "response too large to buffer", sent=True))
                return
            buf.append(data)
            return
        self.client.send_data(data)

    def on_end(self, trailers: tuple = ()) -> None:
        att: Attempt = self.attempt  # type: ignore[assignment]
        att.ended = True
        resp = self.response
        client = self.client
        if self.resp_buffer is not None:
            body = b"".join(self.resp_buffer)
            self.resp_buffer = None
            client.send_head(resp, (self.set_cookie,) if self.set_cookie is not None else (), len(body))
            client.send_data(body)
        client.send_end(trailers)
        conn = att.conn
        att.conn = None
        conn.finish(resp.keep_alive and att.body_done)  # release (or discard) the connection
        status = self.status
        self.record(att, status < 500, "ok" if status < 500 else "5xx", status,
                    resp.header(b"retry-after") if status == 503 else None)
        self._done(True)

    # -- failures and retries ------------------------------------------------------------------

    def backend_failed(self, att: Attempt, conn: Any, code: str, detail: str) -> None:
        """The attempt's connection failed (reset, closed, timeout, garbage)."""
        if att.cancelled:
            return
        att.conn = None
        if att.responding and not att.ended:
            self.attempt_failed(att, Failed(code, detail, sent=True, after_response=True))
            return
        body = self.body
        if (
            (code == "closed" or code == "reset")
            and att.reused
            and not conn.received
            and not att.resent
            and self.resend_ok()
            and (body is None or body.replayable)
        ):
            # The keep-alive race: the backend closed this reused connection
            # before answering. Safe to send again, once, on a fresh one.
            log.debug("backend {backend}: reused connection closed before the response; re-sending on a fresh one",
                      backend=att.backend.address)
            att.resent = True
            att.body_done = body is None
            self.state = QUEUED
            att.conns.acquire(att, fresh=True)
            return
        self.attempt_failed(att, Failed(code, detail, sent=att.sent))

    def attempt_failed(self, att: Attempt, failure: Failed) -> None:
        if self.done:
            return
        if failure.code == "max_pending":
            # Refused by the pool's own queue limit: not the backend's fault.
            self.record(att, True, "cancelled")
            self.reject(503, failure.detail, extra=tuple(overflow_headers(Limit.PENDING)))
            return
        self.record(att, False, "gateway")
        st = self.st
        if st is not None and not failure.after_response:
            kind = FAILURE_KIND.get(failure.code)
            if kind is not None and st.policy.retryable(kind) and st.attempts < st.policy.max_attempts:
                # Where would a retry go? With nowhere left, fail now, spending no budget.
                backend = self.pick()
                if backend is not None:
                    body = self.body
                    d = st.may_retry(kind, None, self._interim, body is None or body.replayable)
                    if d.retry:
                        self._wait_retry(backend, d.delay)
                        return
        self._give_up(att, failure)

    def _wait_retry(self, backend: Backend, delay: float) -> None:
        self.state = RETRY_WAIT
        self._next = backend
        self._start_timer(RETRY_TIMER, delay)

    def _retry(self) -> None:
        backend, self._next = self._next, None
        if self.done or backend is None:
            return
        t = self.st.try_timeout()
        if t is not None and t <= 0:
            self.reject(504, "request deadline passed before another backend could be tried", outcome="gateway")
            return
        self.forward_to(backend)

    def _withhold(self, att: Attempt, resp: Any) -> bool:
        """A response whose status the route retries: retry elsewhere (True,
        the response and its connection are dropped) or relay it (False)."""
        status = resp.status
        st = self.st
        # The retry state hears of it before it decides (the pool only once
        # the attempt is over: now if it is retried, else at the response's end).
        self.record(att, status < 500, "5xx" if status >= 500 else "ok", status,
                    resp.header(b"retry-after") if status == 503 else None, pool=False)
        if st.attempts >= st.policy.max_attempts:
            return False
        backend = self.pick()
        if backend is None:
            return False  # nowhere else to go: relay this answer as it is
        body = self.body
        d = st.may_retry(RetryFailure.STATUS, status, self._interim, body is None or body.replayable)
        if not d.retry:
            return False
        conn = att.conn
        if conn is not None:
            conn.discard_rest()  # the rest of this read belongs to no one
        att.cancel()
        self.record(att, status < 500, "5xx" if status >= 500 else "ok")
        self.backend = att.backend
        self._withheld = resp
        self._wait_retry(backend, d.delay)
        return True

    def _give_up(self, att: Attempt, failure: Failed) -> None:
        backend = att.backend.address
        if failure.after_response:
            log.warn("{method} {path}: backend {backend} failed mid-response: {detail}",
                     method=self.req.method.decode(), path=self.req.path.decode("latin-1"),
                     backend=backend, detail=failure.detail)
            self.error = f"backend {backend}: {failure.detail} (mid-response)"
            self.outcome = "gateway"
            self.client.flush()
            self.client.reset()
            self._done(False)
            return
        withheld = self._withheld
        code = failure.code
        status = withheld.status if withheld is not None and code == "status" else FAILURE_STATUS.get(code, 502)
        cause = f"backend {backend}: {failure.detail}"
        log.warn("{method} {path}: {status} {cause}", method=self.req.method.decode(),
                 path=self.req.path.decode("latin-1"), status=status, cause=cause)
        extra: tuple = ()
        if withheld is not None and withheld.status == 503 and code == "status":
            ra = withheld.header(b"retry-after")
            if ra is not None:
                extra = ((b"retry-after", ra),)
        self.reject(status, cause, outcome="gateway", extra=extra)

    # -- the outcome, recorded once ----------------------------------------------------------

    def record(self, att: Attempt, ok: bool, outcome: str, status: int | None = None,
               retry_after: Any = None, pool: bool = True) -> None:
        """How the attempt went, told once to each that counts it: the retry
        state (breakers, limits, Retry-After holds; once per attempt) and,
        with ``pool``, the pool (balancer, passive health, drain) as the
        attempt ends. ``outcome`` as in L{lbtwist.pool.OUTCOMES}."""
        now = self.clock.seconds()
        if pool:
            if self.attempt is att:
                self.attempt = None
            if self._queue_armed:
                self._cancel_timer(QUEUE_TIMER)
            self.ended = now
            self.pool.on_finish(att.backend, now - att.started, ok, outcome, now)  # type: ignore[union-attr]
        st = self.st
        if st is not None and not self._reported:
            self._reported = True
            st.on_attempt_finish(att.backend, outcome, status, retry_after, now)

    # -- timers -------------------------------------------------------------------------------

    def _start_timer(self, kind: str, delay: float) -> None:
        timers = self.timers
        if timers is None:
            timers = self.timers = self.ctx.exchange_timers(self)
        if kind == QUEUE_TIMER:
            self._queue_armed = True
        else:
            self._retry_armed = True
        timers.start(kind, delay)

    def _cancel_timer(self, kind: str) -> None:
        if kind == QUEUE_TIMER:
            self._queue_armed = False
        else:
            self._retry_armed = False
        self.timers.cancel(kind)

    def timer_fired(self, kind: str) -> None:
        if kind == QUEUE_TIMER:
            self._queue_armed = False
            att = self.attempt
            if att is not None and att.conn is None and not att.cancelled and not self.done:
                att.cancel()
                self.attempt_failed(att, Failed("pool-full", f"no connection to {att.backend.address} became free in time",
                                                sent=False))
        elif kind == RETRY_TIMER:
            self._retry_armed = False
            self._retry()
        self.flush()

    # -- flow control -------------------------------------------------------------------------

    def backend_write_blocked(self) -> None:
        self.client.pause_reading("backend")
        att = self.attempt
        if att is not None and att.conn is not None and self.response is None:
            # Bound how long a backend may leave the upload unread.
            att.conn.set_timeout(self.ctx.http.body_timeout, "write")

    def backend_write_unblocked(self) -> None:
        self.client.resume_reading("backend")
        att = self.attempt
        if att is not None and att.conn is not None and att.conn.timeout_kind() == "write":
            if att.body_done:
                att.conn.set_timeout(att.timeout, "response")
            else:
                att.conn.clear_timeout()

    def client_write_blocked(self) -> None:
        att = self.attempt
        if att is not None and att.conn is not None:
            att.conn.pause_reading()
            att.conn.clear_timeout()

    def client_write_unblocked(self) -> None:
        att = self.attempt
        if att is not None and att.conn is not None:
            att.conn.resume_reading()
            if self.response is not None:
                att.conn.set_timeout(self.ctx.http.body_timeout, "body")

    # -- the client side ends it ---------------------------------------------------------------

    def client_lost(self) -> None:
        """The client went away: abandon the backend side (not its fault)."""
        self.abort()

    def abort(self) -> None:
        """Drop everything now (client gone, drain timeout)."""
        if self.done:
            return
        att = self.attempt
        if att is not None:
            att.cancel()
            self.record(att, True, "cancelled")
        self.outcome = "cancelled"
        self._done(False)

    def protocol_error(self, status: int, reason: str) -> None:
        """The client sent a bad request body (e.g. malformed chunk, too large)."""
        if self.done:
            return
        self.req_out = ()  # never forward any part of a bad request
        att = self.attempt
        if att is not None:
            att.cancel()
            self.record(att, True, "cancelled")
        if self.response is not None:
            self.outcome = "rejected"
            self.error = reason
            self.client.flush()
            self.client.reset()
            self._done(False)
            return
        self.request_complete = False
        self.reject(status, reason)

    # -- output ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """End of an event: write what it queued (backend bytes held while
        the client's read was parsed, then the client's)."""
        rq = self.req_out
        if rq:
            self.req_out = ()
            att = self.attempt
            if att is not None and att.conn is not None:
                att.conn.write(rq[0] if len(rq) == 1 else b"".join(rq))
        self.client.flush()

    def reject(self, status: int, cause: str, outcome: str = "rejected",
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer ``status`` ourselves (before any response byte was sent);
        ``extra`` headers (Retry-After, the limit that refused...)."""
        if self.done:
            return
        self.status = status
        self.error = cause
        self.outcome = outcome
        forwarding = self.ctx.forwarding
        if self.request_id:
            extra = ((forwarding.request_id_header, self.request_id), *extra)
        self.bytes_out += self.client.send_error(status, cause, (*extra, *forwarding.response_fields))
        self._done(True)

    def _done(self, clean: bool) -> None:
        if self.done:
            return
        self.done = True
        self.state = DONE
        if self._queue_armed:
            self._cancel_timer(QUEUE_TIMER)
        if self._retry_armed:
            self._cancel_timer(RETRY_TIMER)
        st = self.st
        if st is not None:
            st.finish()
        ctx = self.ctx
        hub = ctx.runtime.traffic
        if hub.subscribers:
            hub.publish(self.traffic_record())
        self.client.exchange_done(self, clean)

    def traffic_record(self) -> TrafficRecord:
        """The access log's record of this exchange."""
        req = self.req
        now = self.ended or self.clock.seconds()
        outcome = self.outcome
        if outcome == "ok" and self.status >= 500:
            outcome = "5xx"  # a relayed backend 5xx (lbtwist's own set the outcome in reject)
        info = self.client.tls_info()
        tls = {} if info is None else {"tls_version": info.version, "tls_cipher": info.cipher,
                                       "tls_resumed": info.resumed}
        plan = self.plan
        return TrafficRecord(
            kind="http", listener=self.ctx.name, start=time.time() - (now - self.started),
            duration=now - self.started, client=self.client.client_addr,
            pool=plan.pool if plan else None,
            backend=self.backend.address if self.backend else None,
            route=plan.name if plan else None,
            method=req.method.decode("ascii"), path=req.path.decode("latin-1"),
            status=self.status or None, bytes_in=self.body.size if self.body else 0,
            bytes_out=self.bytes_out, tries=self.tries,
            request_id=self.request_id.decode("latin-1") if self.request_id else None,
            outcome=outcome, error=self.error, **tls,
        )

    # -- TUNNEL ------------------------------------------------------------------------------------

    def _start_tunnel(self, att: Attempt, resp: Any) -> None:
        self.status = 101
        self.response = resp
        self.state = TUNNEL
        client = self.client
        client.send_head(resp, (), None)
        client.flush()
        conn = att.conn
        att.conn = None
        if self.attempt is att:
            self.attempt = None
        if self._queue_armed:
            self._cancel_timer(QUEUE_TIMER)

        def closed(tunnel: Tunnel) -> None:
            self.bytes_out = tunnel.bytes_out
            att.ended = True
            self.record(att, True, "ok")
            self._done(False)

        tunnel = Tunnel(client, conn, self.clock, self.ctx.listener.idle_timeout or 3600.0, closed)
        self.tunnel = tunnel
        conn.start_tunnel(tunnel)
        client.start_tunnel(tunnel)
