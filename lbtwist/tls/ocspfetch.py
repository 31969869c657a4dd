"""Fetching and refreshing stapled OCSP responses (``certificates[].ocsp_fetch``).

One L{OCSPFetcher} per certificate POSTs an OCSP request (RFC 6960, over
HTTP as RFC 5019 describes) to the responder named by the certificate's
Authority Information Access extension, or by ``ocsp_responder``. The answer
goes through L{lbtwist.tls.ocsp.parse_staple}, the validator of the file
path. A usable good response is stapled from the next handshake on, on every
listener serving that certificate (L{lbtwist.tls.context.ServerTLS.offer_staple}:
no context is rebuilt, no listener restarted), and written to the ``ocsp``
file when one is configured (temporary file and rename), so a restart starts
with it. A revoked or unknown answer replaces it too (so nothing is stapled)
and is warned about.

Schedule: the next fetch comes at half the time to the response's
``nextUpdate``, clamped to ``[ocsp_refresh_min, ocsp_refresh_max]`` and
moved up to 10% earlier at random (so certificates do not fetch in step). A
failure (no answer in ``ocsp_timeout``, not HTTP 200, not a valid response
for the certificate, good but already stale) retries with doubling delays
from ``min(ocsp_refresh_min, 60s)`` up to ``ocsp_refresh_max``, keeping the
last good response; when that one passes its ``nextUpdate``, stapling stops
and that is warned about once. State changes are logged once, not attempts.

With ``workers: N`` only the master fetches (L{OCSPService} runs where the
health probes run) and pushes each new response to every worker, which
checks it with the same validator (L{lbtwist.workers.master.Fleet.push_ocsp}).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from typing import Any, Callable

import attrs
from cryptography import x509
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from lbtwist.tls.context import TLSConfigError
from lbtwist.tls.files import TLSFileError, load_certificate_pair
from lbtwist.tls.ocsp import Staple, file_staple, find_issuer, ocsp_request, parse_staple, responder_url

__all__ = ["OCSPFetcher", "OCSPService", "apply_pushed", "fetch_settings", "timing_problems"]

log = Logger(namespace="lbtwist.tls.ocsp")

#: The first retry delay is ocsp_refresh_min, but never longer than this.
RETRY_BASE_MAX = 60.0
#: Responses larger than this are refused (real ones are a few KiB).
MAX_RESPONSE = 64 * 1024


@attrs.frozen
class FetchSettings:
    """What a fetcher is built from: a reload keeps a fetcher whose settings
    are unchanged (same certificate, same keys)."""

    cert: str
    leaf: x509.Certificate
    issuer: x509.Certificate
    url: str
    file: str | None
    timeout: float
    refresh_min: float
    refresh_max: float


def timing_problems(c: Any) -> list[tuple[str, str]]:
    """(key, problem) of the timing keys of a certificate entry."""
    out = []
    if not c.ocsp_timeout > 0:
        out.append(("ocsp_timeout", "must be above 0"))
    if not 0 < c.ocsp_refresh_min <= c.ocsp_refresh_max:
        out.append(("ocsp_refresh_min", f"must be above 0 and at most ocsp_refresh_max ({c.ocsp_refresh_max:g}s)"))
    return out


def fetch_settings(c: Any, now: float) -> FetchSettings:
    """The fetch settings of a certificate entry with ``ocsp_fetch``. Raises
    L{TLSFileError}: the certificate, the issuer, or the responder URL (path
    ``"ocsp_issuer"`` / ``"ocsp_responder"`` when the key is missing) - the
    same check for ``lbtwist check``, start and reload."""
    cf = load_certificate_pair(c.cert, c.key, now)
    issuer = find_issuer(cf.leaf, cf.chain[1:], c.ocsp_issuer)
    url = c.ocsp_responder or responder_url(cf.leaf)
    if url is None:
        raise TLSFileError("ocsp_responder", (
            f"{c.cert}: the certificate names no http OCSP responder (Authority Information Access): "
            "set ocsp_responder"
        ))
    if not url.lower().startswith("http://"):
        raise TLSFileError("ocsp_responder", f"{url!r}: OCSP responders are http:// URLs (RFC 6960 A.1)")
    if c.ocsp and not os.access(os.path.dirname(os.path.abspath(c.ocsp)), os.W_OK):
        raise TLSFileError(c.ocsp, "ocsp_fetch writes fetched responses here, but its directory is not writable")
    for key, problem in timing_problems(c):
        raise TLSFileError(key, problem)
    return FetchSettings(c.cert, cf.leaf, issuer, url, c.ocsp, float(c.ocsp_timeout),
                         float(c.ocsp_refresh_min), float(c.ocsp_refresh_max))


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old or the new file, whole."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ocsp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class _Discard(Protocol):
    """Takes a body nobody reads (the non-persistent pool closes the connection after)."""

    def dataReceived(self, data: bytes) -> None:
        pass


class FetchError(Exception):
    """A fetch that gave nothing usable (the message says why)."""


@attrs.define(eq=False)
class OCSPFetcher:
    """Fetches and refreshes the OCSP response of one certificate.

    @param http: anything with treq's ``post(url, data=, headers=)`` and
        responses with ``code`` and ``content()``: a L{treq.HTTPClient} in
        production, a L{treq.testing.StubTreq} in tests.
    @param publish: called with (certificate key, DER or None) when what is
        stapled changes: a new response, or None once the last one went stale.
    """

    settings: FetchSettings
    clock: IReactorTime
    http: Any
    publish: Callable[[str, bytes | None], None]
    wallclock: Callable[[], float] = time.time
    random: Callable[[], float] = random.random
    #: The last validated response (good, revoked or unknown).
    current: Staple | None = None
    fetch_ok: int = 0
    fetch_failed: int = 0
    #: Failed fetches in a row.
    failures: int = 0
    #: starting, good, revoked, unknown, failing, stale.
    state: str = "starting"
    last_error: str | None = None
    _timer: IDelayedCall | None = None
    _stale_timer: IDelayedCall | None = None
    _inflight: defer.Deferred | None = None

    @property
    def key(self) -> str:
        return self.settings.cert

    # -- lifecycle ------------------------------------------------------------

    def start(self, initial: Staple | None = None) -> None:
        """Take ``initial`` (the file's response) as current; fetch now unless
        it is good and usable, else when it is due for a refresh."""
        now = self.wallclock()
        if initial is not None and initial.usable(now):
            self.current = initial
            self.state = "good"
            self._arm_stale()
            self._schedule(self.refresh_delay(initial, now))
        else:
            self._schedule(0.0)

    def stop(self) -> None:
        for t in (self._timer, self._stale_timer):
            if t is not None and t.active():
                t.cancel()
        self._timer = self._stale_timer = None
        if self._inflight is not None:
            d, self._inflight = self._inflight, None
            d.cancel()

    def refresh_now(self) -> None:
        """Fetch at once (unless a fetch is in flight)."""
        if self._inflight is None:
            self._schedule(0.0)

    # -- schedule ---------------------------------------------------------------

    def _jitter(self, delay: float) -> float:
        return delay * (1.0 - 0.1 * self.random())

    def refresh_delay(self, staple: Staple, now: float) -> float:
        """Half the time to nextUpdate, clamped to [refresh_min, refresh_max], jittered down."""
        s = self.settings
        half = (staple.next_update - now) / 2 if staple.next_update is not None else s.refresh_max
        return self._jitter(min(max(half, s.refresh_min), s.refresh_max))

    def retry_delay(self) -> float:
        """After ``failures`` failures in a row: doubling, from min(refresh_min, 60s) to refresh_max."""
        s = self.settings
        base = min(s.refresh_min, RETRY_BASE_MAX)
        return self._jitter(min(base * 2 ** max(self.failures - 1, 0), s.refresh_max))

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._fetch)

    def _arm_stale(self) -> None:
        if self._stale_timer is not None and self._stale_timer.active():
            self._stale_timer.cancel()
        self._stale_timer = None
        c = self.current
        if c is not None and c.status == "good" and c.next_update is not None:
            self._stale_timer = self.clock.callLater(max(c.next_update - self.wallclock(), 0.0), self._went_stale)

    def next_fetch(self) -> float | None:
        """Seconds until the scheduled fetch (None: in flight, or stopped)."""
        t = self._timer
        if t is None or not t.active():
            return None
        return t.getTime() - self.clock.seconds()

    def seconds_to_next_update(self) -> float | None:
        c = self.current
        if c is None or c.next_update is None:
            return None
        return c.next_update - self.wallclock()

    # -- fetch ----------------------------------------------------------------------

    def _fetch(self) -> defer.Deferred:
        self._timer = None
        s = self.settings
        try:
            body = ocsp_request(s.leaf, s.issuer)
            d = defer.maybeDeferred(
                self.http.post, s.url, data=body,
                headers={b"Content-Type": [b"application/ocsp-request"], b"Accept": [b"application/ocsp-response"]},
            )
        except Exception as e:
            d = defer.fail(e)
        d.addCallback(self._body)
        d.addTimeout(s.timeout, self.clock)
        self._inflight = d
        d.addCallback(self._got)
        d.addErrback(self._failed)
        d.addErrback(lambda f: log.failure("tls ocsp {cert}: fetch bookkeeping failed", f, cert=s.cert))
        return d

    def _body(self, response: Any) -> Any:
        if response.code != 200:
            response.content().addErrback(lambda f: None)  # read it off the connection
            raise FetchError(f"the responder answered HTTP {response.code}")
        if isinstance(response.length, int) and response.length > MAX_RESPONSE:
            response.original.deliverBody(_Discard())  # not read; the connection is not kept
            raise FetchError(f"response of {response.length} bytes is too large")
        return response.content()

    def _got(self, der: bytes) -> None:
        self._inflight = None
        s = self.settings
        if len(der) > MAX_RESPONSE:
            raise FetchError(f"response of {len(der)} bytes is too large")
        try:
            staple = parse_staple(der, s.leaf, s.url)
        except TLSFileError as e:
            raise FetchError(str(e)) from None
        now = self.wallclock()
        if staple.status == "good" and not staple.usable(now):
            raise FetchError(staple.problem(now) or "the response is not valid now")
        self.fetch_ok += 1
        self.failures = 0
        self.last_error = None
        self.current = staple
        self.publish(s.cert, der)
        if s.file:
            try:
                write_atomically(s.file, der)
            except OSError as e:
                log.warn("tls ocsp {cert}: cannot write {path}: {e}", cert=s.cert, path=s.file, e=e.strerror or e)
        if staple.status == "good":
            self._set_state("good", "stapling a good OCSP response from {url} (nextUpdate in {left})",
                            left=_left(staple, now))
        else:
            self._set_state(staple.status, "{problem}", problem=staple.problem(now))
        self._arm_stale()
        self._schedule(self.refresh_delay(staple, now))

    def _failed(self, f: Any) -> None:
        if f.check(defer.CancelledError) and self._inflight is None:
            return  # stopped
        self._inflight = None
        self.fetch_failed += 1
        self.failures += 1
        if f.check(defer.TimeoutError, defer.CancelledError):
            why = f"no answer within {self.settings.timeout:g}s"
        else:
            why = f.getErrorMessage() or f.type.__name__
        self.last_error = why
        c = self.current
        keeping = (" keeping the last good response until its nextUpdate"
                   if c is not None and c.status == "good" and c.usable(self.wallclock()) else "")
        if self.state != "stale":
            self._set_state("failing", "fetch from {url} failed: {why};{keeping} retrying with backoff",
                            why=why, keeping=keeping or " nothing to staple,")
        self._schedule(self.retry_delay())

    def _went_stale(self) -> None:
        self._stale_timer = None
        c = self.current
        if c is None or c.usable(self.wallclock()):
            return
        self.publish(self.settings.cert, None)
        self._set_state("stale", "the last good OCSP response is stale (no fresh one fetched): not stapled")

    def _set_state(self, state: str, fmt: str, **kw: Any) -> None:
        if state == self.state:
            return
        self.state = state
        emit = log.info if state == "good" else log.warn
        emit("tls ocsp {cert}: " + fmt, cert=self.settings.cert, url=self.settings.url, **kw)

    def status(self) -> dict[str, Any]:
        left = self.seconds_to_next_update()
        out: dict[str, Any] = {
            "fetch_ok_total": self.fetch_ok,
            "fetch_failed_total": self.fetch_failed,
            "state": self.state,
        }
        if left is not None:
            out["next_update_seconds"] = round(left, 1)
        nxt = self.next_fetch()
        if nxt is not None:
            out["next_fetch_seconds"] = round(nxt, 1)
        return out


def _left(staple: Staple, now: float) -> str:
    if staple.next_update is None:
        return "never"
    return f"{max(staple.next_update - now, 0.0):.0f}s"


def _http_client(reactor: Any) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


class OCSPService(Service):
    """The fetchers of a balancer (not of a worker: its master fetches), by
    certificate file. What they fetch goes to every L{ServerTLS} of the
    runtime and, on a master, to every worker."""

    def __init__(self, runtime: Any, *, http: Any = None, wallclock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.setName("ocsp")
        self.runtime = runtime
        self.clock = runtime.reactor
        self.http = http if http is not None else _http_client(runtime.reactor)
        self.wallclock = wallclock
        self.rand = rand
        self.fetchers: dict[str, OCSPFetcher] = {}
        #: certificate key -> the DER pushed last (None: nothing stapled)
        self.current: dict[str, bytes | None] = {}
        runtime.ocsp = self
        runtime.listener_state.setdefault("ocsp", self._listener_state)

    # -- config ---------------------------------------------------------------

    def prepare(self, config: Any) -> dict[str, tuple[FetchSettings, Staple | None]]:
        """Settings and file response of every certificate with ocsp_fetch
        in ``config``; raises L{TLSConfigError}. Nothing changes yet."""
        now = self.wallclock()
        out: dict[str, tuple[FetchSettings, Staple | None]] = {}
        for lcfg in config.listeners:
            if lcfg.tls is None:
                continue
            for c in lcfg.tls.certificates:
                if not c.ocsp_fetch or c.cert in out:
                    continue
                try:
                    s = fetch_settings(c, now)
                except TLSFileError as e:
                    raise TLSConfigError(f"listener {lcfg.name}: certificate {c.cert}: {e}") from None
                out[c.cert] = (s, file_staple(c.ocsp, s.leaf, fetch=True)[0] if c.ocsp else None)
        return out

    def commit(self, prepared: dict[str, tuple[FetchSettings, Staple | None]]) -> None:
        """Keep fetchers whose settings are unchanged, stop removed ones,
        start new ones (when running); then give every listener what is current."""
        for key in list(self.fetchers):
            p = prepared.get(key)
            if p is None or p[0] != self.fetchers[key].settings:
                self.fetchers.pop(key).stop()
                self.current.pop(key, None)
        for key, (s, initial) in prepared.items():
            if key in self.fetchers:
                continue
            f = OCSPFetcher(s, self.clock, self.http, self._publish, wallclock=self.wallclock, random=self.rand)
            f.current = initial
            self.fetchers[key] = f
            if self.running:
                f.start(initial)
        self._resync()

    def startService(self) -> None:
        super().startService()
        for f in self.fetchers.values():
            f.start(f.current)

    def stopService(self) -> Any:
        super().stopService()
        for f in self.fetchers.values():
            f.stop()

    # -- publishing ---------------------------------------------------------------

    def _publish(self, key: str, der: bytes | None) -> None:
        self.current[key] = der
        self._offer(key, der)
        workers = getattr(self.runtime, "workers", None)
        if workers is not None:
            workers.push_ocsp(self.payload({key: der}))

    def _offer(self, key: str, der: bytes | None) -> None:
        tls = getattr(self.runtime, "tls", None)
        for name, server in (dict(tls.servers).items() if tls is not None else ()):
            try:
                server.offer_staple(key, der, self.fetchers[key].settings.url if key in self.fetchers else key)
            except TLSFileError as e:
                log.warn("tls {name}: fetched OCSP response not taken: {e}", name=name, e=e)

    def _resync(self) -> None:
        """Listeners built by a reload get what is current."""
        for key, der in self.current.items():
            self._offer(key, der)

    def payload(self, staples: dict[str, bytes | None] | None = None) -> bytes:
        """The worker message: certificate key -> DER hex (null: stop stapling)."""
        staples = self.current if staples is None else staples
        return json.dumps({k: (v.hex() if v is not None else None) for k, v in staples.items()}).encode()

    def refresh_now(self) -> list[str]:
        """Fetch every certificate's response now (``POST /api/ocsp/refresh``,
        e.g. after the CA revoked or re-signed); the certificates, sorted."""
        for f in self.fetchers.values():
            f.refresh_now()
        return sorted(self.fetchers)

    # -- state (docs/operations.md) ------------------------------------------------

    def _listener_state(self, name: str) -> dict[str, Any] | None:
        lcfg = next((l for l in self.runtime.config.listeners if l.name == name), None)
        if lcfg is None or lcfg.tls is None:
            return None
        by = {c.cert: self.fetchers[c.cert].status() for c in lcfg.tls.certificates if c.cert in self.fetchers}
        return {"by_certificate": by} if by else None


def apply_pushed(runtime: Any, data: bytes) -> None:
    """A worker: staple what the master fetched (checked by each listener)."""
    tls = getattr(runtime, "tls", None)
    if tls is None:
        return
    for key, hexder in json.loads(data).items():
        der = bytes.fromhex(hexder) if hexder is not None else None
        for name, server in dict(tls.servers).items():
            try:
                server.offer_staple(key, der, f"OCSP response for {key} from the master")
            except TLSFileError as e:
                log.warn("tls {name}: OCSP response from the master not taken: {e}", name=name, e=e)
