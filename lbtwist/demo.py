"""Demo backends started inside the balancer process, so a first ``make run``
serves at once without any other server to set up."""
from __future__ import annotations

import json
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.web import resource, server

from lbtwist.listener import ListenerService

log = Logger(namespace="lbtwist.demo")


class DemoHTTP(resource.Resource):
    """Answers every path with a small JSON body naming the backend.

    Query parameters make it a toy for trying lbtwist's resilience:
    ``?delay=1.5`` answers after that many seconds (at most 60) and
    ``?status=503`` answers with that status."""

    isLeaf = True

    def __init__(self, label: str, reactor: Any) -> None:
        super().__init__()
        self.label = label
        self.reactor = reactor
        self.count = 0

    def render(self, request: Any) -> Any:
        self.count += 1
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/healthz":
            return b'{"ok": true}\n'
        args = request.args
        try:
            status = int(args.get(b"status", [b"200"])[0])
            delay = min(60.0, max(0.0, float(args.get(b"delay", [b"0"])[0])))
        except ValueError:
            request.setResponseCode(400)
            return b'{"error": "status and delay must be numbers"}\n'
        request.setResponseCode(status)
        body = self._body(request)
        if not delay:
            return body
        log.info("demo backend {label}: delaying response {delay}s", label=self.label, delay=delay)
        call = self.reactor.callLater(delay, self._finish, request, body)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return server.NOT_DONE_YET

    def _finish(self, request: Any, body: bytes) -> None:
        request.write(body)
        request.finish()

    def _body(self, request: Any) -> bytes:
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
        site = server.Site(DemoHTTP(f"demo-http-{i + 1} ({bind})", reactor))
        site.noisy = False
        ListenerService(f"demo-http-{i + 1}", bind, site, reactor).setServiceParent(svc)
    for i, bind in enumerate(demo_cfg.tcp_echo):
        f = protocol.Factory.forProtocol(Echo)
        f.noisy = False
        ListenerService(f"demo-echo-{i + 1}", bind, f, reactor).setServiceParent(svc)
    return svc
