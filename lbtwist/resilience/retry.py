# -*- test-case-name: tests.test_resilience_retry -*-
"""Retry policy, sans-IO: which failures may be tried again, for which requests,
how many times, and how long to wait first.

Retries are the usual way a balancer turns one slow node into an outage, so the
policy is deliberately narrow by default: connect failures and resets that
happened before any response byte, idempotent requests only, one extra try.
The budget (L{lbtwist.resilience.budget}) caps what the policy allows in total.
"""
from __future__ import annotations

import difflib
import email.utils
import enum
import math
import random
from typing import Any, Iterable, Iterator

import attrs


class Failure(str, enum.Enum):
    """How one attempt failed, as the data plane reports it."""

    #: The TCP (or TLS) connection to the backend was never established:
    #: not one request byte left lbtwist.
    CONNECT_FAILURE = "connect-failure"
    #: The connection broke (RST/EOF) before the response head arrived.
    RESET = "reset"
    #: The per-try timeout fired before the response head arrived.
    TIMEOUT = "timeout"
    #: The backend answered with a status; see L{RetryPolicy.statuses}.
    STATUS = "status"


#: RFC 9110 section 9.2.2: methods whose repetition has the same effect as one call.
#: The one definition: every other module imports it (or its bytes form).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: The same methods as the HTTP parser hands them over, for a membership test without a decode.
IDEMPOTENT_METHODS_BYTES = frozenset(m.encode("ascii") for m in IDEMPOTENT_METHODS)

#: Shorthands accepted in ``retry_on`` besides failure names and status codes.
STATUS_ALIASES: dict[str, frozenset[int]] = {
    "gateway-error": frozenset({502, 503, 504}),
    "5xx": frozenset(range(500, 600)),
}

RETRY_ON_NAMES = tuple(f.value for f in Failure if f is not Failure.STATUS) + tuple(STATUS_ALIASES)


def parse_retry_on(entries: Iterable[Any]) -> tuple[frozenset[Failure], frozenset[int]]:
    """``["connect-failure", "reset", 503, "gateway-error"]`` -> (failure kinds,
    statuses). Raises ValueError naming the bad entry."""
    kinds: set[Failure] = set()
    statuses: set[int] = set()
    for entry in entries:
        if isinstance(entry, bool):
            raise ValueError(f"retry_on: {entry!r} is not a failure name or status code")
        if isinstance(entry, int) or (isinstance(entry, str) and entry.strip().isdigit()):
            code = int(entry)
            if not 400 <= code <= 599:
                raise ValueError(f"retry_on: status {code} is not a 4xx/5xx status")
            statuses.add(code)
            continue
        if not isinstance(entry, str):
            raise ValueError(f"retry_on: {entry!r} is not a failure name or status code")
        name = entry.strip().lower()
        if name in STATUS_ALIASES:
            statuses |= STATUS_ALIASES[name]
            continue
        try:
            kind = Failure(name)
        except ValueError:
            kind = None
        if kind is None or kind is Failure.STATUS:
            close = difflib.get_close_matches(name, RETRY_ON_NAMES, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"retry_on: unknown entry {entry!r}{hint}; expected one of "
                f"{', '.join(RETRY_ON_NAMES)} or a status code"
            )
        kinds.add(kind)
    return frozenset(kinds), frozenset(statuses)


@attrs.frozen
class Backoff:
    """Exponential backoff with full jitter: the n-th retry waits a uniform
    random time in [0, min(cap, base * 2**(n-1))]. Full jitter spreads retries
    so that clients failing together do not come back together."""

    base: float = 0.025
    cap: float = 0.25

    def __attrs_post_init__(self) -> None:
        if self.base < 0 or self.cap < 0:
            raise ValueError("backoff: base and max must be >= 0")
        if self.base > self.cap:
            raise ValueError(f"backoff: base ({self.base:g}s) is above max ({self.cap:g}s)")

    def ceiling(self, retry: int) -> float:
        """Upper bound of the wait before retry number ``retry`` (1-based)."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        # 2**60 overflows nothing but is far past any cap; avoid huge ints.
        return min(self.cap, self.base * 2.0 ** min(retry - 1, 60))

    def delay(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (1-based)."""
        return rng.uniform(0.0, self.ceiling(retry))


@attrs.frozen
class RetryPolicy:
    """What a route may retry. Immutable; one per route, shared by requests."""

    #: Failure kinds that may be retried (never Failure.STATUS; see ``statuses``).
    on: frozenset[Failure] = frozenset({Failure.CONNECT_FAILURE, Failure.RESET})
    #: Response statuses that may be retried (the response is then withheld).
    statuses: frozenset[int] = frozenset()
    #: Tries in all, the first one included; 1 disables retries.
    max_attempts: int = 2
    #: Time each try may take to produce a response head; None: only the route timeout.
    per_try_timeout: float | None = None
    backoff: Backoff = Backoff()
    #: Request body bytes kept for replay; a longer body makes the request final.
    max_replay_body: int = 64 * 1024
    #: A request carrying this header (lower-case) is retryable whatever its method.
    idempotency_header: str | None = "idempotency-key"
    #: Retry connect failures of non-idempotent requests too: safe, because no
    #: request byte left lbtwist. Off by default, as the contract says.
    connect_failure_any_method: bool = False

    def __attrs_post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("retry: max_attempts must be >= 1")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError("retry: per_try_timeout must be > 0")
        if self.max_replay_body < 0:
            raise ValueError("retry: max_replay_body must be >= 0")
        if Failure.STATUS in self.on:
            raise ValueError("retry: list statuses in 'statuses', not Failure.STATUS")

    @classmethod
    def from_config(cls, cfg: Any) -> "RetryPolicy":
        """Build from a L{lbtwist.config.model.RetryConfig}. ValueError on bad values."""
        kinds, statuses = parse_retry_on(cfg.retry_on)
        header = cfg.idempotency_header
        return cls(
            on=kinds,
            statuses=statuses,
            max_attempts=cfg.max_attempts,
            per_try_timeout=cfg.per_try_timeout,
            backoff=Backoff(base=cfg.backoff.base, cap=cfg.backoff.max),
            max_replay_body=cfg.max_replay_body,
            idempotency_header=header.lower() if header else None,
            connect_failure_any_method=cfg.connect_failure_any_method,
        )

    @classmethod
    def connect_only(cls, attempts: int, backoff: Backoff = Backoff(0.0, 0.0)) -> "RetryPolicy":
        """The L4 policy: a client connection may try ``attempts`` backends,
        retrying only connects that never completed."""
        return cls(
            on=frozenset({Failure.CONNECT_FAILURE}),
            max_attempts=attempts,
            backoff=backoff,
            connect_failure_any_method=True,
        )

    @property
    def retries_enabled(self) -> bool:
        return self.max_attempts > 1 and bool(self.on or self.statuses)

    def eligible(self, method: str | bytes | None, has_idempotency_key: bool = False) -> bool:
        """May this request be sent twice? ``method`` None means not HTTP (L4)."""
        if method is None or has_idempotency_key:
            return True
        if isinstance(method, bytes):
            method = method.decode("latin-1")
        return method.upper() in IDEMPOTENT_METHODS

    def has_key(self, headers: Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]) -> bool:
        """Does a header list carry a non-empty idempotency key? Names in any
        case, as ``str`` or ``bytes`` pairs (the L7 parser's ``all_headers``)."""
        name = self.idempotency_header
        if not name:
            return False
        bname = name.encode("latin-1")
        for k, v in headers:
            if k.lower() == (bname if isinstance(k, bytes) else name) and v.strip():
                return True
        return False

    def retryable(self, failure: Failure, status: int | None = None) -> bool:
        """Is this kind of failure one the route asked to retry?"""
        if failure is Failure.STATUS:
            return status is not None and status in self.statuses
        return failure in self.on

    def withhold(self, status: int) -> bool:
        """Must the data plane hold back a response head with this status
        until L{RequestRetryState.may_retry} has decided? True only for
        statuses the route retries; others are forwarded at once."""
        return status in self.statuses


class ReplayBuffer:
    """Keeps the request body bytes sent so far, up to ``limit``, so another
    backend can be sent the same request. Past the limit it drops everything
    and the request can no longer be retried: memory stays bounded per request."""

    __slots__ = ("limit", "_chunks", "size", "overflowed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: list[bytes] = []
        self.size = 0
        self.overflowed = False

    def append(self, data: bytes) -> None:
        if self.overflowed:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.overflowed = True
            self._chunks = []
            return
        self._chunks.append(data)

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    def __iter__(self) -> Iterator[bytes]:
        if self.overflowed:
            raise ValueError("replay buffer overflowed: body cannot be replayed")
        return iter(list(self._chunks))

    def release(self) -> None:
        """The request is done (or can no longer be retried): free the bytes."""
        self._chunks = []
        self.overflowed = True


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait, or None if absent/garbage.
    ``now`` is wall-clock seconds (the real reactor's ``seconds()``), needed for
    the HTTP-date form. Never negative."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        parsed = email.utils.parsedate_tz(value)
    except (TypeError, ValueError):
        return None
    if parsed is None:
        return None
    when = email.utils.mktime_tz(parsed)
    delta = when - now
    if math.isnan(delta):
        return None
    return max(0.0, float(delta))
