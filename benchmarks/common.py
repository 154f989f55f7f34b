"""What every benchmark states about the machine it ran on (imported by the scripts beside it)."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

# CPU flags that decide which matrix kernels run (Linux /proc/cpuinfo names): AMX tiles (bf16, int8),
# AVX-512 bf16 dot products, VNNI int8 dot products (AVX-512 and VEX forms), fp16.
ISA_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_fp16",
             "avx512f", "avx2")


def cpu_flags() -> set[str]:
    """valley_rt.cpu's flags: /proc/cpuinfo's, less the AMX ones where this process may not use the tiles."""
    from valley_rt.cpu import cpu_flags as flags

    return set(flags())


def amx_denied() -> bool:
    """The CPU has AMX tiles but this process may not use them (benchmarks/no_amx.py, or the kernel)."""
    from valley_rt.cpu import amx_permitted, cpuinfo_flags

    return "amx_tile" in cpuinfo_flags() and not amx_permitted()


def cpu_kind() -> str:
    """A short name for result files: the widest matrix engine the process may use; "_noamx" where the
    CPU's AMX tiles are denied to it (an AVX-512 run emulated on an AMX CPU)."""
    flags = cpu_flags()
    if "amx_int8" in flags or "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags or "avx512_vnni" in flags:
        kind = "avx512"
    else:
        kind = "avx2" if "avx2" in flags else platform.machine()
    return f"{kind}_noamx" if amx_denied() else kind


def peak_rss_mb() -> float:
    """This process's peak resident set in MB: VmHWM, which belongs to the address space and so starts
    afresh at exec. Not ru_maxrss: Linux carries ru_maxrss over exec, so a child spawned by a parent
    that once held 6 GB reports at least 6 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def last_level_cache_bytes() -> int:
    """The largest CPU cache cpu0 reports (sysfs; 0 where unknown). Some of the machines here have a
    300 MiB L3: a working set "far larger than the caches" has to be sized from it."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        digits = size[:-1] if size[-1:] in "KMG" else size
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best


def hardware() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    flags = cpu_flags()
    return {"cpu": cpu, "cpu_kind": cpu_kind(), "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "gpu": gpu, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "last_level_cache_mb": round(last_level_cache_bytes() / 2**20), "amx_denied": amx_denied()}


def read_bandwidth_gbs(threads: int, gib: float | None = None, repeats: int = 5) -> float:
    """Best-of-n streaming read of a buffer far larger than the caches (torch sum, `threads` threads):
    the roofline a memory-bound decode step is measured against. gib: the buffer, by default 1 GiB or
    4x the last-level cache, whichever is larger."""
    import time

    import torch

    torch.set_num_threads(threads)
    size = int(gib * 2**30) if gib else max(2**30, 4 * last_level_cache_bytes())
    x = torch.ones(size // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """torch n x n x n matmul rate per dtype (GFLOP/s, best of n): bf16 runs on AMX / AVX512-BF16 where
    the CPU has them (oneDNN), fp32 on AVX-512 / AVX2 FMA. The yardstick of a compute-bound prefill."""
    import time

    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: oneDNN picks and JITs its kernel
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    return out


def linear_macs_per_token(hidden: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """Multiply-adds of one decoder layer's linears per token: q/k/v, o, gate/up and down."""
    hd = hidden // heads
    return hidden * (heads + 2 * kv_heads) * hd + heads * hd * hidden + 3 * hidden * intermediate
