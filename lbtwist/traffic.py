"""One record per finished request (L7) or connection/flow (L4), published to
subscribers: the access log and the metrics read the same facts."""
from __future__ import annotations

from typing import Callable

import attrs


@attrs.define
class TrafficRecord:
    """What happened to one request or connection."""

    kind: str  # "http" | "tcp" | "udp"
    listener: str
    start: float  # wall-clock seconds (time.time()) when it began
    duration: float  # seconds
    client: str = ""
    pool: str | None = None
    backend: str | None = None  # address of the backend that served (last try)
    route: str | None = None  # route index/name for http
    method: str | None = None
    path: str | None = None
    status: int | None = None  # http status sent to the client
    bytes_in: int = 0  # from the client
    bytes_out: int = 0  # to the client
    tries: int = 0  # backend attempts (1 = no retry)
    request_id: str | None = None
    tls_resumed: bool | None = None  # None when not TLS
    tls_version: str | None = None  # "TLSv1.3" when the client connection is TLS
    tls_cipher: str | None = None  # OpenSSL cipher name when TLS
    outcome: str = "ok"  # see lbtwist.pool.OUTCOMES, plus "rejected" (4xx by lbtwist itself)
    error: str | None = None  # short cause when lbtwist itself failed the request


Subscriber = Callable[[TrafficRecord], None]


class TrafficHub:
    """Fan-out of finished-work records. Subscribers must be cheap and must not raise."""

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        self.subscribers.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        self.subscribers.remove(fn)

    def publish(self, record: TrafficRecord) -> None:
        for fn in self.subscribers:
            fn(record)
