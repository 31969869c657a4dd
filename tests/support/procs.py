"""Run a real ``twistd lbtwist`` (or any command) as a subprocess and wait for
what it prints, always with a deadline."""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 (free now; the race is small)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_env() -> dict:
    """Environment for subprocesses that should import the checkout's lbtwist."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO)
    return e


def twistd_cmd(config: str | os.PathLike) -> list[str]:
    return [str(BIN / "twistd"), "-n", "--pidfile=", "lbtwist", "--config", str(config)]


class Proc:
    """A subprocess whose merged output is read line by line with deadlines."""

    def __init__(self, argv: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None) -> None:
        self.argv = argv
        e = dict(os.environ)
        e.setdefault("PYTHONUNBUFFERED", "1")
        # the checkout's sources first, so tests exercise the code under test
        e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        if env:
            e.update(env)
        self.p = subprocess.Popen(
            argv, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.lines: list[str] = []
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.p.stdout, selectors.EVENT_READ)
        os.set_blocking(self.p.stdout.fileno(), False)

    def _pump(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False at EOF."""
        if not self._sel.select(timeout):
            return True
        chunk = self.p.stdout.read(65536)
        if not chunk:
            return False
        self._buf += chunk
        *done, self._buf = self._buf.split(b"\n")
        self.lines.extend(x.decode("utf-8", "replace") for x in done)
        return True

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        """Block until a line containing ``text`` appears; raise with the output if not."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if text in line:
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not seen within {timeout}s in output of {self.argv}:\n" + self.output())
            if not self._pump(min(left, 0.5)):
                if text in self._buf.decode("utf-8", "replace"):
                    return self._buf.decode("utf-8", "replace")
                self.p.wait(5)
                raise AssertionError(f"process exited ({self.p.returncode}) before {text!r}:\n" + self.output())

    def drain_output(self, seconds: float = 0.5) -> str:
        """Read what the process printed within ``seconds``; the output so far."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._pump(max(0.0, deadline - time.monotonic())):
            pass
        return self.output()

    def output(self) -> str:
        return "\n".join(self.lines) + ("\n" + self._buf.decode("utf-8", "replace") if self._buf else "")

    def finish(self, timeout: float = 15.0) -> int:
        """Wait for exit, collecting output; kill on timeout."""
        deadline = time.monotonic() + timeout
        while self.p.poll() is None and time.monotonic() < deadline:
            self._pump(0.2)
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        while self._pump(0):
            if not self._sel.select(0):
                break
        return self.p.returncode

    def terminate(self, timeout: float = 15.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        return self.finish(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
