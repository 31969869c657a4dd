"""Routing: the built-in match kinds, first match wins with a default, config
errors that name the route, plugin kinds through the pluggy hook (the example
plugin's query_param), and routing inside the L7 proxy."""
from __future__ import annotations

import pytest

from lbtwist.config.model import RouteConfig
from lbtwist.registry import Registry, RuleSpec
from lbtwist.routing import (
    HeadersMatcher,
    HostMatcher,
    MethodMatcher,
    PathPrefixMatcher,
    PathRegexMatcher,
    RequestHead,
    Router,
    host_without_port,
    lbtwist_routing_rules,
)
from support.l7 import MemHarness, listener_config, ok, split_responses


def head(method="GET", target="/", host="example.com", headers=()):
    path = target.split("?", 1)[0]
    return RequestHead(method=method, target=target, path=path, host=host, headers=tuple(headers))


def test_host_exact_and_wildcard():
    m = HostMatcher.from_value(["api.example.com", "*.example.com"])
    assert m.matches(head(host="api.example.com"))
    assert m.matches(head(host="a.example.com"))
    assert m.matches(head(host="a.b.example.com"))
    assert not m.matches(head(host="example.com"))
    assert not m.matches(head(host="evil-example.com"))
    assert not m.matches(head(host="example.com.evil"))
    for bad in ["", "a b", "host:80", "*", 3]:
        with pytest.raises(ValueError):
            HostMatcher.from_value(bad)


def test_host_without_port():
    assert host_without_port("Example.COM:8080") == "example.com"
    assert host_without_port("[::1]:80") == "[::1]"
    assert host_without_port("a.test.") == "a.test"


def test_path_prefix_regex_method_headers():
    assert PathPrefixMatcher.from_value("/v1/").matches(head(target="/v1/x?q"))
    assert not PathPrefixMatcher.from_value("/v1/").matches(head(target="/v10"))
    assert PathPrefixMatcher.from_value(["/a", "/b"]).matches(head(target="/b/c"))
    with pytest.raises(ValueError):
        PathPrefixMatcher.from_value("v1")
    rx = PathRegexMatcher.from_value(r"^/static/.*\.css$")
    assert rx.matches(head(target="/static/a.css?v=2"))  # the query is not part of the path
    assert not rx.matches(head(target="/x/static/a.css"))
    with pytest.raises(ValueError):
        PathRegexMatcher.from_value("(unclosed")
    assert MethodMatcher.from_value(["get", "HEAD"]).matches(head(method="HEAD"))
    assert not MethodMatcher.from_value("GET").matches(head(method="POST"))
    hm = HeadersMatcher.from_value({"X-Canary": "1", "x-debug": True, "x-block": False})
    assert hm.matches(head(headers=[("x-canary", "1"), ("x-debug", "")]))
    assert not hm.matches(head(headers=[("x-canary", "2"), ("x-debug", "")]))
    assert not hm.matches(head(headers=[("x-canary", "1"), ("x-debug", ""), ("x-block", "y")]))
    assert not hm.matches(head(headers=[("x-canary", "1")]))
    with pytest.raises(ValueError):
        HeadersMatcher.from_value({"bad name": "1"})


def rules():
    return {s.name: s for s in lbtwist_routing_rules()}


def test_first_match_wins_and_default():
    routes = [
        RouteConfig(match={"host": "api.example.com", "path_prefix": "/v1/"}, pool="api"),
        RouteConfig(match={"host": "*.example.com", "path_regex": "^/static/", "method": "GET",
                           "headers": {"x-canary": "1"}}, pool="canary"),
        RouteConfig(match={"host": "*.example.com"}, pool="web"),
    ]
    r = Router.build(routes, rules(), make_target=lambda rc, name: rc.pool, default="fallback")
    assert r.route(head(host="api.example.com", target="/v1/users")).target == "api"
    assert r.route(head(host="api.example.com", target="/v2/users")).target == "web"
    assert r.route(head(host="cdn.example.com", target="/static/a.js", headers=[("x-canary", "1")])).target == "canary"
    assert r.route(head(host="cdn.example.com", target="/static/a.js", method="POST",
                        headers=[("x-canary", "1")])).target == "web"
    assert r.route(head(host="other.org")).target == "fallback"
    assert Router.build(routes, rules(), make_target=lambda rc, n: rc.pool).route(head(host="other.org")) is None
    # cheap matchers are evaluated first
    kinds = [type(m).__name__ for m in r.routes[1].matchers]
    assert kinds[0] == "MethodMatcher" and kinds[-1] == "PathRegexMatcher"


def test_build_errors_name_route_and_key():
    with pytest.raises(ValueError, match=r"routes\[1\]\.match: unknown match kind 'hots' \(did you mean 'host'\?\)"):
        Router.build([RouteConfig(match={}, pool="a"), RouteConfig(match={"hots": "x"}, pool="a")],
                     rules(), make_target=lambda rc, n: None)
    with pytest.raises(ValueError, match=r"routes\[0\]\.match\.path_regex: "):
        Router.build([RouteConfig(match={"path_regex": "("}, pool="a")], rules(), make_target=lambda rc, n: None)


def test_registry_collects_builtin_rules():
    reg = Registry.default(entry_points=False)
    assert {"host", "path_prefix", "path_regex", "method", "headers"} <= set(reg.rules)
    assert reg.origin("routing rule", "host") == "lbtwist.routing"


def test_plugin_rule_kind_from_the_example_plugin():
    """query_param comes from plugins/lbtwist-example through the entry point."""
    reg = Registry.default(entry_points=True)
    assert "query_param" in reg.rules, "install plugins/lbtwist-example into the venv"
    r = Router.build([RouteConfig(match={"query_param": {"beta": "1"}, "path_prefix": "/"}, pool="beta")],
                     reg.rules, make_target=lambda rc, n: rc.pool, default="main")
    assert r.route(head(target="/x?beta=1&y=2")).target == "beta"
    assert r.route(head(target="/x?beta=2")).target == "main"
    assert type(r.routes[0].matchers[-1]).__name__ == "QueryParamMatcher"  # plugin kinds run last


def test_a_plugin_can_add_a_kind_through_the_hook():
    from lbtwist import hookimpl

    class MatchAll:
        def matches(self, request):
            return request.client.startswith("10.")

    from zope.interface import implementer

    from lbtwist.interfaces import IRouteMatcher

    MatchAll = implementer(IRouteMatcher)(MatchAll)

    class Plugin:
        @staticmethod
        @hookimpl
        def lbtwist_routing_rules():
            return [RuleSpec("client_net10", lambda value: MatchAll(), "client in 10/8")]

    reg = Registry()
    import lbtwist.routing as routing_mod

    reg.register(routing_mod, "lbtwist.routing")
    reg.register(Plugin, "test-plugin")
    reg.collect()
    r = Router.build([RouteConfig(match={"client_net10": True}, pool="internal")], reg.rules,
                     make_target=lambda rc, n: rc.pool)
    assert r.route(RequestHead("GET", "/", "/", "h", client="10.1.2.3")).target == "internal"
    assert r.route(RequestHead("GET", "/", "/", "h", client="192.0.2.1")) is None


def test_proxy_routes_each_request_not_each_connection():
    routes = [
        RouteConfig(match={"host": "api.example.com", "path_prefix": "/v1/"}, pool="api", timeout=5.0),
        RouteConfig(match={"host": "*.example.com", "path_regex": "^/static/", "method": "GET",
                           "headers": {"x-canary": "1"}}, pool="static"),
        RouteConfig(match={"query_param": {"beta": "1"}}, pool="api"),
    ]
    h = MemHarness(pools={"web": ["10.0.0.1:80"], "api": ["10.0.0.2:80"], "static": ["10.0.0.3:80"]},
                   listener=listener_config(pool="web", routes=routes))
    proto, t = h.client()
    sent_to = []
    backends = {}

    def send(raw):
        before = len(h.reactor.tcpClients)
        proto.dataReceived(raw)
        if len(h.reactor.tcpClients) > before:
            b = h.accept()
            backends[b.address] = b
        for addr, b in backends.items():
            if b.sent():
                sent_to.append(addr)
                b.clear()
                b.reply(ok(addr.encode()))

    send(b"GET /v1/users HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    send(b"GET /static/app.js HTTP/1.1\r\nHost: cdn.example.com\r\nX-Canary: 1\r\n\r\n")
    send(b"GET /static/app.js HTTP/1.1\r\nHost: cdn.example.com\r\n\r\n")
    send(b"GET /page?beta=1 HTTP/1.1\r\nHost: www.other.org\r\n\r\n")
    send(b"GET /v1/users HTTP/1.1\r\nHost: API.EXAMPLE.COM:443\r\n\r\n")
    assert sent_to == ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80", "10.0.0.2:80"]
    assert [r.status for r in split_responses(t.value())] == [200] * 5


def test_no_default_pool_unmatched_is_404():
    h = MemHarness(listener=listener_config(pool=None, routes=[RouteConfig(match={"path_prefix": "/api"}, pool="app")]))
    proto, t = h.client()
    proto.dataReceived(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
    r = split_responses(t.value())[0]
    assert r.status == 404 and b"no route for h/other" in r.body
    assert h.pending_connects() == 0


def test_routes_are_labelled_by_name_or_pool_not_by_index():
    from lbtwist.routing import route_labels

    routes = [
        RouteConfig(match={"path_prefix": "/v1/"}, pool="api"),
        RouteConfig(match={"path_prefix": "/v2/"}, pool="api"),
        RouteConfig(name="static", match={"path_prefix": "/s/"}, pool="files"),
        RouteConfig(match={"path_prefix": "/f/"}, pool="static"),  # the pool's name is taken by a named route
        RouteConfig(match={}, pool="default"),  # "default" is the listener's own fallback route
    ]
    assert route_labels(routes) == ["api", "api~2", "static", "static~2", "default~2"]
    # inserting a route to another pool leaves the others' labels alone
    assert route_labels([RouteConfig(match={"host": "x"}, pool="beta"), *routes]) == [
        "beta", "api", "api~2", "static", "static~2", "default~2"]
    r = Router.build(routes, rules(), make_target=lambda rc, name: name, default="fallback")
    assert [x.name for x in r.routes] == [x.target for x in r.routes] == route_labels(routes)
    assert r.default.name == "default"
