"""Engine folder + manifest: a full tiny export, verification, tampering, version, atomicity, interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import valley_rt.engine_format as ef

from valley_rt.errors import EngineError
from valley_rt.export import manifest as mf


# -- the manifest on its own ------------------------------------------------------------------------
@pytest.fixture()
def engine(tmp_path):
    d = tmp_path / "engine"
    (d / "llm").mkdir(parents=True)
    (d / "vision.onnx").write_bytes(os.urandom(5000))
    (d / "llm" / "llm.onnx").write_bytes(b"graph" * 100)
    mf.write_manifest(d, config={"name": "x"}, source={"sha256": "0" * 64}, precision={"vision": "fp32"},
                      parity={"vision": {"min_cosine": 1.0}})
    return d


def test_roundtrip(engine):
    m = mf.load_manifest(engine)
    assert m["format"] == mf.FORMAT and m["version"] == mf.VERSION
    assert set(m["artifacts"]) == {"vision.onnx", "llm/llm.onnx"}
    assert m["artifacts"]["vision.onnx"]["bytes"] == 5000
    assert m["artifacts"]["vision.onnx"]["sha256"] == mf.sha256_file(engine / "vision.onnx")
    assert "onnxruntime" in m["packages"] and "torch" in m["packages"]


def test_tampered_byte_is_refused(engine):
    f = engine / "vision.onnx"
    data = bytearray(f.read_bytes())
    data[1234] ^= 0x01
    f.write_bytes(bytes(data))
    mf.load_manifest(engine, verify=False)  # same size: only the hash can tell
    with pytest.raises(EngineError, match=r"vision\.onnx: sha256 .* \(modified after export\)") as e:
        mf.load_manifest(engine)
    assert "\n" not in str(e.value)


def test_verified_stamp_skips_rehash_until_a_file_changes(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = ef.sha256_file
    monkeypatch.setattr(ef, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    ef.load_manifest(engine)  # no stamp yet: every artifact hashed, then a stamp written
    assert sorted(h for h in hashed if h != ef.MANIFEST) == ["llm.onnx", "vision.onnx"]
    # the files were changed just now: too recent for their timestamps to prove anything (racy)
    hashed.clear()
    ef.load_manifest(engine)
    assert "vision.onnx" in hashed
    # a stamp written well after the last change: nothing is re-read
    now = time.time_ns()
    monkeypatch.setattr(ef.time, "time_ns", lambda: now + 10 * ef.RACY_NS)
    ef.write_verified_stamp(engine)
    monkeypatch.undo()
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ef, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    hashed.clear()
    ef.load_manifest(engine)
    assert [h for h in hashed if h != ef.MANIFEST] == []
    # a flipped byte (size kept, mtime put back) still moves ctime: re-hashed and refused
    f = engine / "vision.onnx"
    _flip_a_byte_keeping_mtime(f)
    with pytest.raises(EngineError, match="modified after export"):
        ef.load_manifest(engine)


def _flip_a_byte_keeping_mtime(f) -> None:
    """Tamper with f as a careful attacker would: same size, the old mtime put back."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[10] ^= 0x01
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_tampering_in_the_stamps_own_tick_is_caught(engine, tmp_path, monkeypatch):
    """Same size, same mtime, and a ctime the coarse clock may not have moved: the racy rule re-hashes."""
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "cache"))
    ef.load_manifest(engine)
    f = engine / "vision.onnx"
    _flip_a_byte_keeping_mtime(f)
    with pytest.raises(EngineError, match="modified after export"):
        ef.load_manifest(engine)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(version=ef.VERSION + 1), "engine format version 2, this valley-rt reads version 1"),
    (lambda m: m.update(format="something-else"), "format 'something-else', expected 'valley-rt-engine'"),
    (lambda m: m.update(artifacts={}), "no artifacts listed"),
])
def test_wrong_version_or_format(engine, change, match):
    path = engine / mf.MANIFEST
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    with pytest.raises(EngineError, match=match):
        mf.load_manifest(engine)


def test_missing_truncated_unlisted_and_garbage(engine):
    (engine / "extra.bin").write_bytes(b"x")
    with pytest.raises(EngineError, match="extra.bin: not listed"):
        mf.load_manifest(engine)
    (engine / "extra.bin").unlink()
    (engine / "llm" / "llm.onnx").write_bytes(b"graph")
    with pytest.raises(EngineError, match="5 bytes, manifest.json says 500"):
        mf.load_manifest(engine, verify=False)
    (engine / "llm" / "llm.onnx").unlink()
    with pytest.raises(EngineError, match="listed in manifest.json but missing"):
        mf.load_manifest(engine)
    (engine / mf.MANIFEST).write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        mf.load_manifest(engine)
    (engine / mf.MANIFEST).unlink()
    with pytest.raises(EngineError, match="manifest.json: missing"):
        mf.load_manifest(engine)
    with pytest.raises(EngineError, match="no such engine folder"):
        mf.load_manifest(engine / "nope")


def test_atomic_folder(tmp_path):
    from valley_rt.errors import OutputError

    target = tmp_path / "e"
    with pytest.raises(RuntimeError):
        with mf.atomic_folder(target) as work:
            (work / "a").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither target nor a leftover partial folder

    def fill(work, text):
        (work / "a").write_text(text)
        mf.write_manifest(work, config={}, source={}, precision={}, parity={})

    with mf.atomic_folder(target) as work:
        fill(work, "v1")
    assert (target / "a").read_text() == "v1"
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700
    with pytest.raises(OutputError, match="already exists there \\(pass --overwrite"):
        with mf.atomic_folder(target):
            pass
    with mf.atomic_folder(target, overwrite=True) as work:
        fill(work, "v2")
    assert (target / "a").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["e"]
    (target / "notes.txt").write_text("mine")  # a file the manifest does not list: no longer ours to delete
    with pytest.raises(OutputError, match="is not a valley-rt engine"):
        with mf.atomic_folder(target, overwrite=True):
            pass
    assert (target / "notes.txt").read_text() == "mine"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_manifest_paths_must_stay_inside_the_engine(engine, tmp_path):
    """files.* and artifacts entries that leave the folder (../, absolute, a symlink out) are refused."""
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"x" * 10)
    path = engine / mf.MANIFEST
    good = json.loads(path.read_text())
    for where, change in [
        ("files.vision", lambda m: m.update(files={"vision": "../outside.onnx"})),
        ("files.llm", lambda m: m.update(files={"llm": str(tmp_path)})),
        ("artifacts", lambda m: m["artifacts"].update({"../outside.onnx": {"sha256": mf.sha256_file(outside),
                                                                             "bytes": 10}})),
    ]:
        m = json.loads(json.dumps(good))
        change(m)
        path.write_text(json.dumps(m))
        with pytest.raises(EngineError, match=f"{where} entry .* outside the engine folder"):
            mf.load_manifest(engine)
    (engine / "link").symlink_to(tmp_path)
    m = json.loads(json.dumps(good))
    m["files"] = {"vision": "link/outside.onnx"}
    path.write_text(json.dumps(m))
    with pytest.raises(EngineError, match="files.vision entry 'link/outside.onnx' resolves to .*outside the engine"):
        mf.load_manifest(engine)


def test_hash_folder_sees_content_and_names(tmp_path):
    (tmp_path / "a").write_text("1")
    h1 = mf.hash_folder(tmp_path)
    (tmp_path / "a").write_text("2")
    h2 = mf.hash_folder(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert len({h1, h2, mf.hash_folder(tmp_path)}) == 3


# -- a real export of a tiny checkpoint -------------------------------------------------------------
def make_checkpoint(path, mode="mean"):
    from valley_rt.checkpoint import save_checkpoint
    from valley_rt.config import preset
    from valley_rt.model import build_model
    from valley_rt.demo.tokenizer import token_layout, train_tokenizer

    texts = ["A red square moves left and a blue circle stays still. ### Human: what moves? Assistant:"] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = preset("tiny")
    cfg.temporal.mode = mode
    cfg.tokens = token_layout(tok)
    cfg.llm.vocab_size = len(tok)
    return save_checkpoint(build_model(cfg, seed=2), path, tokenizer=tok)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


def test_export_engine_end_to_end(checkpoint, tmp_path):
    from valley_rt.backends.vision import OnnxVision, TorchVision
    from valley_rt.checkpoint import load_checkpoint
    from valley_rt.export.engine import export_engine
    from valley_rt.export.onnx_vision import compare, sample_crops

    out = tmp_path / "engine"
    m = export_engine(checkpoint, out, precision="fp32", quant="none", gpu="no")
    # The export's verified stamp still describes every artifact: nothing touched them after the hashing
    # (a chmod would move their ctime, and the first load would hash the whole engine again). Checked
    # before any load: a verifying load re-hashes what it cannot trust and writes a new stamp.
    stamp = json.loads(ef._stamp_path(out).read_text())
    assert set(stamp["files"]) == set(m["artifacts"])
    assert {rel: ef.file_stat(out / rel) for rel in m["artifacts"]} == stamp["files"]
    assert m == mf.load_manifest(out)
    assert m["source"] == {"name": checkpoint.name, "sha256": mf.hash_folder(checkpoint)}  # no machine's path
    llm_meta = json.loads((out / "llm" / "llm_onnx.json").read_text())
    assert llm_meta["source"]["name"] == "llm" and str(tmp_path) not in json.dumps(llm_meta)
    assert llm_meta["quant"]["sym"] is None  # quant="none": not quantized
    assert m["precision"] == {"vision": "fp32", "llm": "fp32"}
    names = set(m["artifacts"])
    assert {"vision.onnx", "llm/llm.onnx", "tokenizer/tokenizer.json"} <= names
    assert m["parity"]["vision"]["parity"]["fp32"]["pooled"]["rel_err"] <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]  # no partial or temp folders left

    model = load_checkpoint(checkpoint)
    crops = sample_crops(model.cfg, 4, seed=9)
    pooled, frames = OnnxVision.from_engine(out).encode(crops)
    ref_pooled, ref_frames = TorchVision(model).encode(crops)
    assert compare(ref_pooled, pooled)["rel_err"] <= 1e-4 and compare(ref_frames, frames)["rel_err"] <= 1e-4

    from valley_rt.errors import OutputError

    with pytest.raises(OutputError, match="already exists there"):
        export_engine(checkpoint, out, precision="fp32", quant="none", gpu="no")


def test_shipped_demo_engine_names_no_build_machine():
    """The bundled engine's manifest and LLM metadata carry no absolute path and say the GPTQ is asymmetric;
    the hand-edited llm_onnx.json still verifies against the manifest's hash."""
    from valley_rt.runtime import DEMO_ENGINE

    m = mf.load_manifest(DEMO_ENGINE)
    llm_meta = json.loads((DEMO_ENGINE / "llm" / "llm_onnx.json").read_text())
    assert m["source"]["name"] == "demo" and "path" not in m["source"]
    assert not isinstance(llm_meta["source"], str) and "path" not in llm_meta["source"]
    assert llm_meta["quant"]["sym"] is False and m["precision"]["llm"] == "gptq4-g32-act"


def test_export_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from valley_rt.cli import app

    res = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "error:" in res.output and not (tmp_path / "e").exists()


def test_export_cli_writes_engine(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from valley_rt.cli import app

    out = tmp_path / "e"
    res = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(out), "--precision", "int8",
                                   "--quant", "rtn4", "--group-size", "32", "--gpu", "no"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["precision"] == {"vision": "int8", "llm": "rtn4-g32"}
    assert summary["vision_parity"]["int8"]["pooled"]["min_cosine"] >= 0.999
    assert mf.load_manifest(out)["precision"] == summary["precision"]
    # stdout is the JSON summary alone; stderr names each stage, the layer loops counted to the end
    stages = [line for line in res.stderr.splitlines() if line.startswith("export: ")]
    for needle in ("export: hashing the checkpoint", "export: vision: tracing the ONNX graph",
                   "export: LLM graph: 4-bit decode graph", "export: LLM graph: W8A8 prompt graph",
                   "export: manifest: hashing the engine", "export: done in "):
        assert any(line.startswith(needle) for line in stages), (needle, res.stderr)
    assert any("layers (100 %)" in line for line in stages), res.stderr


def test_interrupted_export_leaves_no_loadable_folder(checkpoint, tmp_path):
    """SIGKILL an export in the middle (after the vision graph exists): nothing at the target path."""
    out = tmp_path / "engine"
    # The LLM half is made slow (as it is for a real model), so the kill lands mid-export every time.
    code = (f"import time\n"
            f"from valley_rt.export import engine\n"
            f"slow, real = lambda *a, **k: (time.sleep(60), real(*a, **k))[1], engine._export_llm\n"
            f"engine._export_llm = slow\n"
            f"engine.export_engine({str(checkpoint)!r}, {str(out)!r}, precision='fp32', quant='none', gpu='no')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(p.name.startswith(".engine.tmp-") and (p / "vision.onnx").exists() for p in tmp_path.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    with pytest.raises(EngineError):
        mf.load_manifest(out)


@pytest.mark.slow
def test_export_engine_gptq_multimodal_calibration(checkpoint, tmp_path, shared_dir):
    """--quant gptq: calibration on spliced video+text embeddings, held-out gate figures in the manifest."""
    from valley_rt.export.engine import export_engine

    videos = ["snowmobile.mp4", "gray.mp4", "vp9.webm", "yuv444.mp4", "mpeg4.avi", "hevc.mkv", "av1.mp4", "vfr.mp4"]
    records = [{"id": f"r{i}", "video": str(shared_dir / "videos" / v), "conversations": [
        {"from": "human", "value": "<video>\nWhat moves in the video?"},
        {"from": "gpt", "value": f"A red square moves left {i}."}]} for i, v in enumerate(videos)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "engine"
    m = export_engine(checkpoint, out, precision="fp32", quant="gptq", group_size=32, calib=data, keep_failed_gate=True, gpu="no")
    llm = m["parity"]["llm"]
    assert m["precision"]["llm"] == "gptq4-g32" and llm["calibration"] in ("multimodal", "text")
    assert set(llm["alternatives"]) == {"multimodal", "text"}  # both measured, the better kept
    assert llm["calibration_examples"] == 6 and llm["held_out_examples"] == 2
    assert {"ppl_delta", "agreement", "answer_agreement", "em_ref", "em_quant", "sqnr_db", "gate"} <= set(llm)
    assert "llm/llm.onnx" in m["artifacts"] and mf.load_manifest(out) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "engine"]  # GPTQ scratch removed
    # the standard GPTQ folder stays in the engine, hashed like every file
    gdir = out / "llm" / "gptq"
    assert m["files"]["gptq"] == "llm/gptq/" and "llm/gptq/model.safetensors" in m["artifacts"]
    assert "llm/gptq/config.json" in m["artifacts"] and "llm/gptq/tokenizer.json" in m["artifacts"]
    config = json.loads((gdir / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["desc_act"]) == (4, 32, False)
    from safetensors import safe_open

    with safe_open(str(gdir / "model.safetensors"), framework="pt") as st:
        names = set(st.keys())
    proj = "model.layers.0.self_attn.q_proj"
    assert {f"{proj}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")} <= names
    from transformers import AutoTokenizer

    from valley_rt.config import SPECIAL_TOKENS

    tok = AutoTokenizer.from_pretrained(gdir)
    vocab = config["vocab_size"]  # the six Valley tokens are the last ids, as in the checkpoint
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(vocab - 6, vocab))
    (gdir / "config.json").write_text("{}")  # a changed byte in it fails the engine's verification
    with pytest.raises(EngineError):
        mf.load_manifest(out)


def test_export_gptq_needs_calibration(checkpoint, tmp_path):
    from valley_rt.export.engine import export_engine

    with pytest.raises(EngineError, match="--quant gptq needs --calib"):
        export_engine(checkpoint, tmp_path / "e", quant="gptq")
    assert not (tmp_path / "e").exists()


def test_folder_digest_of_one_hashing_pass_equals_hash_folder():
    """export hashes the checkpoint once and derives both source ids (the folder's and llm/'s) from it."""
    from valley_rt.runtime import DEMO_CHECKPOINT

    hashes = ef.file_hashes(DEMO_CHECKPOINT)
    assert ef.folder_digest(hashes) == ef.hash_folder(DEMO_CHECKPOINT)
    assert ef.folder_digest(hashes, under="llm/") == ef.hash_folder(DEMO_CHECKPOINT / "llm")
    assert ef.folder_digest(hashes, under="llm/") != ef.folder_digest(hashes)
