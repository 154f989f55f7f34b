"""The engine folder's manifest, and writing the folder atomically.

    ENGINE/manifest.json   {"format": "valley-rt-engine", "version": 1, "source": {...}, "config": ValleyConfig,
                            "precision": {...}, "parity": {...}, "packages": {...},
                            "artifacts": {relative path: {"sha256", "bytes"}}}
    ENGINE/vision.onnx     vision + temporal + projector graph (valley_rt.export.onnx_vision)
    ENGINE/llm/            the LLM half (valley_rt.export.llm_onnx)
    ENGINE/tokenizer/      the checkpoint's tokenizer files, verbatim

Trade-off: the manifest lists every file with its sha256, so loading can prove the folder is the one
that was exported (a flipped byte, a truncated copy, a file from another export all fail in one line).
Hashing reads every byte (~1 s per GB here); `load_manifest(verify=False)` checks presence and sizes
only, for callers that verified once and want a fast cold start.

Atomicity: an export is built in a hidden sibling folder (same parent, hence same filesystem) and
renamed onto the target only after the manifest is written, so an export that is interrupted at any
point leaves no folder at the target path, and a folder at the target path always has its manifest.
What may be replaced or refused is valley_rt.outdir's business (never a folder valley-rt did not write).

Containment: every path the manifest names (artifacts, files.*) must stay inside the engine folder
after resolving symlinks; `../x`, an absolute path or a link out of the folder is refused, so a
manifest cannot make valley-rt load (or hash) a file from elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from valley_rt.errors import EngineError

FORMAT = "valley-rt-engine"
VERSION = 1
MANIFEST = "manifest.json"
PACKAGES = ("valley-rt", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
            "gptqmodel", "numpy")
_CHUNK = 1 << 22  # 4 MiB reads while hashing


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(folder: str | Path) -> list[str]:
    """Every regular file under folder, as sorted POSIX relative paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def hash_folder(folder: str | Path) -> str:
    """One sha256 over a folder: its sorted relative paths and each file's sha256 (the source checkpoint's id)."""
    h = hashlib.sha256()
    for rel in list_files(folder):
        h.update(rel.encode() + b"\0" + sha256_file(Path(folder) / rel).encode() + b"\n")
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def write_manifest(engine_dir: str | Path, *, config: dict, source: dict, precision: dict, parity: dict,
                   extra: dict | None = None) -> dict:
    """Hash every file in engine_dir and write manifest.json last. Returns the manifest."""
    engine_dir = Path(engine_dir)
    artifacts = {rel: {"sha256": sha256_file(engine_dir / rel), "bytes": (engine_dir / rel).stat().st_size}
                 for rel in list_files(engine_dir) if rel != MANIFEST}
    manifest = {"format": FORMAT, "version": VERSION, "source": source, "config": config,
                "precision": precision, "parity": parity, "packages": package_versions(),
                "artifacts": artifacts, **(extra or {})}
    text = json.dumps(manifest, indent=2) + "\n"
    tmp = engine_dir / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, engine_dir / MANIFEST)
    return json.loads(text)  # exactly what load_manifest will return (tuples become lists)


def artifact_path(engine_dir: str | Path, rel, *, where: str = "artifacts") -> Path:
    """engine_dir / rel, refused (EngineError) unless it is a relative path that stays inside engine_dir
    once symlinks are resolved."""
    engine_dir = Path(engine_dir)
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise EngineError(f"{engine_dir / MANIFEST}: {where} entry {rel!r} is not a relative path")
    pure = Path(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise EngineError(f"{engine_dir / MANIFEST}: {where} entry {rel!r} points outside the engine folder")
    path = engine_dir / pure
    root = engine_dir.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise EngineError(f"{engine_dir / MANIFEST}: {where} entry {rel!r} resolves to {real}, outside the "
                          f"engine folder")
    return path


def load_manifest(engine_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check an engine folder's manifest; EngineError (one line) on anything wrong.

    Checks: folder and manifest exist, JSON parses, format name and version match this valley-rt,
    every listed artifact exists with its size, no unlisted file was added, and (verify=True) every
    artifact's sha256.
    """
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: no such engine folder (create one with `valley-rt export CKPT --out {engine_dir}`)")
    if not path.is_file():
        raise EngineError(f"{path}: missing; {engine_dir} is not an engine folder (or its export did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"{path}: format {got!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise EngineError(f"{path}: engine format version {manifest.get('version')!r}, this valley-rt reads "
                          f"version {VERSION}; re-export the engine")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        raise EngineError(f"{path}: no artifacts listed")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise EngineError(f"{path}: 'files' is not an object")
    for name, rel in files.items():
        artifact_path(engine_dir, rel, where=f"files.{name}")
    for name in ("vision", "trt", "trt_cache"):
        gpu = manifest.get("gpu")
        if isinstance(gpu, dict) and gpu.get(name):
            artifact_path(engine_dir, gpu[name], where=f"gpu.{name}")
    for rel, entry in artifacts.items():
        f = artifact_path(engine_dir, rel)
        if not isinstance(entry, dict):
            raise EngineError(f"{path}: artifacts entry {rel!r} is not an object")
        if not f.is_file():
            raise EngineError(f"{f}: listed in {MANIFEST} but missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise EngineError(f"{f}: {size} bytes, {MANIFEST} says {entry.get('bytes')} (truncated or replaced)")
    unlisted = [rel for rel in list_files(engine_dir) if rel != MANIFEST and rel not in artifacts]
    if unlisted:
        raise EngineError(f"{engine_dir / unlisted[0]}: not listed in {MANIFEST} (files were added after export)")
    if verify:
        for rel, entry in artifacts.items():
            digest = sha256_file(engine_dir / rel)
            if digest != entry.get("sha256"):
                raise EngineError(f"{engine_dir / rel}: sha256 {digest[:12]}..., {MANIFEST} says "
                                  f"{str(entry.get('sha256'))[:12]}... (modified after export)")
    return manifest


def atomic_folder(target: str | Path, *, overwrite: bool = False, sources=()):
    """An engine folder written atomically: valley_rt.outdir.atomic_folder with kind "engine" (an existing
    target is replaced only when it is an engine folder and overwrite=True; inputs are never touched)."""
    from valley_rt.outdir import atomic_folder as _atomic_folder

    return _atomic_folder(target, kind="engine", sources=sources, overwrite=overwrite)
