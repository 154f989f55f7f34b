"""How many CPU threads the runtime uses when it is not told: the physical cores this process may run on.

Inference here is matmul-bound; two hyperthreads of one core share its vector units, so a pool with one
thread per logical CPU is no faster than one per physical core and wakes more threads per op.
`os.cpu_count()` counts logical CPUs, so the physical count comes from psutil when it is installed, else
from /proc/cpuinfo, scaled down to the share of logical CPUs the process's affinity mask allows.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def default_threads() -> int:
    """Physical cores available to this process (at least 1)."""
    logical = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    physical = _physical_cores() or logical
    return max(1, round(physical * allowed / logical))


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        pass
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    cores, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or None
