"""Real-size paths on a shape-faithful tiny model: sharded original checkpoints (benchmarks/
make_real_checkpoint.py), streamed convert (with a delta on a base), sharded load, streamed LLM export,
and the one-line errors for a missing, wrong or truncated shard and a base/delta mismatch."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from valley_rt.checkpoint import _read_original_weights, convert_original, load_checkpoint, sanitize
from valley_rt.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
SHARD = 300_000  # bytes: the tiny preset's original layout becomes 4 shards, its converted LLM 2


def _script():
    spec = importlib.util.spec_from_file_location("make_real_checkpoint", ROOT / "benchmarks" / "make_real_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """OUT/{original (delta, fp16, 4 shards), base, clip} and OUT2/valley-rt, written by the script."""
    mk = _script()
    out = tmp_path_factory.mktemp("real")
    assert mk.main([str(out / "d"), "--preset", "tiny", "--delta", "--shard-mb", str(SHARD / 2**20)]) == 0
    assert mk.main([str(out / "o"), "--preset", "tiny", "--shard-mb", str(SHARD / 2**20)]) == 0
    assert mk.main([str(out / "v"), "--preset", "tiny", "--layout", "valley-rt", "--shard-mb", str(SHARD / 2**20)]) == 0
    return out


def _convert(made, name, out, **kw):
    base = {"base_dir": made / name / "base"} if name == "d" else {}
    return convert_original(original_dir=made / name / "original", out_dir=out,
                            vision_tower_dir=made / name / "clip", **base, **kw)


def _states_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_script_writes_real_layouts(made):
    index = json.loads((made / "o" / "original" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    assert any(k.startswith("model.vision_tower.vision_model.") for k in index["weight_map"])
    base_vocab = json.loads((made / "d" / "base" / "config.json").read_text())["vocab_size"]
    assert base_vocab == 994  # the base LLaMA has no added tokens
    assert len(list((made / "v" / "valley-rt" / "llm").glob("model-*.safetensors"))) > 1


def test_streamed_convert_equals_in_memory_path(made, tmp_path):
    """Sharded original (fp16) -> streamed, sharded convert: the same tensors as mapping the whole
    original in memory, and the same as the script's valley-rt layout written directly."""
    out = _convert(made, "o", tmp_path / "conv", max_shard_bytes=SHARD)
    assert len(list((out / "llm").glob("model-*.safetensors"))) > 1
    got = load_checkpoint(out).state_dict()
    mapped, _ = sanitize(_read_original_weights(made / "o" / "original"))
    assert all(v.dtype == torch.float16 for v in mapped.values())
    ref = {k: v for k, v in got.items() if k in mapped}
    _states_equal(ref, {k: v.float() for k, v in mapped.items()})
    _states_equal(got, load_checkpoint(made / "v" / "valley-rt").state_dict())
    # the vision half alone, the LLM left on the meta device
    half = load_checkpoint(out, llm=False)
    assert half.llm.lm_head.weight.is_meta and not half.mm_projector.weight.is_meta
    torch.testing.assert_close(half.mm_projector.weight, got["mm_projector.weight"], rtol=0, atol=0)


def test_streamed_delta_convert_equals_in_memory_sum(made, tmp_path):
    out = _convert(made, "d", tmp_path / "conv", max_shard_bytes=SHARD, dtype="fp32")
    got = load_checkpoint(out).state_dict()
    delta, _ = sanitize(_read_original_weights(made / "d" / "original"))
    base, _ = sanitize(_read_original_weights(made / "d" / "base"))
    for k, d in delta.items():
        want = d.float().clone()
        if k in base:
            want[tuple(slice(0, s) for s in base[k].shape)] += base[k].float()
        assert torch.equal(got[k], want), k
    emb = got["llm.model.embed_tokens.weight"]
    assert torch.equal(emb[994:], delta["llm.model.embed_tokens.weight"][994:].float())  # added rows: delta only


def test_zero_base_is_sparse_and_converts_to_the_delta(tmp_path):
    """--zero-base: the base's shards keep their size but hold (almost) no disk blocks, and the delta
    applied to it gives back the delta (fp32 sum of zeros), through the same streamed convert."""
    mk = _script()
    out = tmp_path / "z"
    # shards of 4 MiB, each holding its header's block and at most the block the header's end shares
    assert mk.main([str(out), "--preset", "tiny", "--delta", "--zero-base", "--shard-mb", "4"]) == 0
    shards = list((out / "base").glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    blocks = sum(f.stat().st_blocks * 512 for f in shards)
    if blocks >= size:  # a file system that does not keep files sparse (the script's figures say so too)
        pytest.skip(f"{tmp_path}: the file system kept the zero blocks")
    assert blocks <= len(shards) * 64 * 1024 < size
    conv = convert_original(original_dir=out / "original", out_dir=tmp_path / "conv", base_dir=out / "base",
                            vision_tower_dir=out / "clip", dtype="fp32")
    got = load_checkpoint(conv).state_dict()
    delta, _ = sanitize(_read_original_weights(out / "original"))
    for k, d in delta.items():
        assert torch.equal(got[k], d.float()), k


def _one_error_line(args) -> str:
    r = subprocess.run([sys.executable, "-m", "valley_rt", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_one_error_line_before_writing(made, tmp_path):
    orig = _copy(made / "o" / "original", tmp_path / "orig")
    (orig / "model-00003-of-00004.safetensors").unlink()
    line = _one_error_line(["convert", str(orig), str(tmp_path / "out"), "--vision-tower", str(made / "o" / "clip")])
    assert "model-00003-of-00004.safetensors: missing shard" in line and "tensor model." in line
    assert not (tmp_path / "out").exists()


def test_truncated_and_wrong_shards_name_file_and_tensor(made, tmp_path):
    orig = _copy(made / "o" / "original", tmp_path / "orig")
    f = orig / "model-00002-of-00004.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00004.safetensors: truncated: tensor \S+ ends at byte"):
        _convert_dir(orig, made / "o" / "clip", tmp_path / "out")
    f.write_bytes(data)
    index_file = orig / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    index["weight_map"][key] = "model-00004-of-00004.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"model-00004-of-00004.safetensors: wrong shard: .*{key}.* in model-00001"):
        _convert_dir(orig, made / "o" / "clip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _convert_dir(orig, clip, out, **kw):
    return convert_original(original_dir=orig, out_dir=out, vision_tower_dir=clip, **kw)


def test_base_delta_mismatch_names_base_file_and_tensor(made, tmp_path):
    from safetensors.torch import load_file, save_file

    base = _copy(made / "d" / "base", tmp_path / "base")
    f = sorted(base.glob("model-*.safetensors"))[-1]
    part = load_file(str(f))
    key = sorted(part)[0]
    part[key] = torch.zeros(part[key].shape[0] + 1, *part[key].shape[1:], dtype=part[key].dtype)
    save_file(part, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{f.name}: base tensor {key} has shape"):
        convert_original(original_dir=made / "d" / "original", out_dir=tmp_path / "out", base_dir=base,
                         vision_tower_dir=made / "d" / "clip")
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_load_errors(made, tmp_path):
    ck = _copy(made / "v" / "valley-rt", tmp_path / "ck")
    shards = sorted((ck / "llm").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"llm/{shards[1].name}: missing shard"):
        load_checkpoint(ck)


def _logits(sess, embeds: np.ndarray, meta: dict) -> np.ndarray:
    shape = meta["shape"]
    feeds = {"inputs_embeds": embeds, "seqlens_k": np.array([embeds.shape[1] - 1], np.int32),
             "total_sequence_length": np.array(embeds.shape[1], np.int32)}
    for i in range(shape["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, shape["num_kv_heads"], 64, meta["cache_head_dim"]),
                                                           np.float32)
    return sess.run(["logits"], feeds)[0]


@pytest.mark.parametrize("quant", ["rtn4", "none"])
def test_streamed_llm_export_equals_in_memory_graph(made, tmp_path, quant):
    """export_llm_onnx from a sharded checkpoint (weights streamed into llm.onnx.data as each layer is
    built) answers exactly as the graph built whole in memory from the same weights in one file."""
    from safetensors.torch import save_file

    from valley_rt.export.llm_onnx import (LlamaShape, QuantSettings, _WeightSource, build_graph,
                                           export_llm_onnx)
    from valley_rt.shards import TensorIndex

    llm = made / "v" / "valley-rt" / "llm"
    export_llm_onnx(llm, tmp_path / "eng", quant=quant, group_size=32)
    meta = json.loads((tmp_path / "eng" / "llm_onnx.json").read_text())
    single = tmp_path / "single"
    single.mkdir()
    index = TensorIndex(llm)
    save_file({k: index.get(k) for k in index.keys()}, str(single / "model.safetensors"))
    cfg = json.loads((llm / "config.json").read_text())
    settings = QuantSettings(quant, "fp32" if quant == "none" else "int8", group_size=32,
                             sym=False if quant == "rtn4" else None)
    model, _ = build_graph(_WeightSource(single, settings), LlamaShape.from_hf_config(cfg, llm))
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(tmp_path / "eng" / "llm.onnx"), providers=["CPUExecutionProvider"])
    embeds = np.random.default_rng(0).standard_normal((1, 7, cfg["hidden_size"])).astype(np.float32)
    a, b = _logits(ref, embeds, meta), _logits(got, embeds, meta)
    assert np.isfinite(a).all() and np.array_equal(a, b)
    assert len(ref.get_inputs()) == len(got.get_inputs())
    assert (tmp_path / "eng" / "llm.onnx").stat().st_size < 100_000  # the weights are all in llm.onnx.data


@pytest.mark.parametrize("bits,group_size,dtype", [(4, 128, torch.float16), (4, 32, torch.float32),
                                                   (8, 32, torch.float16), (4, 64, torch.bfloat16)])
def test_fast_rtn_equals_reference_quantizer(bits, group_size, dtype):
    """rtn_matmul_nbits (straight from [out, in]) writes the same bytes as quantize_rtn + to_matmul_nbits."""
    from valley_rt.export.llm_onnx import quantize_rtn, rtn_matmul_nbits, to_matmul_nbits

    w = (torch.randn(96, 256, generator=torch.Generator().manual_seed(bits + group_size)) * 0.05).to(dtype)
    w[3] = 0  # a row of zeros: scale clamped, zero point 0
    w[5, :group_size] = 0.01  # a group with one value: its range still holds 0
    fast = rtn_matmul_nbits(w, bits=bits, group_size=group_size)
    ref = to_matmul_nbits(quantize_rtn(w.float().T.contiguous(), bits=bits, group_size=group_size))
    for field in ("b", "scales", "zero_points"):
        assert np.array_equal(getattr(fast, field), getattr(ref, field)), field
    assert (fast.perm, fast.bits, fast.block_size, fast.k, fast.n) == (ref.perm, ref.bits, ref.block_size, ref.k, ref.n)
    with pytest.raises(CheckpointError, match="group size 48 does not divide in_features 256"):
        rtn_matmul_nbits(w, bits=4, group_size=48, name="w")


def test_vision_only_load_still_checks_llm_shards(made, tmp_path):
    """export loads only the vision half first: a truncated LLM shard must fail there, not after the
    vision export."""
    ck = _copy(made / "v" / "valley-rt", tmp_path / "ck")
    f = sorted((ck / "llm").glob("model-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"llm/{f.name}: truncated: tensor"):
        load_checkpoint(ck, llm=False)
