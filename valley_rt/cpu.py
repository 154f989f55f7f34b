"""How many CPU threads the runtime uses when it is not told: the physical cores this process may run on.

Inference here is matmul-bound; two hyperthreads of one core share its vector units, so a pool with one
thread per logical CPU is no faster than one per physical core and wakes more threads per op.
`os.cpu_count()` counts logical CPUs, so the physical count comes from psutil when it is installed, else
from /proc/cpuinfo, scaled down to the share of logical CPUs the process's affinity mask allows.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


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


def one_cpu_per_core(sysfs: Path = Path("/sys/devices/system/cpu")) -> list[int]:
    """The logical CPUs this process may run on, one per physical core (the lowest-numbered sibling of
    each core, from Linux's sysfs topology); every allowed CPU where the topology cannot be read."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    picked, seen = [], set()
    for cpu in allowed:
        try:
            siblings = (sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
        except OSError:
            return allowed
        if siblings not in seen:
            seen.add(siblings)
            picked.append(cpu)
    return picked


# -- what the CPU's matrix units can do ------------------------------------------------------------------
def cpuinfo_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """`cpuinfo_flags`, less the AMX ones when Linux does not let this process use the tiles
    (`amx_permitted`): the kernels then run without them, so every choice made from these flags must too."""
    flags = cpuinfo_flags()
    if any(f.startswith("amx") for f in flags) and not amx_permitted():
        flags = frozenset(f for f in flags if not f.startswith("amx"))
    return flags


ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1022, 0x1023, 18, 158


@functools.cache
def amx_permitted() -> bool:
    """Whether this process may use AMX tiles. Linux (5.16+) gives a process the tiles' register state
    only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM), as ONNX Runtime's MLAS and oneDNN do before
    using AMX: a kernel without that support, or a sandbox (seccomp) refusing the request, leaves them
    on their AVX-512 kernels although /proc/cpuinfo lists the amx flags. Asking grants the tiles to the
    process, as those libraries would."""
    import ctypes
    import platform
    import sys

    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
        syscall.restype = ctypes.c_long
        mask = ctypes.c_ulong(0)
        # variadic: every argument passed as a full 64-bit word, as the kernel reads them
        if syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_GET_XCOMP_PERM), ctypes.byref(mask)) != 0:
            return False  # a kernel that does not manage AMX state
        if mask.value & (1 << XFEATURE_XTILEDATA):
            return True
        return syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                       ctypes.c_ulong(XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        return False


ISA_CLASSES = ("amx", "avx512_bf16", "vnni", "avx2", "other")


def isa_class(flags: frozenset[str] | set[str] | None = None) -> str:
    """The widest matrix engine the CPU reports, as one word:
    amx          AMX tiles (bf16 and int8, e.g. Sapphire Rapids and later Xeons);
    avx512_bf16  AVX-512 bf16 dot products, and VNNI (e.g. Zen 4, Cooper Lake);
    vnni         int8 dot products only (AVX512-VNNI or AVX-VNNI: Cascade Lake, Ice Lake, Alder Lake);
    avx2         fp32 FMA only; other: none of these (e.g. ARM)."""
    flags = cpu_flags() if flags is None else flags
    if {"amx_bf16", "amx_int8"} & flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"
