"""The admin HTTP API on twisted.web: JSON for pools, backends, listeners and
the config, operator actions (drain, enable, weight, reload), Prometheus
``/metrics`` and the dashboard's static files.

Every error is a JSON body ``{"error": ..., "status": ...}`` naming what was
wrong; a refused request changes nothing. State changes go through Pool
methods only, so they are logged and published like any other change.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any, Callable
from urllib.parse import unquote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http_headers import Headers

from lbtwist.admin.auth import Guard
from lbtwist.admin.metrics import exposition
from lbtwist.admin.state import StateView, config_json
from lbtwist.health.drain import drain_backend
from lbtwist.config.problems import num
from lbtwist.pool import MAX_WEIGHT

log = Logger(namespace="lbtwist.admin")

MAX_BODY = 64 * 1024

_STATIC = {
    "": ("index.html", b"text/html; charset=utf-8"),
    "index.html": ("index.html", b"text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}

#: action -> (Pool method, value)
_ACTIONS = {
    "drain": ("set_draining", True),
    "undrain": ("set_draining", False),
    "enable": ("set_enabled", True),
    "disable": ("set_enabled", False),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _static(name: str) -> bytes:
    return (resources.files("lbtwist.admin") / "dashboard" / name).read_bytes()


class AdminResource(resource.Resource):
    """One leaf resource that routes on the path itself: the URL space is small
    and a flat table reads better than a tree of child resources."""

    isLeaf = True

    def __init__(
        self,
        runtime: Any,
        view: StateView,
        registry: Any,
        guard: Guard,
        reload: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.runtime = runtime
        self.view = view
        self.registry = registry
        self.guard = guard
        self.reload = reload

    # -- plumbing -------------------------------------------------------------

    def refuse_head(self, method: bytes, headers: Headers, length: int | None) -> tuple[int, str] | None:
        """The checks a request head alone decides, made before any body is
        read: who is calling (401/403, by L{Guard}) and the declared body size
        (413). ``length`` is the Content-Length, None for a chunked body (its
        size is checked as it streams). Returns None or ``(status, message)``."""
        refused = self.guard.check(method, _last(headers, b"host"), _last(headers, b"origin"), _last(headers, b"authorization"))
        if refused is not None:
            return refused
        if length is not None and length > MAX_BODY:
            return 413, f"request body of {length} bytes is larger than {MAX_BODY} bytes"
        return None

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # the admin listener's channel made these checks before reading the
        # body; made again here for any other Site (tests serve this resource alone)
        refused = self.refuse_head(request.method, request.requestHeaders, None)
        if refused is not None:
            status, message = refused
            for name, value in refusal_headers(status):
                request.responseHeaders.addRawHeader(name, value)
            return self._error(request, status, message)
        segments = [unquote(s.decode("utf-8", "replace")) for s in request.postpath]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments.pop()
        method = request.method.decode("ascii", "replace")
        try:
            result = self.dispatch(method, segments, request)
        except ApiError as e:
            return self._error(request, e.status, e.message)
        except Exception:
            log.failure("admin API: {method} {path} failed", method=method, path=request.path)
            return self._error(request, 500, "internal error (see the lbtwist log)")
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                lambda body: self._finish(request, body),
                lambda f: self._finish_failure(request, f),
            )
            return server.NOT_DONE_YET
        return result

    def _finish(self, request: server.Request, body: bytes) -> None:
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(body)
            request.finish()

    def _finish_failure(self, request: server.Request, f: Failure) -> None:
        if f.check(ApiError):
            body = self._error(request, f.value.status, f.value.message)
        else:
            log.failure("admin API: request failed", f)
            body = self._error(request, 500, f"{f.type.__name__}: {f.getErrorMessage()}")
        self._finish(request, body)

    def _json(self, request: server.Request, obj: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    def _error(self, request: server.Request, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return error_json(status, message)

    # -- routing --------------------------------------------------------------

    def dispatch(self, method: str, seg: list[str], request: server.Request) -> Any:
        if not seg or seg == [""] or (len(seg) == 1 and seg[0] in _STATIC):
            name = seg[0] if seg else ""
            self._allow(method, "GET", "HEAD")
            fname, ctype = _STATIC[name]
            request.setHeader(b"content-type", ctype)
            request.setHeader(b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'")
            return _static(fname)
        if seg == ["metrics"]:
            self._allow(method, "GET", "HEAD")
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            if self.runtime.workers is not None:
                return self._fleet_metrics()
            return exposition(self.registry)
        if seg[0] != "api":
            raise ApiError(404, f"no such path {request.path.decode('latin-1')!r}")
        rest = seg[1:]
        if rest == ["pools"]:
            self._allow(method, "GET", "HEAD")
            return self._json(request, self.view.overview(history=_flag(request, b"history", True)))
        if rest == ["config"]:
            self._allow(method, "GET", "HEAD")
            return self._json(request, config_json(self.runtime.config))
        if rest == ["fleet"]:
            self._allow(method, "GET", "HEAD")
            fleet = self.runtime.fleet
            return self._json(request, fleet.status() if fleet is not None else {"mode": "off", "redis_up": False})
        if rest == ["reload"]:
            self._allow(method, "POST")
            return self._reload(request)
        if rest == ["ocsp", "refresh"]:
            self._allow(method, "POST")
            ocsp = self.runtime.ocsp
            log.info("admin API: OCSP refresh requested by {who}", who=_who(request))
            keys = ocsp.refresh_now() if ocsp is not None else []
            return self._json(request, {"refreshing": keys})
        if rest == ["workers"]:
            self._allow(method, "GET", "HEAD")
            fleet = self.runtime.workers
            if fleet is None:
                return self._json(request, {"workers": [], "single_process": True})
            return self._json(request, fleet.workers_json())
        if rest == ["listeners"]:
            self._allow(method, "GET", "HEAD")
            self.view.live.sync()
            return self._json(request, {"listeners": self.view.listeners(self.view.clock.seconds())})
        if len(rest) >= 2 and rest[0] == "pools":
            pool = self._pool(rest[1])
            if len(rest) == 2:
                self._allow(method, "GET", "HEAD")
                self.view.live.sync()
                return self._json(request, self.view.pool(pool, self.view.clock.seconds(), _flag(request, b"history", True)))
            if rest[2] == "backends" and len(rest) == 3:
                self._allow(method, "GET", "HEAD")
                now = self.view.clock.seconds()
                return self._json(request, {"backends": [self.view.backend(pool, b, now, _flag(request, b"history", True)) for b in pool.backends()]})
            if rest[2] == "backends" and len(rest) in (4, 5):
                backend = self._backend(pool, rest[3])
                if len(rest) == 4:
                    self._allow(method, "GET", "HEAD")
                    return self._backend_json(request, pool, backend)
                return self._action(method, rest[4], pool, backend, request)
        raise ApiError(404, f"no such path {request.path.decode('latin-1')!r}")

    def _allow(self, method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(405, f"method {method} not allowed here; use {' or '.join(allowed)}")

    def _pool(self, name: str) -> Any:
        pool = self.runtime.pools.get(name)
        if pool is None:
            known = ", ".join(sorted(self.runtime.pools)) or "none"
            raise ApiError(404, f"unknown pool {name!r}; pools: {known}")
        return pool

    def _backend(self, pool: Any, address: str) -> Any:
        b = pool.get(address)
        if b is None:
            for cand in pool.backends():  # also by configured name
                if cand.name == address:
                    return cand
            known = ", ".join(x.address for x in pool.backends()) or "none"
            raise ApiError(404, f"pool {pool.name!r} has no backend {address!r}; backends: {known}")
        return b

    def _backend_json(self, request: server.Request, pool: Any, backend: Any, status: int = 200) -> bytes:
        self.view.live.sync()
        return self._json(request, self.view.backend(pool, backend, self.view.clock.seconds(), _flag(request, b"history", True)), status)

    # -- actions --------------------------------------------------------------

    def _action(self, method: str, action: str, pool: Any, backend: Any, request: server.Request) -> bytes:
        who = _who(request)
        if action in _ACTIONS:
            self._allow(method, "POST")
            self._body(request, required=False)  # malformed JSON is refused even when unused
            fn, value = _ACTIONS[action]
            if action == "drain":
                self._drain(pool, backend, f"admin API ({who})")
            else:
                getattr(pool, fn)(backend, value, f"admin API ({who})")
            return self._after_change(request, pool, backend)
        if action == "weight":
            self._allow(method, "PUT", "POST")
            body = self._body(request, required=True)
            if not isinstance(body, dict) or "weight" not in body:
                raise ApiError(400, 'expected a JSON object {"weight": N}')
            w = body["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ApiError(400, f"weight must be a number, got {json.dumps(w)}")
            if not 0 <= w <= MAX_WEIGHT:
                raise ApiError(400, f"weight must be between 0 and {num(MAX_WEIGHT)}, got {num(w)}")
            pool.set_weight(backend, float(w), f"admin API ({who})")
            return self._after_change(request, pool, backend)
        raise ApiError(404, f"unknown action {action!r}; actions: drain, undrain, enable, disable, weight")

    def _after_change(self, request: server.Request, pool: Any, backend: Any) -> Any:
        """The backend's JSON; with worker processes, only once every worker
        applied the change (so the caller's next request sees it everywhere)."""
        fleet = self.runtime.workers
        if fleet is None:
            return self._backend_json(request, pool, backend)
        d = fleet.sync()
        return d.addCallback(lambda _: self._backend_json(request, pool, backend))

    def _fleet_metrics(self) -> defer.Deferred:
        """The master's series and its workers', merged (lbtwist.workers.metricsmerge)."""
        from lbtwist.workers.metricsmerge import merge

        mine = exposition(self.registry).decode("utf-8")

        def merged(got: list) -> bytes:
            return merge([t for _, t in got], [w for w, _ in got], master_text=mine).encode("utf-8")

        return self.runtime.workers.fetch_metrics().addCallback(merged)

    def _drain(self, pool: Any, backend: Any, reason: str) -> None:
        """Drain the way config removal and shutdown do (L{drain_backend}):
        at the pool's ``drain_timeout`` the work left is cut. Already
        draining: the running timer stands (a repeated click does not
        extend it); undrain stops it."""
        if backend.draining:
            return
        d = drain_backend(pool, backend, self.runtime.reactor, reason)
        d.addErrback(lambda f: log.failure("admin API: drain of {backend}", f, backend=backend.address))

    def _body(self, request: server.Request, required: bool) -> Any:
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
        if not raw.strip():
            if required:
                raise ApiError(400, "a JSON body is required")
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"malformed JSON body: {e}") from None

    def _reload(self, request: server.Request) -> Any:
        if self.reload is None:
            raise ApiError(501, "reload is not available in this process")
        log.info("admin API: reload requested by {who}", who=_who(request))
        d = defer.maybeDeferred(self.reload)

        def ok(result: Any) -> bytes:
            body: dict[str, Any] = {"reloaded": True}
            if result is not None:
                body["result"] = result if isinstance(result, (str, int, float, bool, list, dict)) else str(result)
            return self._json(request, body)

        def failed(f: Failure) -> bytes:
            # a rejected config: the old one keeps running, say why
            return self._json(request, {"reloaded": False, "error": f.getErrorMessage() or f.type.__name__, "status": 422}, 422)

        return d.addCallbacks(ok, failed)


def error_json(status: int, message: str) -> bytes:
    """The body of every admin error: ``{"error": ..., "status": ...}``."""
    return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode() + b"\n"


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers a refusal with ``status`` carries besides the JSON body: a 401
    says how to authenticate (a browser then prompts: any user, the token as
    password)."""
    if status == 401:
        return [(b"www-authenticate", b'Bearer realm="lbtwist"'),
                (b"www-authenticate", b'Basic realm="lbtwist admin (password: the token)"')]
    return []


def _last(headers: Headers, name: bytes) -> bytes | None:
    """The last value of header ``name`` (what Request.getHeader answers)."""
    values = headers.getRawHeaders(name)
    return values[-1] if values else None


def _flag(request: server.Request, name: bytes, default: bool) -> bool:
    vals = request.args.get(name)
    if not vals:
        return default
    return vals[0].lower() not in (b"0", b"false", b"no")


def _who(request: server.Request) -> str:
    peer = request.getClientAddress()
    return getattr(peer, "host", None) or str(peer)
