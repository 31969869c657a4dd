"""The HTTP/2 limits of a listener (``listeners[].http.h2``): what is a valid
value (the config validator and the runtime share L{problems}), and the
SETTINGS lbtwist announces from them."""
from __future__ import annotations

from typing import Any, Iterator

from h2.settings import SettingCodes

#: RFC 9113 6.5.2 / 6.9.1 bounds.
MAX_WINDOW = (1 << 31) - 1
MIN_WINDOW = 65535
#: Below this a browser's request headers do not fit.
MIN_HEADER_LIST = 4096


def problems(cfg: Any) -> Iterator[tuple[str, str]]:
    """(key, message) for each bad value of an L{Http2Config}."""
    if not 1 <= cfg.max_concurrent_streams <= MAX_WINDOW:
        yield "max_concurrent_streams", f"must be 1 to {MAX_WINDOW} (got {cfg.max_concurrent_streams})"
    if not MIN_HEADER_LIST <= cfg.max_header_list_size <= MAX_WINDOW:
        yield "max_header_list_size", f"must be {MIN_HEADER_LIST} to {MAX_WINDOW} bytes (got {cfg.max_header_list_size})"
    for key in ("initial_window_size", "connection_window_size"):
        v = getattr(cfg, key)
        if not MIN_WINDOW <= v <= MAX_WINDOW:
            yield key, f"must be {MIN_WINDOW} to {MAX_WINDOW} bytes (got {v})"
    for key in ("max_resets", "max_control_frames"):
        v = getattr(cfg, key)
        if v < 1:
            yield key, f"must be at least 1 (got {v})"
    for key in ("resets_per_second", "control_frames_per_second"):
        v = getattr(cfg, key)
        if not v > 0:
            yield key, f"must be above 0 (got {v})"
    if cfg.max_age is not None and not cfg.max_age > 0:
        yield "max_age", f"must be above 0 (got {cfg.max_age})"


def check(cfg: Any) -> None:
    """ValueError naming the first bad value."""
    for key, msg in problems(cfg):
        raise ValueError(f"http.h2.{key}: {msg}")


def local_settings(cfg: Any) -> dict[int, int]:
    """The SETTINGS frame lbtwist opens a client connection with."""
    return {
        SettingCodes.MAX_CONCURRENT_STREAMS: cfg.max_concurrent_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
        SettingCodes.INITIAL_WINDOW_SIZE: cfg.initial_window_size,
        SettingCodes.ENABLE_PUSH: 0,
    }
