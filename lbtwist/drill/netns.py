# -*- test-case-name: tests.test_drill_netns -*-
"""A throwaway network lab for the balancer-failover drill: network
namespaces joined by veth pairs to a bridge that lives in a namespace of its
own, so nothing is added to the host's root namespace (no link, no address,
no sysctl) and everything goes with ``ip netns del``.

Names are unique per run (``lbtw-<pid>-<random>-<role>``); a lab left behind
by a drill that was SIGKILLed (its pid gone) is swept by the next one.
Every step is a blocking ``ip`` call: the lab is built before the load starts
and torn down after it ends.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
from typing import Callable, Sequence

import attrs

#: Prefix of every namespace a lab creates.
PREFIX = "lbtw-"
_NAME = re.compile(r"^lbtw-(\d+)-[0-9a-f]+-[a-z0-9]+$")

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


class LabError(Exception):
    """The lab could not be built (the message names the step)."""


def run_ip(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """One ``ip`` command, bounded; raises LabError naming it on failure."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv)}: {e}") from None
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r


def missing_requirements(tools: Sequence[str] = ("ip", "keepalived")) -> list[str]:
    """What stops the drill on this machine: not root, a missing program, or
    ``ip netns`` not working. Empty when it can run."""
    out = []
    if os.geteuid() != 0:
        out.append("it must run as root (network namespaces, keepalived)")
    for t in tools:
        if shutil.which(t) is None:
            hint = " (Debian package iproute2)" if t == "ip" else f" (Debian package {t})" if t == "keepalived" else ""
            out.append(f"{t!r} is not installed{hint}")
    if not out:
        try:
            subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            out.append(f"'ip netns' does not work here: {e}")
    return out


def existing() -> list[str]:
    """Names of the network namespaces on this machine."""
    r = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, timeout=10)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    try:
        return [n["name"] for n in json.loads(r.stdout)]
    except (ValueError, KeyError, TypeError):
        return []


def sweep_stale(run: Runner = run_ip) -> list[str]:
    """Delete labs whose drill process is gone (SIGKILLed before its
    teardown). Returns the namespaces deleted."""
    gone = []
    for name in existing():
        m = _NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            try:
                run(["ip", "netns", "del", name])
                gone.append(name)
            except LabError:
                pass
    return gone


@attrs.define
class Lab:
    """Namespaces ``roles`` on one L2 segment ``subnet``: role ``i`` gets
    host address ``first + i``; the bridge namespace holds the bridge only.
    ``setup`` builds it (tearing down what it made if a step fails),
    ``teardown`` removes it (idempotent, never raises)."""

    roles: tuple[str, ...]
    subnet: str = "10.77.0.0/24"
    first: int = 11
    run: Runner = run_ip
    tag: str = attrs.field(factory=lambda: f"{os.getpid()}-{secrets.token_hex(3)}")
    created: list[str] = attrs.Factory(list)
    addresses: dict[str, str] = attrs.Factory(dict)

    def ns(self, role: str) -> str:
        return f"{PREFIX}{self.tag}-{role}"

    @property
    def bridge_ns(self) -> str:
        return self.ns("br")

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def address(self, role: str) -> str:
        return self.addresses[role]

    def host(self, n: int) -> str:
        """The ``n``-th address of the subnet (a VIP, say)."""
        return str(ipaddress.ip_network(self.subnet)[n])

    def setup(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        if not net.is_private:
            raise LabError(f"lab subnet {self.subnet} is not a private range")
        br = self.bridge_ns
        self._add_ns(br)
        self.run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        self.run(["ip", "-n", br, "link", "set", "br0", "up"])
        for i, role in enumerate(self.roles):
            ns = self.ns(role)
            self._add_ns(ns)
            port = f"p{i}"
            # both ends are made in the bridge namespace; one moves to the node
            self.run(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            self.run(["ip", "-n", br, "link", "set", port, "master", "br0", "up"])
            addr = str(net[self.first + i])
            self.run(["ip", "-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0"])
            self.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self.addresses[role] = addr

    def _add_ns(self, name: str) -> None:
        self.run(["ip", "netns", "add", name])
        self.created.append(name)
        self.run(["ip", "-n", name, "link", "set", "lo", "up"])

    def exec_argv(self, role: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def teardown(self) -> list[str]:
        """Delete every namespace this lab made (the veths and the bridge go
        with them); returns the problems met, which it does not raise."""
        problems = []
        while self.created:
            name = self.created.pop()
            try:
                self.run(["ip", "netns", "del", name])
            except LabError as e:
                problems.append(str(e))
        return problems

    def leftovers(self) -> list[str]:
        """This lab's namespaces still present on the machine."""
        mine = f"{PREFIX}{self.tag}-"
        return [n for n in existing() if n.startswith(mine)]


def holder(lab: Lab, roles: Sequence[str], vip: str) -> list[str]:
    """The roles whose eth0 carries ``vip`` right now (blocking; for the
    drill's final checks, the live poll uses L{vip_argv})."""
    out = []
    for role in roles:
        r = subprocess.run(vip_argv(lab, role), capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and has_address(r.stdout, vip):
            out.append(role)
    return out


def vip_argv(lab: Lab, role: str) -> list[str]:
    return ["ip", "-n", lab.ns(role), "-j", "-4", "addr", "show", "dev", "eth0"]


def has_address(ip_json: str, address: str) -> bool:
    """Does ``ip -j addr show`` output list ``address``?"""
    try:
        for link in json.loads(ip_json or "[]"):
            for a in link.get("addr_info", []):
                if a.get("local") == address:
                    return True
    except (ValueError, AttributeError, TypeError):
        return False
    return False
