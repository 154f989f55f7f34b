"""Writing an engine folder: its manifest (hashes, config, figures, package versions) and the atomic
build-aside-then-rename. The format itself (file names, versions, `load_manifest`) lives in
`valley_rt.engine_format`, the runtime's side, and is re-exported here for the exporters.

Atomicity: an export is built in a hidden sibling folder (same parent, hence same filesystem) and
renamed onto the target only after the manifest is written, so an export that is interrupted at any
point leaves no folder at the target path, and a folder at the target path always has its manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from valley_rt.engine_format import (FORMAT, MANIFEST, VERSION, hash_folder, list_files,  # noqa: F401
                                     load_manifest, sha256_file)
from valley_rt.errors import EngineError

PACKAGES = ("valley-rt", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
            "gptqmodel", "numpy")


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
