"""The fleet wired into a runtime: routes with scope fleet get a fleet
limiter over their local one, local routes keep theirs, pools' detectors
share ejections while health runs, and the admin view and metrics read it."""
from twisted.internet.testing import MemoryReactorClock

from lbtwist.admin.metrics import fleet_metrics
from lbtwist.admin.state import fleet_summary
from lbtwist.config import load_config
from lbtwist.fleet.ratelimit import FleetRateLimiter
from lbtwist.registry import Registry
from lbtwist.resilience.ratelimit import RateLimiter
from lbtwist.service import LbtwistService

CONFIG = """
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: app
    routes:
      - name: shared
        match: {path_prefix: /a}
        pool: app
        rate_limit: {rate: 20, scope: fleet}
      - name: mine
        match: {path_prefix: /b}
        pool: app
        rate_limit: {rate: 20}
pools:
  - name: app
    backends: [{address: "127.0.0.1:9001"}, {address: "127.0.0.1:9002"}]
fleet: {redis: "tcp:127.0.0.1:1", name: edge}
"""


def _svc(text=CONFIG):
    reactor = MemoryReactorClock()
    reg = Registry.default(entry_points=False)
    return LbtwistService(load_config(text, reg).config, reactor, reg), reactor


def test_scope_fleet_routes_get_a_fleet_limiter_and_detectors_are_shared():
    svc, reactor = _svc()
    svc.startService()
    try:
        rt = svc.runtime
        routes = rt.resilience.routes["web"]
        assert isinstance(routes["shared"].rate_limiter, FleetRateLimiter)
        assert routes["shared"].rate_limiter.local.rate == 20  # one definition of rate and burst
        assert type(routes["mine"].rate_limiter) is RateLimiter
        assert set(rt.fleet.limiters) == {"web/shared"}
        assert set(rt.fleet.ejections.detectors) == {"app"}
        assert reactor.tcpClients and reactor.tcpClients[0][:2] == ("127.0.0.1", 1)  # connecting, never blocking
        summary = fleet_summary(rt)
        assert summary["mode"] == "local" and summary["redis_up"] is False and summary["name"] == "edge"
        names = {m.name for m in fleet_metrics(rt)}
        assert {"lbtwist_fleet_redis_up", "lbtwist_fleet_fallbacks", "lbtwist_fleet_rate_decisions",
                "lbtwist_fleet_ejection_messages"} <= names
    finally:
        svc.stopService()
    assert rt.fleet.ejections.detectors == {}  # health stopped: nothing shared any more


def test_without_a_fleet_block_nothing_changes():
    text = CONFIG.replace("rate_limit: {rate: 20, scope: fleet}", "rate_limit: {rate: 20}").replace(
        'fleet: {redis: "tcp:127.0.0.1:1", name: edge}\n', "")
    svc, reactor = _svc(text)
    svc.startService()
    try:
        assert svc.runtime.fleet is None and fleet_summary(svc.runtime) is None
        assert list(fleet_metrics(svc.runtime)) == []
        assert type(svc.runtime.resilience.routes["web"]["shared"].rate_limiter) is RateLimiter
    finally:
        svc.stopService()


def test_admin_api_fleet_endpoint_overview_field_and_metrics():
    from test_admin_api import Env

    from lbtwist.config.model import FleetConfig
    from lbtwist.fleet.service import FleetService

    env = Env()
    code, body, _ = env.get("/api/fleet")
    assert code == 200 and body == {"mode": "off", "redis_up": False}
    from twisted.internet.testing import MemoryReactorClock

    env.rt.fleet = FleetService.from_config(FleetConfig(redis="tcp:127.0.0.1:1", name="edge"), MemoryReactorClock())
    code, body, _ = env.get("/api/fleet")
    assert code == 200 and body["mode"] == "local" and body["redis"] == "redis://127.0.0.1:1"
    assert body["ejections"]["published_total"] == 0 and body["rate_limits"] == {}
    code, body, _ = env.get("/api/pools")
    assert body["fleet"]["mode"] == "local"
    code, text, _ = env.get("/metrics")
    assert b'lbtwist_fleet_redis_up{fleet="edge"} 0.0' in text
    code, body, _ = env.post("/api/fleet")
    assert code == 405


def test_reload_keeps_an_unchanged_fleet_route_and_forgets_a_removed_one():
    import gc

    svc, reactor = _svc()
    svc.startService()
    try:
        rt = svc.runtime
        before = rt.resilience.routes["web"]["shared"].rate_limiter
        reg = Registry.default(entry_points=False)
        svc.apply(load_config(CONFIG.replace("rate_limit: {rate: 20}", "rate_limit: {rate: 30}"), reg).config)
        assert rt.resilience.routes["web"]["shared"].rate_limiter is before  # its leases carry over
        removed = CONFIG.replace("""      - name: shared
        match: {path_prefix: /a}
        pool: app
        rate_limit: {rate: 20, scope: fleet}
""", "")
        svc.apply(load_config(removed, reg).config)
        del before
        gc.collect()
        assert "web/shared" not in rt.fleet.status()["rate_limits"]
    finally:
        svc.stopService()


def _role_svc(role, workers=1):
    from lbtwist.workers.fleetview import worker_config

    reactor = MemoryReactorClock()
    reg = Registry.default(entry_points=False)
    cfg = load_config(CONFIG, reg).config
    if role == "worker":
        cfg = worker_config(cfg, workers)
    return LbtwistService(cfg, reactor, reg, role=role, workers=workers), reactor


def test_a_worker_limits_through_the_whole_fleet_bucket_and_falls_back_to_its_share():
    svc, _ = _role_svc("worker", workers=2)
    fleet = svc.runtime.fleet
    assert fleet.ejections is None  # the master's detector shares ejections
    lim = fleet.limiters["web/shared"]
    assert lim.shared.rate == 20 and lim.local.rate == 10 and lim.local.burst == 10
    names = {m.name for m in fleet_metrics(svc.runtime)}
    assert names == {"lbtwist_fleet_rate_decisions", "lbtwist_fleet_rate_redis_calls"}


def test_the_master_shares_ejections_and_reports_the_link_not_rate_decisions():
    svc, _ = _role_svc("master")
    fleet = svc.runtime.fleet
    assert fleet.ejections is not None
    st = fleet.status()
    assert st["rate_limits"] == {} and st["rate_limits_decided_by"].startswith("workers")
    names = {m.name for m in fleet_metrics(svc.runtime)}
    assert "lbtwist_fleet_redis_up" in names and "lbtwist_fleet_rate_decisions" not in names


def test_worker_config_keeps_a_fleet_scope_limit_whole_and_splits_a_local_one():
    from lbtwist.workers.fleetview import worker_config

    reg = Registry.default(entry_points=False)
    routes = worker_config(load_config(CONFIG, reg).config, 2).listeners[0].routes
    assert routes[0].rate_limit.rate == 20 and routes[1].rate_limit.rate == 10
