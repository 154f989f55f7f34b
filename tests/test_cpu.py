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


def test_one_cpu_per_core_skips_hyperthread_siblings(monkeypatch, tmp_path):
    # 4 logical CPUs on 2 cores (siblings 0,2 and 1,3); the process may run on CPUs 1, 2 and 3
    for i, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        (tmp_path / f"cpu{i}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{i}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 2, 3})
    assert cpu.one_cpu_per_core(tmp_path) == [1, 2]
    assert cpu.one_cpu_per_core(tmp_path / "missing") == [1, 2, 3]  # no topology: every allowed CPU
