"""The ``lbtwist_discovery`` hook: the example plugin's ``http_json`` source,
registered from this checkout's plugins/lbtwist-example (the copy installed
in the venv may predate the hook), against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor as real_reactor, task
from twisted.web import resource, server

from lbtwist.config import ConfigError, load_config
from lbtwist.discovery.base import SourceTracker
from lbtwist.registry import Registry

PLUGIN = Path(__file__).resolve().parents[1] / "plugins/lbtwist-example/lbtwist_example/plugin.py"


def _registry() -> Registry:
    spec = importlib.util.spec_from_file_location("lbtwist_example_checkout_plugin", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reg = Registry.default(entry_points=False)
    reg.register(mod, "example")
    reg.collect()
    return reg


class _List(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.body = b"[]"
        self.code = 200

    def render_GET(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


async def until(cond, what, deadline=30.0):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(real_reactor, 0.05, lambda: None)


def test_registered_and_checked_at_config_load():
    reg = _registry()
    assert "http_json" in reg.discovery
    text = "listeners: []\npools:\n  - name: web\n    discovery: [{plugin: http_json, options: {url: 'ftp://x'}}]\n"
    with pytest.raises(ConfigError, match="http_json: 'url' must be an http:// or https:// URL"):
        load_config(text, reg)
    ok = "listeners: []\npools:\n  - name: web\n    discovery: [{plugin: http_json, options: {url: 'http://127.0.0.1:1/'}}]\n"
    assert load_config(ok, reg).config.pools[0].discovery[0].plugin == "http_json"


@pytest_twisted.ensureDeferred
async def test_http_json_source_follows_the_endpoint_and_keeps_the_set_on_errors():
    reg = _registry()
    page = _List()
    page.body = b'[{"address": "127.0.0.1:9001"}, {"address": "127.0.0.1:9002", "weight": 2}]'
    site = server.Site(page)
    site.noisy = False
    port = real_reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/backends"
    src = reg.make_discovery("http_json", {"url": url, "interval": 0.1, "timeout": 5}, reactor=real_reactor)
    t = SourceTracker("p", src.kind, src.target, real_reactor, lambda: None, max_shrink=100.0)
    try:
        src.start(t)
        await until(lambda: t.accepted is not None, "the first fetch")
        assert {e.address: e.weight for e in t.accepted} == {"127.0.0.1:9001": 1.0, "127.0.0.1:9002": 2.0}
        page.code = 500
        await until(lambda: t.state == "failing", "the 500 seen")
        assert "HTTP 500" in t.last_error and len(t.accepted) == 2
        page.code, page.body = 200, b'["127.0.0.1:9003"]'
        await until(lambda: t.state == "ok", "recovery")
        assert {e.address for e in t.accepted} == {"127.0.0.1:9003"}
    finally:
        src.stop()
        await port.stopListening()
