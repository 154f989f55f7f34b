"""The engine folder's manifest, and writing the folder atomically.

    ENGINE/manifest.json   {"format": "valley-rt-engine", "version": 1, "source": {...}, "config": ValleyConfig,
                            "precision": {...}, "parity": {...}, "packages": {...},
                            "artifacts": {relative path: {"sha256", "bytes"}}}
    ENGINE/vision.onnx     vision + temporal + projector graph (valley_rt.export.onnx_vision)
    ENGINE/llm/            the LLM half (valley_rt.export.llm_onnx)
    ENGINE/tokenizer/      the checkpoint's tokenizer files, verbatim

Trade-off: the manifest lists every file with its sha256, so loading can prove the folder is the one
that was exported (a flipped byte, a truncated copy, a file from another export all fail in one line).
Hashing reads every byte (~1 s per GB); `load_manifest(verify=False)` checks presence and sizes
only, for callers that verified once and want a fast cold start.

Verified stamps: a full verification (and an export, which has just hashed every file) leaves a stamp
in the user cache, keyed by the manifest's own sha256, holding each artifact's (size, mtime, ctime,
inode). A later verify=True load re-hashes only the files whose stat differs from the stamp, plus any
file changed too close to the stamp's writing for its timestamps to tell (git's "racily clean"
rule: timestamps have a coarse tick, so a write in the same tick as the stamp would look unchanged).
Any write to a file moves its ctime, which no user-level call can set back, so an unchanged stat
means unchanged bytes for everything short of someone with root rewriting the disk under the
filesystem. The stamp lives outside the engine folder (which must hold only listed files).

Atomicity: an export is built in a hidden sibling folder (same parent, hence same filesystem) and
renamed onto the target only after the manifest is written, so an export that is interrupted at any
point leaves no folder at the target path, and a folder at the target path always has its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

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
    for rel, entry in artifacts.items():
        f = engine_dir / rel
        if not f.is_file():
            raise EngineError(f"{f}: listed in {MANIFEST} but missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise EngineError(f"{f}: {size} bytes, {MANIFEST} says {entry.get('bytes')} (truncated or replaced)")
    unlisted = [rel for rel in list_files(engine_dir) if rel != MANIFEST and rel not in artifacts]
    if unlisted:
        raise EngineError(f"{engine_dir / unlisted[0]}: not listed in {MANIFEST} (files were added after export)")
    if verify:
        trusted = _stamped_unchanged(engine_dir)
        for rel, entry in artifacts.items():
            if rel in trusted:
                continue
            digest = sha256_file(engine_dir / rel)
            if digest != entry.get("sha256"):
                raise EngineError(f"{engine_dir / rel}: sha256 {digest[:12]}..., {MANIFEST} says "
                                  f"{str(entry.get('sha256'))[:12]}... (modified after export)")
        if len(trusted) < len(artifacts):
            write_verified_stamp(engine_dir)
    return manifest


# -- verified stamps (see the module docstring) ------------------------------------------------------
RACY_NS = 2_000_000_000  # files changed within 2 s of the stamp are re-hashed: timestamp ticks are coarse


def stamp_dir() -> Path:
    """Where stamps live: $VALLEY_RT_CACHE/verified (default ~/.cache/valley-rt/verified)."""
    return Path(os.environ.get("VALLEY_RT_CACHE", Path.home() / ".cache" / "valley-rt")) / "verified"


def _stamp_path(engine_dir: Path) -> Path:
    return stamp_dir() / (sha256_file(engine_dir / MANIFEST)[:32] + ".json")


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def write_verified_stamp(engine_dir: str | Path) -> None:
    """Record that engine_dir's artifacts, as they are now, match its manifest. Call only right after
    hashing them (load_manifest(verify=True), or an export's write_manifest). A cache that cannot be
    written only costs the next load a full verification, so OSError is not raised."""
    engine_dir = Path(engine_dir)
    manifest = json.loads((engine_dir / MANIFEST).read_text())
    stamp = {"written_ns": time.time_ns(), "files": {rel: _stat(engine_dir / rel) for rel in manifest["artifacts"]}}
    with contextlib.suppress(OSError):
        path = _stamp_path(engine_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path)


def _stamped_unchanged(engine_dir: Path) -> set[str]:
    """Artifacts whose stat equals the stamp's and which were not changed within RACY_NS of it."""
    try:
        stamp = json.loads(_stamp_path(engine_dir).read_text())
        written, files = int(stamp["written_ns"]), dict(stamp["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    trusted = set()
    for rel, recorded in files.items():
        with contextlib.suppress(OSError):
            now = _stat(engine_dir / rel)
            if now == recorded and now[2] + RACY_NS < written:
                trusted.add(rel)
    return trusted


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of target to fill; on success it replaces target, on error it is removed.

    overwrite=False refuses an existing target up front (EngineError). With overwrite=True the old folder
    is moved aside, the new one renamed in, then the old one deleted: the target path never holds a mix.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise EngineError(f"{target}: already exists (pass --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield work
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "engine")
        os.rename(work, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
