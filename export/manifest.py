"""Writing an engine folder: its manifest (hashes, config, figures, package versions) and the atomic
build-aside-then-rename. The format itself (file names, versions, `load_manifest`) lives in
`valley_rt.engine_format`, the runtime's side, and is re-exported here for the exporters.

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
What may be replaced or refused is valley_rt.outdir's business (never a folder valley-rt did not write).

Containment: every path the manifest names (artifacts, files.*) must stay inside the engine folder
after resolving symlinks; `../x`, an absolute path or a link out of the folder is refused, so a
manifest cannot make valley-rt load (or hash) a file from elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from valley_rt.engine_format import (FORMAT, MANIFEST, VERSION, artifact_path, hash_folder,  # noqa: F401
                                     list_files, load_manifest, sha256_file, write_verified_stamp)

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


def atomic_folder(target: str | Path, *, overwrite: bool = False, sources=()):
    """An engine folder written atomically: valley_rt.outdir.atomic_folder with kind "engine" (an existing
    target is replaced only when it is an engine folder and overwrite=True; inputs are never touched)."""
    from valley_rt.outdir import atomic_folder as _atomic_folder

    return _atomic_folder(target, kind="engine", sources=sources, overwrite=overwrite)
