"""No valley-rt command deletes or overwrites a file it did not write.

A tree of user files (including an input checkpoint, a batch file, an `OUT.tmp` sibling and a folder
of photos) is snapshotted (paths, sha256, mtimes, modes); every command is then pointed at or around
those files. Each must refuse with one `error:` line and exit code 2, and the snapshot must be
unchanged. The commands that succeed (into new folders beside pre-existing `OUT.tmp` siblings) must
leave every other file as it was, and no temporary folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from valley_rt.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "original_valley"


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every entry under root: (kind, sha256 of a file / link target, mtime_ns, mode)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel.split("/")[0] in skip:
                continue
            st = p.lstat()
            if p.is_symlink():
                snap[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir", st.st_mode)
            else:
                snap[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return snap


def refused(args: list, *, match: str) -> None:
    res = CliRunner().invoke(app, [str(a) for a in args])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2, (args, res.exit_code, res.output, res.exception)
    assert len(errors) == 1 and "Traceback" not in res.output, (args, res.output)
    assert match in errors[0], (match, errors[0])


@pytest.fixture()
def home(tmp_path):
    if not FIXTURES.is_dir():
        pytest.skip("shared fixtures are not present")
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "a.jpg").write_bytes(os.urandom(2000))
    (home / "photos" / "b.jpg").write_bytes(os.urandom(3000))
    (home / "notes.txt").write_text("my notes\n")
    (home / "ckpt.tmp").mkdir()  # siblings an old valley-rt would have deleted
    (home / "ckpt.tmp" / "keep.txt").write_text("not valley-rt's\n")
    (home / "eng.tmp").mkdir()
    (home / "eng.tmp" / "keep.txt").write_text("not valley-rt's either\n")
    (home / "answers.jsonl").write_text("my own log line\n")  # an --out that is not an answers file
    shutil.copytree(FIXTURES / "model_mean", home / "orig")
    shutil.copytree(FIXTURES / "clip", home / "clip")  # orig/config.json names ../clip as its tower
    shutil.copy(SHARED / "videos" / "snowmobile.mp4", home / "clip.mp4")
    (home / "q.jsonl").write_text(json.dumps({"id": 1, "video": "clip.mp4", "question": "what ?"}) + "\n")
    os.link(home / "q.jsonl", home / "q-hardlink.jsonl")
    (home / "photos-link").symlink_to(home / "photos")
    return home


def test_no_command_deletes_or_overwrites_user_files(home, monkeypatch):
    before = snapshot(home)
    orig, photos = home / "orig", home / "photos"

    # convert: an existing folder of user files, OUT == SRC, OUT inside / containing SRC, a file, ., a link
    refused(["convert", orig, photos], match="is not a valley-rt checkpoint")
    refused(["convert", orig, photos, "--overwrite"], match="is not a valley-rt checkpoint")
    refused(["convert", orig, orig], match="the output is the input")
    refused(["convert", orig, orig / "sub"], match="the output is inside the input")
    refused(["convert", orig, home, "--overwrite"], match="the output contains the input")
    refused(["convert", orig, home / "notes.txt"], match="exists and is not a folder")
    refused(["convert", orig, home / "photos-link"], match="is a symbolic link")
    refused(["convert", orig, home / "notes.txt" / "x"], match="notes.txt is not a folder")
    monkeypatch.chdir(photos)
    refused(["convert", orig, "."], match="is the current folder")
    monkeypatch.chdir(home)
    assert snapshot(home) == before

    # a real conversion beside the pre-existing ckpt.tmp sibling, then a replacement of its own output
    ckpt = home / "ckpt"
    for extra in ([], ["--overwrite"]):
        res = CliRunner().invoke(app, ["convert", str(orig), str(ckpt), *extra])
        assert res.exit_code == 0, res.output
    refused(["convert", orig, ckpt], match="already exists there (pass --overwrite")
    assert snapshot(home, skip=("ckpt",)) == before  # ckpt.tmp/keep.txt survived both runs
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    made = snapshot(home)

    # export: onto its source (the old --force bug), inside it, a user folder, a file, the old flag
    refused(["export", ckpt, "--out", ckpt, "--overwrite", "--quant", "none", "--gpu", "no"],
            match="the output is the input")
    refused(["export", ckpt, "--out", ckpt / "engine", "--quant", "none", "--gpu", "no"],
            match="the output is inside the input")
    refused(["export", ckpt, "--out", photos, "--overwrite", "--quant", "none", "--gpu", "no"],
            match="is not a valley-rt engine")
    refused(["export", ckpt, "--out", home / "notes.txt", "--quant", "none", "--gpu", "no"],
            match="exists and is not a folder")
    refused(["export", ckpt, "--out", home / "eng", "--force"], match="--overwrite")

    # ask --batch: --out is the batch file (by name, by hard link), a folder, in a missing folder,
    # a file that is not an answers file
    refused(["ask", "--batch", home / "q.jsonl", "--out", home / "q.jsonl"], match="is the batch file")
    refused(["ask", "--batch", home / "q.jsonl", "--out", home / "q-hardlink.jsonl"], match="is the batch file")
    refused(["ask", "--batch", home / "q.jsonl", "--out", photos], match="is a folder")
    refused(["ask", "--batch", home / "q.jsonl", "--out", home / "nope" / "a.jsonl"], match="does not exist")
    refused(["ask", "--batch", home / "q.jsonl", "--out", home / "answers.jsonl"],
            match="refusing to append to a file valley-rt did not write")

    # train, synth, eval, probe pointed at user files and folders
    refused(["train", home / "q.jsonl", "--init", ckpt, "--out", photos, "--max-steps", "1"], match="not empty")
    refused(["train", "--recipe", "smoke", "--out", home], match="not empty")
    refused(["train", home / "q.jsonl", "--init", ckpt, "--out", home / "notes.txt"], match="is not a folder")
    refused(["synth", photos, "--n", "1", "--seed", "0"], match="not empty")
    refused(["synth", home / "notes.txt", "--n", "1", "--seed", "0"], match="is not a folder")
    refused(["eval", ckpt, home / "q.jsonl", "--out", home / "notes.txt"], match="is not a valley-rt evaluation")
    refused(["eval", ckpt, home / "q.jsonl", "--out", home / "q.jsonl"], match="is the input")
    refused(["probe", home / "notes.txt"], match="notes.txt")
    assert snapshot(home) == made

    # a real export beside the pre-existing eng.tmp sibling
    res = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(home / "eng"), "--quant", "none",
                                   "--precision", "fp32", "--gpu", "no"])
    assert res.exit_code == 0, res.output
    assert snapshot(home, skip=("eng",)) == made
    assert oct((home / "eng").stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert oct((home / "eng" / "manifest.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    export = ["export", ckpt, "--out", home / "eng", "--quant", "none", "--precision", "fp32", "--gpu", "no"]
    refused(export, match="already exists there (pass --overwrite")
    res = CliRunner().invoke(app, [str(a) for a in export + ["--overwrite"]])
    assert res.exit_code == 0, res.output
    assert snapshot(home, skip=("eng",)) == made
    assert not [p.name for p in home.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
