"""The lead's rule as a property: whatever ``lbtwist check`` accepts starts,
whatever it refuses names a key path and a line.

Configs are generated from the model itself (lbtwist.config.model: every
class, key and type, walked through the type hints as the loader walks
them), with values drawn from what each key means (pool names that exist or
not, binds, hash keys, header names, durations with and without units...)
and, now and then, a value of the wrong type or out of range. Each one is
checked exactly as ``lbtwist check`` and ``twistd lbtwist`` check it (the
default plugin registry); an accepted one is built into the real service
tree and started and stopped on a memory reactor (nothing is bound), and
reviewed by ``lbtwist check``; a refused one must name, for every error, a
key path and a line of the file.

Deterministic for CI: derandomized, no example database, a bounded number of
examples. Certificate files (good, expired, mismatched, missing) are
written once, to a temporary directory.
"""
from __future__ import annotations

import atexit
import datetime
import os
import shutil
import tempfile
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import attrs
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbtwist.check import review
from lbtwist.config import ConfigError, load_config
from lbtwist.config import model as m
from lbtwist.registry import Registry
from lbtwist.tls.testing import TestCA

from support.startup import start_and_stop

REG = Registry.default()
POOLS = ["app", "api", "cache"]
_DIR = tempfile.mkdtemp(prefix="lbtwist-prop-")
atexit.register(shutil.rmtree, _DIR, True)
_LOG = os.path.join(_DIR, "access.jsonl")


def _certificates() -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """Certificate files for listener TLS, written once: (good pairs, bad pairs)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = TestCA()
    a = ca.issue("a.test", "*.a.test").write(_DIR, "a")
    b = ca.issue("b.test").write(_DIR, "b")
    combined = os.path.join(_DIR, "combined.pem")
    with open(combined, "wb") as f, open(b[0], "rb") as c, open(b[1], "rb") as k:
        f.write(c.read() + k.read())
    expired = ca.issue("old.test", not_before=now - datetime.timedelta(days=9),
                       not_after=now - datetime.timedelta(days=2)).write(_DIR, "expired")
    return [a, b, (combined, None)], [expired, (a[0], b[1]), ("/nonexistent/cert.pem", None)]


_GOOD_CERTS, _BAD_CERTS = _certificates()


def one(*values: Any) -> st.SearchStrategy:
    return st.sampled_from(values)


def sometimes(good: st.SearchStrategy, bad: st.SearchStrategy, noise: int) -> st.SearchStrategy:
    """``bad`` about once in ``noise`` draws, else ``good`` (0: always good).
    The test is on a middle value: hypothesis favours the ends of a range."""
    if noise <= 0:
        return good
    return st.integers(0, noise - 1).flatmap(lambda i: bad if i == noise // 2 else good)


# -- what each key means ------------------------------------------------------------

def meanings(noise: int) -> tuple[dict[Any, st.SearchStrategy], dict[tuple[type, str], st.SearchStrategy]]:
    """Strategies for the leaf types, and (class, key) -> strategy for keys
    whose meaning a type does not say. A bad value about once in ``noise``
    draws (0: never)."""
    noisy = noise > 0

    def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
        return sometimes(good, bad, noise)

    # Every tree draws edge values of the right type (0, which is "off" for
    # some keys and an error for others; control characters in strings...):
    # those are where a validator forgets a check the runtime makes.
    _DURATION = mostly(sometimes(one("50ms", "250ms", "1s", "2s", "5s", "10s", "30s", "2m", "1h"), one(0, "0"), 8),
                       one(30, "-1s", "5x", True, "1.5"))
    _SIZE = mostly(one(0, 1, 512, "64k", "1m", "1g"), one(-1, "1x", 1.5))
    _INT = mostly(sometimes(st.integers(1, 12), st.just(0), 8), one(-1, 1.5, "3", 10**12, True))
    _FLOAT = mostly(one(0, 0.5, 1, 2.5, 5, 10, 50, 100), one(-1, 150, float("inf"), float("nan"), "x"))
    _BIND = mostly(one("tcp:0:interface=127.0.0.1", "udp:0:interface=127.0.0.1", "tcp:0"),
                   one("tcp:18080:interface=127.0.0.1", "udp:18080", "tcp:70000", "tcp:x", "bogus:1", 8080))
    _POOL_REF = mostly(one(*POOLS), one("nope", 7))
    _HEADER = mostly(one("x-user", "X-Tenant", "idempotency-key"), one("bad name", "a:b", ""))
    _HASH_KEY = mostly(one("source", " Source", "SOURCE", "header:X-User", "Header: x-tenant", "cookie:sid", "Cookie:SID"),
                       one("ip", "header:", "cookie", "source:x", "header:a b"))
    _ADDRESS = mostly(one("127.0.0.1:9001", "127.0.0.1:9002", "localhost:9003", "[::1]:9004"),
                      one("127.0.0.1:0", "127.0.0.1", "host:99999", "nohost", ":80"))

    _MATCH_VALUES = {
        "host": mostly(one("example.com", "*.example.com", ["a.example", "b.example"]), one(5, "")),
        "path_prefix": mostly(one("/", "/api", ["/a", "/b"]), one("api", 3)),
        "path_regex": mostly(one("^/v[0-9]+/", "\\.png$"), one("(", 1)),
        "method": mostly(one("GET", ["GET", "POST"], "put"), one("BAD METHOD", 3)),
        "headers": mostly(one({"x-a": "1"}, {"X-Env": ["prod", "stage"]}), one({"bad name": "1"}, "x")),
        "query_param": mostly(one({"v": "2"}, "debug"), one(3,)),
        "sni": mostly(one("example.com", "*.example.com"), one(7,)),
        "tls_version": mostly(one("1.2", "1.3", ["1.2", "1.3"], 1.3), one("1.1", "x")),
        "bogus_rule": st.just(1),
    }


    @st.composite
    def _match(draw: Any) -> dict:
        names = draw(st.lists(mostly(st.sampled_from([k for k in _MATCH_VALUES if k != "bogus_rule"]),
                                     st.just("bogus_rule")), max_size=2, unique=True))
        return {n: draw(_MATCH_VALUES[n]) for n in names}


    _ALGORITHM_OPTIONS = mostly(
        one({}, {}, {}, {"replicas": 50}, {"table_size": 251}, {"choices": 2}, {"decay": "10s"}),
        one({"bogus": 1}, {"replicas": -3}, "x"),
    )

    leaves = {
        m.Duration: _DURATION, m.Size: _SIZE, int: _INT, float: _FLOAT,
        bool: mostly(st.booleans(), one("yes please", 1)), str: mostly(one("a", "b"), one(3)),
    }
    return leaves, {
        (m.ListenerConfig, "name"): mostly(one("web", "edge", "dns"), one("web", "")),
        (m.ListenerConfig, "bind"): _BIND,
        (m.ListenerConfig, "pool"): st.one_of(st.none(), _POOL_REF, _POOL_REF, _POOL_REF),
        (m.ListenerConfig, "hash_key"): _HASH_KEY,
        (m.ListenerTLSConfig, "certificates"): st.lists(
            st.builds(
                lambda pair, names, default: {"cert": pair[0], **({"key": pair[1]} if pair[1] else {}),
                                              **({"names": names} if names else {}),
                                              **({"default": default} if default is not None else {})},
                mostly(st.sampled_from(_GOOD_CERTS), st.sampled_from(_BAD_CERTS)),
                st.lists(mostly(one("a.test", "*.a.test", "b.test"), one("c.test", "bad name")), max_size=2),
                st.one_of(st.none(), st.booleans()),
            ),
            min_size=1, max_size=2,
        ),
        (m.ListenerTLSConfig, "min_version"): mostly(one("1.2", "1.3"), one("1.1", 1.2)),
        (m.ListenerTLSConfig, "ciphers"): mostly(one(m.TLS12_CIPHERS, "ECDHE-RSA-AES128-GCM-SHA256"), one("NOPE",)),
        (m.ListenerTLSConfig, "ciphersuites"): mostly(one(m.TLS13_CIPHERSUITES, "TLS_AES_128_GCM_SHA256"), one("NOPE",)),
        (m.ListenerTLSConfig, "alpn"): st.one_of(st.none(), st.lists(sometimes(one("http/1.1", "h2"), one("", "x" * 300), 6), max_size=2)),
        (m.PoolTLSConfig, "min_version"): mostly(one("1.2", "1.3"), one("1.1", 1.2)),
        (m.RouteConfig, "pool"): _POOL_REF,
        (m.RouteConfig, "match"): _match(),
        (m.RouteConfig, "hash_key"): st.one_of(st.none(), _HASH_KEY),
        (m.PoolConfig, "name"): mostly(one(*POOLS), one("", 3)),
        (m.PoolConfig, "algorithm"): mostly(one(*sorted(REG.balancers)), one("bogus", "round-robin")),
        (m.PoolConfig, "algorithm_options"): _ALGORITHM_OPTIONS if noisy else st.just({}),
        (m.BackendConfig, "address"): _ADDRESS,
        (m.BackendConfig, "weight"): mostly(one(0, 1, 2.5, 10, 1000000), one(-1, 1000001, float("nan"), "heavy")),
        (m.BackendConfig, "name"): st.one_of(st.none(), one("b1", "b2")),
        (m.ActiveHealthConfig, "interval"): mostly(one("1s", "5s", "10s"), one(0, "100ms")),
        (m.ActiveHealthConfig, "timeout"): mostly(one("250ms", "500ms", "900ms"), one(0, "5s")),
        (m.ActiveHealthConfig, "jitter"): mostly(one(0, 0.1, 0.5), one(1, -0.1)),
        (m.ActiveHealthConfig, "kind"): mostly(one("tcp", "http"), one("tcp_banner", "bogus", "HTTP")),
        (m.ActiveHealthConfig, "path"): mostly(one("/healthz", "/ready?full=1"), one("healthz", "")),
        (m.ActiveHealthConfig, "method"): mostly(one("GET", "HEAD"), one("G ET",)),
        (m.ActiveHealthConfig, "host"): st.one_of(st.none(), sometimes(one("example.com", "127.0.0.1:9001"), one("bad host\r\n", ""), 4)),
        (m.ActiveHealthConfig, "expected_statuses"): mostly(one("200-399", "200", "200,204"), one("abc", "399-200", "99")),
        (m.ActiveHealthConfig, "body_match"): st.one_of(st.none(), mostly(one("ok", "^up"), one("(",))),
        (m.ActiveHealthConfig, "options"): mostly(st.just({}), one({"expect": "SSH-"}, {"bogus": 1})),
        (m.HeaderRewrite, "add"): st.dictionaries(_HEADER, sometimes(one("1", "prod", ""), one("a\r\nb", "\x00"), 6), max_size=2),
        (m.HeaderRewrite, "set"): st.dictionaries(_HEADER, sometimes(one("1", "no-store"), one("a\nb", "caf\u00e9"), 6), max_size=2),
        (m.HeaderRewrite, "remove"): st.lists(_HEADER, max_size=2),
        (m.RetryConfig, "retry_on"): st.lists(mostly(one("connect-failure", "reset", "timeout", "gateway-error", "5xx", 503),
                                                     one("bogus", 999, 99)), max_size=3),
        (m.RetryConfig, "idempotency_header"): st.one_of(st.none(), _HEADER),
        (m.RateLimitConfig, "key"): mostly(one("client", "route", "header:x-user", "header:X-Api-Key"), one("header:", "ip", "header:a b")),
        (m.HttpConfig, "request_id_header"): _HEADER,
        (m.HttpConfig, "sticky_cookie"): st.one_of(st.none(), mostly(one("lb", "route_id"), one("bad cookie", ""))),
        (m.CircuitBreakerConfig, "failure_statuses"): st.lists(mostly(one(500, 502, 503, 504), one(99, 600, "503")), max_size=3),
        (m.TLSPassthroughConfig, "routes"): st.dictionaries(mostly(one("example.com", "*.example.com", "api.example.com"), one("bad name", "")),
                                                             _POOL_REF, max_size=2),
        (m.TLSPassthroughConfig, "default"): st.one_of(st.none(), _POOL_REF),
        (m.PoolTLSConfig, "ca"): st.none(),
        (m.PoolTLSConfig, "cert"): st.none(),
        (m.PoolTLSConfig, "key"): st.none(),
        (m.PoolTLSConfig, "server_name"): st.one_of(st.none(), mostly(one("backend.example.com",), one("bad name",))),
        (m.PoolTLSConfig, "alpn"): st.lists(sometimes(one("http/1.1", "h2"), one("", "x" * 300), 6), max_size=2),
        (m.AdminConfig, "bind"): mostly(one("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"), one("tcp:0", "tcp:x")),
        (m.AdminConfig, "token"): st.one_of(st.none(), one("s3cret-token-value-long-enough",)),
        (m.AdminConfig, "token_file"): mostly(st.none(), one("/nonexistent/token",)),
        (m.AccessLogConfig, "path"): mostly(one("stderr", _LOG), one("/nonexistent/dir/access.log",)),
        (m.DeploymentConfig, "failover"): st.one_of(st.none(), one("keepalived VIP",)),
        (m.DemoConfig, "http"): st.lists(mostly(one("tcp:0:interface=127.0.0.1"), one("tcp:x",)), max_size=2),
        (m.DemoConfig, "tcp_echo"): st.lists(mostly(one("tcp:0:interface=127.0.0.1"), one("tcp:x",)), max_size=1),
        (m.RateLimitConfig, "scope"): mostly(one("local", "local", "local", "fleet"), one("global", 1)),
        (m.FleetConfig, "redis"): mostly(one("tcp:127.0.0.1:6379", "redis://127.0.0.1:6380/1", "rediss://lb:pw@[::1]:6390",
                                             "unix:/run/redis/redis.sock"),
                                         one("tcp:127.0.0.1", "http://h:1", "redis://h/x", "tcp:h:0", 6379)),
        (m.FleetConfig, "name"): mostly(one("edge", "test.fleet-1"), one("bad name", "", "x" * 70)),
        (m.FleetConfig, "username"): st.one_of(st.none(), one("lbtwist",)),
        (m.FleetConfig, "password"): st.one_of(st.none(), st.none(), one("s3cret",)),
        (m.FleetConfig, "password_file"): mostly(st.none(), one("/nonexistent/redis.pass",)),
        (m.FleetTLSConfig, "ca"): mostly(st.none(), one("/nonexistent/ca.pem",)),
        (m.FleetTLSConfig, "cert"): st.none(),
        (m.FleetTLSConfig, "key"): st.none(),
        (m.FleetTLSConfig, "server_name"): st.one_of(st.none(), one("redis.internal",)),
    }



#: (class, key) -> the value's strategy ignores the type: the list lengths at the top.
_LISTS = {
    (m.Config, "listeners"): (1, 3),
    (m.Config, "pools"): (1, 3),
    (m.PoolConfig, "backends"): (0, 3),
    (m.ListenerConfig, "routes"): (0, 3),
}

#: Keys written with this probability when they have a default (required keys (almost) always).
OPTIONAL_P = {m.Config: 0.6, m.HeaderRewrite: 0.5, m.RateLimitConfig: 0.5}
DEFAULT_OPTIONAL_P = 0.3
#: ... and these more often, so that files have the shapes that do something.
KEY_P = {
    (m.ListenerConfig, "mode"): 0.9,
    (m.ListenerConfig, "routes"): 0.7,
    (m.PoolConfig, "backends"): 0.9,
    (m.PoolConfig, "algorithm"): 0.7,
    (m.PoolConfig, "health"): 0.5,
    (m.RouteConfig, "match"): 0.7,
    (m.RouteConfig, "request_headers"): 0.4,
    (m.RouteConfig, "response_headers"): 0.4,
    (m.HealthConfig, "active"): 0.6,
    (m.ListenerTLSConfig, "certificates"): 0.95,
}


def _noise() -> st.SearchStrategy:
    """A value of some other type."""
    return one(-1, 1.5, "x", True, [1], {"k": 1}, None)


class Tree:
    """Strategies for every class and key of the model, at one noise level."""

    def __init__(self, noise: int) -> None:
        self.noise = noise
        self.noisy = noise > 0
        self.leaves, self.overrides = meanings(noise)
        self.classes: dict[type, st.SearchStrategy] = {}

    def mostly(self, good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
        return sometimes(good, bad, self.noise)

    def for_type(self, tp: Any, owner: type, key: str) -> st.SearchStrategy:
        """Values for a key of type ``tp``, as the loader reads the model."""
        if (owner, key) in self.overrides:
            return self.overrides[(owner, key)]
        if tp in self.leaves:
            return self.leaves[tp]
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            arms = [a for a in get_args(tp) if a is not type(None)]
            parts = st.one_of(*(self.for_type(a, owner, key) for a in arms))
            if type(None) not in get_args(tp):
                return parts
            # an optional section is written more often than not, so that it is tested
            return sometimes(parts, st.none(), 3 if any(attrs.has(a) for a in arms) else 2)
        if origin is Literal:
            return self.mostly(st.sampled_from(get_args(tp)), one("bogus", 1))
        if origin is list:
            lo, hi = _LISTS.get((owner, key), (0, 2))
            return st.lists(self.for_type(get_args(tp)[0], owner, key), min_size=lo, max_size=hi)
        if origin is dict:
            return self.mostly(st.dictionaries(one("a", "b"), self.for_type(get_args(tp)[1], owner, key), max_size=2), _noise())
        if attrs.has(tp):
            # an empty value ("health:") is an empty mapping: generate it too
            empty = st.none() if owner is not m.Config else self.for_class(tp)
            return sometimes(self.for_class(tp), sometimes(empty, _noise(), 2 if self.noisy else 0), 12)
        if isinstance(tp, typing.NewType):
            return self.for_type(tp.__supertype__, owner, key)
        if tp is Any:
            return one({}, 1, "x")
        raise AssertionError(f"the generator does not know {tp!r} ({owner.__name__}.{key}): teach it")

    def for_class(self, cls: type) -> st.SearchStrategy:
        """A mapping for ``cls``: required keys (almost) always, others
        sometimes, and (noisy) now and then an unknown key."""
        if cls not in self.classes:
            self.classes[cls] = st.deferred(lambda: self._build_class(cls))
        return self.classes[cls]

    def _build_class(self, cls: type) -> st.SearchStrategy:
        hints = get_type_hints(cls)
        p = OPTIONAL_P.get(cls, DEFAULT_OPTIONAL_P)
        required_p = 1.0 - 1.0 / (3 * self.noise) if self.noisy else 1.0
        fields = [(f.name, required_p if f.default is attrs.NOTHING else KEY_P.get((cls, f.name), p),
                   self.for_type(hints[f.name], cls, f.name))
                  for f in attrs.fields(cls)]
        noisy, noise = self.noisy, self.noise

        @st.composite
        def build(draw: Any) -> dict:
            out: dict[str, Any] = {}
            for name, chance, strategy in fields:
                if draw(st.floats(0, 1)) < chance:
                    out[name] = draw(strategy)
            if noisy and draw(st.integers(0, 3 * noise)) == noise:
                out[draw(one("bogus", "algoritm", "timeuot"))] = 1
            return out

        return build()


@st.composite
def configs(draw: Any, tree: Tree) -> dict:
    """A whole file. Listener modes are drawn first; most of the time binds and
    mode-specific keys are then made to fit the mode (else nearly every file
    would be refused for one of them)."""
    cfg = draw(tree.for_class(m.Config))
    if tree.noise == 0 or tree.noise > 20:
        _tidy(cfg, clean=tree.noise == 0)
    for lst in cfg.get("listeners") or []:
        if isinstance(lst, dict) and (not tree.noisy or draw(st.integers(0, 9)) > 0):
            mode = lst.get("mode", "tcp")
            if mode == "udp":
                lst["bind"] = "udp:0:interface=127.0.0.1"
            elif isinstance(lst.get("bind"), str) and lst["bind"].startswith("udp:"):
                lst["bind"] = "tcp:0:interface=127.0.0.1"
            if mode != "http":
                for k in ("routes", "http"):
                    lst.pop(k, None)
                if isinstance(lst.get("hash_key"), str) and ":" in lst["hash_key"]:
                    lst["hash_key"] = "source"
            if mode != "tcp":
                lst.pop("tls_passthrough", None)
                lst.pop("proxy_protocol", None)
            if mode == "udp":
                lst.pop("tls", None)
    return cfg


def _dicts(value: Any) -> list[dict]:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _tidy(cfg: dict, clean: bool) -> None:
    """Names unique and references resolved (the noisy tree keeps its
    duplicates and dangling references). Items that are not mappings are a
    bad value on purpose: dropped in the clean tree, else left alone."""
    if clean:
        for key in ("listeners", "pools"):
            if key in cfg:
                cfg[key] = _dicts(cfg[key])
        for lst in cfg.get("listeners", ()):
            if "routes" in lst:
                lst["routes"] = _dicts(lst["routes"])
        for pool in cfg.get("pools", ()):
            if "backends" in pool:
                seen = {}
                for b in _dicts(pool["backends"]):
                    seen.setdefault(b.get("address"), b)
                pool["backends"] = list(seen.values())
    if cfg.get("listeners") and not cfg.get("pools"):
        cfg["pools"] = [{"name": "app"}]
    names = []
    for i, pool in enumerate(_dicts(cfg.get("pools"))):
        pool["name"] = POOLS[i] if i < len(POOLS) else f"pool{i}"
        names.append(pool["name"])

    def ref(value: Any) -> Any:
        return value if value in names or not names else names[len(str(value)) % len(names)]  # deterministic

    for i, lst in enumerate(_dicts(cfg.get("listeners"))):
        lst["name"] = f"{lst.get('name', 'l')}{i}"
        routes = _dicts(lst.get("routes"))
        if lst.get("pool") is not None or lst.get("mode", "tcp") != "http" or not routes:
            lst["pool"] = ref(lst.get("pool"))
        for route in routes:
            route["pool"] = ref(route.get("pool"))
        tp = lst.get("tls_passthrough")
        if isinstance(tp, dict):
            if isinstance(tp.get("routes"), dict):
                tp["routes"] = {k: ref(v) for k, v in tp["routes"].items()}
            if tp.get("default") is not None:
                tp["default"] = ref(tp["default"])


#: No bad values; one now and then (most files have one or two); many.
CLEAN, LIGHT, NOISY = Tree(0), Tree(150), Tree(13)


def _dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, allow_unicode=True)


OUTCOMES: dict[str, int] = {"accepted": 0, "refused": 0}


def check_one(text: str) -> None:
    try:
        loaded = load_config(text, REG, source_name="gen.yaml")
    except ConfigError as e:
        OUTCOMES["refused"] += 1
        lines = len(text.splitlines())
        assert e.errors, str(e)
        for p in e.errors:
            assert p.path, f"an error without a key path: {p}\n--- config:\n{text}"
            assert p.line is not None and 1 <= p.line <= lines, f"an error without a line in the file: {p}\n--- config:\n{text}"
        return
    OUTCOMES["accepted"] += 1
    review(loaded.config)  # lbtwist check's operational review must not crash either
    start_and_stop(loaded.config, REG)


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(st.one_of(configs(CLEAN), configs(LIGHT), configs(LIGHT), configs(NOISY)))
def test_what_check_accepts_starts_and_what_it_refuses_is_placed(cfg):
    check_one(_dump(cfg))


def test_the_generator_reaches_both_outcomes():
    """Runs after the property (file order): a generator that only ever made
    refused configs would test half the rule."""
    if OUTCOMES["accepted"] + OUTCOMES["refused"] == 0:
        test_what_check_accepts_starts_and_what_it_refuses_is_placed()
    assert OUTCOMES["accepted"] >= 20, OUTCOMES
    assert OUTCOMES["refused"] >= 20, OUTCOMES
