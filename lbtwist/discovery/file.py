"""Backends from a file: a YAML or JSON list in the shape of ``backends``
(``[{address: "10.0.0.1:80", weight: 2, name: a}, "10.0.0.2:80", ...]``).

The file is checked every ``poll_interval`` (its inode, size and mtime; a
change re-reads it) and, where ``twisted.internet.inotify`` works, its
directory is watched too so a write or an atomic rename is seen at once.
A missing, empty (a truncation caught mid-write) or broken file is a failure:
the tracker keeps the last known set.
"""
from __future__ import annotations

import os
from typing import Any

import yaml
from twisted.internet import task
from twisted.logger import Logger

from lbtwist.discovery.base import Endpoint, Tracker

log = Logger(namespace="lbtwist.discovery.file")


def parse_backends(text: str, where: str) -> list[Endpoint]:
    """Endpoints from the file's text; ValueError naming the problem."""
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not YAML/JSON: {str(e).splitlines()[0]}") from None
    if data is None:
        raise ValueError(f"{where}: empty")
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of backends, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            item = {"address": item}
        if not isinstance(item, dict) or not isinstance(item.get("address"), str):
            raise ValueError(f"{where}[{i}]: expected an address string or {{address: host:port, weight, name}}")
        unknown = set(item) - {"address", "weight", "name"}
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown key {sorted(unknown)[0]!r} (address, weight, name)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"{where}[{i}]: weight must be a number, not {weight!r}")
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{where}[{i}]: name must be a string, not {name!r}")
        try:
            out.append(Endpoint(address=item["address"], weight=float(weight), name=name))
        except ValueError as e:
            raise ValueError(f"{where}[{i}]: {e}") from None
    return out


class FileSource:
    kind = "file"

    def __init__(self, path: str, reactor: Any, *, poll_interval: float = 1.0, inotify: bool = True) -> None:
        self.path = os.path.abspath(path)
        self.target = path
        self.reactor = reactor
        self.poll_interval = poll_interval
        self._use_inotify = inotify
        self._tracker: Tracker | None = None
        self._loop: task.LoopingCall | None = None
        self._notifier: Any = None
        self._seen: tuple | None = None
        self._pending: Any = None

    def start(self, tracker: Tracker) -> None:
        self._tracker = tracker
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)
        if self._use_inotify:
            self._watch()

    def _watch(self) -> None:
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            n = inotify.INotify(reactor=self.reactor)
            n.startReading()
            mask = (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_CREATE
                    | inotify.IN_DELETE | inotify.IN_MOVED_FROM | inotify.IN_MODIFY)
            n.watch(FilePath(os.path.dirname(self.path)), mask=mask, callbacks=[self._event])
            self._notifier = n
        except Exception as e:  # no inotify on this platform/reactor: polling alone
            log.info("discovery file {path}: no inotify ({e}); polling every {t:g}s",
                     path=self.path, e=e, t=self.poll_interval)
            self._notifier = None

    def _event(self, watch: Any, path: Any, mask: int) -> None:
        if os.fsdecode(path.basename()) != os.path.basename(self.path):  # inotify hands bytes paths
            return
        # several events per write: check once, on the next turn
        if self._pending is None or not self._pending.active():
            self._pending = self.reactor.callLater(0, self.check)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def check(self) -> None:
        """Re-read when the file changed (or after a failure, until it reads well)."""
        assert self._tracker is not None
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._seen = None
            self._tracker.failed(f"cannot read {self.path}: {e.strerror}")
            return
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig == self._seen:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            endpoints = parse_backends(text, self.path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self._seen = None  # retried at the next poll
            self._tracker.failed(str(e))
            return
        self._seen = sig
        self._tracker.update(endpoints)
