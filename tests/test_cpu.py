"""The runtime's default thread count: physical cores this process may use, never hyperthreads."""

from __future__ import annotations

import builtins
import os

import pytest

from valley_rt import cpu


def test_default_threads_is_within_the_affinity_mask():
    n = cpu.default_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_cpuinfo_fallback_counts_cores_not_hyperthreads(monkeypatch, tmp_path):
    # two sockets, two cores each, two hyperthreads per core: 8 logical CPUs, 4 physical cores
    blocks = [f"processor\t: {i}\nphysical id\t: {i // 4}\ncore id\t\t: {(i // 2) % 2}\n" for i in range(8)]
    info = tmp_path / "cpuinfo"
    info.write_text("\n".join(blocks))
    real_import, real_open = builtins.__import__, builtins.open

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    assert cpu._physical_cores() == 4


def test_one_cpu_per_core_skips_hyperthread_siblings(monkeypatch, tmp_path):
    # 4 logical CPUs on 2 cores (siblings 0,2 and 1,3); the process may run on CPUs 1, 2 and 3
    for i, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        (tmp_path / f"cpu{i}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{i}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 2, 3})
    assert cpu.one_cpu_per_core(tmp_path) == [1, 2]
    assert cpu.one_cpu_per_core(tmp_path / "missing") == [1, 2, 3]  # no topology: every allowed CPU


def _has_amx() -> bool:
    try:
        return " amx_tile" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_amx_flags_are_dropped_when_the_process_may_not_use_the_tiles(monkeypatch, tmp_path):
    """/proc/cpuinfo lists amx_* on an AMX CPU whatever Linux lets the process do; where the tiles are
    refused (old kernel, sandbox) the libraries run AVX-512 kernels, and so must every choice made from
    cpu_flags: isa_class falls back to the AVX-512 class."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
    monkeypatch.setattr(cpu, "amx_permitted", lambda: True)
    assert cpu.isa_class() == "amx" and "amx_int8" in cpu.cpu_flags()
    monkeypatch.setattr(cpu, "amx_permitted", lambda: False)
    assert cpu.isa_class() == "avx512_bf16" and not any(f.startswith("amx") for f in cpu.cpu_flags())


@pytest.mark.skipif(not _has_amx(), reason="needs a CPU with AMX tiles")
def test_no_amx_wrapper_denies_the_tiles_to_the_command_and_its_children():
    """benchmarks/no_amx.py refuses the AMX permission request with seccomp: the command sees no AMX
    (amx_permitted False, isa_class avx512_bf16), while the same command without it does; oneDNN then
    runs its AVX-512 bf16 kernel (its verbose log names the ISA of the matmul it ran)."""
    import subprocess
    import sys
    from pathlib import Path

    wrapper = Path(__file__).resolve().parents[1] / "benchmarks" / "no_amx.py"
    code = ("from valley_rt.cpu import amx_permitted, isa_class; import subprocess, sys;"
            "print(amx_permitted(), isa_class(), subprocess.run([sys.executable, '-c', "
            "'from valley_rt.cpu import isa_class; print(isa_class())'], capture_output=True, text=True).stdout.strip())")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    denied = subprocess.run([sys.executable, str(wrapper), "--", sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=60)
    assert plain.stdout.split() == ["True", "amx", "amx"], plain.stderr[-500:]
    assert denied.stdout.split() == ["False", "avx512_bf16", "avx512_bf16"], denied.stderr[-500:]
    matmul = ("import torch; a = torch.ones(256, 256, dtype=torch.bfloat16); a @ a")
    log = subprocess.run([sys.executable, str(wrapper), "--", sys.executable, "-c", matmul], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    runs = [line for line in log.splitlines() if ",exec,cpu,matmul," in line]
    assert runs and all("amx" not in line for line in runs), log[-800:]
