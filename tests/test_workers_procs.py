"""A master with worker processes, for real: twistd on 127.0.0.1 with
``workers: 2`` (lbtwist.workers). Every wait is bounded by an event with a
generous deadline (a loaded 2-core box)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time

import pytest

from support.procs import Proc, free_port, twistd_cmd

DEADLINE = 60.0


def _config(tmp_path, web, echo, admin, demo_a, demo_b, echo_be, *, workers=2, extra_pool="", interval="1s"):
    text = f"""
workers: {workers}
listeners:
  - name: web
    bind: "tcp:{web}:interface=127.0.0.1"
    mode: http
    pool: web
  - name: echo
    bind: "tcp:{echo}:interface=127.0.0.1"
    mode: tcp
    pool: echo
pools:
  - name: web
    algorithm: round_robin
    health:
      active: {{kind: http, path: /healthz, interval: {interval}, timeout: 500ms, jitter: 0, stagger: 0s}}
    backends:
      - {{address: "127.0.0.1:{demo_a}", name: a}}
      - {{address: "127.0.0.1:{demo_b}", name: b}}
{extra_pool}
  - name: echo
    backends: [{{address: "127.0.0.1:{echo_be}"}}]
admin:
  bind: "tcp:{admin}:interface=127.0.0.1"
demo:
  http: ["tcp:{demo_a}:interface=127.0.0.1", "tcp:{demo_b}:interface=127.0.0.1"]
  tcp_echo: ["tcp:{echo_be}:interface=127.0.0.1"]
"""
    path = tmp_path / "lbtwist.yaml"
    path.write_text(text)
    return path


class Fleet:
    """A running master (+ workers) and what the tests ask it."""

    def __init__(self, tmp_path, **kw):
        self.web, self.echo, self.admin = free_port(), free_port(), free_port()
        self.demo_a, self.demo_b, self.echo_be = free_port(), free_port(), free_port()
        self.tmp_path = tmp_path
        self.kw = kw
        self.path = self.write()
        self.proc = Proc(twistd_cmd(self.path))
        self.n = kw.get("workers", 2)
        self.wait_workers(self.n)

    def write(self, **over):
        kw = dict(self.kw, **over)
        return _config(self.tmp_path, self.web, self.echo, self.admin, self.demo_a, self.demo_b, self.echo_be, **kw)

    def api(self, method, path, body=None):
        c = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=30)
        try:
            c.request(method, path, body=body)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def workers(self):
        status, body = self.api("GET", "/api/workers")
        assert status == 200, body
        return json.loads(body)["workers"]

    def wait_workers(self, n, exclude=(), timeout=DEADLINE):
        """Until ``n`` workers serve (none of them in ``exclude``); their list."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ws = self.workers()
                if len(ws) == n and not {w["pid"] for w in ws} & set(exclude):
                    return ws
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} workers not serving within {timeout}s:\n" + self.proc.output()[-4000:])
            self.proc._pump(0.1)

    def get(self, path="/"):
        """One request on a new connection (so the kernel picks a worker each time)."""
        c = http.client.HTTPConnection("127.0.0.1", self.web, timeout=30)
        try:
            c.request("GET", path, headers={"Connection": "close"})
            r = c.getresponse()
            body = r.read()
            return r.status, json.loads(body) if body.startswith(b"{") else body
        finally:
            c.close()

    def stop(self):
        return self.proc.terminate(timeout=60)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.proc.kill()
    for w in _maybe(f):
        _reap(w)


def _maybe(f):
    try:
        status, body = f.api("GET", "/api/workers")
        got = json.loads(body)
        spare = [got["spare"]["pid"]] if got.get("spare") else []
        return [w["pid"] for w in got["workers"]] + spare
    except Exception:
        return []


def _reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(pred, timeout, what, proc):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s:\n" + proc.output()[-4000:])
        proc._pump(0.05)


def test_two_workers_both_serve_and_counts_add_up(fleet):
    before = sum(w["requests"] for w in fleet.workers())
    for _ in range(40):
        status, _ = fleet.get()
        assert status == 200
    _wait(lambda: sum(w["requests"] for w in fleet.workers()) - before >= 40, 30, "40 requests counted", fleet.proc)
    ws = fleet.workers()
    assert sum(w["requests"] for w in ws) - before == 40
    assert all(w["requests"] > 0 for w in ws), ws  # 40 new connections: both got some
    assert len({w["pid"] for w in ws}) == 2 and all(w["rss_bytes"] > 0 for w in ws)
    # PSS and USS beside RSS: shared pages split, private pages only
    assert all(0 < w["uss_bytes"] <= w["pss_bytes"] <= w["rss_bytes"] for w in ws), ws
    assert all(w["pid"] != fleet.proc.p.pid for w in ws)
    # /metrics: the workers' request counters summed, RSS per worker
    status, text = fleet.api("GET", "/metrics")
    assert status == 200
    assert b'process_resident_memory_bytes{worker="1"}' in text
    assert b'process_resident_memory_bytes{worker="2"}' in text


def test_workers_without_tls_never_load_openssl(fleet):
    """No TLS in the config: a worker imports Twisted with pyOpenSSL hidden
    and nothing it runs imports it later (pyOpenSSL and cryptography are about
    17 MB of RSS); the master does (its probes' twisted.web)."""
    def loaded(pid):
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        return "cryptography" in maps  # its Rust .so (libssl itself comes with asyncio's ssl)

    for _ in range(10):
        assert fleet.get()[0] == 200
    assert fleet.api("POST", "/api/reload")[0] == 200  # a reload does not bring it in either
    ws = fleet.workers()
    assert len(ws) == 2 and not any(loaded(w["pid"]) for w in ws), [w["pid"] for w in ws]


def test_one_prober_for_the_fleet(fleet):
    """Only the master probes: the demo origins log every /healthz."""
    def probes():
        return sum(1 for l in fleet.proc.lines if "GET /healthz" in l)

    fleet.proc._pump(0.1)
    start, t0 = probes(), time.monotonic()
    deadline = t0 + 5.0
    while time.monotonic() < deadline:
        fleet.proc._pump(0.1)
    elapsed = time.monotonic() - t0
    n = probes() - start
    # two backends, interval 1s, one prober: about 2 per second (a worker probing too would double it)
    assert n <= 2 * (elapsed + 1.5), (n, elapsed)
    assert n >= 2, (n, elapsed)


def test_admin_drain_stops_new_work_on_every_worker(fleet):
    status, body = fleet.api("POST", f"/api/pools/web/backends/127.0.0.1:{fleet.demo_a}/drain")
    assert status == 200, body
    seen = {}
    for _ in range(40):
        status, r = fleet.get()
        assert status == 200
        seen[r["backend"].split(" ")[0]] = seen.get(r["backend"].split(" ")[0], 0) + 1
    assert set(seen) == {"demo-http-2"}, seen  # both workers: nothing to the drained one
    # and both workers served (their figures arrive with the next heartbeat)
    _wait(lambda: all(w["requests"] > 0 for w in fleet.workers()), 30, "both workers counted", fleet.proc)


def test_kill9_worker_replaced_and_others_serve(fleet):
    ws = fleet.workers()
    victim = ws[0]["pid"]
    other = ws[1]["pid"]
    failures = ok = 0
    killed_at = None
    t0 = time.monotonic()
    for i in range(300):  # ~100 req/s for ~3 s, bounded in count
        if i == 100:
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
        try:
            status, _ = fleet.get()
            ok += status == 200
            failures += status != 200
        except (OSError, http.client.HTTPException):
            failures += 1
        left = t0 + (i + 1) * 0.01 - time.monotonic()
        if left > 0:
            fleet.proc._pump(left)
    # one request at a time: at most the one the dead worker held fails
    assert failures <= 1, (failures, ok)
    line = fleet.proc.wait_for("exited: killed by signal 9", timeout=30)
    assert "replacing it" in line
    started = fleet.proc.wait_for("started, pid", timeout=30)  # the replacement
    ws = fleet.wait_workers(2, exclude=[victim])
    assert other in {w["pid"] for w in ws}  # the other worker was untouched
    assert not _alive(victim)


def _spare(fleet, exclude=(), timeout=DEADLINE):
    """The prepared spare's pid once /api/workers lists one (not in ``exclude``)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = fleet.api("GET", "/api/workers")
        spare = json.loads(body).get("spare")
        if spare and spare["prepared"] and spare["pid"] not in exclude:
            return spare["pid"]
        if time.monotonic() > deadline:
            raise AssertionError(f"no prepared spare within {timeout}s:\n" + fleet.proc.output()[-4000:])
        fleet.proc._pump(0.1)


def test_spare_takes_a_killed_workers_slot_and_a_new_spare_follows(fleet):
    """A pre-started spare (imported, config loaded, every slot's sockets)
    replaces a killed worker: the replacement is the spare's process, it
    serves on the slot's socket, and a new spare is started after it."""
    spare = _spare(fleet)
    ws = fleet.workers()
    pids = {w["pid"] for w in ws}
    assert spare not in pids and _alive(spare)
    victim = ws[0]
    os.kill(victim["pid"], signal.SIGKILL)
    ws = fleet.wait_workers(2, exclude=[victim["pid"]])
    assert spare in {w["pid"] for w in ws}
    assert next(w for w in ws if w["pid"] == spare)["slot"] == victim["slot"]
    fleet.proc.wait_for(f"started, pid {spare} (the spare)", timeout=30)
    # the replacement serves new connections (the kernel spreads them over both slots)
    before = {w["pid"]: w["requests"] for w in ws}
    for _ in range(40):
        assert fleet.get()[0] == 200
    _wait(lambda: any(w["pid"] == spare and w["requests"] > before[spare] for w in fleet.workers()), 30,
          "the former spare served", fleet.proc)
    new = _spare(fleet, exclude=[spare])
    assert new not in {w["pid"] for w in fleet.workers()}
    # a reload drops the spare (it holds the old config) and starts a new one
    fleet.write(extra_pool="  - name: spare\n    backends: [{address: \"127.0.0.1:9\"}]")
    status, body = fleet.api("POST", "/api/reload")
    assert status == 200, body
    fleet.proc.wait_for("stopped (reload); a new one follows", timeout=30)
    _spare(fleet, exclude=[spare, new])
    _wait(lambda: not _alive(new), 30, "the old spare gone", fleet.proc)


def test_sigterm_exits_zero_with_no_worker_left(fleet):
    pids = [w["pid"] for w in fleet.workers()] + [_spare(fleet)]
    assert fleet.stop() == 0, fleet.proc.output()[-3000:]
    assert "every worker has exited" in fleet.proc.output()
    _wait(lambda: not any(_alive(p) for p in pids), 10, "workers gone", fleet.proc)


def test_sighup_bad_file_changes_nothing_good_file_reaches_workers(fleet):
    pids = sorted(w["pid"] for w in fleet.workers())
    fleet.path.write_text(fleet.path.read_text().replace("algorithm: round_robin", "algorithm: round_robbin"))
    os.kill(fleet.proc.p.pid, signal.SIGHUP)
    fleet.proc.wait_for("reload failed", timeout=30)
    assert sorted(w["pid"] for w in fleet.workers()) == pids
    assert fleet.get()[0] == 200
    # a good file: in place (same binds), the same workers apply it
    fleet.write(extra_pool="  - name: spare\n    backends: [{address: \"127.0.0.1:9\"}]")
    status, body = fleet.api("POST", "/api/reload")
    assert status == 200 and json.loads(body)["reloaded"] is True, body
    # the master and both workers applied it (the workers before the call returned)
    _wait(lambda: sum(1 for l in fleet.proc.lines if "configuration applied" in l) >= 3, 10,
          "three 'configuration applied'", fleet.proc)
    assert sorted(w["pid"] for w in fleet.workers()) == pids
    status, body = fleet.api("GET", "/api/pools")
    assert b"spare" in body


def test_reload_moving_a_listener_replaces_workers_one_at_a_time(fleet):
    old_pids = {w["pid"] for w in fleet.workers()}
    old_echo = fleet.echo
    fleet.echo = free_port()
    fleet.write()
    status, body = fleet.api("POST", "/api/reload")
    assert status == 200, body
    ws = fleet.wait_workers(2, exclude=old_pids)
    with socket.create_connection(("127.0.0.1", fleet.echo), timeout=30) as s:
        s.sendall(b"hi\n")
        assert s.recv(16) == b"hi\n"
    assert fleet.get()[0] == 200  # the web port never left
    _wait(lambda: not any(_alive(p) for p in old_pids), 40, "old workers gone", fleet.proc)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", old_echo), timeout=5).close()


def test_wedged_worker_killed_after_silent_heartbeat_and_replaced(fleet):
    ws = fleet.workers()
    wedged, other = ws[0]["pid"], ws[1]["pid"]
    os.kill(wedged, signal.SIGSTOP)  # alive, answers nothing
    try:
        t0 = time.monotonic()
        line = fleet.proc.wait_for("no heartbeat answer", timeout=30)
        assert f"killing it" in line
        assert time.monotonic() - t0 >= 4.0  # not before the 5 s of silence (minus output delay)
        fleet.proc.wait_for("exited: killed by signal 9", timeout=30)
        ws = fleet.wait_workers(2, exclude=[wedged])
        assert other in {w["pid"] for w in ws}
        assert fleet.get()[0] == 200
    finally:
        _reap(wedged)


class OneLineFleet(Fleet):
    """The same fleet from a config file that is ONE line of JSON (valid YAML)."""

    def write(self, **over):
        kw = dict(self.kw, **over)
        cfg = {
            "workers": kw.get("workers", 2),
            "listeners": [{"name": "web", "bind": f"tcp:{self.web}:interface=127.0.0.1", "mode": "http", "pool": "web"}],
            "pools": [{"name": "web", "algorithm": kw.get("algorithm", "round_robin"),
                       "backends": [{"address": f"127.0.0.1:{self.demo_a}", "name": "a"}]}],
            "admin": {"bind": f"tcp:{self.admin}:interface=127.0.0.1"},
            "demo": {"http": [f"tcp:{self.demo_a}:interface=127.0.0.1"]},
        }
        path = self.tmp_path / "lbtwist.json"
        text = json.dumps(cfg)
        assert "\n" not in text
        path.write_text(text)
        return path


def test_one_line_json_config_workers_serve_and_reload(tmp_path):
    """A one-line config is config TEXT in every worker (and in the master's
    reload), never a file name: before the fix every worker failed with
    'cannot read the config file: File name too long' and was restarted in a loop."""
    f = OneLineFleet(tmp_path)
    try:
        ws = f.wait_workers(2)
        for _ in range(10):
            assert f.get()[0] == 200
        f.write(algorithm="least_connections")
        status, body = f.api("POST", "/api/reload")
        assert status == 200 and json.loads(body)["reloaded"] is True, body
        assert sorted(w["pid"] for w in f.workers()) == sorted(w["pid"] for w in ws)
        assert f.get()[0] == 200
        assert not any("cannot read the config file" in l for l in f.proc.lines), f.proc.output()[-4000:]
    finally:
        f.proc.kill()
        for w in _maybe(f):
            _reap(w)
