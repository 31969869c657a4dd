"""One request/response exchange: route the request, choose a backend, run
an L{Attempt}, relay the response (or answer an error), and account for it.

The exchange sits between the client connection (which parses requests and
owns client-side timers) and the attempt (which owns one backend
connection). Bytes for the client are collected in ``out`` and written once
per event (``flush``), so a response head and its first body bytes leave in
one send.

Retry policies hook in at L{Exchange.retry}: called with the failed attempt
before the error page is sent, it may start another attempt (for example
with L{Exchange.forward_to}) and return True.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import Logger

from lbtwist.l7.chunked import LAST_CHUNK
from lbtwist.l7.errors import FAILURE_STATUS, error_page, page_body_size
from lbtwist.l7.forward import DONE, RESPONDING, Attempt, Failed, RequestBody
from lbtwist.l7.headers import (
    FRAME_CHUNKED,
    FRAME_CLOSE,
    FRAME_LENGTH,
    FRAME_NONE,
    backend_request_head,
    client_response_head,
    interim_head,
)
from lbtwist.l7.parser import Request, Response
from lbtwist.l7.plan import RoutePlan
from lbtwist.l7.tunnel import Tunnel
from lbtwist.pool import Backend, PickContext, Pool
from lbtwist.resilience.limits import Limit, overflow_headers
from lbtwist.resilience.ratelimit import RateDecision
from lbtwist.resilience.retry import IDEMPOTENT_METHODS_BYTES as _IDEMPOTENT, Failure
from lbtwist.routing import RequestHead, host_without_port
from lbtwist.traffic import TrafficRecord

if TYPE_CHECKING:
    from lbtwist.l7.client import HttpProxyProtocol

log = Logger(namespace="lbtwist.l7")

#: Request body bytes held (no connection yet) before the client's reads pause.
BODY_PAUSE = 256 * 1024
#: Cap on a response held whole for ``buffering: response``.
MAX_BUFFERED_RESPONSE = 64 * 1024 * 1024

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange:
    #: ``retry(exchange, attempt, failure) -> bool``: see the module docstring.
    retry: Callable[["Exchange", Attempt, Failed], bool] | None = None

    # Per-request state; class-level defaults so construction only sets what
    # every request needs (an Exchange is built per request).
    plan: RoutePlan | None = None
    pool: Pool | None = None
    backend: Backend | None = None
    attempt: Attempt | None = None
    tries = 0
    body: RequestBody | None = None
    request_complete = True
    response: Response | None = None
    framing = FRAME_NONE
    keep_alive = False
    status = 0
    bytes_out = 0
    done = False
    request_id = b""
    error: str | None = None
    outcome = "ok"
    set_cookie: tuple[bytes, bytes] | None = None
    resp_buffer: list[bytes] | None = None
    resp_buffered = 0
    waiting_body = False
    head = b""
    tunnel: Tunnel | None = None
    _queue_timer: Any = None
    #: lbtwist.resilience RequestRetryState: retry decisions, breakers, limits.
    st: Any = None
    _retry_timer: Any = None
    #: The breaker/limits layer was told how the current attempt ended.
    _reported = False
    #: An interim (1xx) response was relayed: the client saw response bytes.
    _interim = False
    #: The last response held back for a retry (its status is answered if none is left).
    _withheld: Response | None = None
    #: When the last attempt was reported (saves another clock read).
    ended = 0.0

    #: Backends tried without a retry state (with one, ``st.tried`` is the list).
    exclude: "list[Backend] | tuple" = ()
    #: Backend-bound bytes held until the client's current read is parsed
    #: (a list once there are some).
    req_out: "list[bytes] | tuple" = ()

    def __init__(self, client: "HttpProxyProtocol", req: Request) -> None:
        self.client = client
        ctx = self.ctx = client.ctx
        self.req = req
        clock = self.clock = ctx.clock
        self.started = clock.seconds()
        #: Client-bound bytes, written once per event (see flush).
        self.out: list[bytes] = []
        if req.has_body:
            self.body = RequestBody(req.chunked, 0)
            self.request_complete = False

    # -- start ------------------------------------------------------------------------

    def request_head(self) -> RequestHead:
        """The routing view of the request (built only when routes need it)."""
        req = self.req
        target = req.target.decode("latin-1")
        q = target.find("?")
        return RequestHead(
            method=req.method.decode("ascii"),
            target=target,
            path=target if q < 0 else target[:q],
            host=host_without_port(req.host.decode("latin-1")) if req.host else "",
            headers=tuple((n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in req.all_headers),
            client=self.client.client_ip_str,
            tls=self.client.tls,
            **_tls_fields(self.client),
        )

    def start(self) -> None:
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
            self.client.parser.max_body = plan.max_body
        pool = ctx.runtime.pools.get(plan.pool)
        if pool is None:
            self.reject(503, f"pool {plan.pool!r} does not exist", outcome="gateway")
            return
        self.pool = pool
        rid = req.request_id
        if rid is None:
            ids = ctx.ids  # RequestIds.new(), inlined: once per request
            rid = b"%s-%x" % (ids.prefix, next(ids.count))
        self.request_id = rid
        rr = plan.resilience
        if rr is not None:
            limiter = rr.rate_limiter
            if limiter is not None:
                d = limiter.check_request(self.request_head(), self.started)
                if d.__class__ is not RateDecision:  # a fleet limiter asking Redis (at most its timeout)
                    d.addCallback(self._rate_decided).addErrback(
                        lambda f: log.failure("rate limit decision failed", f))
                    return
                if not d.allowed:
                    self._rate_limited(d)
                    return
        self._admitted()

    def _rate_limited(self, d: RateDecision) -> None:
        self.reject(429, f"route {self.plan.name!r}: rate limit exceeded",  # type: ignore[union-attr]
                    extra=((b"retry-after", d.retry_after_header().encode()),))

    def _rate_decided(self, d: RateDecision) -> None:
        """The fleet limiter's answer came (or its timeout's local decision)."""
        if self.done:
            return  # the client went away meanwhile
        if not d.allowed:
            self._rate_limited(d)
            return
        self._admitted()
        self.flush()

    def _admitted(self) -> None:
        """Past the rate limit: admission limits, then balance and forward."""
        ctx = self.ctx
        req = self.req
        plan: RoutePlan = self.plan  # type: ignore[assignment]
        pool = self.pool
        rr = plan.resilience
        st = None
        if rr is not None:
            method = req.method
            st = self.st = rr.start_request(ctx.resilience.pool(plan.pool), self.clock, ctx.rng, method=method,
                                            headers=() if method in _IDEMPOTENT else req.all_headers,
                                            now=self.started, admit=True)
            refused = st.refused
            if refused is not None:
                self.reject(503, f"pool {plan.pool!r}: {refused.value} reached",
                            extra=tuple(overflow_headers(refused)))
                return
        body = self.body
        if body is not None:
            body.replay_limit = plan.replay_limit
            if plan.buffer_request and not body.complete:
                self.waiting_body = True
                if req.expect_continue:
                    req.expect_continue = False  # answered here; the backend gets the whole body
                    self.out.append(_CONTINUE)
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

    # -- attempts -----------------------------------------------------------------------

    def pick(self) -> Backend | None:
        pool = self.pool
        now = self.clock.seconds() if self.tries else self.started
        sticky = self.ctx.sticky
        st = self.st
        exclude = self.exclude if st is None else st.pick_exclude(now)
        if sticky is not None:
            b = sticky.pinned(pool, self.req.cookie, now)  # type: ignore[arg-type]
            if b is not None and b not in exclude:
                return b
        key = self.plan.hash_key.key(self.req, self.client.client_ip)  # type: ignore[union-attr]
        b = pool.select(PickContext(now, key, exclude, self.client.client_ip_str))  # type: ignore[union-attr]
        if b is None and st is not None and not self.tries and exclude:
            # Every backend left is held out by a breaker or a Retry-After:
            # like panic mode, rather answer from them than fail the whole pool.
            b = pool.select(PickContext(now, key, st.exclude, self.client.client_ip_str))  # type: ignore[union-attr]
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
        """Start an attempt on ``backend`` (also the entry point for retries)."""
        ctx = self.ctx
        plan = self.plan
        req = self.req
        pool = self.pool
        conns = ctx.connection_pools.by_backend.get(backend)  # find(), without the call
        if conns is None:
            pcfg = ctx.runtime.pool_configs.get(pool.name)  # type: ignore[union-attr]
            if pcfg is not None:
                conns = ctx.connection_pools.get(pool, backend, pcfg.connection_pool, pcfg.connect_timeout)
            else:
                conns = ctx.connection_pools.get(pool, backend, ctx.default_connection_pool, 3.0)
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
        att = Attempt(self, backend, conns, self.head, req.method == b"HEAD", timeout, self.body, now)
        if tries > 1:
            att.replay = True  # a retry: the whole body again, from the replay copy
        self.attempt = att
        self._reported = False
        if st is not None:
            st.on_attempt_start(backend, now)
        pool.on_start(backend, now)  # type: ignore[union-attr]
        if not conns.acquire(att) and self.attempt is att:
            # Queued behind the backend's connection cap: bound the wait.
            self._queue_timer = self.clock.callLater(timeout, self._queue_expired, att)
        return att

    def resend_ok(self) -> bool:
        """May this request be sent again (RFC 9110 9.2.2, or an idempotency key)?"""
        req = self.req
        if req.method in _IDEMPOTENT:
            return True
        name = self.plan.idempotency_header  # type: ignore[union-attr]
        return name is not None and req.header(name) is not None

    def _queue_expired(self, att: Attempt) -> None:
        self._queue_timer = None
        if self.attempt is att and att.conn is None and not att.cancelled:
            att.cancel()
            self.attempt_failed(att, Failed("pool-full", f"no connection to {att.backend.address} became free in time", sent=False))
            self.flush()

    def _cancel_queue_timer(self) -> None:
        t, self._queue_timer = self._queue_timer, None
        if t is not None and t.active():
            t.cancel()

    def _finish_attempt(self, att: Attempt, ok: bool, outcome: str) -> None:
        """Report the attempt to the pool exactly once."""
        if self.attempt is att:
            self.attempt = None
        if self._queue_timer is not None:
            self._cancel_queue_timer()
        now = self.ended = self.clock.seconds()
        self.pool.on_finish(att.backend, now - att.started, ok, outcome)  # type: ignore[union-attr]
        st = self.st
        if st is not None and not self._reported:
            self._reported = True
            st.on_attempt_finish(att.backend, outcome)

    # -- from the attempt ------------------------------------------------------------------

    def attempt_connected(self, att: Attempt) -> None:
        if self._queue_timer is not None:
            self._cancel_queue_timer()
        self.client.resume_reading("body")

    # -- response events, straight from the backend connection's parser ----------------------

    def on_informational(self, resp: Response) -> None:
        if resp.status == 100:
            if self.req.expect_continue:
                self.out.append(_CONTINUE)
            self._interim = True
        elif self.req.version == b"1.1" and resp.status != 101:
            self.out.append(interim_head(resp))
            self._interim = True

    def on_response(self, resp: Response) -> None:
        att = self.attempt
        att.state = RESPONDING  # type: ignore[union-attr]
        att.conn.response = resp  # type: ignore[union-attr]
        if self._queue_timer is not None:
            self._cancel_queue_timer()
        req = self.req
        if resp.status == 101:
            if req.upgrade is None:
                att.cancel()
                self.attempt_failed(att, Failed("garbage", "backend switched protocols without an Upgrade request", sent=True))
                return
            self._start_tunnel(att, resp)
            return
        st = self.st
        if st is not None and st.policy.statuses and resp.status in st.policy.statuses and self._withhold(att, resp):
            return
        self.response = resp
        self.status = resp.status
        # client_framing(), inlined: this runs for every response
        if resp.no_body:
            framing = FRAME_NONE
        elif resp.content_length is not None and resp.te is None:
            framing = FRAME_LENGTH
        elif req.version == b"1.1":
            framing = FRAME_CHUNKED
        else:
            framing = FRAME_CLOSE
        self.framing = framing
        keep = req.keep_alive and framing != FRAME_CLOSE and not self.client.draining
        self.keep_alive = keep
        plan = self.plan
        extra = (self.set_cookie,) if self.set_cookie is not None else ()
        if plan.buffer_response and not resp.no_body:  # type: ignore[union-attr]
            self.resp_buffer = []
            return
        self.out.append(client_response_head(resp, framing, keep, req.version, self.request_id, self.ctx.forwarding,
                                             plan.response_rewriter, extra))  # type: ignore[union-attr]

    def on_body(self, data: bytes) -> None:
        n = len(data)
        self.bytes_out += n
        buf = self.resp_buffer
        if buf is not None:
            self.resp_buffered += n
            if self.resp_buffered > MAX_BUFFERED_RESPONSE:
                att = self.attempt
                if att is not None:
                    att.cancel()
                    self.attempt_failed(att, Failed("garbage", "response too large to buffer", sent=True))
                return
            buf.append(data)
            return
        if self.framing == FRAME_CHUNKED:
            self.out.append(b"%x\r\n" % n)
            self.out.append(data)
            self.out.append(b"\r\n")
        else:
            self.out.append(data)

    def on_end(self) -> None:
        att = self.attempt
        att.state = DONE  # type: ignore[union-attr]
        resp = self.response
        if self.resp_buffer is not None:
            body = b"".join(self.resp_buffer)
            self.resp_buffer = None
            extra = (self.set_cookie,) if self.set_cookie is not None else ()
            self.out.append(client_response_head(
                resp, framing=self.framing, keep_alive=self.keep_alive, client_version=self.req.version,  # type: ignore[arg-type]
                request_id=self.request_id, policy=self.ctx.forwarding,
                rewriter=self.plan.response_rewriter, extra=extra, content_length=len(body),  # type: ignore[union-attr]
            ))
            self.out.append(body)
        elif self.framing == FRAME_CHUNKED:
            self.out.append(LAST_CHUNK)
        out = self.out
        if out:  # flush() and client.write(), inlined
            self.out = []
            client = self.client
            if not client.closed:
                client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        conn = att.conn  # att.finish(), inlined
        att.conn = None
        conn.finish(resp.keep_alive and att.body_done)  # type: ignore[union-attr]
        self.attempt = None  # _finish_attempt(), inlined
        if self._queue_timer is not None:
            self._cancel_queue_timer()
        now = self.ended = self.clock.seconds()
        status = self.status
        outcome = "ok" if status < 500 else "5xx"
        self.pool.on_finish(att.backend, now - att.started, status < 500, outcome, now)  # type: ignore[union-attr]
        st = self.st
        if st is not None and not self._reported:
            self._reported = True
            st.on_attempt_finish(att.backend, outcome, status,
                                 resp.header(b"retry-after") if status == 503 else None, now)  # type: ignore[union-attr]
        self._done(self.keep_alive)

    def attempt_failed(self, att: Attempt, failure: Failed) -> None:
        if self.done:
            return
        if failure.code == "max_pending":
            # Refused by the pool's own queue limit: not the backend's fault.
            self._finish_attempt(att, True, "cancelled")
            self.reject(503, failure.detail, extra=tuple(overflow_headers(Limit.PENDING)))
            return
        self._finish_attempt(att, False, "gateway")
        st = self.st
        if st is not None and not failure.after_response:
            kind = _FAILURE_KIND.get(failure.code)
            if kind is not None and st.policy.retryable(kind) and st.attempts < st.policy.max_attempts:
                # Where would a retry go? With nowhere left, fail now, spending no budget.
                backend = self.pick()
                if backend is not None:
                    body = self.body
                    d = st.may_retry(kind, None, self._interim, body is None or body.replayable)
                    if d.retry:
                        self._retry_timer = self.clock.callLater(d.delay, self._retry, backend)
                        return
        self._give_up(att, failure)

    def _retry(self, backend: Backend) -> None:
        self._retry_timer = None
        if self.done:
            return
        t = self.st.try_timeout()
        if t is not None and t <= 0:
            self.reject(504, "request deadline passed before another backend could be tried", outcome="gateway")
            return
        self.forward_to(backend)
        self.flush()

    def _withhold(self, att: Attempt, resp: Response) -> bool:
        """A response whose status the route retries: retry elsewhere (True,
        the response and its connection are dropped) or relay it (False)."""
        status = resp.status
        st = self.st
        self._reported = True
        st.on_attempt_finish(att.backend, "5xx" if status >= 500 else "ok", status,
                             resp.header(b"retry-after") if status == 503 else None)
        if st.attempts >= st.policy.max_attempts:
            return False
        backend = self.pick()
        if backend is None:
            return False  # nowhere else to go: relay this answer as it is
        body = self.body
        d = st.may_retry(Failure.STATUS, status, self._interim, body is None or body.replayable)
        if not d.retry:
            return False
        conn = att.conn
        if conn is not None:
            conn.parser.handler = _DISCARD  # the rest of this read belongs to no one
        att.cancel()
        if self.attempt is att:
            self.attempt = None
        if self._queue_timer is not None:
            self._cancel_queue_timer()
        now = self.ended = self.clock.seconds()
        self.pool.on_finish(att.backend, now - att.started, status < 500, "5xx" if status >= 500 else "ok")  # type: ignore[union-attr]
        self.backend = att.backend
        self._withheld = resp
        self._retry_timer = self.clock.callLater(d.delay, self._retry, backend)
        return True

    def _give_up(self, att: Attempt, failure: Failed) -> None:
        backend = att.backend.address
        if failure.after_response:
            log.warn("{method} {path}: backend {backend} failed mid-response: {detail}",
                     method=self.req.method.decode(), path=self.req.path.decode("latin-1"),
                     backend=backend, detail=failure.detail)
            self.error = f"backend {backend}: {failure.detail} (mid-response)"
            self.outcome = "gateway"
            self.flush()
            self.client.abort()
            self._done(False)
            return
        retry = self.retry
        if retry is not None and retry(self, att, failure):
            return
        self._fail(backend, failure)

    def _fail(self, backend: str, failure: Failed) -> None:
        """Answer the error page for the last failure (no retry left)."""
        withheld = self._withheld
        status = withheld.status if withheld is not None and failure.code == "status" else FAILURE_STATUS.get(failure.code, 502)
        cause = f"backend {backend}: {failure.detail}"
        if withheld is not None and withheld.status == 503 and failure.code == "status":
            ra = withheld.header(b"retry-after")
            if ra is not None:
                log.warn("{method} {path}: {status} {cause}", method=self.req.method.decode(),
                         path=self.req.path.decode("latin-1"), status=status, cause=cause)
                self.reject(status, cause, outcome="gateway", extra=((b"retry-after", ra),))
                return
        log.warn("{method} {path}: {status} {cause}", method=self.req.method.decode(),
                 path=self.req.path.decode("latin-1"), status=status, cause=cause)
        self.reject(status, cause, outcome="gateway")

    def backend_write_blocked(self) -> None:
        self.client.pause_reading("backend")
        att = self.attempt
        if att is not None and att.conn is not None and self.response is None:
            # Bound how long a backend may leave the upload unread.
            att.conn.set_timeout(self.ctx.http.body_timeout, "write")

    def backend_write_unblocked(self) -> None:
        self.client.resume_reading("backend")
        att = self.attempt
        if att is not None and att.conn is not None and att.conn.deadline.kind == "write":
            if att.body_done:
                att.conn.set_timeout(att.timeout, "response")
            else:
                att.conn.deadline.clear()

    # -- from the client connection ---------------------------------------------------------

    def body_data(self, data: bytes) -> None:
        if self.done:
            return
        body = self.body
        att = self.attempt
        if att is not None and att.accepting_body:
            att.body_data(data)
            body.add(data, True)  # type: ignore[union-attr]
        else:
            body.add(data, False)  # type: ignore[union-attr]
            if not self.waiting_body and body.unsent_size > BODY_PAUSE:  # type: ignore[union-attr]
                self.client.pause_reading("body")

    def body_end(self) -> None:
        self.request_complete = True
        if self.done:
            return
        body = self.body
        if body is None:
            return
        body.complete = True
        if self.waiting_body:
            self.waiting_body = False
            self.forward()
            return
        att = self.attempt
        if att is not None and att.accepting_body:
            att.body_end()

    def client_write_blocked(self) -> None:
        att = self.attempt
        if att is not None and att.conn is not None:
            att.conn.pause_reading()
            att.conn.deadline.clear()

    def client_write_unblocked(self) -> None:
        att = self.attempt
        if att is not None and att.conn is not None:
            att.conn.resume_reading()
            if self.response is not None:
                att.conn.set_timeout(self.ctx.http.body_timeout, "body")

    def client_lost(self) -> None:
        """The client went away: abandon the backend side (not its fault)."""
        self.out = []  # nowhere to send it
        self.abort()

    def abort(self) -> None:
        """Drop everything now (drain timeout, protocol error mid-request)."""
        if self.done:
            return
        att = self.attempt
        if att is not None:
            att.cancel()
            self._finish_attempt(att, True, "cancelled")
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
            self._finish_attempt(att, True, "cancelled")
        if self.response is not None:
            self.outcome = "rejected"
            self.error = reason
            self.flush()
            self.client.abort()
            self._done(False)
            return
        self.request_complete = False
        self.reject(status, reason)

    # -- output ------------------------------------------------------------------------------

    def flush(self) -> None:
        rq = self.req_out
        if rq:
            self.req_out = ()
            att = self.attempt
            if att is not None and att.conn is not None:
                att.conn.write(rq[0] if len(rq) == 1 else b"".join(rq))
        out = self.out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.out = []
            self.client.write(data)

    def reject(self, status: int, cause: str, outcome: str = "rejected",
               extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer ``status`` ourselves (before any response byte was sent);
        ``extra`` headers (Retry-After, the limit that refused...)."""
        if self.done:
            return
        self.status = status
        self.error = cause
        self.outcome = outcome
        keep = self.req.keep_alive and self.request_complete and not self.client.draining
        if self.request_id:
            extra = ((self.ctx.forwarding.request_id_header, self.request_id), *extra)
        extra = (*extra, *self.ctx.forwarding.response_fields)
        page = error_page(status, cause, close=not keep, head_only=self.req.method == b"HEAD", extra=extra)
        self.bytes_out += page_body_size(page)
        self.out.append(page)
        self.flush()
        self._done(keep)

    def _done(self, keep_alive: bool) -> None:
        if self.done:
            return
        self.done = True
        if self._queue_timer is not None:
            self._cancel_queue_timer()
        st = self.st
        if st is not None:
            t = self._retry_timer
            if t is not None:
                self._retry_timer = None
                if t.active():
                    t.cancel()
            st.finish()
        ctx = self.ctx
        hub = ctx.runtime.traffic
        if hub.subscribers:
            req = self.req
            now = self.ended or self.clock.seconds()
            outcome = self.outcome
            if outcome == "ok" and self.status >= 500:
                outcome = "5xx"  # a relayed backend 5xx (lbtwist's own set the outcome in reject)
            hub.publish(TrafficRecord(
                kind="http", listener=ctx.name, start=time.time() - (now - self.started),
                duration=now - self.started, client=self.client.client_addr,
                pool=self.plan.pool if self.plan else None,
                backend=self.backend.address if self.backend else None,
                route=self.plan.name if self.plan else None,
                method=req.method.decode("ascii"), path=req.path.decode("latin-1"),
                status=self.status or None, bytes_in=self.body.size if self.body else 0,
                bytes_out=self.bytes_out, tries=self.tries,
                request_id=self.request_id.decode("latin-1") if self.request_id else None,
                outcome=outcome, error=self.error,
                **_tls_record(self.client),
            ))
        self.client.exchange_done(self, keep_alive)

    # -- upgrade --------------------------------------------------------------------------------

    def _start_tunnel(self, att: Attempt, resp: Response) -> None:
        from lbtwist.l7.backend import TUNNEL

        req = self.req
        self.status = 101
        self.response = resp
        self.out.append(client_response_head(
            resp, framing=FRAME_NONE, keep_alive=True, client_version=req.version,
            request_id=self.request_id, policy=self.ctx.forwarding,
            rewriter=self.plan.response_rewriter,  # type: ignore[union-attr]
        ))
        self.flush()
        conn = att.conn
        att.conn = None
        if self.attempt is att:
            self.attempt = None
        self._cancel_queue_timer()
        conn.state = TUNNEL  # type: ignore[union-attr]
        conn.deadline.clear()  # type: ignore[union-attr]
        started = att.started

        def closed(tunnel: Tunnel) -> None:
            self.bytes_out = tunnel.bytes_out
            self.pool.on_finish(att.backend, self.clock.seconds() - started, True, "ok")  # type: ignore[union-attr]
            self._done(False)

        idle = self.ctx.listener.idle_timeout or 3600.0
        tunnel = Tunnel(self.client, conn, self.clock, idle, closed)
        conn.tunnel = tunnel  # type: ignore[union-attr]
        conn.user = tunnel  # type: ignore[union-attr]
        self.tunnel = tunnel
        self.client.start_tunnel(tunnel)


def _tls_info(client: Any) -> Any:
    if not client.tls or client.transport is None:
        return None
    from lbtwist.tls.server import tls_info

    return tls_info(client.transport)


def _tls_fields(client: Any) -> dict[str, str]:
    """RequestHead's TLS fields (version, cipher, SNI) for ``sni``/``tls_version`` routes."""
    info = _tls_info(client)
    if info is None:
        return {}
    return {"tls_version": info.version, "tls_cipher": info.cipher, "sni": info.server_name or ""}


def _tls_record(client: Any) -> dict[str, Any]:
    """The access log's TLS fields (absent on plain connections)."""
    info = _tls_info(client)
    if info is None:
        return {}
    return {"tls_version": info.version, "tls_cipher": info.cipher, "tls_resumed": info.resumed}



#: Attempt failure codes (L{Failed.code}) as the retry policy names them;
#: absent codes (a garbled response...) are never retried.
_FAILURE_KIND = {
    "connect-refused": Failure.CONNECT_FAILURE,
    "connect-failed": Failure.CONNECT_FAILURE,
    "connect-timeout": Failure.CONNECT_FAILURE,
    "pool-full": Failure.CONNECT_FAILURE,
    "reset": Failure.RESET,
    "closed": Failure.RESET,
    "timeout": Failure.TIMEOUT,
}


class _Discard:
    """Parser sink for the rest of a response dropped for a retry."""

    def on_informational(self, resp: Response) -> None:
        pass

    def on_response(self, resp: Response) -> None:
        pass

    def on_body(self, data: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass


_DISCARD = _Discard()
