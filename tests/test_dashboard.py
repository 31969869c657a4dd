"""The dashboard in a real browser against a real balancer: ``twistd lbtwist``
in a subprocess (TCP relay, demo echo backends, admin API), headless Debian
Chromium driven over the DevTools protocol. Checks what the page shows, clicks
a Drain button like an operator would, and takes the screenshot for docs/
(``LBTWIST_SCREENSHOT=1`` writes docs/dashboard.png).

Needs Debian's ``chromium`` package (``apt-get install -y chromium``).
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import textwrap
import urllib.request
from pathlib import Path

import pytest

from support.procs import REPO, Proc, free_port, twistd_cmd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DEADLINE = 20.0

pytestmark = pytest.mark.integration


class WebSocket:
    """Just enough RFC 6455 for a DevTools session: masked text frames out,
    (possibly fragmented) text frames in. Every read has a deadline."""

    def __init__(self, url: str, timeout: float = DEADLINE) -> None:
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        assert m, url
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        assert host in ("127.0.0.1", "localhost"), url
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        head = bytes([0x81])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by peer")
            if opcode in (0x9, 0xA):  # ping/pong: not sent by DevTools in practice
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


class DevTools:
    """A DevTools session on one page target."""

    def __init__(self, ws_url: str) -> None:
        self.ws = WebSocket(ws_url)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:  # skip events until our answer
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, condition_js: str, what: str, timeout_ms: int = 15000):
        """Let the page poll ``condition_js`` (every 100 ms, bounded); return its value."""
        value = self.evaluate(textwrap.dedent(f"""
            new Promise((resolve) => {{
              const t0 = Date.now();
              (function check() {{
                let v = null;
                try {{ v = ({condition_js}); }} catch (e) {{ v = null; }}
                if (v || Date.now() - t0 > {timeout_ms}) resolve(v || null); else setTimeout(check, 100);
              }})();
            }})
        """))
        assert value, f"dashboard never showed {what}"
        return value

    def open(self, url: str) -> None:
        """Navigate and wait for the load event, so later scripts run in the page."""
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        while json.loads(self.ws.recv()).get("method") != "Page.loadEventFired":
            pass

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (not element.click())."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            f" e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
            f" return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
        )
        assert box, f"nothing matches {selector}"
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        self.ws.close()


def tcp_round_trip(port: int, payload: bytes = b"hello\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def api(port: int, path: str, method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def port_of(line: str) -> int:
    return int(re.search(r"port=(\d+)", line).group(1))


@pytest.fixture
def balancer(tmp_path):
    yield from _balancer(tmp_path, workers=2)


@pytest.fixture
def single_balancer(tmp_path):
    yield from _balancer(tmp_path, workers=1)


def _balancer(tmp_path, workers: int):
    e1, e2, e3, dead = free_port(), free_port(), free_port(), free_port()
    cfg = tmp_path / "lbtwist.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        workers: {workers}
        listeners:
          - name: echo
            bind: "tcp:0:interface=127.0.0.1"
            mode: tcp
            pool: echo
        pools:
          - name: echo
            algorithm: round_robin
            slow_start: 60s
            health:
              active: {{kind: tcp, interval: 500ms, timeout: 200ms, unhealthy_threshold: 2, assume_healthy: true}}
            backends:
              - address: "127.0.0.1:{e1}"
              - address: "127.0.0.1:{e2}"
              - address: "127.0.0.1:{e3}"
              - address: "127.0.0.1:{dead}"
        admin:
          bind: "tcp:0:interface=127.0.0.1"
        demo:
          tcp_echo: ["tcp:{e1}:interface=127.0.0.1", "tcp:{e2}:interface=127.0.0.1", "tcp:{e3}:interface=127.0.0.1"]
        """))
    proc = Proc(twistd_cmd(cfg), cwd=tmp_path)
    try:
        admin = port_of(proc.wait_for("listener admin on", DEADLINE))
        relay = port_of(proc.wait_for("listener echo on", DEADLINE))
        yield proc, admin, relay, (e1, e2, e3, dead)
    finally:
        rc = proc.terminate(DEADLINE)
        assert rc == 0 and "Server Shut Down." in proc.output(), proc.output()
        assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is required for the dashboard test: apt-get install -y chromium")

    def launch(url: str) -> DevTools:
        profile = tmp_path / "chromium-profile"
        argv = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--window-size=1500,900", "--hide-scrollbars", "about:blank",
        ]
        proc = Proc(argv)
        procs.append(proc)
        line = proc.wait_for("DevTools listening on ws://", DEADLINE)
        devport = int(re.search(r"ws://127\.0\.0\.1:(\d+)/", line).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{devport}/json/list", timeout=5) as r:
            targets = json.loads(r.read())
        page = next(t for t in targets if t["type"] == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        sessions.append(dt)
        dt.open(url)
        return dt

    procs: list[Proc] = []
    sessions: list[DevTools] = []
    yield launch
    for s in sessions:
        s.close()
    for p in procs:
        p.terminate(5)  # SIGTERM first (chromium stops its helpers), SIGKILL after 5 s


def row_state(page: DevTools, address: str, states: tuple[str, ...], what: str) -> str:
    return page.wait_for(
        f"(() => {{ const r = document.querySelector('tr[data-backend=\"{address}\"]');"
        f" return r && {json.dumps(list(states))}.includes(r.dataset.state) ? r.dataset.state : null; }})()",
        what,
    )


def test_dashboard_shows_live_state_and_drains_on_click(balancer, browser, tmp_path):
    proc, admin, relay, (e1, e2, e3, dead) = balancer
    # real traffic through the relay; connects to the dead backend fail over to live ones
    for _ in range(12):
        assert tcp_round_trip(relay) == b"hello\n"
    page = browser(f"http://127.0.0.1:{admin}/")

    # pools, backends and their states are on the page, refreshed without reloading
    page.wait_for("document.body.dataset.refreshes >= 2", "two refreshes")
    rows = page.wait_for(
        "(() => { const r = [...document.querySelectorAll('tr[data-backend]')];"
        " return r.length === 4 ? r.map(x => x.dataset.backend) : null; })()",
        "four backend rows",
    )
    assert sorted(rows) == sorted(f"127.0.0.1:{p}" for p in (e1, e2, e3, dead))
    assert page.evaluate("document.querySelector('.pool[data-pool=\"echo\"] h2').textContent") == "echo"
    assert page.evaluate("document.getElementById('status').dataset.status") == "live"
    # the active probes (and the relay's failed connects) take the dead backend out
    row_state(page, f"127.0.0.1:{dead}", ("unhealthy", "ejected"), "the dead backend out of rotation")
    for p in (e1, e2, e3):
        row_state(page, f"127.0.0.1:{p}", ("healthy",), f"backend {p} healthy")
    # the connections appear in the live figures (window of complete seconds) and charts
    page.wait_for(
        f"[...document.querySelectorAll('tr[data-backend]')].filter(r => r.dataset.backend !== '127.0.0.1:{dead}')"
        ".every(r => r.cells[4].textContent !== '0.00')",
        "a non-zero request rate on every live backend",
    )
    points = page.evaluate("[...document.querySelectorAll('tr[data-backend] svg.spark')].map(s => s.dataset.points)")
    assert points and all(int(p) >= 59 for p in points[::2])  # req/s series: a point per second
    assert page.evaluate("document.querySelector('tr[data-listener=\"echo\"]').cells[1].textContent") == "tcp"

    # the workers row: one line per worker process, as /api/workers lists them, counting their traffic
    pids = sorted(str(w["pid"]) for w in api(admin, "/api/workers")["workers"])
    assert len(pids) == 2
    shown = page.wait_for(
        "(() => { const r = [...document.querySelectorAll('#workers tr[data-pid]')];"
        " return !document.getElementById('workers-section').hidden && r.length === 2 ? r.map(x => x.dataset.pid) : null; })()",
        "two worker rows",
    )
    assert sorted(shown) == pids
    page.wait_for("[...document.querySelectorAll('#workers tr[data-pid]')]"
                  ".reduce((n, r) => n + Number(r.cells[3].textContent), 0) >= 12", "the workers' request counts")
    assert page.evaluate("document.querySelector('#workers tr[data-pid]').cells[7].textContent").endswith("MiB")
    assert page.evaluate("document.getElementById('workers-summary').textContent").startswith("2 processes")

    # an operator clicks Drain on a backend: the page and the balancer agree
    target = f"127.0.0.1:{e1}"
    page.click(f'tr[data-backend="{target}"] button[data-action="drain"]')
    row_state(page, target, ("draining",), "the clicked backend as draining")
    assert page.evaluate(f"document.querySelector('tr[data-backend=\"{target}\"] button[data-action]').textContent") == "Undrain"
    state = api(admin, f"/api/pools/echo/backends/{target}?history=0")
    assert state["draining"] is True and state["in_rotation"] is False
    before = state["total"]
    for _ in range(4):  # the relay really stops sending it new connections
        assert tcp_round_trip(relay) == b"hello\n"
    assert api(admin, f"/api/pools/echo/backends/{target}?history=0")["total"] == before

    # Undrain: it rejoins through slow start, shown with its progress
    page.click(f'tr[data-backend="{target}"] button[data-action="undrain"]')
    row_state(page, target, ("slow_start",), "the undrained backend in slow start")
    width = page.wait_for(f"document.querySelector('tr[data-backend=\"{target}\"] .bar > span').style.width",
                          "a slow-start progress bar")
    assert width.endswith("%") and 0 < float(width[:-1]) < 100
    assert api(admin, f"/api/pools/echo/backends/{target}?history=0")["slow_start"]["active"] is True

    screenshot_run = bool(os.environ.get("LBTWIST_SCREENSHOT"))
    if screenshot_run:  # a longer, livelier run for the picture in docs/
        api(admin, f"/api/pools/echo/backends/127.0.0.1:{e2}/drain", method="POST")
        for i in range(12):  # paced by the page's own refreshes: about 40 connections a second
            for _ in range(40):
                tcp_round_trip(relay)
            n = page.evaluate("Number(document.body.dataset.refreshes)")
            page.wait_for(f"Number(document.body.dataset.refreshes) > {n}", "the next refresh")
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    (tmp_path / "dashboard.png").write_bytes(shot)
    if screenshot_run:
        (REPO / "docs" / "dashboard.png").write_bytes(shot)


def test_dashboard_has_no_workers_row_for_one_process(single_balancer, browser):
    proc, admin, relay, _ = single_balancer
    assert api(admin, "/api/workers")["workers"] == []
    page = browser(f"http://127.0.0.1:{admin}/")
    page.wait_for("document.body.dataset.refreshes >= 2", "two refreshes")
    assert page.evaluate("document.getElementById('workers-section').hidden") is True
    assert page.evaluate("document.querySelectorAll('#workers tr[data-pid]').length") == 0
