"""OCSP fetching and refresh (lbtwist.tls.ocspfetch) on task.Clock, with a
fake responder behind treq.testing.StubTreq: the schedule, backoff, stale
handling, the swap in place, the file write, the worker push and the config
checks. Responses are real, signed by a throwaway CA with cryptography."""
from __future__ import annotations

import datetime
import json
import time
import types

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource

from lbtwist.config.model import CertificateConfig, ListenerTLSConfig
from lbtwist.tls.checks import check_listener_tls
from lbtwist.tls.context import ServerTLS
from lbtwist.tls.files import TLSFileError
from lbtwist.tls.ocsp import load_staple, ocsp_request, parse_staple
from lbtwist.tls.ocspfetch import OCSPFetcher, apply_pushed, fetch_settings
from lbtwist.tls.testing import TestCA

URL = "http://127.0.0.1:9/ocsp"
UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def ca():
    return TestCA()


def der_response(ca, leaf, status="good", next_in=7200.0, now=None):
    now = datetime.datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    st = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
          "unknown": ocsp.OCSPCertStatus.UNKNOWN}[status]
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf, issuer=ca.cert, algorithm=hashes.SHA1(), cert_status=st,
        this_update=now - datetime.timedelta(seconds=60),
        next_update=now + datetime.timedelta(seconds=next_in),
        revocation_time=now - datetime.timedelta(days=1) if status == "revoked" else None,
        revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class Responder(Resource):
    """Answers POSTs with ``self.body`` / ``self.code``; records requests."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.body = b""
        self.code = 200
        self.requests = []

    def render_POST(self, request):
        self.requests.append((request.getHeader(b"content-type"), request.content.read()))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/ocsp-response")
        return self.body


class Hung:
    """A responder that never answers."""

    def __init__(self):
        self.calls = []

    def post(self, url, **kw):
        d = defer.Deferred()
        self.calls.append(d)
        return d


class Env:
    def __init__(self, ca, tmp_path, *, refresh_min=300.0, refresh_max=43200.0, file=True, http=None, chain=True):
        self.ca = ca
        self.clock = task.Clock()
        self.t0 = time.time()
        self.wall = lambda: self.t0 + self.clock.seconds()
        issued = ca.issue("a.test", ocsp_url=URL)
        cert, key = issued.write(tmp_path, "a")
        if chain:
            with open(cert, "ab") as f:
                f.write(ca.cert_pem)
        self.leaf = issued.cert
        self.cfg = CertificateConfig(cert=cert, key=key, ocsp=str(tmp_path / "a.ocsp.der") if file else None,
                                     ocsp_fetch=True, ocsp_refresh_min=refresh_min, ocsp_refresh_max=refresh_max,
                                     ocsp_timeout=10.0)
        self.server = ServerTLS(ListenerTLSConfig(certificates=[self.cfg]), self.clock, name="edge",
                                wallclock=self.wall)
        self.responder = Responder()
        self.stub = StubTreq(self.responder) if http is None else None
        self.http = http if http is not None else self.stub
        self.published = []
        self.fetcher = OCSPFetcher(fetch_settings(self.cfg, self.wall()), self.clock, self.http, self.publish,
                                   wallclock=self.wall, random=lambda: 0.0)

    def publish(self, key, der):
        self.published.append(der)
        self.server.offer_staple(key, der, URL)

    def answer(self, status="good", next_in=7200.0):
        self.responder.code = 200
        self.responder.body = der_response(self.ca, self.leaf, status, next_in, now=self.wall())

    def run(self, seconds=0.0):
        self.clock.advance(seconds)
        if self.stub is not None:
            self.stub.flush()

    def next_fetch_in(self):
        left = self.fetcher.next_fetch()
        assert left is not None
        return left


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def ocsp_warnings(events):
    return [e for e in events if e.get("log_namespace") == "lbtwist.tls.ocsp" and e["log_level"].name == "warn"]


def test_good_fetch_is_stapled_in_place_written_and_refreshed_at_half_life(ca, tmp_path):
    env = Env(ca, tmp_path)
    ctx_before = env.server.choose(None)[0].cert_context
    env.answer(next_in=7200.0)
    env.fetcher.start(None)
    env.run()
    ctype, body = env.responder.requests[0]
    assert ctype == b"application/ocsp-request"
    assert body == ocsp_request(env.leaf, ca.cert)
    assert ocsp.load_der_ocsp_request(body).serial_number == env.leaf.serial_number
    staple = env.server.staple_of(env.cfg.cert)
    assert staple is not None and staple.status == "good" and staple.usable(env.wall())
    assert env.server.choose(None)[0].cert_context is ctx_before  # no context rebuilt
    assert load_staple(env.cfg.ocsp, env.leaf).der == staple.der  # a restart has it
    assert list(tmp_path.glob(".ocsp-*")) == []  # no temporary file left
    assert env.fetcher.fetch_ok == 1 and env.fetcher.state == "good"
    assert env.next_fetch_in() == pytest.approx(3600.0, abs=1)  # half of 2 h
    # the refresh replaces the response with the responder's newer one
    env.run(env.next_fetch_in())
    env.answer(next_in=7200.0)
    env.run(0)
    assert len(env.responder.requests) == 2 and env.fetcher.fetch_ok == 2


def test_refresh_delay_bounds_and_jitter(ca, tmp_path):
    env = Env(ca, tmp_path, refresh_min=300.0, refresh_max=43200.0)
    now = env.wall()
    short = parse_staple(der_response(ca, env.leaf, next_in=120.0, now=now), env.leaf, URL)
    long = parse_staple(der_response(ca, env.leaf, next_in=7 * 86400.0, now=now), env.leaf, URL)
    assert env.fetcher.refresh_delay(short, now) == pytest.approx(300.0)  # never below refresh_min
    assert env.fetcher.refresh_delay(long, now) == pytest.approx(43200.0)  # never above refresh_max
    env.fetcher.random = lambda: 1.0
    assert env.fetcher.refresh_delay(long, now) == pytest.approx(43200.0 * 0.9)  # jitter: earlier only


def test_failures_back_off_keep_the_last_good_then_stop_stapling_when_stale(ca, tmp_path, logged):
    env = Env(ca, tmp_path, refresh_min=300.0, refresh_max=1800.0)
    env.answer(next_in=1200.0)
    env.fetcher.start(None)
    env.run()
    good = env.server.staple_of(env.cfg.cert)
    assert env.fetcher.state == "good" and env.next_fetch_in() == pytest.approx(600.0, abs=1)
    env.responder.code, env.responder.body = 500, b"down"
    delays = []
    env.run(env.next_fetch_in())  # first failure at t=600
    for _ in range(3):
        delays.append(env.next_fetch_in())
        env.run(delays[-1])
    assert delays == [pytest.approx(60.0), pytest.approx(120.0), pytest.approx(240.0)]  # from min(300, 60) doubling
    # still stapling the last good one (t = 600 + 420 < nextUpdate 1200)
    assert env.server.staple_of(env.cfg.cert) is good and good.usable(env.wall())
    assert env.fetcher.fetch_failed == 4 and env.fetcher.last_error == "the responder answered HTTP 500"
    warns = ocsp_warnings(logged)
    assert len(warns) == 1 and "failed" in warns[0]["log_format"]  # once, not per attempt
    # past nextUpdate: stapling stops, warned once; retries go on, capped at refresh_max
    env.run(1200.0 - env.clock.seconds() + 1)
    assert env.published[-1] is None and env.server.staple_of(env.cfg.cert) is None
    assert env.fetcher.state == "stale"
    for _ in range(4):
        env.run(env.next_fetch_in())
    assert env.next_fetch_in() <= 1800.0
    warns = ocsp_warnings(logged)
    assert len(warns) == 2 and "stale" in warns[1]["log_format"]
    # the responder is back: good again, logged as a change
    env.answer(next_in=7200.0)
    env.run(env.next_fetch_in())
    assert env.fetcher.state == "good" and env.fetcher.failures == 0
    assert env.server.staple_of(env.cfg.cert).usable(env.wall())


def test_revoked_answer_replaces_the_good_staple_and_warns(ca, tmp_path, logged):
    env = Env(ca, tmp_path)
    env.answer()
    env.fetcher.start(None)
    env.run()
    assert env.server.staple_of(env.cfg.cert).status == "good"
    env.answer(status="revoked")
    env.fetcher.refresh_now()
    env.run()
    staple = env.server.staple_of(env.cfg.cert)
    assert staple.status == "revoked" and not staple.usable(env.wall())
    assert env.fetcher.state == "revoked"
    assert load_staple(env.cfg.ocsp, env.leaf).status == "revoked"
    warns = ocsp_warnings(logged)
    assert len(warns) == 1 and "revoked" in warns[0]["problem"]


@pytest.mark.parametrize("bad", ["garbage", "other-cert", "stale", "unsuccessful"])
def test_bad_answers_are_failures_and_keep_the_file_response(ca, tmp_path, bad):
    env = Env(ca, tmp_path)
    first = der_response(ca, env.leaf, now=env.wall())
    with open(env.cfg.ocsp, "wb") as f:
        f.write(first)
    initial = load_staple(env.cfg.ocsp, env.leaf)
    env.server.reload()
    if bad == "garbage":
        env.responder.body = b"<html>oops</html>"
    elif bad == "other-cert":
        env.responder.body = der_response(ca, ca.issue("b.test").cert, now=env.wall())
    elif bad == "stale":
        env.responder.body = der_response(ca, env.leaf, next_in=-10.0, now=env.wall())
    else:
        env.responder.body = ocsp.OCSPResponseBuilder.build_unsuccessful(
            ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(serialization.Encoding.DER)
    env.fetcher.start(initial)
    assert env.fetcher.state == "good" and env.responder.requests == []  # the file's is current: no fetch yet
    env.fetcher.refresh_now()
    env.run()
    assert env.fetcher.fetch_failed == 1 and env.fetcher.state == "failing"
    assert env.server.staple_of(env.cfg.cert).der == first
    with open(env.cfg.ocsp, "rb") as f:
        assert f.read() == first


def test_a_hung_responder_times_out(ca, tmp_path):
    hung = Hung()
    env = Env(ca, tmp_path, http=hung)
    env.fetcher.start(None)
    env.clock.advance(0)
    assert len(hung.calls) == 1
    env.clock.advance(9.9)
    assert env.fetcher.fetch_failed == 0
    env.clock.advance(0.2)
    assert hung.calls[0].called  # cancelled
    assert env.fetcher.fetch_failed == 1 and env.fetcher.last_error == "no answer within 10s"
    env.fetcher.stop()
    assert env.clock.getDelayedCalls() == []


def test_stop_cancels_a_fetch_in_flight(ca, tmp_path):
    hung = Hung()
    env = Env(ca, tmp_path, http=hung)
    env.fetcher.start(None)
    env.clock.advance(0)
    env.fetcher.stop()
    assert hung.calls[0].called and env.fetcher.fetch_failed == 0
    assert env.clock.getDelayedCalls() == []


def test_reload_keeps_a_fetched_response_without_a_file(ca, tmp_path):
    env = Env(ca, tmp_path, file=False)
    env.answer()
    env.fetcher.start(None)
    env.run()
    der = env.server.staple_of(env.cfg.cert).der
    env.server.reload()
    assert env.server.staple_of(env.cfg.cert).der == der


def test_worker_applies_pushed_responses_with_the_same_validator(ca, tmp_path, logged):
    env = Env(ca, tmp_path)
    runtime = types.SimpleNamespace(tls=types.SimpleNamespace(servers={"edge": env.server}))
    der = der_response(ca, env.leaf, now=env.wall())
    apply_pushed(runtime, json.dumps({env.cfg.cert: der.hex()}).encode())
    assert env.server.staple_of(env.cfg.cert).der == der
    other = der_response(ca, ca.issue("b.test").cert, now=env.wall())
    apply_pushed(runtime, json.dumps({env.cfg.cert: other.hex()}).encode())
    assert env.server.staple_of(env.cfg.cert).der == der  # refused, kept
    assert any("not taken" in e.get("log_format", "") for e in logged)
    apply_pushed(runtime, json.dumps({env.cfg.cert: None}).encode())
    assert env.server.staple_of(env.cfg.cert) is None


def test_config_errors_name_the_key(ca, tmp_path):
    issued = ca.issue("a.test")  # no AIA, and the cert file holds only the leaf
    cert, key = issued.write(tmp_path, "n")
    now = time.time()
    c = CertificateConfig(cert=cert, key=key, ocsp_fetch=True)
    with pytest.raises(TLSFileError, match=r"^ocsp_issuer: ocsp_fetch needs the issuer"):
        fetch_settings(c, now)
    found = {(p, sev) for p, sev, _ in check_listener_tls(ListenerTLSConfig(certificates=[c]), "http", now)}
    assert ("certificates[0].ocsp_issuer", "error") in found
    issuer = ca.write_ca(tmp_path / "issuer.pem")
    c2 = CertificateConfig(cert=cert, key=key, ocsp_fetch=True, ocsp_issuer=issuer)
    with pytest.raises(TLSFileError, match=r"^ocsp_responder: .*names no http OCSP responder"):
        fetch_settings(c2, now)
    found = [f for f in check_listener_tls(ListenerTLSConfig(certificates=[c2]), "http", now) if "ocsp" in f[0]]
    assert [(p, sev) for p, sev, _ in found] == [("certificates[0].ocsp_responder", "error")]
    c3 = CertificateConfig(cert=cert, key=key, ocsp_fetch=True, ocsp_issuer=issuer, ocsp_responder=URL,
                           ocsp=str(tmp_path / "not-yet.der"))
    assert fetch_settings(c3, now).url == URL
    assert [f for f in check_listener_tls(ListenerTLSConfig(certificates=[c3]), "http", now) if "ocsp" in f[0]] == []
    other = TestCA("another CA").write_ca(tmp_path / "other.pem")
    c4 = attrs_evolve(c3, ocsp_issuer=other)
    found = [f for f in check_listener_tls(ListenerTLSConfig(certificates=[c4]), "http", now) if "ocsp" in f[0]]
    assert [(p, sev) for p, sev, _ in found] == [("certificates[0].ocsp_issuer", "error")]
    c5 = CertificateConfig(cert=cert, key=key, ocsp_responder=URL)
    found = [f for f in check_listener_tls(ListenerTLSConfig(certificates=[c5]), "http", now) if "ocsp" in f[0]]
    assert [(p, sev) for p, sev, _ in found] == [("certificates[0].ocsp_responder", "warning")]


def attrs_evolve(inst, **kw):
    import attrs

    return attrs.evolve(inst, **kw)


class FakeWorkers:
    def __init__(self):
        self.pushed = []

    def push_ocsp(self, data):
        self.pushed.append(json.loads(data))


def test_service_publishes_to_every_listener_and_the_workers_and_survives_reloads(ca, tmp_path):
    from lbtwist.tls.ocspfetch import OCSPService

    env = Env(ca, tmp_path)
    other = ServerTLS(ListenerTLSConfig(certificates=[env.cfg]), env.clock, name="other", wallclock=env.wall)
    listeners = [types.SimpleNamespace(name=n, tls=ListenerTLSConfig(certificates=[env.cfg])) for n in ("edge", "other")]
    runtime = types.SimpleNamespace(
        reactor=env.clock, listener_state={}, workers=FakeWorkers(),
        tls=types.SimpleNamespace(servers={"edge": env.server, "other": other}),
        config=types.SimpleNamespace(listeners=listeners),
    )
    svc = OCSPService(runtime, http=env.stub, wallclock=env.wall, rand=lambda: 0.0)
    svc.commit(svc.prepare(runtime.config))
    svc.startService()
    env.answer()
    env.run()
    der = env.server.staple_of(env.cfg.cert).der
    assert other.staple_of(env.cfg.cert).der == der  # every listener serving the certificate
    assert runtime.workers.pushed == [{env.cfg.cert: der.hex()}]
    st = runtime.listener_state["ocsp"]("edge")["by_certificate"][env.cfg.cert]
    assert st["fetch_ok_total"] == 1 and st["state"] == "good" and 0 < st["next_update_seconds"] <= 7200
    assert runtime.listener_state["ocsp"]("nope") is None
    # a reload with the same settings keeps the fetcher (no new fetch); changed settings replace it
    kept = svc.fetchers[env.cfg.cert]
    svc.commit(svc.prepare(runtime.config))
    assert svc.fetchers[env.cfg.cert] is kept and len(env.responder.requests) == 1
    changed = attrs_evolve(env.cfg, ocsp_refresh_max=7200.0)
    runtime.config = types.SimpleNamespace(listeners=[types.SimpleNamespace(
        name="edge", tls=ListenerTLSConfig(certificates=[changed]))])
    svc.commit(svc.prepare(runtime.config))
    assert svc.fetchers[env.cfg.cert] is not kept and kept.next_fetch() is None
    env.run()
    assert len(env.responder.requests) == 1  # the new one starts from the file the old one wrote
    runtime.config = types.SimpleNamespace(listeners=[])
    svc.commit(svc.prepare(runtime.config))
    assert svc.fetchers == {}
    svc.stopService()
    assert [c for c in env.clock.getDelayedCalls() if c.active()] == []


def test_an_oversized_answer_is_refused_unread(ca, tmp_path):
    env = Env(ca, tmp_path)
    env.responder.body = b"x" * (64 * 1024 + 1)
    env.fetcher.start(None)
    env.run()
    assert env.fetcher.fetch_failed == 1 and "too large" in env.fetcher.last_error
    assert env.server.staple_of(env.cfg.cert) is None


def test_an_unwritable_ocsp_file_is_a_config_error(ca, tmp_path):
    env = Env(ca, tmp_path)
    c = attrs_evolve(env.cfg, ocsp=str(tmp_path / "no-such-dir" / "a.der"))  # root writes anywhere: no chmod
    found = [f for f in check_listener_tls(ListenerTLSConfig(certificates=[c]), "http", time.time()) if "ocsp" in f[0]]
    assert [(p, sev) for p, sev, _ in found] == [("certificates[0].ocsp", "error")]
    assert "directory is not writable" in found[0][2]


def test_timing_keys_are_checked_with_the_other_problems(ca, tmp_path):
    issued = ca.issue("a.test")
    cert, key = issued.write(tmp_path, "t")
    c = CertificateConfig(cert=cert, key=key, ocsp_fetch=True, ocsp_refresh_min=50000.0, ocsp_timeout=0.0)
    found = sorted((p, sev) for p, sev, _ in check_listener_tls(ListenerTLSConfig(certificates=[c]), "http", time.time())
                   if "ocsp" in p)
    assert found == [("certificates[0].ocsp_issuer", "error"), ("certificates[0].ocsp_refresh_min", "error"),
                     ("certificates[0].ocsp_timeout", "error")]
