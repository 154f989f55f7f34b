"""Export on first use: a checkpoint folder -> an engine in the user cache, made once and then reused.

`valley_rt.load` and the CLI hand `ensure_engine` to the runtime as its `exporter` hook when a
checkpoint is to run on a CPU; the runtime itself never imports the exporters.

An entry is CACHE/engines/NAME-HASH (HASH: the checkpoint's content), beside NAME-HASH.source.json
naming the checkpoint it was made from. One lock file per cache root (CACHE/engines/.lock)
serializes exports: of two processes asking at once, the second finds the first's engine. The export
itself is atomic (built aside, renamed into place), so a killed export leaves nothing. An entry whose
files no longer match its manifest is exported again over itself; an entry holding files valley-rt
did not write is never deleted (EngineError naming the folder to remove).
"""

from __future__ import annotations

import fcntl
import json
import re
import sys
from pathlib import Path

from valley_rt.config import ValleyConfig
from valley_rt.engine_format import cache_root, file_hashes, folder_digest, hash_folder, load_manifest
from valley_rt.errors import EngineError


def cache_dir() -> Path:
    """The user cache (VALLEY_RT_CACHE, else ~/.cache/valley-rt); EngineError when it cannot be a folder."""
    root = cache_root()
    try:
        for p in (root, *root.parents):  # the nearest existing part must be a folder
            if p.exists():
                if not p.is_dir():
                    raise EngineError(f"cache folder {root}: {p} is not a folder (set VALLEY_RT_CACHE to a folder)")
                break
    except OSError as e:  # a name too long, permissions
        raise EngineError(f"cache folder {str(root)[:200]}: {e.strerror or e}") from None
    return root


def engines_dir() -> Path:
    return cache_dir() / "engines"


def ensure_engine(ckpt: str | Path, *, rebuild: bool = False) -> Path:
    """Export `ckpt` once into the user cache (int4 round-to-nearest LLM, default vision precision) and
    return the entry, verified (every artifact's sha256); a damaged entry is rebuilt, saying so on
    stderr. rebuild=True exports it again whatever its state."""
    from valley_rt.checkpoint import read_config
    from valley_rt.export.engine import export_engine
    from valley_rt.outdir import is_engine

    ckpt = Path(ckpt)
    hashes = file_hashes(ckpt)  # read once: the cache key and the export's source ids
    key = folder_digest(hashes)[:16]
    root = engines_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "a")
    except OSError as e:
        raise EngineError(f"{root}: cannot use the engine cache ({e.strerror}); set VALLEY_RT_CACHE to a "
                          f"writable folder") from None
    out = root / f"{ckpt.name}-{key}"
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_old_lock_files(root)
        if not rebuild and out.exists():
            try:
                load_manifest(out, verify=True)
                return out
            except EngineError as e:  # damaged after export: a flipped byte, a lost or added file
                print(f"valley-rt: rebuilding the cached engine of {ckpt} ({e})", file=sys.stderr)
        if out.exists() and not is_engine(out):
            raise EngineError(f"{out}: this engine cache entry is damaged and holds files valley-rt did not "
                              f"list; remove that folder and run again to rebuild it")
        export_engine(ckpt, out, quant="rtn4", group_size=group_size_for(read_config(ckpt)),
                      overwrite=out.exists(), source_hashes=hashes)
        _source_record(out).write_text(json.dumps({"checkpoint": str(ckpt.resolve())}) + "\n")
    return out


def is_cache_entry(engine: str | Path) -> bool:
    engine = Path(engine)
    return engine.resolve().parent == engines_dir().resolve() and re.fullmatch(r".+-[0-9a-f]{16}", engine.name)


def verified_entry(engine: str | Path) -> Path:
    """A cache entry loaded by its own path: verified, or rebuilt from the checkpoint it was made from
    when that checkpoint is still there with the same content; else EngineError saying it is a cache
    entry and how to rebuild it."""
    engine = Path(engine)
    try:
        load_manifest(engine, verify=True)
        return engine
    except EngineError as e:
        ckpt = _cached_engine_source(engine)
        if ckpt is None:
            raise EngineError(f"{e} ({engine} is an engine valley-rt cached: remove that folder and run again "
                              f"to rebuild it)") from None
        return ensure_engine(ckpt)


def _source_record(engine: Path) -> Path:
    return engine.with_name(f"{engine.name}.source.json")


def _cached_engine_source(engine: Path) -> Path | None:
    """The checkpoint a cache entry was exported from, when its record still names it and the
    checkpoint's content hash is the one in the entry's name (so rebuilding gives the same engine)."""
    try:
        src = Path(json.loads(_source_record(engine).read_text())["checkpoint"])
        if (src / "valley.json").is_file() and engine.name == f"{src.name}-{hash_folder(src)[:16]}":
            return src
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remove_old_lock_files(root: Path) -> None:
    """Empty NAME-HASH.lock files, one per entry, left by valley-rt versions that locked per entry."""
    for p in root.glob("*.lock"):
        if re.fullmatch(r".+-[0-9a-f]{16}\.lock", p.name) and p.is_file() and p.stat().st_size == 0:
            p.unlink(missing_ok=True)


def group_size_for(cfg: ValleyConfig, largest: int = 128) -> int:
    """The largest power-of-two int4 group size (<= 128) that divides every linear's input width."""
    size = largest
    while size > 8 and (cfg.llm.hidden_size % size or cfg.llm.intermediate_size % size):
        size //= 2
    return size
