"""The runtime's default thread count: physical cores this process may use, never hyperthreads."""

from __future__ import annotations

import builtins
import os

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
