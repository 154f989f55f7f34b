"""Writing an output folder without ever losing a file valley-rt did not write.

`convert` and `export` build their folder in a unique hidden sibling that this module creates
(`.OUT.tmp-XXXXXX`, same parent hence same filesystem) and rename it into place at the end:

- an OUT that already exists is refused, unless it is an empty folder (nothing to lose) or a complete
  artifact of the same kind that valley-rt wrote (`is_checkpoint` / `is_engine`) and the caller asked
  to replace it (`overwrite=True`, the CLI's `--overwrite`);
- an OUT equal to, inside or containing one of the command's inputs is refused (symlinks resolved),
  and so are the current folder, a symlink and a path whose parent is a file;
- replacing moves the old artifact into another fresh hidden sibling, renames the new one in, then
  deletes the old one, which was checked to be the artifact kind just before the move;
- a failure (an exception, Ctrl-C) deletes only the temporary folder made here: a pre-existing
  `OUT.tmp` or any other sibling is never touched. A SIGKILL leaves the hidden temporary behind.

Trade-off: the checks read a few small files (valley.json, manifest.json and a folder listing); an
artifact is recognised by its own metadata, not by a marker file, so folders made by older valley-rt
versions can still be replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from valley_rt.errors import OutputError

CHECKPOINT_ENTRIES = {"valley.json", "valley.safetensors", "llm", "vision_tower"}


# -- what valley-rt wrote ---------------------------------------------------------------------------
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_checkpoint(folder: Path) -> bool:
    """A complete valley-rt checkpoint folder holding nothing else: valley.json (format valley-rt),
    valley.safetensors, llm/ and vision_tower/ and no other top-level entry."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    meta = _json(folder / "valley.json")
    names = {p.name for p in folder.iterdir()}
    return (isinstance(meta, dict) and meta.get("format") == "valley-rt" and names == CHECKPOINT_ENTRIES
            and (folder / "valley.safetensors").is_file() and (folder / "llm").is_dir()
            and (folder / "vision_tower").is_dir())


def is_engine(folder: Path) -> bool:
    """An engine folder valley-rt exported: manifest.json (format valley-rt-engine) lists every other
    file in it. Listed files may be missing or damaged (a corrupted engine is still ours to replace);
    a file the manifest does not list (someone else's) makes it not an engine."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    manifest = _json(folder / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != "valley-rt-engine":
        return False
    listed = manifest.get("artifacts")
    if not isinstance(listed, dict):
        return False
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() and not p.is_symlink():
            continue
        if rel != "manifest.json" and rel not in listed:
            return False
    return True


KINDS: dict[str, Callable[[Path], bool]] = {"checkpoint": is_checkpoint, "engine": is_engine}


# -- checks -----------------------------------------------------------------------------------------
def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_target(target: str | Path, *, kind: str, sources: Iterable[str | Path | None] = (),
                 overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """The absolute output path, after refusing every OUT that could lose a file (OutputError, one line)."""
    raw = Path(target)
    target = Path(os.path.abspath(raw))
    if target.parent == target:
        raise OutputError(f"{raw}: cannot write a {kind} onto the filesystem root")
    real = target.parent.resolve() / target.name
    for src in sources:
        if src is None:
            continue
        src_real = Path(src).resolve()
        if _overlap(real, src_real):
            where = ("is" if real == src_real else "is inside" if src_real in real.parents else "contains")
            raise OutputError(f"{raw}: the output {where} the input {src}; choose another output folder")
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{raw}: is the current folder (or holds it); give a new folder's name")
    if target.is_symlink():
        raise OutputError(f"{raw}: is a symbolic link; give the folder's real path or a new name")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{raw}: exists and is not a folder; give a new folder's name")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{raw}: {parent} is not a folder")
            break
    if target.is_dir() and any(target.iterdir()):
        if not KINDS[kind](target):
            raise OutputError(f"{raw}: exists and is not a valley-rt {kind} (valley-rt never deletes a folder "
                              f"it did not write); give a new folder's name")
        if not overwrite:
            raise OutputError(f"{raw}: a {kind} already exists there (pass {flag} to replace it)")
    return target


def _normalize_modes(folder: Path) -> None:
    """mkdtemp makes a 0700 folder: give the tree the modes a plain mkdir/open would (umask applies).
    Only paths whose mode differs are changed: a chmod moves the file's ctime, and an export's verified
    stamp (engine_format.write_verified_stamp, written just before) trusts files by their stat."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        st = os.stat(p)
        mode = (0o777 if p.is_dir() else (0o777 if st.st_mode & stat.S_IXUSR else 0o666)) & ~mask
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(p, mode)


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, kind: str, sources: Iterable[str | Path | None] = (),
                  overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to fill; on success it becomes `target`.

    See the module docstring for what is refused. The existing target is checked again just before it
    is moved aside, so a folder someone filled in the meantime is not deleted either.
    """
    sources = list(sources)
    target = check_target(target, kind=kind, sources=sources, overwrite=overwrite, flag=flag)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise OutputError(f"{target}: cannot create the output folder ({e.strerror})") from None
    try:
        yield work
        _normalize_modes(work)
        check_target(target, kind=kind, sources=sources, overwrite=overwrite, flag=flag)
        _swap_in(work, target, kind)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _swap_in(work: Path, target: Path, kind: str) -> None:
    if not target.exists():
        try:
            os.rename(work, target)  # fails unless target is still absent or an empty folder
        except OSError as e:
            raise OutputError(f"{target}: appeared while writing ({e.strerror}); nothing was replaced") from None
        return
    if target.is_dir() and not any(target.iterdir()):
        os.rmdir(target)  # an empty folder: nothing to lose
        os.rename(work, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / kind)
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(old / kind, target)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- folders written in place -----------------------------------------------------------------------
MARKER = ".valley-rt.json"


def claim_folder(folder: str | Path, *, kind: str, legacy: Callable[[Path], bool] = lambda p: False) -> Path:
    """For commands that fill OUT in place and may resume into it (synth, train): OUT must be absent, an
    empty folder, or a folder an earlier run of the same kind made (its OUT/.valley-rt.json marker names
    the kind; `legacy` recognises folders made before the marker existed). The marker is written here,
    before anything else, so a run killed at any point can be rerun into the same folder.
    """
    raw = Path(folder)
    folder = Path(os.path.abspath(raw))
    cwd = Path.cwd().resolve()
    real = folder.parent.resolve() / folder.name
    if real in cwd.parents:
        raise OutputError(f"{raw}: holds the current folder; give a new folder's name")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{raw}: exists and is not a folder; give a new folder's name")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{raw}: {parent} is not a folder")
            break
    marker = folder / MARKER
    if folder.is_dir() and any(folder.iterdir()):
        meta = _json(marker)
        ours = meta.get("kind") == kind if isinstance(meta, dict) else legacy(folder)
        if not ours:
            what = f"a valley-rt {meta.get('kind')} folder" if isinstance(meta, dict) else "not empty"
            raise OutputError(f"{raw}: {what}, and not a valley-rt {kind} folder (valley-rt never overwrites "
                              f"files it did not write); give a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text(json.dumps({"kind": kind}) + "\n")
    except OSError as e:
        raise OutputError(f"{raw}: cannot create the output folder ({e.strerror})") from None
    return folder


def check_output_file(path: str | Path, *, what: str, ours: Callable[[Path], bool],
                      inputs: Iterable[str | Path | None] = ()) -> Path:
    """An output file that may be replaced only if `ours` recognises it as one valley-rt wrote; never one
    of the command's input files, a folder, or a file in a missing folder."""
    raw = Path(path)
    path = Path(os.path.abspath(raw))
    if path.is_dir():
        raise OutputError(f"{raw}: is a folder; give the {what}'s file name")
    if not path.parent.is_dir():
        raise OutputError(f"{raw}: folder {path.parent} does not exist")
    if path.exists():
        for src in inputs:
            if src is not None and Path(src).exists() and os.path.samefile(src, path):
                raise OutputError(f"{raw}: is the input {src}; give another {what} file")
        if not ours(path):
            raise OutputError(f"{raw}: exists and is not a valley-rt {what} (valley-rt never overwrites files "
                              f"it did not write); give a new file name")
    return path
