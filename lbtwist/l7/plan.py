"""What a route resolves to for the proxy, precomputed once per route: the
pool, timeouts, limits, buffering, header rewriters and the hash key, so the
per-request path reads attributes instead of config."""
from __future__ import annotations

import attrs

from lbtwist.config.model import HttpConfig, RouteConfig
from lbtwist.config.names import parse_hash_key
from lbtwist.l7.headers import Rewriter
from lbtwist.l7.parser import Request
from lbtwist.resilience.build import RouteResilience

#: Default bytes of a request body kept to re-send it after the keep-alive race.
DEFAULT_REPLAY = 64 * 1024


@attrs.frozen
class HashKey:
    """Where the key for hashing algorithms comes from: ``source`` (client
    address), ``header:NAME`` or ``cookie:NAME``."""

    kind: str = "source"
    name: bytes = b""

    @classmethod
    def parse(cls, text: str | None) -> "HashKey":
        """``text`` as the validator reads it (L{parse_hash_key}); None is ``source``."""
        if text is None:
            return cls()
        kind, name = parse_hash_key(text)
        return cls(kind, name.encode() if name is not None else b"")

    def key(self, req: Request, client_ip: bytes) -> bytes | None:
        if self.kind == "source":
            return client_ip
        if self.kind == "header":
            return req.header(self.name)
        return cookie_value(req.cookie, self.name)


def cookie_value(cookie: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a Cookie header, or None."""
    if not cookie:
        return None
    for part in cookie.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v.strip(b'"')
    return None


@attrs.frozen
class RoutePlan:
    name: str
    pool: str
    #: The response head must start within this after the request was sent.
    timeout: float
    #: 413 above this body size (0: unlimited).
    max_body: int
    buffer_request: bool
    buffer_response: bool
    request_rewriter: Rewriter | None
    response_rewriter: Rewriter | None
    hash_key: HashKey
    #: Body bytes kept so the request can be sent again (keep-alive race, retries).
    replay_limit: int
    #: Lower-case header whose presence makes any request safe to re-send.
    idempotency_header: bytes | None
    #: The route's config (retry policies and plugins read it).
    config: RouteConfig | None = None
    #: Retry policy and budget, rate limiter, whole-request deadline (per route).
    resilience: RouteResilience | None = None

    @classmethod
    def build(
        cls, rcfg: RouteConfig | None, name: str, pool: str, http: HttpConfig, hash_key: HashKey = HashKey(),
        resilience: RouteResilience | None = None,
    ) -> "RoutePlan":
        """``hash_key`` is the listener's: the key of the default route and of
        every route that does not set its own. ``resilience``: the route's
        retry budget and rate limiter when the caller keeps them across
        reloads; else built fresh from ``rcfg``."""
        if resilience is None:
            resilience = RouteResilience.from_config(rcfg, default_timeout=http.request_timeout, name=name)
        if rcfg is None:
            return cls(
                name=name, pool=pool, timeout=http.request_timeout, max_body=http.max_body_size,
                buffer_request=False, buffer_response=False, request_rewriter=None,
                response_rewriter=None, hash_key=hash_key, replay_limit=DEFAULT_REPLAY,
                idempotency_header=b"idempotency-key",
                resilience=resilience,
            )
        retry = getattr(rcfg, "retry", None)
        replay = getattr(retry, "max_replay_body", DEFAULT_REPLAY) if retry is not None else DEFAULT_REPLAY
        idem = getattr(retry, "idempotency_header", "idempotency-key") if retry is not None else "idempotency-key"
        max_body = rcfg.max_body_size if rcfg.max_body_size is not None else http.max_body_size
        buffer_request = rcfg.buffering in ("request", "both")
        if buffer_request:
            # A fully buffered body is held anyway: keep it for replay too.
            replay = max(replay, max_body or replay)
        return cls(
            name=name,
            pool=rcfg.pool,
            timeout=rcfg.timeout if rcfg.timeout is not None else http.request_timeout,
            max_body=max_body or 0,
            buffer_request=buffer_request,
            buffer_response=rcfg.buffering in ("response", "both"),
            request_rewriter=Rewriter.compile(rcfg.request_headers),
            response_rewriter=Rewriter.compile(rcfg.response_headers),
            hash_key=HashKey.parse(rcfg.hash_key) if rcfg.hash_key is not None else hash_key,
            replay_limit=replay,
            idempotency_header=idem.lower().encode() if idem else None,
            config=rcfg,
            resilience=resilience,
        )
