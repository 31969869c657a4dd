"""What ``lbtwist check`` accepts must start; what it refuses names the key
path and line. One parser for each fact the validator and the runtime both
read (hash keys, breaker defaults, idempotent methods), and configs built
into the real service tree on a MemoryReactorClock (nothing is bound)."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import attrs
import pytest

from lbtwist.config import ConfigError, load_config
from lbtwist.config.model import CircuitBreakerConfig, HealthConfig, PassiveHealthConfig
from lbtwist.l7.listener import build_router
from lbtwist.l7.plan import HashKey
from lbtwist.registry import Registry
from lbtwist.resilience.breaker import BreakerSettings
from support.startup import start_and_stop

REG = Registry.default()
PACKAGE = Path(__file__).resolve().parent.parent / "lbtwist"


def _load(text: str):
    return load_config(textwrap.dedent(text), REG, source_name="t.yaml")


HTTP = """\
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: app
{extra}pools:
  - name: app
    algorithm: ring_hash
    backends: [{{address: "127.0.0.1:9001"}}, {{address: "127.0.0.1:9002"}}]
"""


# -- hash keys: one parser ------------------------------------------------------


@pytest.mark.parametrize("text,kind,name", [
    ("Header:X-User", "header", b"x-user"),
    (" source", "source", b""),
    ("SOURCE ", "source", b""),
    ("header : X-User ", "header", b"x-user"),
    ("Cookie:SID", "cookie", b"SID"),
])
def test_every_hash_key_check_accepts_is_the_one_the_route_uses(text, kind, name):
    extra = f"    routes:\n      - pool: app\n        hash_key: {text!r}\n"
    loaded = _load(HTTP.format(extra=extra))
    svc = start_and_stop(loaded.config, REG)
    (listener,) = svc.listeners
    (route,) = listener.proxy.router.routes  # the running listener's router
    assert route.target.hash_key == HashKey(kind, name)


@pytest.mark.parametrize("mode,bind", [("tcp", "tcp:0:interface=127.0.0.1"), ("udp", "udp:0:interface=127.0.0.1")])
def test_l4_listener_with_a_source_hash_key_in_any_spelling_starts(mode, bind):
    loaded = _load(f"""\
        listeners:
          - {{name: l4, bind: "{bind}", mode: {mode}, pool: app, hash_key: " Source"}}
        pools:
          - {{name: app, backends: [{{address: "127.0.0.1:9001"}}]}}
        """)
    start_and_stop(loaded.config, REG)


def test_hash_key_runtime_parser_is_the_validators():
    from lbtwist.config.names import parse_hash_key

    for text in ("header:", "header:a b", "ip", "source:x", "cookie"):
        with pytest.raises(ValueError) as validator:
            parse_hash_key(text)
        with pytest.raises(ValueError) as runtime:
            HashKey.parse(text)
        assert str(runtime.value) == str(validator.value)


# -- hash_key on an http listener is inherited by its routes --------------------


def test_routes_inherit_the_http_listeners_hash_key():
    extra = (
        "    hash_key: header:X-Tenant\n"
        "    routes:\n"
        "      - {match: {path_prefix: /own}, pool: app, hash_key: 'cookie:sid'}\n"
        "      - {match: {path_prefix: /inherit}, pool: app}\n"
    )
    loaded = _load(HTTP.format(extra=extra))
    router = build_router(loaded.config.listeners[0], REG)
    own, inherited = (r.target.hash_key for r in router.routes)
    assert own == HashKey("cookie", b"sid")
    assert inherited == HashKey("header", b"x-tenant")
    assert router.default.target.hash_key == HashKey("header", b"x-tenant")
    start_and_stop(loaded.config, REG)


def test_lbtwist_check_sees_an_inherited_hash_key_as_sticky():
    from lbtwist.check import review

    extra = "    hash_key: header:X-Tenant\n"
    loaded = _load(HTTP.format(extra=extra).replace("    algorithm: ring_hash\n", "    algorithm: ring_hash\n    drain_timeout: 5s\n"))
    found = [f for f in review(loaded.config) if f.id == "sticky-drain"]
    assert [f.keys for f in found] == [("pools[0].drain_timeout", "listeners[0].hash_key")]


# -- one definition each: breaker defaults, idempotent methods -------------------


def test_breaker_defaults_are_the_config_models():
    model = CircuitBreakerConfig()
    assert BreakerSettings() == BreakerSettings.from_config(model)
    assert BreakerSettings().consecutive_failures == model.consecutive_failures == 10


def test_the_idempotent_method_set_is_written_once():
    from lbtwist.l7 import machine, parser
    from lbtwist.resilience import attempts, retry

    spelled = [
        str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
        if re.search(r"""b?["']TRACE["']""", p.read_text(encoding="utf-8"))
    ]
    assert spelled == ["resilience/retry.py"]
    assert parser.IDEMPOTENT_METHODS is retry.IDEMPOTENT_METHODS_BYTES
    assert machine.IDEMPOTENT is retry.IDEMPOTENT_METHODS_BYTES
    assert retry.IDEMPOTENT_METHODS_BYTES == {m.encode() for m in retry.IDEMPOTENT_METHODS}
    assert attempts._IDEMPOTENT == retry.IDEMPOTENT_METHODS | retry.IDEMPOTENT_METHODS_BYTES


# -- an empty section is an empty mapping ------------------------------------------


@pytest.mark.parametrize("key", ["health", "circuit_breaker", "limits", "connection_pool"])
def test_an_empty_section_means_its_defaults(key):
    loaded = _load(HTTP.format(extra="").replace("    algorithm: ring_hash\n", f"    algorithm: ring_hash\n    {key}:\n"))
    pool = loaded.config.pools[0]
    assert getattr(pool, key) == attrs.fields_dict(type(pool))[key].default.factory()
    start_and_stop(loaded.config, REG)


def test_an_empty_nested_section_means_its_defaults():
    loaded = _load(HTTP.format(extra="").replace(
        "    algorithm: ring_hash\n", "    algorithm: ring_hash\n    health:\n      passive:\n"))
    assert loaded.config.pools[0].health == HealthConfig(passive=PassiveHealthConfig())


def test_an_empty_item_still_names_its_missing_keys():
    with pytest.raises(ConfigError) as e:
        _load("pools:\n  - name: app\n    backends:\n      -\n")
    assert [(p.line, p.path, p.message) for p in e.value.errors] == [
        (4, "pools[0].backends[0].address", "missing required key 'address'")]


# -- exact numbers in messages --------------------------------------------------------


def test_weights_are_reported_exactly():
    text = HTTP.format(extra="").replace('{address: "127.0.0.1:9002"}', '{address: "127.0.0.1:9002", weight: 1000001}')
    with pytest.raises(ConfigError) as e:
        _load(text)
    assert [(p.line, p.path, p.message) for p in e.value.errors] == [
        (9, "pools[0].backends[1].weight", "must be between 0 and 1000000, got 1000001")]
    with pytest.raises(ConfigError) as e:
        _load(text.replace("1000001", "-1000001"))
    assert "must not be negative (got -1000001)" in str(e.value)


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_infinite_and_nan_numbers_are_refused(value):
    text = HTTP.format(extra="").replace("    algorithm: ring_hash\n", f"    algorithm: ring_hash\n    health: {{panic_threshold: 10, passive: {{latency: {{factor: {value}}}}}}}\n")
    with pytest.raises(ConfigError) as e:
        _load(text)
    problems = e.value.errors
    assert {(p.line, p.path) for p in problems} == {(9, "pools[0].health.passive.latency.factor")}
    assert f"must be a finite number (got {value.strip('.').replace('.', '')})" in [p.message for p in problems]



# -- configs check used to accept that could not start (found by the property) -----

L4 = """\
listeners:
  - name: l
    bind: "{bind}"
    mode: {mode}
    pool: app
{extra}pools:
  - name: app
    backends: [{{address: "127.0.0.1:9001"}}]
{pool_extra}"""


@pytest.mark.parametrize("mode,extra,pool_extra,line,path,fragment", [
    ("udp", "    proxy_protocol: {accept: true}\n", "", 6, "listeners[0].proxy_protocol.accept", "PROXY protocol needs mode: tcp"),
    ("udp", "    proxy_protocol: {send: v2}\n", "", 6, "listeners[0].proxy_protocol.send", "PROXY protocol needs mode: tcp"),
    ("http", "    proxy_protocol:\n      accept: true\n", "", 7, "listeners[0].proxy_protocol.accept", "PROXY protocol needs mode: tcp"),
    ("udp", "    idle_timeout: 0\n", "", 6, "listeners[0].idle_timeout", "must be above 0 for mode udp"),
    ("http", "    routes:\n      - pool: app\n        request_headers: {add: {x-a: \"a\\r\\nb\"}}\n", "", 8,
     "listeners[0].routes[0].request_headers.add.x-a", "invalid header value 'a\\r\\nb'"),
    ("http", "    routes:\n      - pool: app\n        response_headers:\n          set: {x-a: \"a\\0b\"}\n", "", 9,
     "listeners[0].routes[0].response_headers.set.x-a", "invalid header value 'a\\x00b'"),
    ("http", "", "    tls:\n      alpn: [h2, \"\"]\n", 10, "pools[0].tls.alpn[1]", "ALPN protocol names are 1 to 255 bytes of printable ASCII"),
    ("http", "", "    health:\n      active: {kind: http, host: \"bad host\\r\\n\"}\n", 10, "pools[0].health.active",
     "host must be a host name (and port), got 'bad host\\r\\n'"),
    ("http", "", "    health:\n      active: {kind: http, path: \"/a b\"}\n", 10, "pools[0].health.active",
     "path must hold no spaces or control characters, got '/a b'"),
])
def test_what_the_runtime_refuses_check_refuses_with_its_key_and_line(mode, extra, pool_extra, line, path, fragment):
    bind = "udp:0:interface=127.0.0.1" if mode == "udp" else "tcp:0:interface=127.0.0.1"
    with pytest.raises(ConfigError) as e:
        _load(L4.format(bind=bind, mode=mode, extra=extra, pool_extra=pool_extra))
    assert [(p.line, p.path) for p in e.value.errors] == [(line, path)], str(e.value)
    assert fragment in e.value.errors[0].message


def test_tcp_proxy_protocol_and_idle_timeout_zero_still_start():
    loaded = _load(L4.format(bind="tcp:0:interface=127.0.0.1", mode="tcp",
                             extra="    idle_timeout: 0\n    proxy_protocol: {accept: true, send: v1}\n", pool_extra=""))
    start_and_stop(loaded.config, REG)


def test_a_rate_below_one_without_a_burst_is_refused_where_the_bucket_is_sized():
    extra = "    routes:\n      - pool: app\n        rate_limit:\n          rate: 0.5\n"
    with pytest.raises(ConfigError) as e:
        _load(L4.format(bind="tcp:0:interface=127.0.0.1", mode="http", extra=extra, pool_extra=""))
    assert [(p.line, p.path) for p in e.value.errors] == [(9, "listeners[0].routes[0].rate_limit.rate")]
    assert "without a burst the bucket holds 0.5 tokens" in e.value.errors[0].message
    loaded = _load(L4.format(bind="tcp:0:interface=127.0.0.1", mode="http", extra=extra + "          burst: 1\n", pool_extra=""))
    start_and_stop(loaded.config, REG)


def test_a_probe_timeout_of_zero_is_refused():
    with pytest.raises(ConfigError) as e:
        _load(L4.format(bind="tcp:0:interface=127.0.0.1", mode="tcp", extra="",
                        pool_extra="    health:\n      active:\n        timeout: 0\n"))
    assert [(p.line, p.path, p.message) for p in e.value.errors] == [
        (11, "pools[0].health.active.timeout", "must be above 0")]
