"""The config loader and validator: every problem class named with its line
and key path, suggestions, a full valid file round-tripping into the model,
the command-line check without traceback, and docs covering every key."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import attrs
import pytest

from lbtwist import hookimpl
from lbtwist.config import ConfigError, LoadedConfig, Problem, load_config, parse_duration, parse_size, parse_udp_bind
from lbtwist.config.loader import load
from lbtwist.config.model import Config
from lbtwist.config.validate import CheckContext, parse_hash_key, validate
from lbtwist.interfaces import IBalancer
from lbtwist.registry import BalancerSpec, Registry, RuleSpec
from zope.interface import implementer

from support.procs import REPO, source_env

# -- a small registry of test plugins -------------------------------------------


@implementer(IBalancer)
class _FirstBalancer:
    def pick(self, candidates, ctx):
        return candidates[0] if candidates else None

    def on_start(self, backend, now):
        pass

    def on_finish(self, backend, now, latency, ok):
        pass


def _no_options(name):
    def factory(options, *, clock, rng):
        if options:
            raise ValueError(f"{name}: unknown option {sorted(options)[0]!r}")
        return _FirstBalancer()

    return factory


def _ring_hash(options, *, clock, rng):
    replicas = options.get("replicas", 100)
    if not isinstance(replicas, int) or replicas <= 0:
        raise ValueError(f"ring_hash: replicas must be a positive integer, got {replicas!r}")
    return _FirstBalancer()


def _path_prefix(value):
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"path_prefix must start with '/', got {value!r}")
    return object()


class _TestPlugin:
    @hookimpl
    def lbtwist_balancers(self):
        return [
            BalancerSpec("round_robin", _no_options("round_robin")),
            BalancerSpec("least_connections", _no_options("least_connections")),
            BalancerSpec("ring_hash", _ring_hash),
        ]

    @hookimpl
    def lbtwist_routing_rules(self):
        return [RuleSpec("host", lambda v: object()), RuleSpec("path_prefix", _path_prefix)]


def _registry() -> Registry:
    reg = Registry()
    reg.register(_TestPlugin(), "test")
    reg.collect()
    return reg


REG = _registry()


def _problems(text: str) -> list[Problem]:
    """All problems (errors and warnings) for ``text``, named ``t.yaml``."""
    try:
        loaded = load_config(textwrap.dedent(text), REG, source_name="t.yaml")
    except ConfigError as e:
        return e.problems
    return loaded.warnings


def _ok(text: str) -> LoadedConfig:
    return load_config(textwrap.dedent(text), REG, source_name="t.yaml")


# A valid base the cases below break one thing in.
BASE = """\
listeners:
  - name: edge
    bind: "tcp:0:interface=127.0.0.1"
    mode: tcp
    pool: app
pools:
  - name: app
    algorithm: round_robin
    backends:
      - address: "127.0.0.1:9001"
"""

# (case id, yaml, [(severity, line, path, message fragment)], exact problem count or None)
CASES = [
    ("yaml-syntax", "listeners:\n  - name: a\n    bind: [\n", [("error", 4, "", "YAML syntax error")], 1),
    ("yaml-tab", "listeners:\n\t- name: a\n", [("error", 2, "", "YAML syntax error")], 1),
    ("empty-file", "# only a comment\n", [("error", 1, "", "the file is empty")], 1),
    ("top-level-list", "- listeners\n", [("error", 1, "", "top level must be a mapping")], 1),
    ("two-documents", BASE + "---\nlisteners: []\n", [("error", 11, "", "YAML syntax error: expected a single document in the stream, but found another document")], 1),
    (
        "unknown-key-suggests",
        BASE.replace("algorithm: round_robin", "algoritm: round_robin"),
        [("error", 8, "pools[0].algoritm", "unknown key 'algoritm' (did you mean 'algorithm'?)")],
        None,
    ),
    (
        "unknown-key-lists-valid",
        BASE + "    zzz: 1\n",
        [("error", 11, "pools[0].zzz", "unknown key 'zzz'; valid keys: name, algorithm, algorithm_options, backends")],
        1,
    ),
    (
        "unknown-top-level-key",
        BASE + "pool:\n  - name: x\n",
        [("error", 11, "pool", "unknown key 'pool' (did you mean 'pools'?)")],
        1,
    ),
    (
        "wrong-type-int",
        BASE.replace("    pool: app\n", "    pool: app\n    max_connections: lots\n"),
        [("error", 6, "listeners[0].max_connections", "expected an integer, got the string 'lots'")],
        1,
    ),
    (
        "bool-is-not-int",
        BASE.replace("    pool: app\n", "    pool: app\n    max_connections: true\n"),
        [("error", 6, "listeners[0].max_connections", "expected an integer, got true")],
        1,
    ),
    (
        "number-is-not-string",
        BASE.replace('bind: "tcp:0:interface=127.0.0.1"', "bind: 8080"),
        [("error", 3, "listeners[0].bind", 'expected a string, got the integer 8080 (quote it: "8080")')],
        1,
    ),
    (
        "literal-suggests",
        BASE.replace("mode: tcp", "mode: tpc"),
        [("error", 4, "listeners[0].mode", "expected one of 'tcp', 'udp', 'http', got the string 'tpc' (did you mean 'tcp'?)")],
        1,
    ),
    (
        "duration-without-unit",
        BASE + "    connect_timeout: 30\n",
        [("error", 11, "pools[0].connect_timeout", "duration 30 has no unit: write e.g. '30s' or '30ms'")],
        1,
    ),
    (
        "duration-garbage",
        BASE + "    connect_timeout: soon\n",
        [("error", 11, "pools[0].connect_timeout", "expected a duration like '250ms', '5s', '1m' or '2h', got the string 'soon'")],
        1,
    ),
    (
        "duration-negative",
        BASE + "    connect_timeout: -5s\n",
        [("error", 11, "pools[0].connect_timeout", "negative")],
        1,
    ),
    (
        "size-garbage",
        BASE.replace("    pool: app\n", "    pool: app\n    http: {max_body_size: 5 apples}\n"),
        [("error", 6, "listeners[0].http.max_body_size", "expected a size like 512, '64k', '1m' or '1g'")],
        None,
    ),
    (
        "missing-required",
        BASE + "      - weight: 2\n",
        [("error", 11, "pools[0].backends[1].address", "missing required key 'address'")],
        1,
    ),
    (
        "duplicate-yaml-key",
        BASE.replace("    pool: app\n", "    pool: app\n    pool: app\n"),
        [("error", 6, "listeners[0].pool", "duplicate key 'pool' (first at line 5)")],
        1,
    ),
    (
        "list-expected",
        BASE.replace('    backends:\n      - address: "127.0.0.1:9001"\n', '    backends: {address: "127.0.0.1:9001"}\n'),
        [("error", 9, "pools[0].backends", "expected a list, got a mapping")],
        None,
    ),
    (
        "mapping-expected",
        BASE + "admin: tcp:9900\n",
        [("error", 11, "admin", "expected a mapping with keys bind, ")],
        1,
    ),
    (
        "non-string-key",
        BASE + "    ? [a, b]\n    : 1\n",
        [("error", 11, "pools[0]", "keys must be plain strings, got a list")],
        1,
    ),
    (
        "duplicate-listener-name",
        BASE.replace("listeners:\n", 'listeners:\n  - {name: edge, bind: "tcp:0", pool: app}\n'),
        [("error", 3, "listeners[1].name", "duplicate listener name 'edge' (first at listeners[0].name, line 2)")],
        1,
    ),
    (
        "duplicate-route-name",
        BASE.replace("    mode: tcp\n", "    mode: http\n    routes:\n      - {name: api, pool: app, match: {path_prefix: /a}}\n      - {name: api, pool: app}\n"),
        [("error", 7, "listeners[0].routes[1].name", "duplicate route name 'api' (first at listeners[0].routes[0].name, line 6)")],
        1,
    ),
    (
        "reserved-route-name",
        BASE.replace("    mode: tcp\n", "    mode: http\n    routes:\n      - {name: default, pool: app}\n"),
        [("error", 6, "listeners[0].routes[0].name", "'default' is reserved for requests that match no route")],
        1,
    ),
    (
        "duplicate-pool-name",
        BASE + '  - name: app\n    algorithm: round_robin\n    backends: [{address: "127.0.0.1:9002"}]\n',
        [("error", 11, "pools[1].name", "duplicate pool name 'app' (first at pools[0].name, line 7)")],
        1,
    ),
    (
        "duplicate-backend",
        BASE + '      - address: "127.0.0.1:9001"\n',
        [("error", 11, "pools[0].backends[1].address", "duplicate backend '127.0.0.1:9001' in pool 'app' (first at pools[0].backends[0].address, line 10)")],
        1,
    ),
    (
        "unknown-listener-pool-suggests",
        BASE.replace("pool: app", "pool: ap"),
        [("error", 5, "listeners[0].pool", "unknown pool 'ap' (did you mean 'app'?)")],
        1,
    ),
    (
        "unknown-pool-lists-defined",
        BASE.replace("pool: app", "pool: zebra"),
        [("error", 5, "listeners[0].pool", "unknown pool 'zebra'; defined pools: app")],
        1,
    ),
    (
        "tcp-listener-without-pool",
        BASE.replace("    pool: app\n", "") + '  - name: other\n    backends: [{address: "127.0.0.1:9"}]\n    algorithm: round_robin\n',
        [("error", 2, "listeners[0].pool", "a tcp listener needs a pool")],
        None,
    ),
    (
        "udp-listener-without-pool",
        BASE.replace("    pool: app\n", "").replace("mode: tcp", "mode: udp").replace('"tcp:0:interface=127.0.0.1"', '"udp:0"'),
        [("error", 2, "listeners[0].pool", "a udp listener needs a pool")],
        None,
    ),
    (
        "http-listener-without-pool-or-routes",
        BASE.replace("    pool: app\n", "").replace("mode: tcp", "mode: http"),
        [("error", 2, "listeners[0].pool", "an http listener needs a pool or routes")],
        None,
    ),
    (
        "unknown-route-pool",
        BASE.replace("mode: tcp", "mode: http").replace(
            "    pool: app\n", "    pool: app\n    routes:\n      - match: {host: a.example}\n        pool: apps\n"
        ),
        [("error", 8, "listeners[0].routes[0].pool", "unknown pool 'apps' (did you mean 'app'?)")],
        1,
    ),
    (
        "routes-on-tcp-listener",
        BASE.replace("    pool: app\n", "    pool: app\n    routes:\n      - pool: app\n"),
        [("error", 6, "listeners[0].routes", "routes need mode: http (this listener is tcp)")],
        1,
    ),
    (
        "backend-not-host-port",
        BASE.replace('"127.0.0.1:9001"', "nohost"),
        [("error", 10, "pools[0].backends[0].address", "backend address 'nohost' is not host:port")],
        1,
    ),
    (
        "backend-port-range",
        BASE.replace('"127.0.0.1:9001"', '"127.0.0.1:70000"'),
        [("error", 10, "pools[0].backends[0].address", "port out of range")],
        1,
    ),
    (
        "negative-weight",
        BASE + "        weight: -1\n",
        [("error", 11, "pools[0].backends[0].weight", "must not be negative (got -1)")],
        1,
    ),
    (
        "bad-tcp-bind",
        BASE.replace('"tcp:0:interface=127.0.0.1"', '"tcp:http"'),
        [("error", 3, "listeners[0].bind", "bad endpoint description 'tcp:http': invalid literal for int()")],
        1,
    ),
    (
        "unknown-endpoint-type",
        BASE.replace('"tcp:0:interface=127.0.0.1"', '"tpc:80"'),
        [("error", 3, "listeners[0].bind", "Unknown endpoint type: 'tpc'")],
        1,
    ),
    (
        "unknown-endpoint-option",
        BASE.replace('"tcp:0:interface=127.0.0.1"', '"tcp:0:interfase=127.0.0.1"'),
        [("error", 3, "listeners[0].bind", "unknown option 'interfase'")],
        1,
    ),
    (
        "udp-bind-on-tcp-listener",
        BASE.replace('"tcp:0:interface=127.0.0.1"', '"udp:53"'),
        [("error", 3, "listeners[0].bind", "(udp binds need mode: udp)")],
        1,
    ),
    (
        "udp-listener-bad-bind",
        BASE.replace("mode: tcp", "mode: udp").replace('"tcp:0:interface=127.0.0.1"', '"udp:53:interface=localhost"'),
        [("error", 3, "listeners[0].bind", "interface 'localhost' in 'udp:53:interface=localhost' is not an IP address")],
        1,
    ),
    (
        "udp-listener-tcp-bind",
        BASE.replace("mode: tcp", "mode: udp"),
        [("error", 3, "listeners[0].bind", "a udp listener binds with udp:PORT[:interface=ADDR]")],
        1,
    ),
    (
        "bind-collision-wildcard",
        BASE.replace("listeners:\n", 'listeners:\n  - {name: all, bind: "tcp:8080", pool: app}\n').replace(
            '"tcp:0:interface=127.0.0.1"', '"tcp:8080:interface=127.0.0.1"'
        ),
        [("error", 4, "listeners[1].bind", "collides with listeners[0].bind, line 2: both bind TCP port 8080")],
        1,
    ),
    (
        "admin-collides-with-listener",
        BASE.replace('"tcp:0:interface=127.0.0.1"', '"tcp:9900:interface=127.0.0.1"') + "admin: {}\n",
        [("error", 11, "admin.bind", "collides with listeners[0].bind, line 3: both bind TCP port 9900")],
        1,
    ),
    (
        "admin-bad-bind",
        BASE + 'admin:\n  bind: "tcp:99999999999999:interface=127.0.0.1"\n',
        [("error", 12, "admin.bind", "port 99999999999999 out of range")],
        1,
    ),
    (
        "demo-bad-bind",
        BASE + 'demo:\n  http: ["tcp:0", "nope"]\n',
        [("error", 12, "demo.http[1]", "Unknown endpoint type: 'nope'")],
        1,
    ),
    (
        "unknown-algorithm",
        BASE.replace("algorithm: round_robin", "algorithm: round_robbin"),
        [(
            "error", 8, "pools[0].algorithm",
            "unknown algorithm 'round_robbin' (did you mean 'round_robin'?); "
            "registered: least_connections, ring_hash, round_robin",
        )],
        1,
    ),
    (
        "bad-algorithm-options",
        BASE.replace("algorithm: round_robin", "algorithm: ring_hash\n    algorithm_options: {replicas: -3}"),
        [("error", 9, "pools[0].algorithm_options", "ring_hash: replicas must be a positive integer, got -3")],
        1,
    ),
    (
        "unknown-match-rule",
        BASE.replace("mode: tcp", "mode: http").replace(
            "    pool: app\n", "    pool: app\n    routes:\n      - match:\n          hots: a.example\n        pool: app\n"
        ),
        [("error", 8, "listeners[0].routes[0].match.hots", "unknown match rule 'hots' (did you mean 'host'?); registered: host, path_prefix")],
        1,
    ),
    (
        "match-value-rejected",
        BASE.replace("mode: tcp", "mode: http").replace(
            "    pool: app\n", "    pool: app\n    routes:\n      - match:\n          path_prefix: api\n        pool: app\n"
        ),
        [("error", 8, "listeners[0].routes[0].match.path_prefix", "path_prefix must start with '/', got 'api'")],
        1,
    ),
    (
        "hash-key-syntax",
        BASE.replace("    pool: app\n", "    pool: app\n    hash_key: ip\n"),
        [("error", 6, "listeners[0].hash_key", "hash_key 'ip' is not one of source | header:NAME | cookie:NAME")],
        1,
    ),
    (
        "hash-key-header-at-l4",
        BASE.replace("    pool: app\n", "    pool: app\n    hash_key: header:x-user\n"),
        [("error", 6, "listeners[0].hash_key", "header hash keys need mode: http")],
        1,
    ),
    (
        "route-hash-key-bad-name",
        BASE.replace("mode: tcp", "mode: http").replace(
            "    pool: app\n", "    pool: app\n    routes:\n      - pool: app\n        hash_key: 'cookie:a b'\n"
        ),
        [("error", 8, "listeners[0].routes[0].hash_key", "'a b' is not a valid cookie name")],
        1,
    ),
    (
        "bad-header-name",
        BASE.replace("mode: tcp", "mode: http").replace(
            "    pool: app\n",
            "    pool: app\n    routes:\n      - pool: app\n        request_headers:\n          set: {'x bad': 1}\n",
        ),
        [("error", 9, "listeners[0].routes[0].request_headers.set['x bad']", "expected a string, got the integer 1")],
        None,
    ),
    (
        "bad-header-name-token",
        BASE.replace("mode: tcp", "mode: http").replace(
            "    pool: app\n",
            "    pool: app\n    routes:\n      - pool: app\n        request_headers:\n          set: {'x bad': 'v'}\n",
        ),
        [("error", 9, "listeners[0].routes[0].request_headers.set['x bad']", "'x bad' is not a valid header name")],
        1,
    ),
    (
        "warning-unused-pool",
        BASE + '  - name: spare\n    algorithm: round_robin\n    backends: [{address: "127.0.0.1:9002"}]\n',
        [("warning", 11, "pools[1].name", "pool 'spare' is not used by any listener or route")],
        1,
    ),
    (
        "warning-no-backends",
        BASE.replace('    backends:\n      - address: "127.0.0.1:9001"\n', "    backends:\n"),
        [("warning", 9, "pools[0].backends", "pool 'app' has no backends")],
        1,
    ),
    (
        "warning-http-block-on-tcp",
        BASE.replace("    pool: app\n", "    pool: app\n    http: {max_headers: 10}\n"),
        [("warning", 6, "listeners[0].http", "ignored: http settings apply to mode: http, not tcp")],
        1,
    ),
]


@pytest.mark.parametrize("text,expected,count", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_problem_is_reported_with_line_and_path(text, expected, count):
    problems = _problems(text)
    for severity, line, path, fragment in expected:
        hits = [p for p in problems if p.severity == severity and p.line == line and p.path == path and fragment in p.message]
        assert hits, f"no {severity} at line {line} {path!r} containing {fragment!r} in:\n" + "\n".join(map(str, problems))
    if count is not None:
        assert len(problems) == count, "\n".join(map(str, problems))


def test_every_case_is_an_error_or_a_warning_of_its_own():
    """Cases with errors raise; cases with only warnings load."""
    for case_id, text, expected, _ in CASES:
        if any(sev == "error" for sev, *_ in expected):
            with pytest.raises(ConfigError):
                _ok(text)
        else:
            assert isinstance(_ok(text), LoadedConfig), case_id


FULL = """\
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: web
    idle_timeout: 90s
    http:
      max_body_size: 10MiB
      max_header_size: 64k
      header_timeout: 1.5s
      sticky_cookie: lb
    routes:
      - match: {host: api.example, path_prefix: /v1/}
        pool: api
        timeout: 2s
        max_body_size: 1m
        hash_key: header:X-User
        buffering: request
        request_headers:
          set: {x-env: prod}
          remove: [server]
        retry:
          retry_on: [connect-failure, 503]
          backoff: {base: 10ms, max: 1s}
  - name: dns
    bind: "udp:0:interface=127.0.0.1"
    mode: udp
    pool: api
pools:
  - name: web
    algorithm: least_connections
    connect_timeout: &quick 250ms
    drain_timeout: 1m
    backends:
      - address: "127.0.0.1:9001"
      - address: "[::1]:9002"
        weight: 2.5
        name: six
  - name: api
    algorithm: ring_hash
    algorithm_options: {replicas: 160}
    connect_timeout: *quick
    slow_start: 2h
    connection_pool: {max_per_backend: 8, idle_timeout: 0}
    backends: [{address: "localhost:9100", weight: 0}, {address: "localhost:9101"}]
admin:
  bind: "tcp:0:interface=127.0.0.1"
demo:
  http: ["tcp:0:interface=127.0.0.1"]
"""


def test_full_example_round_trips_into_the_model():
    loaded = _ok(FULL)
    cfg = loaded.config
    assert loaded.warnings == []
    web, dns = cfg.listeners
    assert (web.mode, web.idle_timeout) == ("http", 90.0)
    assert web.http.max_body_size == 10 * 1024 * 1024
    assert web.http.max_header_size == 65536
    assert web.http.header_timeout == 1.5
    assert web.http.keepalive_timeout == 60.0  # default kept
    assert web.http.sticky_cookie == "lb"
    route = web.routes[0]
    assert route.match == {"host": "api.example", "path_prefix": "/v1/"}
    assert (route.timeout, route.max_body_size, route.buffering) == (2.0, 1 << 20, "request")
    assert route.hash_key == "header:X-User"
    assert route.request_headers.set == {"x-env": "prod"} and route.request_headers.remove == ["server"]
    assert route.retry.retry_on == ["connect-failure", 503]
    assert (route.retry.backoff.base, route.retry.backoff.max) == (0.01, 1.0)
    assert dns.mode == "udp" and dns.pool == "api"
    pweb, papi = cfg.pools
    assert (pweb.connect_timeout, pweb.drain_timeout) == (0.25, 60.0)
    assert [(b.address, b.weight, b.name) for b in pweb.backends] == [
        ("127.0.0.1:9001", 1.0, None), ("[::1]:9002", 2.5, "six"),
    ]
    assert isinstance(pweb.backends[1].weight, float)
    assert papi.algorithm_options == {"replicas": 160}
    assert (papi.slow_start, papi.connect_timeout) == (7200.0, 0.25)  # alias of the anchor
    assert (papi.connection_pool.max_per_backend, papi.connection_pool.idle_timeout) == (8, 0.0)
    assert papi.connection_pool.max_age == 300.0
    assert cfg.admin.bind == "tcp:0:interface=127.0.0.1"
    assert cfg.demo.http == ["tcp:0:interface=127.0.0.1"] and cfg.demo.tcp_echo == []
    # positions name the line of each key, for messages after load (reload, admin)
    lines = FULL.splitlines()
    assert "max_body_size: 10MiB" in lines[loaded.positions["listeners[0].http.max_body_size"] - 1]
    assert "replicas" in lines[loaded.positions["pools[1].algorithm_options.replicas"] - 1]


def test_omitted_sections_take_defaults():
    cfg = _ok(BASE).config
    assert cfg.admin is None and cfg.demo is None
    assert cfg.pools[0].connection_pool.idle_timeout == 4.0
    assert cfg.listeners[0].http.max_request_line == 8192
    cfg = _ok(BASE + "admin: {}\n").config
    assert cfg.admin.bind == "tcp:9900:interface=127.0.0.1"


def test_several_problems_are_all_reported_in_file_order():
    text = textwrap.dedent("""\
        listeners:
          - name: edge
            bind: "tcp:8080:interface=127.0.0.1"
            mode: tcp
            pool: ap
          - name: edge
            bind: "udp:x"
            mode: udp
            pool: app
        pools:
          - name: app
            algoritm: round_robin
            algorithm: round_robbin
            connect_timeout: 5
            backends:
              - address: "127.0.0.1:9001"
              - address: "127.0.0.1:9001"
                weight: heavy
        admin:
          bind: "tcp:8080"
    """)
    with pytest.raises(ConfigError) as e:
        load_config(text, REG, source_name="bad.yaml")
    got = [(p.line, p.path) for p in e.value.problems]
    assert got == [
        (5, "listeners[0].pool"),
        (6, "listeners[1].name"),
        (7, "listeners[1].bind"),
        (12, "pools[0].algoritm"),
        (13, "pools[0].algorithm"),
        (14, "pools[0].connect_timeout"),
        (17, "pools[0].backends[1].address"),
        (18, "pools[0].backends[1].weight"),
        (20, "admin.bind"),
        (20, "admin.bind"),  # and it is reachable from other machines without a token
    ], str(e.value)
    lines = str(e.value).splitlines()
    assert len(lines) == 10
    assert lines[0] == "bad.yaml:5: listeners[0].pool: unknown pool 'ap' (did you mean 'app'?)"
    assert all(re.match(r"^bad\.yaml:\d+: \S+: \S", line) for line in lines)


def test_a_rejected_value_is_not_complained_about_twice():
    """``pool: 5`` is a type error; the validator must not add 'needs a pool'."""
    problems = _problems(BASE.replace("pool: app", "pool: 5"))
    assert [(p.line, p.path) for p in problems] == [(5, "listeners[0].pool")]
    problems = _problems(BASE.replace('      - address: "127.0.0.1:9001"\n', "      - weight: 1\n      - weight: 1\n"))
    # two missing addresses: no 'duplicate backend ""' and no 'not host:port' on top
    assert [p.message for p in problems] == ["missing required key 'address'"] * 2
    # a rejected pool list or pool name: no guessing that references are unknown
    for text in ("pools: 5\n", "pools: [{name: 5, algorithm: round_robin, backends: [{address: 'h:1'}]}]\n"):
        problems = _problems(text + "listeners:\n  - {name: a, bind: 'tcp:0', pool: p}\n")
        assert [(p.line, p.path) for p in problems] == [(1, "pools" if text == "pools: 5\n" else "pools[0].name")]
    # a listener that is not a mapping: one problem, not one per field
    problems = _problems("listeners: [edge]\n" + BASE.split("\n", 5)[5])
    assert [(p.line, p.path) for p in problems] == [(1, "listeners[0]")]


def test_merge_keys_anchors_and_yaml11_words():
    text = BASE.replace(
        "    algorithm: round_robin\n",
        "    algorithm: round_robin\n    connection_pool: &cp {max_per_backend: 4}\n",
    ) + '  - name: b\n    algorithm: round_robin\n    connection_pool:\n      <<: *cp\n      max_requests: 7\n    backends: [{address: "127.0.0.1:9"}]\n'
    cfg = _ok(text).config
    assert cfg.pools[1].connection_pool.max_per_backend == 4
    assert cfg.pools[1].connection_pool.max_requests == 7
    # 'on' is a YAML 1.1 boolean; as a key it is taken as written (and unknown here)
    problems = _problems(BASE + "    on: 1\n")
    assert len(problems) == 1 and problems[0].path == "pools[0].on"
    assert problems[0].message.startswith("unknown key 'on'; valid keys: name, algorithm, ")


@pytest.mark.parametrize("text,seconds", [
    ("250ms", 0.25), ("1.5s", 1.5), ("5s", 5.0), ("1m", 60.0), ("2h", 7200.0), (0, 0.0), (0.0, 0.0), ("0", 0.0), (".5s", 0.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text,fragment", [
    (5, "has no unit"), ("5", "has no unit"), ("-1s", "negative"), ("5 sec", "expected a duration"),
    (True, "expected a duration"), ("1d", "expected a duration"),
])
def test_parse_duration_rejects(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_duration(text)


@pytest.mark.parametrize("text,size", [
    (512, 512), ("512", 512), ("64k", 65536), ("64KiB", 65536), ("64kb", 65536), ("1m", 1 << 20), ("1MiB", 1 << 20),
    ("1g", 1 << 30), ("1GiB", 1 << 30), ("0", 0), ("1.5k", 1536), ("100b", 100),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [-1, "-1k", "1x", "k", 1.5, False, "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("bind,result", [
    ("udp:5353", (5353, "")),
    ("udp:0:interface=127.0.0.1", (0, "127.0.0.1")),
    ("udp:port=53:interface=127.0.0.2", (53, "127.0.0.2")),
    (r"udp:53:interface=\:\:1", (53, "::1")),
])
def test_parse_udp_bind(bind, result):
    assert parse_udp_bind(bind) == result


@pytest.mark.parametrize("bind,fragment", [
    ("tcp:53", "udp:PORT[:interface=ADDR]"),
    ("udp:", "bad port"),
    ("udp:70000", "bad port"),
    ("udp:53:54", "exactly one port"),
    ("udp:53:port=54", "exactly one port"),
    ("udp:53:interfase=127.0.0.1", "unknown option 'interfase' in 'udp:53:interfase=127.0.0.1' (did you mean 'interface'?)"),
    ("udp:53:interface=example.com", "not an IP address"),
])
def test_parse_udp_bind_rejects(bind, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_udp_bind(bind)


@pytest.mark.parametrize("key,parsed", [
    ("source", ("source", None)), ("header:X-User", ("header", "x-user")), ("cookie:SID", ("cookie", "SID")),
])
def test_parse_hash_key(key, parsed):
    assert parse_hash_key(key) == parsed


def test_port_zero_and_different_interfaces_do_not_collide():
    text = BASE.replace("listeners:\n", (
        "listeners:\n"
        '  - {name: a, bind: "tcp:0:interface=127.0.0.1", pool: app}\n'
        '  - {name: b, bind: "tcp:7000:interface=127.0.0.2", pool: app}\n'
        '  - {name: c, bind: "udp:7000:interface=127.0.0.1", mode: udp, pool: app}\n'
    )).replace('"tcp:0:interface=127.0.0.1"\n', '"tcp:7000:interface=127.0.0.1"\n')
    assert _ok(text).config.listeners[3].bind == "tcp:7000:interface=127.0.0.1"


def test_config_error_format_and_warning_prefix():
    err = ConfigError([
        Problem("warning", "pools[0].name", "unused", "f.yaml", 7),
        Problem("error", "listeners[0].pool", "unknown pool 'x'", "f.yaml", 3),
        Problem("error", "", "cannot load plugins: boom", "f.yaml"),
    ])
    assert str(err).splitlines() == [
        "f.yaml:3: listeners[0].pool: unknown pool 'x'",
        "f.yaml:7: warning: pools[0].name: unused",
        "f.yaml: cannot load plugins: boom",
    ]
    assert [p.path for p in err.errors] == ["listeners[0].pool", ""]


def test_load_from_path_and_unreadable_file(tmp_path):
    f = tmp_path / "lb.yaml"
    f.write_text(BASE)
    assert _ok_path(f).config.pools[0].name == "app"
    assert _ok_path(str(f)).config.listeners[0].name == "edge"
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(missing, REG)
    assert str(e.value) == f"{missing}: cannot read the config file: No such file or directory"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary, REG)
    f.write_text(BASE.replace("pool: app", "pool: ap"))
    with pytest.raises(ConfigError) as e:
        load_config(f, REG)
    assert str(e.value).startswith(f"{f}:5: listeners[0].pool: ")


def _ok_path(p) -> LoadedConfig:
    return load_config(p, REG)


def test_checks_are_pluggable_and_may_warn():
    result = load(textwrap.dedent(BASE), "t.yaml")

    def slow_connects(ctx: CheckContext):
        for i, pool in enumerate(ctx.config.pools):
            if pool.connect_timeout > 1.0:
                yield ctx.warning(f"pools[{i}].connect_timeout", "longer than 1s")

    found = validate(result.config, result.positions, REG, source="t.yaml", checks=[slow_connects])
    assert [str(p) for p in found] == ["t.yaml:7: warning: pools[0].connect_timeout: longer than 1s"]


def test_plugin_load_failure_is_one_problem_not_a_traceback(monkeypatch):
    def broken(cls, entry_points=True):
        raise ImportError("no module named lbtwist.balancers.builtin")

    monkeypatch.setattr(Registry, "default", classmethod(broken))
    with pytest.raises(ConfigError) as e:
        load_config(textwrap.dedent(BASE), source_name="t.yaml")
    assert str(e.value) == "t.yaml: cannot load plugins: ImportError: no module named lbtwist.balancers.builtin"


def test_shipped_sample_is_valid_with_the_default_registry():
    loaded = load_config(REPO / "etc" / "lbtwist.yaml")
    assert loaded.warnings == []
    assert {p.name for p in loaded.config.pools} == {lst.pool for lst in loaded.config.listeners}


# -- the command-line check ----------------------------------------------------------

_CLI = """
import sys
from lbtwist import hookimpl
from lbtwist.interfaces import IBalancer
from lbtwist.registry import BalancerSpec, Registry
from zope.interface import implementer

@implementer(IBalancer)
class First:
    def pick(self, candidates, ctx): return candidates[0]
    def on_start(self, backend, now): pass
    def on_finish(self, backend, now, latency, ok): pass

class P:
    @hookimpl
    def lbtwist_balancers(self):
        return [BalancerSpec("round_robin", lambda options, clock, rng: First())]

reg = Registry(); reg.register(P(), "p"); reg.collect()
from lbtwist.config.__main__ import main
sys.exit(main(sys.argv[1:], registry=reg))
"""


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=source_env(), capture_output=True, text=True, timeout=60)


def test_cli_prints_one_line_per_problem_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("pool: app", "pool: ap").replace("algorithm: round_robin", "algoritm: round_robin"))
    out = _run([sys.executable, "-c", _CLI, "bad.yaml"], tmp_path)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        "bad.yaml:5: listeners[0].pool: unknown pool 'ap' (did you mean 'app'?)",
        # the algorithm fell back to its default, which this registry lacks (at the pool's line)
        "bad.yaml:7: pools[0].algorithm: unknown algorithm 'p2c'; registered: round_robin",
        "bad.yaml:8: pools[0].algoritm: unknown key 'algoritm' (did you mean 'algorithm'?)",
    ]
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    out = _run([sys.executable, "-c", _CLI, "good.yaml"], tmp_path)
    assert out.returncode == 0, out
    assert out.stdout.strip() == "good.yaml: ok (1 listeners, 1 pools)"


def test_python_m_lbtwist_config_on_a_syntax_error(tmp_path):
    (tmp_path / "s.yaml").write_text("listeners:\n  - name: a\n    bind: [\n")
    out = _run([sys.executable, "-m", "lbtwist.config", "s.yaml"], tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stderr.startswith("s.yaml:4: YAML syntax error: ")


# -- docs cover every key ------------------------------------------------------------


def _reachable(cls: type, path: str, found: dict[type, set[str]]) -> dict[type, set[str]]:
    """Every attrs class reachable from ``cls`` with the key paths that reach it
    (``listeners[].http``), in the docs' heading notation."""
    first = cls not in found
    found.setdefault(cls, set()).add(path)
    if not first:
        return found
    hints = get_type_hints(cls)
    for f in attrs.fields(cls):
        tp, sub = hints[f.name], (f"{path}.{f.name}" if path else f.name)
        stack = [tp]
        while stack:
            t = stack.pop()
            origin = get_origin(t)
            if origin is list:
                for a in get_args(t):
                    if attrs.has(a):
                        _reachable(a, sub + "[]", found)
                    else:
                        stack.append(a)
            elif origin in (dict,):
                stack.append(get_args(t)[1])
            elif origin in (Union, types.UnionType):
                stack.extend(get_args(t))
            elif attrs.has(t):
                _reachable(t, sub, found)
    return found


def _doc_sections(text: str) -> list[tuple[str, str]]:
    parts = re.split(r"^## (.*)$", text, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2]))


def test_docs_document_every_key():
    doc = (REPO / "docs" / "configuration.md").read_text()
    sections = _doc_sections(doc)
    missing = []
    for cls, paths in _reachable(Config, "", {}).items():
        heads = {"Top level"} if paths == {""} else {f"`{p}`" for p in paths}
        bodies = [body for head, body in sections if any(h in head for h in heads)]
        if not bodies:
            missing.append(f"no section for {cls.__name__} (heading: ## {' / '.join(sorted(heads))})")
            continue
        for f in attrs.fields(cls):
            if not any(re.search(rf"^\| `{re.escape(f.name)}` \|", b, re.MULTILINE) for b in bodies):
                missing.append(f"{cls.__name__}.{f.name} (under ## {' / '.join(sorted(heads))})")
    assert not missing, "docs/configuration.md lacks rows for:\n" + "\n".join(missing)


def test_docs_document_duration_and_size_syntax():
    doc = (REPO / "docs" / "configuration.md").read_text()
    for example in ("`250ms`", "`1.5s`", "`1m`", "`2h`", "`64k`", "`64KiB`", "`1MiB`", "`1g`"):
        assert example in doc
