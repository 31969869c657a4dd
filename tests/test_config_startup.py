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
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from lbtwist.config import ConfigError, load_config
from lbtwist.config.model import CircuitBreakerConfig, HealthConfig, PassiveHealthConfig
from lbtwist.l7.listener import build_router
from lbtwist.l7.plan import HashKey
from lbtwist.registry import Registry
from lbtwist.resilience.breaker import BreakerSettings
from lbtwist.service import LbtwistService

REG = Registry.default()
PACKAGE = Path(__file__).resolve().parent.parent / "lbtwist"


@attrs.define
class _UDPPort:
    address: IPv4Address

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        return None


class MemoryReactor(MemoryReactorClock):
    """MemoryReactorClock, plus listenUDP recorded the way listenTCP is."""

    def __init__(self) -> None:
        super().__init__()
        self.udpServers: list[tuple] = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        return _UDPPort(IPv4Address("UDP", interface or "0.0.0.0", port))


def start_and_stop(config, registry: Registry = REG) -> LbtwistService:
    """Build the whole service tree for ``config`` as twistd does, start it
    on a memory reactor (listeners 'listen' without binding) and stop it."""
    reactor = MemoryReactor()
    svc = LbtwistService(config, reactor, registry)
    svc.privilegedStartService()
    svc.startService()
    done = svc.stopService()
    for _ in range(100):  # drains end on timers: move the clock until stopped
        if done.called:
            break
        reactor.advance(1.0)
    assert done.called
    failures = []
    done.addErrback(failures.append)
    assert not failures, failures[0].getTraceback()
    return svc


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
    svc = start_and_stop(loaded.config)
    (route,) = build_router(loaded.config.listeners[0], REG).routes or [build_router(loaded.config.listeners[0], REG).default]
    assert route.target.hash_key == HashKey(kind, name)
    assert svc.runtime.config is loaded.config


@pytest.mark.parametrize("mode,bind", [("tcp", "tcp:0:interface=127.0.0.1"), ("udp", "udp:0:interface=127.0.0.1")])
def test_l4_listener_with_a_source_hash_key_in_any_spelling_starts(mode, bind):
    loaded = _load(f"""\
        listeners:
          - {{name: l4, bind: "{bind}", mode: {mode}, pool: app, hash_key: " Source"}}
        pools:
          - {{name: app, backends: [{{address: "127.0.0.1:9001"}}]}}
        """)
    start_and_stop(loaded.config)


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
    start_and_stop(loaded.config)


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
    from lbtwist.l7 import exchange, parser
    from lbtwist.resilience import attempts, retry

    spelled = [
        str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
        if re.search(r"""b?["']TRACE["']""", p.read_text(encoding="utf-8"))
    ]
    assert spelled == ["resilience/retry.py"]
    assert parser.IDEMPOTENT_METHODS is retry.IDEMPOTENT_METHODS_BYTES
    assert exchange._IDEMPOTENT is retry.IDEMPOTENT_METHODS_BYTES
    assert retry.IDEMPOTENT_METHODS_BYTES == {m.encode() for m in retry.IDEMPOTENT_METHODS}
    assert attempts._IDEMPOTENT == retry.IDEMPOTENT_METHODS | retry.IDEMPOTENT_METHODS_BYTES


# -- an empty section is an empty mapping ------------------------------------------


@pytest.mark.parametrize("key", ["health", "circuit_breaker", "limits", "connection_pool"])
def test_an_empty_section_means_its_defaults(key):
    loaded = _load(HTTP.format(extra="").replace("    algorithm: ring_hash\n", f"    algorithm: ring_hash\n    {key}:\n"))
    pool = loaded.config.pools[0]
    assert getattr(pool, key) == attrs.fields_dict(type(pool))[key].default.factory()
    start_and_stop(loaded.config)


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

