"""The plugin registry: built-ins arrive through the same hooks as third-party
plugins, the example package under plugins/ is found through its installed
entry point, and every way a plugin can be broken yields a PluginError that
names the plugin (and its distribution)."""
from __future__ import annotations

import importlib.metadata
import random
import sys
import textwrap
import types
from pathlib import Path

import attrs
import pytest
from twisted.internet import task

import lbtwist.balancers.builtin
from lbtwist import hookimpl
from lbtwist.pool import Backend, Health, PickContext, Pool
from lbtwist.registry import BalancerSpec, PluginError, Registry, RuleSpec
from lbtwist.routing import RequestHead

REPO = Path(__file__).resolve().parents[1]
BUILTIN = "lbtwist.balancers.builtin"


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose hooks are the given functions."""
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def with_builtins() -> Registry:
    reg = Registry()
    reg.register(lbtwist.balancers.builtin, BUILTIN)
    return reg


@attrs.frozen
class FakeDist:
    name: str
    version: str


@attrs.frozen
class FakeEntryPoint:
    """What importlib.metadata hands the registry: the import itself is real."""

    name: str
    value: str
    dist: FakeDist | None
    group: str = "lbtwist"

    def load(self):
        return importlib.metadata.EntryPoint(self.name, self.value, self.group).load()


@pytest.fixture
def entry_points(monkeypatch):
    """Replace the installed entry points with the ones a test lists."""
    listed: list[FakeEntryPoint] = []

    def fake(group=None, **kw):
        return [ep for ep in listed if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    return listed


# -- built-ins and the installed example --------------------------------------


def test_builtin_algorithms_come_through_the_hook():
    reg = Registry.default(entry_points=False)
    assert reg.pm.get_plugin(BUILTIN) is lbtwist.balancers.builtin
    names = {"round_robin", "weighted_round_robin", "random", "least_connections",
             "peak_ewma", "p2c", "ring_hash", "maglev"}
    assert names <= set(reg.balancers)
    assert {reg.origin("algorithm", n) for n in names} == {BUILTIN}
    assert "ordered_failover" not in reg.balancers  # plugins only via entry points


def test_example_plugin_is_found_through_its_installed_entry_point():
    dist = importlib.metadata.distribution("lbtwist-example")
    eps = [ep for ep in dist.entry_points if ep.group == "lbtwist"]
    assert [(ep.name, ep.value) for ep in eps] == [("example", "lbtwist_example.plugin")]
    reg = Registry.default()
    assert reg.origin("algorithm", "ordered_failover") == "example"
    assert reg.origin("routing rule", "query_param") == "example"
    assert reg.describe("example") == f"plugin 'example' (dist lbtwist-example {dist.version})"
    # Installed like any third-party package, not imported from the checkout.
    mod = reg.pm.get_plugin("example")
    assert Path(mod.__file__).resolve().is_relative_to(Path(str(dist.locate_file(""))).resolve())
    assert not Path(mod.__file__).resolve().is_relative_to(REPO / "plugins")


# -- broken plugins ------------------------------------------------------------


def test_a_hook_that_raises_is_named():
    reg = with_builtins()

    def lbtwist_balancers():
        raise RuntimeError("boom")

    reg.register(plugin("acme", lbtwist_balancers=lbtwist_balancers), "acme-lb")
    with pytest.raises(PluginError) as e:
        reg.collect()
    assert str(e.value) == "plugin 'acme-lb': lbtwist_balancers raised RuntimeError: boom"


def test_duplicate_algorithm_names_both_plugins(entry_points):
    sys.modules["fake_maglev_plugin"] = plugin(
        "fake_maglev_plugin",
        lbtwist_balancers=lambda: [BalancerSpec("maglev", lambda o, **k: None)],
    )
    try:
        entry_points.append(FakeEntryPoint("fast-maglev", "fake_maglev_plugin", FakeDist("lbtwist-maglev", "0.3")))
        with pytest.raises(PluginError) as e:
            Registry.default()
    finally:
        del sys.modules["fake_maglev_plugin"]
    assert str(e.value) == (
        "plugin 'fast-maglev' (dist lbtwist-maglev 0.3): duplicate algorithm 'maglev' "
        f"(already from plugin {BUILTIN!r})"
    )


def test_duplicate_between_two_third_party_plugins_names_both_dists(entry_points):
    spec = lambda: [BalancerSpec("fancy", lambda o, **k: None)]  # noqa: E731
    sys.modules["fancy_a"] = plugin("fancy_a", lbtwist_balancers=spec)
    sys.modules["fancy_b"] = plugin("fancy_b", lbtwist_balancers=spec)
    try:
        entry_points.append(FakeEntryPoint("a", "fancy_a", FakeDist("fancy-a", "1.0")))
        entry_points.append(FakeEntryPoint("b", "fancy_b", FakeDist("fancy-b", "2.0")))
        with pytest.raises(PluginError) as e:
            Registry.default()
    finally:
        del sys.modules["fancy_a"], sys.modules["fancy_b"]
    assert "plugin 'b' (dist fancy-b 2.0): duplicate algorithm 'fancy'" in str(e.value)
    assert "(already from plugin 'a' (dist fancy-a 1.0))" in str(e.value)


def test_entry_point_that_cannot_be_imported_names_plugin_and_dist(entry_points):
    entry_points.append(FakeEntryPoint("broken", "lbtwist_no_such_module.plugin", FakeDist("lbtwist-broken", "1.2")))
    with pytest.raises(PluginError) as e:
        Registry.default()
    assert str(e.value) == (
        "plugin 'broken' (dist lbtwist-broken 1.2): failed to import 'lbtwist_no_such_module.plugin': "
        "ModuleNotFoundError: No module named 'lbtwist_no_such_module'"
    )


def test_entry_point_module_raising_at_import_is_named(entry_points, tmp_path, monkeypatch):
    (tmp_path / "lbtwist_explodes.py").write_text("raise RuntimeError('no config for me')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points.append(FakeEntryPoint("explodes", "lbtwist_explodes", FakeDist("lbtwist-explodes", "0.1")))
    with pytest.raises(PluginError) as e:
        Registry.default()
    assert str(e.value).startswith("plugin 'explodes' (dist lbtwist-explodes 0.1): failed to import")
    assert "RuntimeError: no config for me" in str(e.value)
    sys.modules.pop("lbtwist_explodes", None)


def test_two_entry_points_with_one_name_are_refused(entry_points):
    entry_points.append(FakeEntryPoint("example", "lbtwist_example.plugin", FakeDist("lbtwist-example", "0.1.0")))
    entry_points.append(FakeEntryPoint("example", "lbtwist_example.plugin", FakeDist("other-example", "9")))
    with pytest.raises(PluginError) as e:
        Registry.default()
    assert str(e.value).startswith("plugin 'example' (dist other-example 9): a plugin named 'example' is already")
    assert "lbtwist-example 0.1.0" in str(e.value)


def test_misspelled_hook_is_named():
    reg = with_builtins()
    reg.register(plugin("typo", lbtwist_balancer=lambda: []), "typo-plugin")
    with pytest.raises(PluginError) as e:
        reg.collect()
    assert str(e.value).startswith(
        "plugin 'typo-plugin': unknown hook 'lbtwist_balancer' (did you mean 'lbtwist_balancers'?)"
    )


def test_hook_returning_the_wrong_type_is_named():
    reg = with_builtins()
    reg.register(plugin("wrong", lbtwist_routing_rules=lambda: [BalancerSpec("x", lambda o, **k: None)]), "wrong")
    with pytest.raises(PluginError) as e:
        reg.collect()
    assert "plugin 'wrong': lbtwist_routing_rules returned" in str(e.value)
    assert "expected RuleSpec" in str(e.value)


def test_factory_that_builds_no_balancer_is_named():
    reg = with_builtins()
    reg.register(plugin("lazy", lbtwist_balancers=lambda: [BalancerSpec("lazy", lambda o, **k: object())]), "lazy")
    reg.collect()
    with pytest.raises(PluginError) as e:
        reg.make_balancer("lazy", {}, clock=task.Clock(), rng=random.Random(0))
    assert str(e.value).startswith("plugin 'lazy': algorithm 'lazy' built <object object")
    assert "does not provide IBalancer" in str(e.value)


def test_unknown_algorithm_suggests_and_lists():
    reg = Registry.default(entry_points=False)
    with pytest.raises(KeyError) as e:
        reg.make_balancer("maglv", {}, clock=task.Clock(), rng=random.Random(0))
    assert "unknown algorithm 'maglv' (did you mean 'maglev'?)" in str(e.value)
    assert "round_robin" in str(e.value)


def test_collect_twice_is_harmless():
    reg = Registry.default(entry_points=False)
    before = dict(reg.balancers)
    reg.collect()
    assert reg.balancers == before


# -- the example plugin, used through a config file ----------------------------


CONFIG = """\
listeners:
  - name: web
    bind: "tcp:0:interface=127.0.0.1"
    mode: http
    pool: app
    routes:
      - match: {{query_param: {{beta: "1", page: 2}}}}
        pool: db
pools:
  - name: app
    backends:
      - address: "127.0.0.1:9001"
  - name: db
    algorithm: ordered_failover
{options}    backends:
      - address: "127.0.0.1:9102"
      - address: "127.0.0.1:9101"
      - address: "127.0.0.1:9103"
"""


def test_example_algorithm_from_a_config_file_fails_over_in_order(tmp_path):
    from lbtwist.config import load_config

    path = tmp_path / "lbtwist.yaml"
    path.write_text(CONFIG.format(options=""))
    registry = Registry.default()
    loaded = load_config(path, registry)
    cfg = next(p for p in loaded.config.pools if p.name == "db")
    clock = task.Clock()
    balancer = registry.make_balancer(cfg.algorithm, cfg.algorithm_options, clock=clock, rng=random.Random(0))
    primary, standby, last = (Backend(b.address, weight=b.weight) for b in cfg.backends)
    pool = Pool(cfg.name, [primary, standby, last], balancer, clock, panic_threshold=0)

    def pick(**kw):
        return pool.select(PickContext(now=clock.seconds(), **kw))

    assert [pick() for _ in range(5)] == [primary] * 5  # config order, not address order
    assert pick(exclude=(primary,)) is standby  # a retry goes to the standby
    pool.set_health(primary, Health.UNHEALTHY, "probe failed")
    assert pick() is standby
    pool.set_health(standby, Health.UNHEALTHY, "probe failed")
    assert pick() is last
    pool.set_health(primary, Health.HEALTHY, "probe passed")
    assert pick() is primary  # fails back
    assert pick(exclude=(primary, last)) is None


def test_example_algorithm_options_are_checked_at_config_load(tmp_path):
    from lbtwist.config import ConfigError, load_config

    path = tmp_path / "lbtwist.yaml"
    path.write_text(CONFIG.format(options="    algorithm_options: {sticky: true}\n"))
    with pytest.raises(ConfigError) as e:
        load_config(path, Registry.default())
    assert "ordered_failover: unknown option 'sticky'" in str(e.value)


def test_example_query_param_route_from_a_config_file(tmp_path):
    from lbtwist.config import load_config

    path = tmp_path / "lbtwist.yaml"
    path.write_text(CONFIG.format(options=""))
    registry = Registry.default()
    route = load_config(path, registry).config.listeners[0].routes[0]
    matcher = registry.rules["query_param"].factory(route.match["query_param"])

    def req(target):
        return RequestHead(method="GET", target=target, path=target.split("?")[0], host="example.test")

    assert matcher.matches(req("/search?page=2&beta=1"))
    assert matcher.matches(req("/search?beta=0&beta=1&page=2"))  # any occurrence
    assert not matcher.matches(req("/search?beta=1"))  # every pair must hold
    assert not matcher.matches(req("/search?beta=10&page=2"))
    assert not matcher.matches(req("/search"))


@pytest.mark.parametrize("value", ["beta=1", {}, {"beta": [1]}, {"": "1"}, {"beta": True}])
def test_example_query_param_rejects_bad_values(value):
    registry = Registry.default()
    with pytest.raises(ValueError) as e:
        registry.rules["query_param"].factory(value)
    assert "query_param" in str(e.value)


def test_example_query_param_bad_value_in_config_is_reported(tmp_path):
    from lbtwist.config import ConfigError, load_config

    path = tmp_path / "lbtwist.yaml"
    path.write_text(textwrap.dedent(CONFIG.format(options="")).replace('{beta: "1", page: 2}', '"beta=1"'))
    with pytest.raises(ConfigError) as e:
        load_config(path, Registry.default())
    assert "query_param must be a mapping" in str(e.value)
