"""Checkpoint save/load exactness, load errors, and original-Valley conversion against the fixtures."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from valley_rt.checkpoint import convert_original, load_checkpoint, save_checkpoint
from valley_rt.config import preset
from valley_rt.errors import CheckpointError
from valley_rt.model import build_model

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "original_valley"

MODES = ["model_mean", "model_importance", "model_transformer"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_dir):
    out = {}
    for name in MODES:
        out[name] = convert_original(original_dir=FIXTURES / name, out_dir=tmp_path_factory.mktemp("c") / name)
    return out


@pytest.mark.parametrize("name", MODES)
def test_conversion_matches_original_stage_by_stage(converted, name):
    """The converted model reproduces the original code's outputs (fixtures) at every stage."""
    model = load_checkpoint(converted[name])
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    with torch.no_grad():
        feats = model.vision_features(io["pixel_values"])[0]
        pooled, frames = model.encode_video(io["pixel_values"])
        logits = model(io["input_ids"], io["pixel_values"]).logits
    scale = io["logits"].abs().max()
    torch.testing.assert_close(feats, io["select_layer_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled[0], io["pooled_tokens"], rtol=0, atol=1e-5)
    torch.testing.assert_close(frames[0], io["frame_tokens"], rtol=0, atol=1e-5)
    assert (logits - io["logits"]).abs().max() <= 1e-4 * scale


def test_conversion_reads_mode_flags(converted):
    modes = {n: json.loads((p / "valley.json").read_text())["config"]["temporal"]["mode"] for n, p in converted.items()}
    assert modes == {"model_mean": "mean", "model_importance": "importance", "model_transformer": "transformer"}


def test_converted_parts_open_with_hf_tools(converted):
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    path = converted["model_mean"]
    assert isinstance(LlamaForCausalLM.from_pretrained(path / "llm"), LlamaForCausalLM)
    assert isinstance(CLIPVisionModel.from_pretrained(path / "vision_tower"), CLIPVisionModel)
    tok = AutoTokenizer.from_pretrained(path / "llm")
    assert tok.convert_tokens_to_ids("<vi_end>") == 999


def _as_old_release(src, dst, *, delta_of=None):
    """Rewrite a fixture the way real releases look: transformers-4.28 config, pickled .bin shards,
    `vision_model.` key prefix; optionally as a delta against `delta_of` weights."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["mm_vision_tower"] = str(FIXTURES / "clip")
    (dst / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(src / "model.safetensors"))
    weights = {k.replace("model.vision_tower.", "model.vision_tower.vision_model."): v for k, v in weights.items()}
    if delta_of is not None:
        weights = {k: (v - delta_of[k] if k in delta_of else v) for k, v in weights.items()}
    keys = sorted(weights)
    half = len(keys) // 2
    index = {"weight_map": {}}
    for i, part in enumerate((keys[:half], keys[half:])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: weights[k] for k in part}, dst / fname)
        index["weight_map"].update({k: fname for k in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_old_release_bin_shards_convert_identically(tmp_path, converted):
    _as_old_release(FIXTURES / "model_importance", tmp_path / "orig")
    out = convert_original(original_dir=tmp_path / "orig", out_dir=tmp_path / "conv")
    a, b = load_checkpoint(out), load_checkpoint(converted["model_importance"])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_delta_release_with_base(tmp_path, converted):
    full = load_file(str(FIXTURES / "model_mean" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(v.shape, generator=g) for k, v in full.items()
            if k.startswith("model.layers.") or k in ("model.norm.weight", "lm_head.weight")}
    base["model.embed_tokens.weight"] = torch.randn(994, 64, generator=g)  # base vocab, no added rows
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, str(base_dir / "model.safetensors"))
    delta_of = {k: v for k, v in base.items() if k != "model.embed_tokens.weight"}
    _as_old_release(FIXTURES / "model_mean", tmp_path / "delta", delta_of=delta_of)
    # the embedding delta is applied to the first 994 rows only
    w = load_file(str(FIXTURES / "model_mean" / "model.safetensors"))["model.embed_tokens.weight"].clone()
    w[:994] -= base["model.embed_tokens.weight"]
    parts = sorted((tmp_path / "delta").glob("*.bin"))
    for f in parts:
        d = torch.load(f, weights_only=True)
        if "model.embed_tokens.weight" in d:
            d["model.embed_tokens.weight"] = w
            torch.save(d, f)
    out = convert_original(original_dir=tmp_path / "delta", out_dir=tmp_path / "conv", base_dir=base_dir)
    got = load_checkpoint(out).state_dict()
    ref = load_checkpoint(converted["model_mean"]).state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)


def test_malicious_pickle_is_refused(tmp_path, shared_dir):
    shutil.copytree(FIXTURES / "model_mean", tmp_path / "orig")
    (tmp_path / "orig" / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    with open(tmp_path / "orig" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Boom()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        convert_original(original_dir=tmp_path / "orig", out_dir=tmp_path / "out")


def test_convert_rejects_non_valley(tmp_path, shared_dir):
    shutil.copytree(FIXTURES / "model_mean", tmp_path / "orig")
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'llama', expected 'valley'"):
        convert_original(original_dir=tmp_path / "orig", out_dir=tmp_path / "out")


@pytest.mark.parametrize("mode", ["mean", "max", "importance", "transformer"])
def test_save_load_bit_identical(tmp_path, mode):
    cfg = preset("tiny")
    cfg.temporal.mode = mode
    model = build_model(cfg, seed=3)
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb), ka
    ids = torch.tensor([[1, 5, 996, *[994] * 256, 997, 998, 995, 995, 999, 9]])
    pv = torch.randn(1, 2, 3, 64, 64)
    # One thread: with several, the BLAS may split a reduction differently from call to call under load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids, pv).logits, loaded(ids, pv).logits)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def saved(tmp_path):
    model = build_model(preset("tiny"), seed=3)
    return save_checkpoint(model, tmp_path / "ck")


def test_load_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="valley.json: missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(tmp_path / "nope")


def test_load_original_layout_hints_convert(shared_dir):
    with pytest.raises(CheckpointError, match="valley-rt convert"):
        load_checkpoint(FIXTURES / "model_mean")


def test_load_config_weight_shape_mismatch(saved):
    meta = json.loads((saved / "valley.json").read_text())
    meta["config"]["llm"]["intermediate_size"] = 100
    (saved / "valley.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    msg = str(e.value)
    assert "llm/model.safetensors" in msg and "mlp" in msg and "implies" in msg
    assert ("[128, 64]" in msg and "[100, 64]" in msg) or ("[64, 128]" in msg and "[64, 100]" in msg)
    assert "\n" not in msg


def test_load_missing_tensor(saved):
    w = load_file(str(saved / "valley.safetensors"))
    del w["mm_projector.bias"]
    save_file(w, str(saved / "valley.safetensors"))
    with pytest.raises(CheckpointError, match="valley.safetensors: missing 1 tensor.*mm_projector.bias"):
        load_checkpoint(saved)


def test_load_corrupt_weights_and_version(saved):
    (saved / "vision_tower" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="vision_tower/model.safetensors: not a readable safetensors"):
        load_checkpoint(saved)
    meta = json.loads((saved / "valley.json").read_text())
    meta["version"] = 99
    (saved / "valley.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(saved)


def test_convert_never_deletes_what_it_did_not_write(tmp_path, shared_dir, monkeypatch):
    """convert used to rmtree OUT and OUT.tmp unasked: a folder of user files, the source itself."""
    from valley_rt import checkpoint
    from valley_rt.errors import OutputError
    from valley_rt.export.manifest import hash_folder

    src = tmp_path / "orig"
    shutil.copytree(FIXTURES / "model_mean", src)
    shutil.copytree(FIXTURES / "clip", tmp_path / "clip")
    src_hash = hash_folder(src)
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"\xff\xd8 a photo")
    with pytest.raises(OutputError, match="is not a valley-rt checkpoint"):
        convert_original(original_dir=src, out_dir=user)
    with pytest.raises(OutputError, match="the output is the input"):
        convert_original(original_dir=src, out_dir=src)
    with pytest.raises(OutputError, match="the output is inside the input"):
        convert_original(original_dir=src, out_dir=src / "llm")
    assert (user / "a.jpg").read_bytes() == b"\xff\xd8 a photo" and hash_folder(src) == src_hash

    out = tmp_path / "ckpt"
    (tmp_path / "ckpt.tmp").mkdir()  # someone else's sibling with the name the old code used
    (tmp_path / "ckpt.tmp" / "keep").write_text("mine")
    convert_original(original_dir=src, out_dir=out)
    with pytest.raises(OutputError, match="already exists there"):
        convert_original(original_dir=src, out_dir=out)
    with pytest.raises(OutputError, match="is not a valley-rt checkpoint"):  # --overwrite is no licence
        convert_original(original_dir=src, out_dir=user, overwrite=True)
    real_save = checkpoint._save_hf_config

    def save_then_fail(module, folder, dtype):
        real_save(module, folder, dtype)
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "_save_hf_config", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):  # a failure mid-way keeps the old checkpoint
        convert_original(original_dir=src, out_dir=out, overwrite=True)
    monkeypatch.undo()
    load_checkpoint(out)
    convert_original(original_dir=src, out_dir=out, overwrite=True)
    assert (tmp_path / "ckpt.tmp" / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.tmp", "clip", "orig", "photos"]
