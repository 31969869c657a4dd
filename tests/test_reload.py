"""Hot reload: a bad file keeps the running config; a good one is applied as a
diff without dropping in-flight requests or established TCP relays."""
from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.request

from twisted.internet.testing import MemoryReactorClock

from lbtwist.config import load_config
from lbtwist.pool import Health
from lbtwist.registry import Registry
from lbtwist.service import LbtwistService
from support.procs import Proc, free_port, twistd_cmd


def _cfg(web: int, echo: int, extra_listener: str = "", backends: str = "", algorithm: str = "round_robin") -> str:
    lines = [
        "listeners:",
        "  - name: web",
        f'    bind: "tcp:{web}:interface=127.0.0.1"',
        "    mode: http",
        "    pool: web",
        "  - name: echo",
        f'    bind: "tcp:{echo}:interface=127.0.0.1"',
        "    mode: tcp",
        "    pool: echo",
        extra_listener,
        "pools:",
        "  - name: web",
        f"    algorithm: {algorithm}",
        "    backends:",
        backends,
        "  - name: echo",
        '    backends: [{address: "127.0.0.1:9"}]',
        "",
    ]
    return "\n".join(l for l in lines if l)


def _listener(name: str, port: int) -> str:
    return f'  - name: {name}\n    bind: "tcp:{port}:interface=127.0.0.1"\n    mode: http\n    pool: web'


def _backends(*pairs: tuple[str, int]) -> str:
    return "\n".join(f'      - {{address: "{a}", weight: {w}}}' for a, w in pairs)


def test_apply_diffs_pools_and_listeners_in_place():
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1), ("127.0.0.1:9002", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    pool = svc.runtime.pools["web"]
    b1 = pool.get("127.0.0.1:9001")
    b2 = pool.get("127.0.0.1:9002")
    old_balancer = pool.balancer
    extra = _listener("web2", 8003)
    b = load_config(
        _cfg(8001, 8002, extra_listener=extra, algorithm="least_connections",
             backends=_backends(("127.0.0.1:9002", 3), ("127.0.0.1:9003", 1))),
        reg,
    )
    b1.active = 1  # in flight: removal must drain, not cut
    d = svc.apply(b.config)
    assert d.called
    assert pool is svc.runtime.pools["web"]  # changed in place: state survives
    assert pool.get("127.0.0.1:9002") is b2 and b2.weight == 3
    b3 = pool.get("127.0.0.1:9003")
    assert b3 is not None and b3.health is Health.HEALTHY  # no active check: assumed healthy
    assert b1.draining and pool.get("127.0.0.1:9001") is b1  # draining until its work ends
    assert pool.balancer is not old_balancer
    assert {s.name for s in svc.listeners} == {"web", "echo", "web2"}
    assert svc.runtime.config is b.config
    ports = [p for p, *_ in reactor.tcpServers]
    assert ports.count(8003) == 1
    b1.active = 0
    pool.on_start(b1)
    pool.on_finish(b1, 0.01, True)  # last unit of work ends: drained, then removed
    assert pool.get("127.0.0.1:9001") is None
    svc.stopService()


def test_rebound_listener_releases_its_port_before_the_new_one_binds():
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    old_echo = next(s for s in svc.listeners if s.name == "echo")
    b = load_config(_cfg(8001, 8004, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc.apply(b.config)
    new_echo = next(s for s in svc.listeners if s.name == "echo")
    assert new_echo is not old_echo and old_echo.port is None
    assert new_echo.address.port == 8004
    svc.stopService()


def _get(port: int, path: str) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
        return r.status, json.loads(r.read())


def test_sighup_reload_keeps_inflight_request_and_tcp_stream(tmp_path):
    web, echo, web2, h1, h2, e1 = (free_port() for _ in range(6))
    demo = (
        "demo:\n"
        f'  http: ["tcp:{h1}:interface=127.0.0.1", "tcp:{h2}:interface=127.0.0.1"]\n'
        f'  tcp_echo: ["tcp:{e1}:interface=127.0.0.1"]\n'
    )

    def config(extra: str, web_backends: str) -> str:
        text = _cfg(web, echo, extra_listener=extra, backends=web_backends)
        return text.replace('"127.0.0.1:9"', f'"127.0.0.1:{e1}"') + "\n" + demo

    path = tmp_path / "lb.yaml"
    path.write_text(config("", _backends((f"127.0.0.1:{h1}", 1))))
    proc = Proc(twistd_cmd(path), cwd=tmp_path)
    try:
        proc.wait_for("listener echo on", timeout=30)
        proc.wait_for("listener web on", timeout=30)
        # a TCP relay and a slow HTTP request, both in flight across the reload
        stream = socket.create_connection(("127.0.0.1", echo), timeout=10)
        stream.sendall(b"before\n")
        assert stream.recv(100) == b"before\n"
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=_get(web, "/slow?delay=2")))
        t.start()
        proc.wait_for("delaying response", timeout=15)

        # a broken file is refused and the old config keeps serving
        path.write_text("listeners: [\n")
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for("reload failed, keeping the running config", timeout=15)

        extra = _listener("web2", web2)
        path.write_text(config(extra, _backends((f"127.0.0.1:{h2}", 1))))
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for("configuration applied", timeout=15)

        t.join(20)
        status, body = result["r"]
        assert status == 200 and str(h1) in body["backend"]  # finished on the removed backend
        stream.sendall(b"after\n")
        assert stream.recv(100) == b"after\n"
        stream.close()
        # new requests go to the new backend, through old and new listeners
        assert str(h2) in _get(web, "/")[1]["backend"]
        assert str(h2) in _get(web2, "/")[1]["backend"]
        assert proc.terminate(timeout=30) == 0, proc.output()
    finally:
        proc.kill()


def test_sigterm_drains_inflight_request_then_exits_zero(tmp_path):
    web, echo, h1, e1 = (free_port() for _ in range(4))
    text = _cfg(web, echo, backends=_backends((f"127.0.0.1:{h1}", 1))).replace(
        '"127.0.0.1:9"', f'"127.0.0.1:{e1}"')
    text += f'\ndemo: {{http: ["tcp:{h1}:interface=127.0.0.1"], tcp_echo: ["tcp:{e1}:interface=127.0.0.1"]}}\n'
    path = tmp_path / "lb.yaml"
    path.write_text(text)
    proc = Proc(twistd_cmd(path), cwd=tmp_path)
    try:
        proc.wait_for("listener web on", timeout=30)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(r=_get(web, "/slow?delay=1.5")))
        t.start()
        proc.wait_for("delaying response", timeout=15)
        proc.p.send_signal(signal.SIGTERM)
        proc.wait_for("SIGTERM received", timeout=10)
        # no new connections once it stops accepting
        proc.wait_for("stopping; draining listeners", timeout=10)
        t.join(20)
        assert result["r"][0] == 200  # the in-flight request finished
        assert proc.finish(timeout=30) == 0, proc.output()
    finally:
        proc.kill()


def test_reload_keeps_the_latency_rule_off_for_l4_pools():
    """A tcp listener's pool never gets the latency outlier rule, whether the
    reload changed the pool's health section or only started using the pool
    from a tcp listener."""
    reactor = MemoryReactorClock()
    reg = Registry.default()
    a = load_config(_cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc = LbtwistService(a.config, reactor, reg)
    svc.startService()
    latency_on = lambda name: svc.health.pools[name].cfg.passive.latency.enabled
    assert not latency_on("echo") and latency_on("web")
    text = _cfg(8001, 8002, backends=_backends(("127.0.0.1:9001", 1)))
    text = text.replace('    backends: [{address: "127.0.0.1:9"}]',
                        '    backends: [{address: "127.0.0.1:9"}]\n    health: {passive: {consecutive_5xx: 3}}')
    b = load_config(text, reg)
    assert b.config.pools[1].health.passive.consecutive_5xx == 3
    svc.apply(b.config)
    assert svc.health.pools["echo"].cfg.passive.consecutive_5xx == 3
    assert not latency_on("echo")
    # the web pool, unchanged, becomes the pool of a tcp listener too
    extra = '  - name: raw\n    bind: "tcp:8005:interface=127.0.0.1"\n    mode: tcp\n    pool: web'
    c = load_config(_cfg(8001, 8002, extra_listener=extra, backends=_backends(("127.0.0.1:9001", 1))), reg)
    svc.apply(c.config)
    assert not latency_on("web")
    svc.stopService()


def _limited(rate_burst: str = "{rate: 1, burst: 2}", retry_budget: str = "5") -> str:
    return f"""
listeners:
  - name: web
    bind: "tcp:8001:interface=127.0.0.1"
    mode: http
    pool: web
    routes:
      - match: {{path_prefix: /api}}
        pool: web
        rate_limit: {rate_burst}
        retry: {{budget_percent: {retry_budget}}}
pools:
  - name: web
    backends: [{{address: "127.0.0.1:9001"}}]
"""


def _route(svc, name="0"):
    router = svc.listeners.getServiceNamed("web").proxy.router
    routes = (*router.routes, router.default)
    return next(r.target.resilience for r in routes if r.name == name)


def test_reload_keeps_rate_limit_buckets_and_retry_budgets_of_unchanged_routes():
    """A reload of an unchanged file (or one that changes other things) must
    not lift limits: the route's buckets and budget history carry over. A
    route whose settings changed starts afresh."""
    reactor = MemoryReactorClock()
    reactor.advance(100)
    reg = Registry.default()
    svc = LbtwistService(load_config(_limited(), reg).config, reactor, reg)
    svc.startService()
    rr = _route(svc)
    now = reactor.seconds()
    assert rr.rate_limiter.check("10.0.0.1", now).allowed and rr.rate_limiter.check("10.0.0.1", now).allowed
    assert not rr.rate_limiter.check("10.0.0.1", now).allowed  # burst spent
    for _ in range(40):
        rr.budget.record_request(now)
    default_budget = _route(svc, "default").budget
    # the same file again (new, equal config objects), with another backend added
    text = _limited().replace('[{address: "127.0.0.1:9001"}]', '[{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]')
    svc.apply(load_config(text, reg).config)
    kept = _route(svc)
    assert kept is rr
    assert not kept.rate_limiter.check("10.0.0.1", now).allowed  # still limited
    assert kept.budget.requests_total == 40
    assert _route(svc, "default").budget is default_budget
    # the admin API's retry counters follow the running routes
    assert svc.runtime.resilience.routes["web"]["0"] is kept
    # the route's rate limit changed: new buckets
    svc.apply(load_config(_limited("{rate: 5, burst: 5}"), reg).config)
    fresh = _route(svc)
    assert fresh is not rr and fresh.rate_limiter.check("10.0.0.1", now).allowed
    assert svc.runtime.resilience.routes["web"]["0"] is fresh
    svc.stopService()
