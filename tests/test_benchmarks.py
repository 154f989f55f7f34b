"""The benchmark scripts' own logic: reproduce_demo's per-file comparison (and the recorded hashes of the
bundled demo), the demo question bench_ask asks, bench_video's equal number of runs per side, what
bench_real_size may remove, and bench_gqa's float64 attention (both ORT kernels must match it)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/ on sys.path for the duration of this module (its scripts import each other that way)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_ask
    import bench_gqa
    import bench_real_size
    import bench_video
    import reproduce_demo

    yield {"ask": bench_ask, "video": bench_video, "repro": reproduce_demo, "real_size": bench_real_size,
           "gqa": bench_gqa}
    sys.path.remove(str(REPO / "benchmarks"))


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_reproduce_compares_every_file(bench, tmp_path, capsys):
    repro = bench["repro"]
    files = {"valley.json": b"{}", "llm/model.safetensors": b"\x00" * 64, "vision_tower/model.safetensors": b"v" * 32}
    a = _folder(tmp_path / "a", files)
    b = _folder(tmp_path / "b", files)
    assert repro.main(["--compare", str(a), str(b)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bit_for_bit"] and len(line["identical"]) == 3 and line["identical_bytes"] == line["total_bytes"] == 98

    # one flipped byte in the LLM (the file the last training phase writes), a missing and an extra file
    (b / "llm" / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    (b / "vision_tower" / "model.safetensors").unlink()
    (b / "notes.txt").write_bytes(b"x")
    assert repro.main(["--compare", str(a), str(b)]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["differing"], line["missing"], line["extra"]) == (
        ["llm/model.safetensors"], ["vision_tower/model.safetensors"], ["notes.txt"])
    assert line["identical"] == ["valley.json"] and not line["bit_for_bit"]


def test_recorded_hashes_describe_the_bundled_demo(bench):
    repro = bench["repro"]
    recorded = json.loads(repro.RECORD.read_text())["files"]
    assert recorded == repro.file_hashes(repro.BUNDLED)
    assert {"llm/model.safetensors", "vision_tower/model.safetensors", "valley.safetensors"} <= set(recorded)


def test_bench_ask_asks_a_recorded_question(bench):
    _, _, video, question = bench["ask"].demo_model()
    record = json.loads((REPO / "valley_rt" / "assets" / "clips" / "questions.json").read_text())
    clip = next(c for c in record["clips"] if c["video"] == video.name)
    assert video.is_file() and question in [q["question"] for q in clip["questions"]]


def test_bench_video_times_both_sides_alike(bench):
    calls = []
    stats, result = bench["video"].timed(lambda: calls.append(1) or len(calls), 3)
    assert stats["runs"] == 3 and len(calls) == 3 and result == 3 and stats["min_s"] <= stats["median_s"]
    runs = [{"total_ms": t} for t in (5.0, 1.0, 9.0)]
    assert bench["video"].median_run(runs) == {"total_ms": 5.0}


@pytest.mark.slow
def test_smoke_recipe_reproduces_bit_for_bit(bench, tmp_path, capsys):
    """Two runs of the smoke recipe (~3 min each on 2 busy cores) write byte-identical checkpoints:
    the determinism reproduce_demo.py relies on, checked end to end by its own code path."""
    repro = bench["repro"]
    repro.train("smoke", tmp_path / "one", threads=1)
    assert repro.main(["--recipe", "smoke", "--against-run", str(tmp_path / "one"), "--out", str(tmp_path / "two"),
                       "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bit_for_bit"] and "llm/model.safetensors" in line["identical"]


def test_bench_real_size_removes_only_what_its_stages_wrote(bench, tmp_path):
    """WORK/ckpt, WORK/converted and WORK/engine are replaced only when they hold what make_real_checkpoint,
    convert and export write; a folder with anything else in it is refused and left as it was."""
    from valley_rt.errors import ValleyError
    from valley_rt.outdir import is_checkpoint, is_engine
    from valley_rt.runtime import DEMO_ENGINE

    rs = bench["real_size"]
    made = tmp_path / "ckpt"
    (made / "original").mkdir(parents=True)
    (made / "clip").mkdir()
    rs.remove_own(made, rs.made_checkpoint, "a random checkpoint")
    assert not made.exists()
    rs.remove_own(made, rs.made_checkpoint, "a random checkpoint")  # nothing there: nothing to do
    (made / "original").mkdir(parents=True)
    (made / "notes.txt").write_text("mine")
    with pytest.raises(ValleyError, match="not a random checkpoint this benchmark wrote"):
        rs.remove_own(made, rs.made_checkpoint, "a random checkpoint")
    assert (made / "notes.txt").read_text() == "mine"
    user = tmp_path / "converted"
    user.mkdir()
    (user / "valley.json").write_text("{}")
    with pytest.raises(ValleyError):
        rs.remove_own(user, is_checkpoint, "a converted checkpoint")
    assert (user / "valley.json").is_file()
    engine = tmp_path / "engine"
    import shutil

    shutil.copytree(DEMO_ENGINE, engine)
    (engine / "extra.txt").write_text("mine")  # not listed in the manifest: not an engine any more
    with pytest.raises(ValleyError):
        rs.remove_own(engine, is_engine, "an engine")
    (engine / "extra.txt").unlink()
    rs.remove_own(engine, is_engine, "an engine")
    assert not engine.exists()


def test_bench_gqa_kernels_match_its_float64_attention(bench, capsys, monkeypatch):
    """Both GroupQueryAttention kernels, on a small shape, against the benchmark's own NumPy reference
    (rotary, causal mask over cached + new rows, grouped heads): a wrong reference or binding fails."""
    monkeypatch.setattr(sys, "argv", ["bench_gqa.py", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                                      "--head-size", "16", "--repeat", "1", "--rounds", "1", "--threads", "1"])
    assert bench["gqa"].main() == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["append"], r["cached"]) for r in result["rows"]] == bench["gqa"].CASES
    for row in result["rows"]:
        assert row["flash_max_err_vs_fp64"] < 1e-4 and row["materialized_max_err_vs_fp64"] < 1e-4, row
