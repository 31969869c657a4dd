# -*- test-case-name: tests.test_fleet_settings -*-
"""The ``fleet:`` block: one parser for the validator and the runtime.

L{problems} yields ``(key, message)`` for everything wrong with a
L{lbtwist.config.model.FleetConfig}; L{FleetSettings.from_config} builds
the runtime's settings with the same functions and refuses what it
refuses. Nothing else parses a Redis address."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit

import attrs

#: Fleet names: they go into Redis keys and channel names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_PORT = 6379


@attrs.frozen
class RedisTarget:
    """Where Redis is: a TCP host/port or a unix socket path, with what a URL carried."""

    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = None
    db: int | None = None

    def describe(self) -> str:
        """For logs and the admin API: never the password."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}"


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_redis(text: str) -> RedisTarget:
    """``tcp:HOST:PORT`` | ``unix:PATH`` | ``redis://[USER:PASSWORD@]HOST[:PORT][/DB]``
    | ``rediss://...`` (TLS). Raises ValueError saying what is wrong."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/run/redis/redis.sock")
        return RedisTarget(path=path)
    if text.startswith("tcp:"):
        rest = text[4:]
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:6379")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return RedisTarget(host=host, port=_port(port, text))
    if text.startswith(("redis://", "rediss://")):
        u = urlsplit(text)
        if u.query or u.fragment:
            raise ValueError(f"{text!r}: query strings are not supported; use the fleet keys (db, tls, ...)")
        try:
            port = u.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{text!r}: the port is not a number from 1 to 65535") from None
        if not u.hostname:
            raise ValueError(f"{text!r}: no host")
        db = None
        p = u.path.strip("/")
        if p:
            if not p.isdigit():
                raise ValueError(f"{text!r}: the path must be a database number, e.g. /0")
            db = int(p)
        return RedisTarget(
            host=u.hostname, port=port, tls=u.scheme == "rediss",
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password is not None else None, db=db,
        )
    raise ValueError(f"{text!r} is not tcp:HOST:PORT, unix:PATH, redis://HOST:PORT or rediss://HOST:PORT")


def _read_secret(path: str) -> str:
    lines = Path(path).read_text().splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f"{path}: the file is empty (the first line is the password)")
    return secret


def problems(cfg: Any) -> Iterator[tuple[str, str]]:
    """``(key under fleet, message)`` for each thing wrong with ``cfg``."""
    try:
        target = parse_redis(cfg.redis)
    except ValueError as e:
        yield "redis", str(e)
        target = None
    if not NAME.match(cfg.name or ""):
        yield "name", f"{cfg.name!r} must be 1-64 letters, digits, '_', '.' or '-' (it goes into Redis keys)"
    if cfg.password is not None and cfg.password_file is not None:
        yield "password_file", "set password or password_file, not both"
    if target is not None and target.password is not None and (cfg.password is not None or cfg.password_file is not None):
        yield "redis", "the address carries a password and password/password_file is set too: keep one"
    if target is not None and target.db is not None and cfg.db != 0 and cfg.db != target.db:
        yield "db", f"{cfg.db} contradicts the database /{target.db} in the address"
    if cfg.password_file is not None:
        try:
            _read_secret(cfg.password_file)
        except (OSError, ValueError) as e:
            yield "password_file", f"cannot read the password: {e}"
    if cfg.db < 0:
        yield "db", "must be 0 or more"
    if cfg.tls is not None:
        if target is not None and target.path is not None:
            yield "tls", "TLS over a unix socket is not supported (use tcp: or rediss://)"
        if (cfg.tls.cert is None) != (cfg.tls.key is None):
            yield "tls.cert" if cfg.tls.cert is None else "tls.key", "cert and key go together (both or neither)"
        for key in ("ca", "cert", "key"):
            f = getattr(cfg.tls, key)
            if f is not None and not Path(f).is_file():
                yield f"tls.{key}", f"{f}: no such file"
    if cfg.timeout <= 0:
        yield "timeout", "must be above 0 (it bounds how long a request waits on Redis)"
    for key in ("connect_timeout", "heartbeat", "reconnect_max", "lease_time"):
        if getattr(cfg, key) <= 0:
            yield key, "must be above 0"
    if cfg.lease_max < 1:
        yield "lease_max", "must be at least 1 (1: one Redis call per request)"


@attrs.frozen
class FleetSettings:
    """The ``fleet:`` block resolved for the runtime (secrets read)."""

    target: RedisTarget
    name: str
    prefix: str
    username: str | None
    password: str | None
    db: int
    tls: bool
    ca: str | None
    cert: str | None
    key: str | None
    server_name: str | None
    timeout: float
    connect_timeout: float
    heartbeat: float
    reconnect_max: float
    lease_max: int
    lease_time: float
    share_ejections: bool

    @classmethod
    def from_config(cls, cfg: Any) -> "FleetSettings":
        bad = list(problems(cfg))
        if bad:
            raise ValueError("; ".join(f"fleet.{k}: {m}" for k, m in bad))
        target = parse_redis(cfg.redis)
        password = cfg.password if cfg.password is not None else target.password
        if cfg.password_file is not None:
            password = _read_secret(cfg.password_file)
        tls = cfg.tls
        return cls(
            target=target, name=cfg.name, prefix=key_prefix(cfg.name),
            username=cfg.username if cfg.username is not None else target.username,
            password=password, db=target.db if target.db is not None and cfg.db == 0 else cfg.db,
            tls=target.tls or tls is not None,
            ca=tls.ca if tls else None, cert=tls.cert if tls else None, key=tls.key if tls else None,
            server_name=(tls.server_name if tls else None) or target.host,
            timeout=cfg.timeout, connect_timeout=cfg.connect_timeout, heartbeat=cfg.heartbeat,
            reconnect_max=cfg.reconnect_max, lease_max=cfg.lease_max, lease_time=cfg.lease_time,
            share_ejections=cfg.share_ejections,
        )


def key_prefix(name: str) -> str:
    """Every Redis key and channel of fleet ``name`` starts with this."""
    return f"lbtwist:{name}:"
