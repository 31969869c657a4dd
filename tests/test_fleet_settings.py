"""The fleet block: one parser for the validator and the runtime; errors name the key."""
import textwrap

import pytest

from lbtwist.config.loader import load
from lbtwist.config.model import FleetConfig, FleetTLSConfig
from lbtwist.config.validate import fleet_settings, validate
from lbtwist.fleet.settings import FleetSettings, RedisTarget, parse_redis, problems


@pytest.mark.parametrize("text, want", [
    ("tcp:127.0.0.1:6379", RedisTarget(host="127.0.0.1", port=6379)),
    ("tcp:[::1]:7000", RedisTarget(host="::1", port=7000)),
    ("unix:/run/redis.sock", RedisTarget(path="/run/redis.sock")),
    ("redis://127.0.0.1", RedisTarget(host="127.0.0.1", port=6379)),
    ("redis://u:p%40ss@10.0.0.1:6380/2", RedisTarget(host="10.0.0.1", port=6380, username="u", password="p@ss", db=2)),
    ("rediss://:secret@redis.example:6390", RedisTarget(host="redis.example", port=6390, tls=True, password="secret")),
])
def test_parse_redis_forms(text, want):
    assert parse_redis(text) == want


@pytest.mark.parametrize("text, says", [
    ("tcp:127.0.0.1", "expected tcp:HOST:PORT"),
    ("tcp:127.0.0.1:99999", "port '99999'"),
    ("redis://h:0x/", "port"),
    ("redis://h/abc", "database number"),
    ("redis://h/?ssl=1", "query strings"),
    ("http://h:80", "is not tcp:HOST:PORT"),
    ("unix:", "socket path"),
])
def test_parse_redis_refuses_with_reason(text, says):
    with pytest.raises(ValueError, match=None) as e:
        parse_redis(text)
    assert says in str(e.value)


def test_describe_never_shows_the_password():
    assert parse_redis("redis://u:hunter2@h:1/0").describe() == "redis://h:1"


def cfg(**kw):
    kw.setdefault("redis", "tcp:127.0.0.1:6379")
    kw.setdefault("name", "edge")
    return FleetConfig(**kw)


def test_problems_name_each_key(tmp_path):
    bad = cfg(name="has space", password="a", password_file=str(tmp_path / "missing"), timeout=0.0,
              lease_max=0, db=-1, tls=FleetTLSConfig(cert=str(tmp_path / "c.pem")))
    keys = {k for k, _ in problems(bad)}
    assert keys == {"name", "password_file", "timeout", "lease_max", "db", "tls.key", "tls.cert"}


def test_url_password_and_password_key_conflict():
    assert [k for k, _ in problems(cfg(redis="redis://:x@h:1", password="y"))] == ["redis"]
    assert [k for k, _ in problems(cfg(redis="redis://h:1/3", db=4))] == ["db"]


def test_settings_resolve_secrets_and_url_parts(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = FleetSettings.from_config(cfg(redis="rediss://h:6390/5", password_file=str(pw), username="lb"))
    assert (s.password, s.username, s.db, s.tls, s.server_name, s.prefix) == ("s3cret", "lb", 5, True, "h", "lbtwist:edge:")
    assert s.timeout == 0.05  # the documented default: a request waits at most 50 ms on Redis
    with pytest.raises(ValueError, match="fleet.name"):
        FleetSettings.from_config(cfg(name="a b"))


def _validate(text):
    res = load(textwrap.dedent(text), "t.yaml")
    assert [str(p) for p in res.problems] == []
    return [(p.path, p.message) for p in validate(res.config, res.positions, None, source="t.yaml",
                                                  checks=(fleet_settings,))]


ROUTE = """
listeners:
  - name: web
    bind: tcp:0:interface=127.0.0.1
    mode: http
    pool: app
    routes:
      - pool: app
        rate_limit: {rate: 20, scope: fleet}
pools:
  - name: app
    backends: [{address: "127.0.0.1:9001"}]
"""


def test_validator_uses_the_same_parser_and_names_the_key():
    got = _validate(ROUTE + 'fleet: {redis: "tcp:localhost", name: edge, timeout: 0ms}\n')
    assert [p for p, _ in got] == ["fleet.redis", "fleet.timeout"]
    assert "expected tcp:HOST:PORT" in got[0][1]


def test_fleet_scope_needs_a_fleet_block():
    got = _validate(ROUTE)
    assert got == [("listeners[0].routes[0].rate_limit.scope",
                    "fleet needs a top-level fleet block (fleet: {redis: ..., name: ...}); or use scope: local")]
    assert _validate(ROUTE + 'fleet: {redis: "tcp:127.0.0.1:6379", name: edge, timeout: 50ms}\n') == []


def test_scope_must_be_local_or_fleet():
    res = load(textwrap.dedent(ROUTE.replace("scope: fleet", "scope: global")), "t.yaml")
    assert any("scope" in str(p) for p in res.problems)


def test_api_config_hides_a_password_inside_the_redis_url():
    from lbtwist.admin.state import config_json
    from lbtwist.config.model import Config

    shown = config_json(Config(fleet=cfg(redis="redis://lb:hunter2@10.0.0.5:6379/1", password=None)))
    assert shown["fleet"]["redis"] == "redis://lb:***@10.0.0.5:6379/1"
    shown = config_json(Config(fleet=cfg(password="pw")))
    assert shown["fleet"]["password"] == "***" and shown["fleet"]["redis"] == "tcp:127.0.0.1:6379"
