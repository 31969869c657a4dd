"""Backpressure end to end: a fast sender pushes 200 MB through the relay (a
real ``python -m lbtwist.l4`` process) to a receiver that reads at ~25 MB/s.
Without flow control the relay would hold most of the difference in memory;
with it, the relay's RSS stays near its baseline and every byte arrives."""
from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import pytest
from support.procs import Proc

TOTAL = 200 * 1024 * 1024
CHUNK = 1 << 20
RATE = 25 * 1024 * 1024  # receiver's pace, bytes/s
RSS_BOUND = 40 * 1024 * 1024  # over the idle baseline
DEADLINE = 30.0


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def chunk(i: int) -> bytes:
    return random.Random(i).randbytes(CHUNK)


class SlowReceiver(threading.Thread):
    def __init__(self, lsock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.lsock = lsock
        self.count = 0
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.lsock.settimeout(DEADLINE)
            conn, _ = self.lsock.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            conn.settimeout(DEADLINE)
            pace = threading.Event()  # never set: wait() is the pacing delay
            t0 = time.monotonic()
            while True:
                data = conn.recv(64 * 1024)
                if not data:
                    break
                self.count += len(data)
                self.digest.update(data)
                ahead = self.count / RATE - (time.monotonic() - t0)
                if ahead > 0:
                    pace.wait(ahead)
            conn.close()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.done.set()


class Sender(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.digest = hashlib.sha256()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
            for i in range(TOTAL // CHUNK):
                data = chunk(i)
                self.digest.update(data)
                s.sendall(data)
                self.sent += len(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(DEADLINE)
            s.recv(1)  # the relay closes after the receiver's EOF
            s.close()
        except BaseException as e:
            self.error = e


@pytest.mark.slow
@pytest.mark.integration
def test_relay_memory_stays_bounded_with_a_slow_receiver():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    receiver = SlowReceiver(lsock)
    receiver.start()
    backend = f"127.0.0.1:{lsock.getsockname()[1]}"
    proc = Proc([__import__("sys").executable, "-m", "lbtwist.l4", "--backend", backend])
    try:
        line = proc.wait_for("LISTENING", timeout=15)
        port = int(line.split()[-1])
        baseline = rss(proc.p.pid)
        sender = Sender(port)
        t0 = time.monotonic()
        sender.start()
        peak = baseline
        tick = threading.Event()
        while not receiver.done.is_set():
            assert time.monotonic() - t0 < DEADLINE, "transfer did not finish in time"
            peak = max(peak, rss(proc.p.pid))
            tick.wait(0.05)
        sender.join(DEADLINE)
        elapsed = time.monotonic() - t0
        assert sender.error is None, sender.error
        assert receiver.error is None, receiver.error
        assert receiver.count == sender.sent == TOTAL
        assert receiver.digest.hexdigest() == sender.digest.hexdigest()
        # The receiver was the bottleneck (so the relay had to hold back the sender).
        assert elapsed > TOTAL / RATE * 0.9
        growth = peak - baseline
        print(f"relay RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
              f"growth {growth / 2**20:.1f} MiB, {TOTAL / 2**20 / elapsed:.1f} MiB/s")
        assert growth < RSS_BOUND
    finally:
        proc.terminate(5)
        lsock.close()
