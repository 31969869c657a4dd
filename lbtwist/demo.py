"""Demo backends started inside the balancer process, so a first ``make run``
serves at once without any other server to set up."""
from __future__ import annotations

import json
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import protocol
from twisted.web import resource, server

from lbtwist.listener import ListenerService


class DemoHTTP(resource.Resource):
    """Answers every path with a small JSON body naming the backend."""

    isLeaf = True

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.count = 0

    def render(self, request: Any) -> bytes:
        self.count += 1
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/healthz":
            return b'{"ok": true}\n'
        body = {
            "backend": self.label,
            "served": self.count,
            "method": request.method.decode("latin-1"),
            "path": request.uri.decode("latin-1"),
            "headers": {k.decode("latin-1"): v[0].decode("latin-1") for k, v in request.requestHeaders.getAllRawHeaders()},
        }
        return (json.dumps(body, indent=1) + "\n").encode()


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def demo_service(demo_cfg: Any, reactor: Any) -> MultiService:
    svc = MultiService()
    svc.setName("demo")
    for i, bind in enumerate(demo_cfg.http):
        site = server.Site(DemoHTTP(f"demo-http-{i + 1} ({bind})"))
        site.noisy = False
        ListenerService(f"demo-http-{i + 1}", bind, site, reactor).setServiceParent(svc)
    for i, bind in enumerate(demo_cfg.tcp_echo):
        f = protocol.Factory.forProtocol(Echo)
        f.noisy = False
        ListenerService(f"demo-echo-{i + 1}", bind, f, reactor).setServiceParent(svc)
    return svc
