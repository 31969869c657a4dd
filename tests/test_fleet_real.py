"""Two real lbtwist instances (twistd subprocesses) sharing a real
``redis-server`` started here on a free loopback port: a fleet-scope limit
holds across both, an ejection found through one instance stops traffic
through the other within 1 s, and Redis frozen (SIGSTOP) or killed changes
nothing a client sees but the limits (local ones, with no request waiting
on Redis longer than the 50 ms timeout plus a margin); fleet mode resumes
when Redis is back. Instance A runs ``workers: 2`` (a master and two worker
processes, each worker with its own fleet limiter; the master's detector
shares ejections and its merged /metrics carries the workers' rate
decisions), B one process. Every load loop is bounded in count and time."""
from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from support.procs import Proc, free_port, twistd_cmd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server Debian package (make system-deps)"),
]


#: The slowest request allowed while Redis is frozen or dead: the 50 ms
#: timeout plus a loaded 2-core box's scheduling margin. Without the timeout
#: a request would wait until SIGCONT (seconds) or a reconnect (over 3 s).
REDIS_WAIT_BOUND = 0.05 + 0.45


class Redis:
    def __init__(self, tmp_path, port: int) -> None:
        self.port = port
        self.tmp_path = tmp_path
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        self.p = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            wait(0.05)
        raise AssertionError("redis-server did not answer PING within 15 s")

    def signal(self, sig: int) -> None:
        assert self.p is not None
        self.p.send_signal(sig)

    def kill(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
            self.p.wait(10)


def wait(seconds: float) -> None:
    """Block ``seconds`` (a pause between polls, not a synchronisation)."""
    import select

    select.select([], [], [], seconds)


def get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def post_json(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def until(fn, timeout: float, step: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        wait(step)


CONFIG = """
workers: {workers}
listeners:
  - name: web
    bind: "tcp:{web}:interface=127.0.0.1"
    mode: http
    pool: app
    routes:
      - name: limited
        match: {{path_prefix: /limited}}
        pool: app
        rate_limit: {{rate: 20, burst: 20, key: client, scope: fleet}}
pools:
  - name: app
    algorithm: round_robin
    backends: [{backends}]
    health:
      passive: {{consecutive_5xx: 3, base_ejection_time: 60s, max_ejection_percent: 50}}
    retry_budget: null
admin:
  bind: "tcp:{admin}:interface=127.0.0.1"
fleet:
  redis: "tcp:127.0.0.1:{redis}"
  name: itest
  timeout: 50ms
  heartbeat: 250ms
  reconnect_max: 1s
"""


class Instance:
    def __init__(self, tmp_path, name: str, redis_port: int, backends: dict[str, int], workers: int) -> None:
        self.web, self.admin = free_port(), free_port()
        self.workers = workers
        cfg = tmp_path / f"{name}.yaml"
        addrs = ", ".join(f'{{address: "127.0.0.1:{p}", name: {n}}}' for n, p in backends.items())
        text = CONFIG.format(web=self.web, admin=self.admin, redis=redis_port, backends=addrs, workers=workers)
        cfg.write_text(textwrap.dedent(text).replace("    retry_budget: null\n", ""))
        self.proc = Proc(twistd_cmd(cfg), cwd=tmp_path)
        self.conn: http.client.HTTPConnection | None = None

    def ready(self) -> None:
        if self.workers == 1:
            self.proc.wait_for("listener web on", timeout=60)
        else:
            until(lambda: self._serving_workers() == self.workers, 60, what=f"{self.workers} workers serving")
        until(lambda: get_json(self.admin, "/api/fleet")["mode"] == "fleet", 30, what="fleet mode")

    def _serving_workers(self) -> int:
        try:
            return len(get_json(self.admin, "/api/workers")["workers"])
        except OSError:
            return 0

    def decisions(self, source: str, result: str | None = None) -> float:
        """lbtwist_fleet_rate_decisions_total of route web/limited from /metrics
        (with workers: the master's merge of its workers')."""
        total = 0.0
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if (line.startswith("lbtwist_fleet_rate_decisions_total{") and 'route="web/limited"' in line
                        and f'source="{source}"' in line and (result is None or f'result="{result}"' in line)):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def request(self, path: str, source: str = "127.0.0.1") -> tuple[int, float]:
        """One keep-alive request from client address ``source`` (a loopback
        address: the limiter's ``key: client``): (status, seconds)."""
        t0 = time.monotonic()
        if self.conn is not None and self.conn.source_address[0] != source:
            self.conn.close()
            self.conn = None
        for _ in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.web, timeout=10, source_address=(source, 0))
            try:
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                r.read()
                # with workers, a new connection each time: the kernel spreads them over the workers
                if r.getheader("connection", "").lower() == "close" or self.workers > 1:
                    self.conn.close()
                    self.conn = None
                return r.status, time.monotonic() - t0
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
        raise AssertionError(f"request {path} failed twice")

    def fleet(self) -> dict:
        return get_json(self.admin, "/api/fleet")

    def backend_state(self, name: str) -> dict:
        for b in get_json(self.admin, "/api/pools/app/backends?history=0")["backends"]:
            if b.get("name") == name:
                return b
        raise KeyError(name)

    def stop(self) -> str:
        if self.conn is not None:
            self.conn.close()
        self.proc.terminate(timeout=30)
        return self.proc.output()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    redis = Redis(tmp, free_port())
    redis.start()
    bports = {n: free_port() for n in ("b0", "b1", "b2")}
    backend = Proc([sys.executable, "-m", "lbtwist.drill.backend", "--median", "1ms", "--capacity", "64",
                    *[a for n, p in bports.items() for a in ("--backend", f"{n}:{p}")]], cwd=tmp)
    instances = []
    try:
        line = backend.wait_for("DRILL-READY", timeout=60)
        control = json.loads(line.split("DRILL-READY ", 1)[1])["control"]
        instances = [Instance(tmp, n, redis.port, bports, w) for n, w in (("a", 2), ("b", 1))]
        for inst in instances:
            inst.ready()
        yield redis, control, instances
    finally:
        for inst in instances:
            out = inst.stop()
            assert "Traceback" not in out, out
        backend.kill()
        redis.kill()


def hammer(instances, path: str, seconds: float, max_requests: int = 4000, source: str = "127.0.0.1"):
    """Alternate requests between the instances for ``seconds`` (bounded by
    count), all from client address ``source``."""
    statuses: dict[int, int] = {}
    worst = 0.0
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds and n < max_requests:
        status, took = instances[n % len(instances)].request(path, source)
        statuses[status] = statuses.get(status, 0) + 1
        worst = max(worst, took)
        n += 1
    return statuses, time.monotonic() - t0, worst


def test_a_20_per_second_client_limit_holds_across_both_instances(fleet):
    redis, control, (a, b) = fleet
    statuses, elapsed, _ = hammer((a, b), "/limited/x", 3.0)
    admitted = statuses.get(200, 0)
    # one bucket for the fleet: burst 20 + 20/s (+ at most 20 x lease_time 0.25 s of lease skew);
    # two local buckets would admit twice that
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.get(429, 0) > 0
    assert 0.7 * (20 + 20 * elapsed) <= admitted <= 20 + 20 * (elapsed + 0.25) + 3, (
        admitted, elapsed, statuses, {(i.workers, src): i.decisions(src) for i in (a, b) for src in ("fleet", "lease", "local")})
    print(f"fleet limit 20/s burst 20 over two instances: {admitted} of {sum(statuses.values())} admitted "
          f"in {elapsed:.2f}s (one bucket: {20 + 20 * elapsed:.0f}; two local buckets: {2 * (20 + 20 * elapsed):.0f})")
    for inst in (a, b):
        assert inst.decisions("local") == 0
    # every request was decided once, by a worker of A or by B
    assert a.decisions("lease") + a.decisions("fleet") + b.decisions("lease") + b.decisions("fleet") >= sum(statuses.values())
    assert a.fleet()["rate_limits_decided_by"].startswith("workers")
    st = b.fleet()["rate_limits"]["web/limited"]
    # a hot key: far fewer Redis calls than requests
    assert st["redis_calls_total"] < sum(statuses.values()) / 2


def test_an_ejection_found_through_a_stops_traffic_through_b_within_1s(fleet):
    redis, control, (a, b) = fleet
    post_json(control, "/faults", {"targets": ["b1"], "set": {"error_rate": 1.0, "error_status": 500}})
    try:
        found = None
        for _ in range(60):  # through A only, until A ejects b1 (3 consecutive 5xx of round robin)
            a.request("/")
            if a.backend_state("b1")["state"] == "ejected":
                found = time.monotonic()
                break
        assert found is not None, a.backend_state("b1")
        until(lambda: b.backend_state("b1")["state"] == "ejected", 1.0, step=0.02, what="b1 ejected at B")
        lag = time.monotonic() - found
        print(f"ejection seen through A, applied at B within {lag * 1000:.0f} ms (poll included)")
        assert lag <= 1.0 + 0.1  # the poll itself takes a little
        before = served(control, "b1")
        statuses = [b.request("/")[0] for _ in range(30)]
        assert statuses == [200] * 30  # nothing from b1 reached B's clients
        assert served(control, "b1") == before  # B sent b1 nothing
        assert "shared by" in b.backend_state("b1")["last_change"]
        ej = b.fleet()["ejections"]
        assert ej["applied_total"] >= 1 and ej["published_total"] == 0  # B re-published nothing
        assert a.fleet()["ejections"]["echoes_ignored_total"] >= 1
    finally:
        post_json(control, "/reset", {"targets": ["b1"]})


def served(control: int, name: str) -> dict:
    for snap in get_json(control, "/state")["backends"]:
        if snap["name"] == name:
            return snap["counters"]
    raise KeyError(name)


def _metric(inst, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{inst.admin}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_redis_frozen_then_killed_changes_only_the_limits_and_fleet_mode_resumes(fleet):
    redis, control, (a, b) = fleet
    assert _metric(a, "lbtwist_fleet_redis_up") == 1.0
    redis.signal(signal.SIGSTOP)
    try:
        # the rate-limited route: its first requests find Redis frozen mid-call
        statuses, elapsed, worst = hammer((a, b), "/limited/z", 2.0, max_requests=1500)
        assert set(statuses) <= {200, 429} and statuses.get(200), statuses  # no error, no hang
        frozen_worst = worst
        # no request waits on Redis more than the 50 ms timeout (plus a loaded box's margin)
        assert worst < REDIS_WAIT_BOUND, worst
        for inst in (a, b):
            st = until(lambda i=inst: i.fleet()["mode"] == "local" and i.fleet(), 5, what="local mode")
            assert st["redis_up"] is False and st["fallbacks_total"] >= 1
            assert _metric(inst, "lbtwist_fleet_redis_up") == 0.0
        # the limits fall back to each instance's local bucket: up to twice the fleet's. A client
        # the frozen phase has not touched (its own key): both local buckets start full, so it
        # gets more than one bucket's burst + rate whatever the elapsed time (the frozen phase
        # emptied 127.0.0.1's buckets; two empty buckets beat one full one only after 1.4 s)
        statuses, elapsed, worst = hammer((a, b), "/limited/y", 1.5, max_requests=1500, source="127.0.0.2")
        assert worst < REDIS_WAIT_BOUND, worst
        assert set(statuses) <= {200, 429}
        assert statuses.get(200, 0) > 20 + 20 * elapsed + 0.25 * 20 + 3  # more than one bucket would allow
        assert a.decisions("local", "allowed") > 0 and b.decisions("local", "allowed") > 0
    finally:
        redis.signal(signal.SIGCONT)
    for inst in (a, b):
        until(lambda i=inst: i.fleet()["mode"] == "fleet", 10, what="fleet mode after SIGCONT")
    # killed and restarted on the same port
    redis.kill()
    statuses, elapsed, worst = hammer((a, b), "/limited/k", 1.0, max_requests=1000)
    assert set(statuses) <= {200, 429} and worst < REDIS_WAIT_BOUND, (statuses, worst)
    print(f"worst request while Redis was frozen: {frozen_worst * 1000:.1f} ms; killed: {worst * 1000:.1f} ms")
    for inst in (a, b):
        until(lambda i=inst: i.fleet()["mode"] == "local", 5, what="local mode after kill")
    redis.start()
    for inst in (a, b):
        st = until(lambda i=inst: i.fleet()["mode"] == "fleet" and i.fleet(), 10, what="fleet mode after restart")
        assert st["resumes_total"] >= 2
    # logged once each way per outage, not per failed call or attempt (B: one process, one link)
    st = b.fleet()
    out = b.proc.drain_output(1.0)
    assert out.count("unusable (") == st["fallbacks_total"] == 2, out
    assert out.count("fleet mode resumed") == st["resumes_total"] == 2
