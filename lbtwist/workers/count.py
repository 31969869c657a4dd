"""How many worker processes ``workers:`` asks for: the one parser the
validator and the runtime share."""
from __future__ import annotations

import os
from typing import Callable

#: Above this, ``workers:`` is refused (a typo like 400 would fork-bomb the box).
MAX_WORKERS = 256


def available_cpus() -> int:
    """CPUs this process may run on (taskset/cgroup cpusets), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(value: int | str, cpus: Callable[[], int] = available_cpus) -> int:
    """``auto`` -> the CPUs lbtwist may use; an int 1..MAX_WORKERS as is.
    ValueError names what was wrong."""
    if value == "auto":
        return min(MAX_WORKERS, cpus())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"workers must be 'auto' or a whole number, got {value!r}")
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"workers must be between 1 and {MAX_WORKERS} (or 'auto'), got {value}")
    return value
