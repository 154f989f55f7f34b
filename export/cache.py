"""Export on first use: a checkpoint folder -> an engine in the user cache, made once and then reused.

`valley_rt.load` and the CLI hand `ensure_engine` to the runtime as its `exporter` hook when a
checkpoint is to run on a CPU; the runtime itself never imports the exporters.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from valley_rt.config import ValleyConfig
from valley_rt.engine_format import hash_folder, load_manifest
from valley_rt.errors import EngineError


def cache_dir() -> Path:
    return Path(os.environ.get("VALLEY_RT_CACHE", Path.home() / ".cache" / "valley-rt"))


def ensure_engine(ckpt: str | Path) -> Path:
    """Export `ckpt` once into the user cache (int4 round-to-nearest LLM, default vision precision).

    Two processes asking at once are serialized by a lock file; the second finds the first's engine.
    The export itself is atomic (built aside, renamed into place), so a killed export leaves nothing.
    """
    from valley_rt.checkpoint import read_config
    from valley_rt.export.engine import export_engine

    ckpt = Path(ckpt)
    key = hash_folder(ckpt)[:16]
    root = cache_dir() / "engines"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{ckpt.name}-{key}"
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            load_manifest(out, verify=False)
            return out
        except EngineError:
            pass
        export_engine(ckpt, out, quant="rtn4", group_size=group_size_for(read_config(ckpt)), force=True)
    return out


def group_size_for(cfg: ValleyConfig, largest: int = 128) -> int:
    """The largest power-of-two int4 group size (<= 128) that divides every linear's input width."""
    size = largest
    while size > 8 and (cfg.llm.hidden_size % size or cfg.llm.intermediate_size % size):
        size //= 2
    return size
