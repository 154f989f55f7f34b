"""The ONNX LLM backend against the transformers reference, and the GPTQ -> MatMulNBits repacking
against a plain-torch dequantize-then-matmul, on tiny LLaMAs (GQA; heads of 8 are zero-padded to 16)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from valley_rt.backends.llm_onnx import OnnxLLM
from valley_rt.backends.llm_torch import TorchLLM
from valley_rt.errors import CheckpointError, ContextLengthError, EngineError
from valley_rt.export.gptq_format import GPTQLinear, pack_int32, to_gptq_checkpoint, unpack_int32
from valley_rt.export.llm_onnx import _Graph, export_llm_onnx, iter_linear_names, quantize_rtn, to_matmul_nbits
from valley_rt.generate import SamplingParams, generate

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llama import save_tiny_llamas, tiny_llama as _tiny_llama  # noqa: E402  (tests/tiny_llama.py)

# (hidden, heads, kv heads): head_dim 8 (padded inside the graph) and head_dim 32 (native)
SHAPES = {"hd8": (64, 8, 2), "hd32": (128, 4, 2)}


def tiny_llama(kind: str = "hd8", seed: int = 0) -> LlamaForCausalLM:
    return _tiny_llama(*SHAPES[kind], seed=seed)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return save_tiny_llamas(tmp_path_factory, SHAPES)


def _torch(folder) -> TorchLLM:
    return TorchLLM(LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32))


# ------------------------------------------------------------------------------------------- packing


def test_int32_packing_roundtrip():
    fields = torch.randint(0, 16, (64, 24))
    assert torch.equal(unpack_int32(pack_int32(fields, 4, dim=0), 4, dim=0), fields)
    assert torch.equal(unpack_int32(pack_int32(fields, 4, dim=1), 4, dim=1), fields)


def test_gptq_v1_zero_wraparound_roundtrip():
    w = torch.rand(64, 16)  # all positive: asymmetric zeros are 0, stored as -1 in the v1 format
    lin = quantize_rtn(w, bits=4, group_size=32)
    assert (lin.zeros == 0).any()
    ck = to_gptq_checkpoint(lin)
    back = GPTQLinear.from_checkpoint(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], bits=4,
                                      group_size=32, zeros_stored_minus_one=True)
    assert torch.equal(back.q, lin.q) and torch.equal(back.zeros, lin.zeros)
    torch.testing.assert_close(back.dequantize(), lin.dequantize(), atol=1e-3, rtol=1e-3)  # fp16 scales


def _act_order_g_idx(k: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """What act-order GPTQ writes: rows quantized in a permuted order, group = rank // group_size."""
    order = torch.randperm(k, generator=gen)
    g = torch.empty(k, dtype=torch.int64)
    g[order] = torch.arange(k) // group_size
    return g


def _run_linear(w, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    g = _Graph(accuracy_level)
    y = g.linear("x", w, "w")
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, w.k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, 64, True), (4, 32, True), (8, 32, False)])
def test_matmul_nbits_equals_plain_torch_dequant(bits, group_size, act_order):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    k, n = 256, 96
    w = torch.randn(k, n, generator=gen)
    g_idx = _act_order_g_idx(k, group_size, gen) if act_order else None
    lin = quantize_rtn(w, bits=bits, group_size=group_size, g_idx=g_idx)
    ck = to_gptq_checkpoint(lin)  # through the on-disk int32 format, as a GPTQ folder holds it
    lin = GPTQLinear.from_checkpoint(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], bits=bits,
                                     group_size=group_size, zeros_stored_minus_one=True)
    packed = to_matmul_nbits(lin)
    assert (packed.perm is not None) == act_order
    x = torch.randn(1, 5, k, generator=gen)
    want = (x @ lin.dequantize()).numpy()  # plain torch: dequantize, then matmul
    exact = _run_linear(packed, x.numpy(), accuracy_level=0)  # fp32 compute: the repacking itself
    np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-4)
    fast = _run_linear(packed, x.numpy(), accuracy_level=4)  # int8 activations: the fast kernel
    cos = np.sum(fast * want) / np.linalg.norm(fast) / np.linalg.norm(want)
    assert cos > 0.999


def _group_sq_err(wg, scales, zeros, qmax):
    """Squared rounding error per group of wg [N, G, gs] at the given [N, G] scales and zero points."""
    q = wg.div(scales[..., None]).round().add(zeros[..., None]).clamp(0, qmax)
    return ((q - zeros[..., None]) * scales[..., None] - wg).pow(2).sum(-1)


@pytest.mark.parametrize("sym", [False, True])
def test_rtn_range_search_never_loses_to_min_max(sym):
    """rtn_scales keeps, per group, the shrunk range with the least squared rounding error, min-max
    among the candidates: no group may end worse than min-max, and on heavy-tailed weights in groups
    of 128 the total must drop clearly (~9 % here)."""
    from valley_rt.export.llm_onnx import rtn_scales

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(64, 1024, generator=gen) / torch.rand(64, 1024, generator=gen).add(0.2).sqrt()  # heavy tails
    wg = w.view(64, 8, 128)
    s1, z1 = rtn_scales(wg, dim=-1, qmax=15, sym=sym, ratios=(1.0,))
    s, z = rtn_scales(wg, dim=-1, qmax=15, sym=sym)
    plain, searched = _group_sq_err(wg, s1, z1, 15), _group_sq_err(wg, s, z, 15)
    assert (searched <= plain * (1 + 1e-6)).all()
    assert searched.sum() < 0.95 * plain.sum()
    assert (s < s1).any() and (z == z.round()).all() and z.min() >= 0 and z.max() <= 15
    # one far outlier: clipping it buys a finer step for the other 127 values
    g = torch.randn(1, 1, 128, generator=gen) * 0.01
    g[0, 0, 5] = 0.2
    s_out, _ = rtn_scales(g, dim=-1, qmax=15, sym=sym)
    s_mm, _ = rtn_scales(g, dim=-1, qmax=15, sym=sym, ratios=(1.0,))
    assert s_out.item() < 0.99 * s_mm.item()


def test_rtn_small_groups_keep_min_max():
    """Groups under RTN_SEARCH_MIN_GROUP are min-max: the search gains nothing measurable there
    (docs/peers.md), so their bytes stay as they were."""
    from valley_rt.export.llm_onnx import rtn_scales

    qmax = 15
    wg = torch.randn(16, 4, 32, generator=torch.Generator().manual_seed(32))
    wg[0, 0, 0] = 50.0  # an outlier the search would clip
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    s, z = rtn_scales(wg, dim=-1, qmax=qmax)
    torch.testing.assert_close(s, ((hi - lo) / qmax).clamp(min=1e-8), rtol=0, atol=0)
    torch.testing.assert_close(z, torch.round(-lo / s).clamp(0, qmax), rtol=0, atol=0)


def test_the_second_rtn_pass_reuses_the_first_ones_ranges(hf_dirs, monkeypatch):
    """export's two passes over rtn4 weights (int4 graph, then the W8A8 graph) pack the same bytes; the
    second takes the ranges the first searched instead of searching again."""
    import valley_rt.export.llm_onnx as lo

    calls = []
    search = lo.rtn_scales
    monkeypatch.setattr(lo, "rtn_scales", lambda *a, **k: (calls.append(1), search(*a, **k))[1])
    settings = lo.QuantSettings(quant="rtn4", lm_head="int8", bits=4, group_size=64)
    two = lo._WeightSource(hf_dirs["hd32"], settings, passes=2)
    one = lo._WeightSource(hf_dirs["hd32"], settings)
    name = "model.layers.1.mlp.down_proj"
    first, second, plain = two.linear(name), two.linear(name), one.linear(name)
    assert len(calls) == 2  # the two-pass source searched once, the one-pass source once
    for field in ("b", "scales", "zero_points"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field
        assert np.array_equal(getattr(first, field), getattr(plain, field)), field
    assert name not in two._ranges  # handed over, not held for the rest of the export


def test_bad_grouping_is_rejected():
    lin = quantize_rtn(torch.randn(64, 8), bits=4, group_size=32)
    lin.g_idx = torch.zeros(64, dtype=torch.int64)  # one group of 64 rows with group_size 32
    with pytest.raises(CheckpointError, match="g_idx"):
        to_matmul_nbits(lin)


# ------------------------------------------------------------------------------------------- fp32 parity


@pytest.mark.parametrize("kind", list(SHAPES))
def test_onnx_fp32_matches_torch(hf_dirs, tmp_path, kind):
    onnx_llm = OnnxLLM(export_llm_onnx(hf_dirs[kind], tmp_path, quant="none"))
    ref = _torch(hf_dirs[kind])
    assert onnx_llm.name == "onnx-fp32"
    ids = list(range(3, 40))
    torch.testing.assert_close(onnx_llm.embed(ids), ref.embed(ids))
    torch.testing.assert_close(onnx_llm.prefill(onnx_llm.embed(ids)), ref.prefill(ref.embed(ids)), atol=2e-4, rtol=1e-4)
    for tok in (5, 17, 900):
        torch.testing.assert_close(onnx_llm.decode(tok), ref.decode(tok), atol=2e-4, rtol=1e-4)
    assert onnx_llm.position == ref.position == len(ids) + 3


def test_onnx_greedy_tokens_match_torch(hf_dirs, tmp_path):
    onnx_llm = OnnxLLM(export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="none"))
    ref = _torch(hf_dirs["hd8"])

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" {i}" for i in ids)

    params = SamplingParams(max_new_tokens=24)
    a = generate(onnx_llm, Tok(), input_ids=list(range(10, 30)), params=params, stop=(), eos_token_id=-1)
    b = generate(ref, Tok(), input_ids=list(range(10, 30)), params=params, stop=(), eos_token_id=-1)
    assert a.token_ids == b.token_ids
    assert a.text == b.text


def test_truncate_then_prefill_equals_fresh_run(hf_dirs, tmp_path):
    path = export_llm_onnx(hf_dirs["hd32"], tmp_path, quant="none")
    llm = OnnxLLM(path)
    prefix, turn1, turn2 = list(range(5, 25)), [40, 41, 42], [50, 51, 52, 53]
    llm.prefill(llm.embed(prefix))
    llm.prefill(llm.embed(turn1))
    llm.decode(60)
    llm.truncate(len(prefix))
    got = llm.prefill(llm.embed(turn2))
    fresh = OnnxLLM(path)
    want = fresh.prefill(fresh.embed(prefix + turn2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    llm.reset()
    assert llm.position == 0
    torch.testing.assert_close(llm.prefill(llm.embed(prefix + turn2)), want, atol=1e-5, rtol=1e-5)


def test_context_limit(hf_dirs, tmp_path):
    llm = OnnxLLM(export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="none"), max_context=32)
    assert llm.max_context == 32

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return ""

    with pytest.raises(ContextLengthError, match="prompt of 30 tokens \\+ max_new_tokens 8 exceeds the context of 32"):
        generate(llm, Tok(), input_ids=list(range(30)), params=SamplingParams(max_new_tokens=8))
    assert llm.position == 0


# ------------------------------------------------------------------------------------------- int4


def _cos(a, b) -> float:
    """Cosine of two logit vectors (the backends return NumPy arrays)."""
    return float(torch.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=0))


def _sqnr_db(got, want) -> float:
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    return float(10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()))


def test_rtn4_logits_close_to_fp32(hf_dirs, tmp_path):
    llm = OnnxLLM(export_llm_onnx(hf_dirs["hd32"], tmp_path, quant="rtn4", group_size=32))
    ref = _torch(hf_dirs["hd32"])
    ids = list(range(3, 40))
    got, want = llm.prefill(llm.embed(ids)), ref.prefill(ref.embed(ids))
    assert llm.label == "onnx-int4" and set(llm.tags) <= {"native-decode", "amx-prompt"}  # native where the CPU allows
    assert json.loads((tmp_path / "llm_onnx.json").read_text())["quant"]["sym"] is False  # quantize_rtn's zero points
    assert _cos(got, want) > 0.99
    assert _sqnr_db(got, want) > 15


def write_tiny_gptq(model: LlamaForCausalLM, folder, *, group_size: int, desc_act: bool, seed: int = 0) -> LlamaForCausalLM:
    """Quantize every linear of `model` (RTN, symmetric) into a GPTQ v1 folder as GPTQModel lays it out;
    with desc_act, act-order style g_idx (shared by q/k/v and by gate/up, as one Hessian gives them,
    except layer 1's v_proj, which gets its own to exercise the unfused path). Returns the model with
    the dequantized weights: the exact reference for the folder."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = LlamaForCausalLM(model.config).eval()
    ref_sd = dict(sd)
    shared: dict[tuple, torch.Tensor] = {}
    tensors = {}
    for prefix in iter_linear_names(_shape(model)):
        w = sd.pop(prefix + ".weight").T.contiguous()  # [in, out]
        g_idx = None
        if desc_act:
            layer, part = prefix.split(".")[2], prefix.split(".")[-1]
            share = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(part, part)
            if layer == "1" and part == "v_proj":
                share = "v"
            key = (layer, share)
            if key not in shared:
                shared[key] = _act_order_g_idx(w.shape[0], group_size, gen)
            g_idx = shared[key]
        lin = quantize_rtn(w, bits=4, group_size=group_size, sym=True, g_idx=g_idx)
        for name, t in to_gptq_checkpoint(lin).items():
            tensors[f"{prefix}.{name}"] = t
        back = GPTQLinear.from_checkpoint(tensors[prefix + ".qweight"], tensors[prefix + ".qzeros"],
                                          tensors[prefix + ".scales"], tensors[prefix + ".g_idx"], bits=4,
                                          group_size=group_size, zeros_stored_minus_one=True)
        ref_sd[prefix + ".weight"] = back.dequantize().T.contiguous()
    for k, v in sd.items():
        tensors[k] = v.half() if v.is_floating_point() else v
        if v.is_floating_point():
            ref_sd[k] = v.half().float()  # the folder stores fp16, like GPTQModel's output
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                  "desc_act": desc_act, "sym": True, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(cfg))
    ref.load_state_dict(ref_sd)
    return ref


def _shape(model):
    from valley_rt.export.llm_onnx import LlamaShape

    return LlamaShape.from_hf_config(model.config.to_dict(), "config")


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_folder_matches_dequantized_reference(tmp_path, desc_act):
    model = tiny_llama("hd8", seed=3)
    gdir = tmp_path / "gptq"
    gdir.mkdir()
    ref_model = write_tiny_gptq(model, gdir, group_size=32, desc_act=desc_act)
    ref = TorchLLM(ref_model)
    # accuracy_level 0 (fp32 activations) + fp32 lm_head: only float rounding separates the two
    exact = OnnxLLM(export_llm_onnx(gdir, tmp_path / "exact", quant="gptq", lm_head="fp32", accuracy_level=0))
    ids = list(range(3, 30))
    want = ref.prefill(ref.embed(ids))
    torch.testing.assert_close(exact.prefill(exact.embed(ids)), want, atol=2e-3, rtol=1e-3)
    # the shipped configuration: int8 activations in MatMulNBits, int8 lm_head
    fast = OnnxLLM(export_llm_onnx(gdir, tmp_path / "fast", quant="gptq"))
    assert json.loads((tmp_path / "fast" / "llm_onnx.json").read_text())["quant"]["sym"] is True  # the config's
    got = fast.prefill(fast.embed(ids))
    assert _cos(got, want) > 0.995
    assert _sqnr_db(got, want) > 20
    for tok in (7, 8):
        got, want = fast.decode(tok), ref.decode(tok)
        assert _cos(got, want) > 0.995


def test_export_errors(hf_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="quantization_config"):
        export_llm_onnx(hf_dirs["hd8"], tmp_path / "x", quant="gptq")
    with pytest.raises(CheckpointError, match="config.json"):
        export_llm_onnx(tmp_path / "missing", tmp_path / "y", quant="none")
    with pytest.raises(EngineError, match="expected an exported LLM file"):
        OnnxLLM(tmp_path / "nothing_here")
    path = export_llm_onnx(hf_dirs["hd8"], tmp_path / "old", quant="none")
    meta = json.loads((path.parent / "llm_onnx.json").read_text())
    meta["format_version"] = 1
    (path.parent / "llm_onnx.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="expected LLM format_version 2, got 1"):
        OnnxLLM(path)


@pytest.mark.slow
@pytest.mark.parametrize("desc_act", [False, True])
def test_real_gptqmodel_folder_converts_exactly(tmp_path, desc_act):
    """GPTQModel's own output (quantize -> save) -> export -> OnnxLLM equals the plain-torch
    dequantized model (export.gptq.load_gptq_as_torch), then generates the same greedy answer."""
    from valley_rt.export.gptq import GPTQSettings, load_gptq_as_torch, quantize_llm

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = tmp_path / "src"
    tiny_llama("hd32").save_pretrained(src)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 1000)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(src)  # quantize_llm copies the tokenizer
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, 1000, (48,), generator=gen)} for _ in range(6)]
    qdir = quantize_llm(src, tmp_path / "gptq", calibration=calib,
                        settings=GPTQSettings(group_size=32, desc_act=desc_act))
    ref_model = load_gptq_as_torch(qdir)
    ref = TorchLLM(ref_model[0] if isinstance(ref_model, tuple) else ref_model)
    exact = OnnxLLM(export_llm_onnx(qdir, tmp_path / "exact", quant="gptq", lm_head="fp32", accuracy_level=0))
    ids = list(range(3, 40))
    want = ref.prefill(ref.embed(ids))
    torch.testing.assert_close(exact.prefill(exact.embed(ids)), want, atol=1e-4, rtol=1e-4)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" {i}" for i in ids)

    fast = OnnxLLM(export_llm_onnx(qdir, tmp_path / "fast", quant="gptq"))  # int8 activations + lm_head
    assert _cos(fast.prefill(fast.embed(ids)), want) > 0.999
    exact.reset()
    ref.reset()
    params = SamplingParams(max_new_tokens=12)
    a = generate(exact, Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    b = generate(ref, Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    assert a.token_ids == b.token_ids


# ------------------------------------------------------------------------------------------- W8A8 prompt graph


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_nbits_is_the_gptq_dequantize(act_order):
    from valley_rt.export.llm_onnx import dequantize_nbits

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 48, generator=gen)
    g_idx = _act_order_g_idx(128, 32, gen) if act_order else None
    lin = quantize_rtn(w, bits=4, group_size=32, g_idx=g_idx)
    packed = to_matmul_nbits(lin)
    assert (packed.perm is not None) == act_order
    np.testing.assert_allclose(dequantize_nbits(packed), lin.dequantize().numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,desc_act", [("hd8", False), ("hd32", True)])
def test_w8a8_prefill_graph_continues_into_int4_decode(tmp_path, monkeypatch, kind, desc_act):
    """The prompt graph (int8 GEMMs) writes the KV cache the int4 decode graph reads: its logits and
    the greedy continuation match the int4-only engine's, and both stay close to the dequantized
    reference (heads padded to 16 with hd8; act-order permutations with desc_act)."""
    from valley_rt.backends.llm_onnx import PREFILL_ENV, PREFILL_MIN_TOKENS

    gdir = tmp_path / "gptq"
    gdir.mkdir()
    ref = TorchLLM(write_tiny_gptq(tiny_llama(kind, seed=4), gdir, group_size=32, desc_act=desc_act))
    path = export_llm_onnx(gdir, tmp_path / "engine", quant="gptq")
    monkeypatch.setenv(PREFILL_ENV, "int8")
    w8 = OnnxLLM(path.parent)
    monkeypatch.setenv(PREFILL_ENV, "int4")
    w4 = OnnxLLM(path.parent)
    assert w8.prefill_session is not None and w4.prefill_session is None
    ids = [3 + (7 * i) % 990 for i in range(PREFILL_MIN_TOKENS + 20)]
    want = ref.prefill(ref.embed(ids))
    got8, got4 = w8.prefill(w8.embed(ids)), w4.prefill(w4.embed(ids))
    assert not np.array_equal(got8, got4)  # the prompt really ran on the other graph
    for got in (got8, got4):
        assert _cos(got, want) > 0.995
        assert _sqnr_db(got, want) > 20
    for tok in (5, 6, 7):  # decode (int4 graph in both) reads the cache each prompt graph wrote
        a, b, r = w8.decode(tok), w4.decode(tok), ref.decode(tok)
        assert _cos(a, r) > 0.995 and _cos(a, b) > 0.998

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(f" {i}" for i in ids)

    w8.reset()
    w4.reset()
    params = SamplingParams(max_new_tokens=12)
    a = generate(w8, Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    b = generate(w4, Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    assert a.token_ids == b.token_ids


def test_prefill_policy_rejects_unknown_values(hf_dirs, tmp_path, monkeypatch):
    from valley_rt.backends.llm_onnx import PREFILL_ENV

    path = export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="rtn4", group_size=32)
    monkeypatch.setenv(PREFILL_ENV, "bf16")
    with pytest.raises(EngineError, match="expected auto, int8 or int4"):
        OnnxLLM(path.parent)


def test_deferred_load_opens_both_graphs_on_a_worker_and_gives_the_same_logits(tmp_path, monkeypatch):
    """defer_load + load_rest_in_background: __init__ opens no session, the worker opens both graphs and
    warms the decode graph without moving the position, and the first prefill waits for it: logits
    bit-identical to an engine loaded eagerly, on both graphs (prompt graph, then decode steps)."""
    from valley_rt.backends.llm_onnx import PREFILL_ENV, PREFILL_MIN_TOKENS

    gdir = tmp_path / "gptq"
    gdir.mkdir()
    write_tiny_gptq(tiny_llama("hd8", seed=5), gdir, group_size=32, desc_act=False)
    path = export_llm_onnx(gdir, tmp_path / "engine", quant="gptq")
    monkeypatch.setenv(PREFILL_ENV, "int8")
    import threading

    import valley_rt.backends.llm_onnx as llm_onnx

    eager = OnnxLLM(path.parent)
    monkeypatch.setattr(llm_onnx, "KV_START_SLOTS", 16)  # the prompt below grows the lazy engine's cache
    lazy = OnnxLLM(path.parent, defer_load=True)
    assert lazy.session is None and lazy.prefill_session is None and lazy.has_prefill_graph
    # The worker opens the prompt graph first; hold it before the int4 graph: a prompt runs meanwhile
    # (and grows the KV cache, which the int4 graph must then be bound to), and the first decode step waits.
    gate, opened = threading.Event(), OnnxLLM._open_sessions

    def held(self, which=("prefill_session", "session")):
        if which == ("session",):
            assert gate.wait(60)
        return opened(self, which)

    monkeypatch.setattr(OnnxLLM, "_open_sessions", held)
    lazy.load_rest_in_background()
    ids = [3 + (5 * i) % 990 for i in range(PREFILL_MIN_TOKENS + 9)]
    np.testing.assert_array_equal(lazy.prefill(lazy.embed(ids)), eager.prefill(eager.embed(ids)))
    assert lazy.prefill_session is not None and lazy.session is None and lazy.position == len(ids)
    assert lazy.cache_slots >= len(ids) > 16
    gate.set()
    for tok in (5, 6):
        np.testing.assert_array_equal(lazy.decode(tok), eager.decode(tok))
    assert lazy._loader is None and lazy.session is not None
    # No worker started: the first run opens what is deferred itself.
    plain = OnnxLLM(path.parent, defer_load=True)
    np.testing.assert_array_equal(plain.prefill(plain.embed(ids)), lazy.fork().prefill(lazy.embed(ids)))


def test_the_background_load_holds_the_decode_graph_until_a_decode_step_needs_it(hf_dirs, tmp_path, monkeypatch):
    """With a prompt graph, the worker opens it and then waits: the first prompt runs with the cores to
    itself, and the int4 decode graph opens when the first decode step (or a fork, or wait_loaded) needs
    it; the logits are those of an eagerly loaded engine. "background-both" opens both without waiting."""
    from valley_rt.backends.llm_onnx import LOAD_ENV, PREFILL_ENV, PREFILL_MIN_TOKENS

    path = export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="rtn4", group_size=32)
    monkeypatch.setenv(PREFILL_ENV, "int8")
    eager = OnnxLLM(path.parent)
    ids = [3 + (7 * i) % 990 for i in range(PREFILL_MIN_TOKENS + 5)]
    want = [eager.prefill(eager.embed(ids))] + [eager.decode(t) for t in (5, 6)]

    lazy = OnnxLLM(path.parent, defer_load=True)
    lazy.load_rest_in_background()
    with lazy.first_token_work():  # what the runtime marks: a video's encode, an answer
        got = [lazy.prefill(lazy.embed(ids))]
        deadline = time.monotonic() + 3  # opening the tiny graph takes milliseconds: time enough to see it held
        while time.monotonic() < deadline and lazy.session is None:
            time.sleep(0.05)
        assert lazy.session is None and lazy._loader._thread.is_alive()
        got += [lazy.decode(t) for t in (5, 6)]
    assert lazy.session is not None and lazy._loader is None and lazy.load_wait_s >= lazy.prompt_wait_s
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)

    # A caller out of first-token work for IDLE_S (a chat waiting for its first question): the worker
    # opens the decode graph (and warms it) without a decode step asking.
    idle = OnnxLLM(path.parent, defer_load=True)
    with idle.first_token_work():
        idle.load_rest_in_background()
        idle.prefill(idle.embed(ids))
        time.sleep(0.5)
        assert idle.session is None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and idle.session is None:
        time.sleep(0.05)
    assert idle.session is not None
    idle.wait_loaded()
    np.testing.assert_array_equal(idle.decode(5), want[1])

    monkeypatch.setenv(LOAD_ENV, "background-both")
    both = OnnxLLM(path.parent, defer_load=True)
    both.load_rest_in_background()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and both.session is None:
        time.sleep(0.05)
    assert both.session is not None  # no decode step asked for it
    both.wait_loaded()


def test_a_prompts_wait_for_the_background_load_is_counted_as_the_prompts(hf_dirs, tmp_path, monkeypatch):
    """Without a prompt graph the int4 graph serves the prompt: its wait for the worker is the prompt's
    (prompt_wait_s, which benchmarks subtract from the prefill), not a decode step's."""
    import threading

    from valley_rt.backends.llm_onnx import PREFILL_ENV

    path = export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="rtn4", group_size=32)
    monkeypatch.setenv(PREFILL_ENV, "int4")
    opened = OnnxLLM._open_sessions

    def slow(self, which=("prefill_session", "session")):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.3)
        return opened(self, which)

    monkeypatch.setattr(OnnxLLM, "_open_sessions", slow)
    llm = OnnxLLM(path.parent, defer_load=True)
    llm.load_rest_in_background()
    llm.prefill(llm.embed(list(range(3, 20))))
    assert llm.load_wait_s > 0.1 and llm.prompt_wait_s == llm.load_wait_s
    llm.decode(5)
    assert llm.prompt_wait_s == llm.load_wait_s


def test_a_background_load_failure_is_one_engine_error_at_first_use(hf_dirs, tmp_path, monkeypatch):
    from valley_rt.backends.llm_onnx import LOAD_ENV, PREFILL_ENV, background_load_policy

    path = export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="rtn4", group_size=32)
    monkeypatch.setenv(PREFILL_ENV, "int8")
    prompt_graph = path.parent / "llm_prefill.onnx"
    prompt_graph.write_bytes(prompt_graph.read_bytes()[:1000])  # a cut file
    llm = OnnxLLM(path.parent, defer_load=True)  # nothing opened yet: no error
    llm.load_rest_in_background()
    with pytest.raises(EngineError, match="llm_prefill.onnx: ONNX Runtime cannot open it"):
        llm.prefill(llm.embed(list(range(3, 80))))
    monkeypatch.setenv(LOAD_ENV, "lazy")
    with pytest.raises(EngineError, match="expected background, background-both or eager"):
        background_load_policy()


def test_a_process_that_exits_during_the_background_load_waits_for_it(hf_dirs, tmp_path):
    """The interpreter shuts down while the worker is inside ONNX Runtime (creating a session, or
    running the warm-up): it must wait for the worker, as for any non-daemon thread. A daemon worker
    there is torn down mid-call, and on bench-1b that aborted the process ('terminate called without
    an active exception'). atexit handlers run after that wait, so the worker must be done by then. The
    engine has a prompt graph, so the worker holds the decode graph for a decode step that never comes:
    it must see the main thread end and give up, or the process hangs."""
    import subprocess
    import sys

    path = export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="rtn4", group_size=32)
    code = ("import atexit, sys\n"
            "from valley_rt.backends.llm_onnx import OnnxLLM\n"
            f"llm = OnnxLLM({str(path.parent)!r}, defer_load=True)\n"
            "llm.load_rest_in_background()\n"
            "atexit.register(lambda: print('worker alive at exit:', llm._loader._thread.is_alive()))\n"
            "sys.exit(0)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VALLEY_RT_PREFILL": "int8"})
    assert p.returncode == 0 and "terminate" not in p.stderr, p.stderr[-500:]
    assert "worker alive at exit: False" in p.stdout, p.stdout


def test_prefill_policy_auto_skips_a_prompt_graph_too_big_for_ram(monkeypatch):
    """auto: the W8A8 prompt graph is loaded on CPUs with AMX-INT8 or AVX512-VNNI only when its weights fit
    a share of the RAM (a 7B's 6.6 GB int8 copy beside the 3.6 GB int4 one is not loaded on a 24 GB machine)."""
    from valley_rt.backends import llm_onnx

    monkeypatch.delenv(llm_onnx.PREFILL_ENV, raising=False)
    monkeypatch.setattr(llm_onnx, "cpu_has_int8_gemm", lambda: True)
    monkeypatch.setattr(llm_onnx, "total_memory_bytes", lambda: 24 * 2**30)
    assert llm_onnx.prefill_policy(1 * 2**30)
    assert not llm_onnx.prefill_policy(int(6.6 * 2**30))
    monkeypatch.setenv(llm_onnx.PREFILL_ENV, "int8")
    assert llm_onnx.prefill_policy(int(6.6 * 2**30))
    monkeypatch.setenv(llm_onnx.PREFILL_ENV, "int4")
    assert not llm_onnx.prefill_policy(1)
    monkeypatch.setattr(llm_onnx, "cpu_has_int8_gemm", lambda: False)
    monkeypatch.delenv(llm_onnx.PREFILL_ENV)
    assert not llm_onnx.prefill_policy(1)


@pytest.mark.parametrize("flags, want", [({"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile"}, True),
                                         ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, True),  # Zen 4
                                         ({"avx2", "avx_vnni"}, False), ({"avx2", "avx512f"}, False), (set(), False)])
def test_the_prompt_graph_goes_where_the_cpu_has_int8_gemm_units(monkeypatch, flags, want):
    from valley_rt.backends import llm_onnx

    monkeypatch.setattr("valley_rt.cpu.cpu_flags", lambda: frozenset(flags))
    assert llm_onnx.cpu_has_int8_gemm() is want


def test_kv_cache_grows_on_demand_with_the_same_logits(hf_dirs, tmp_path, monkeypatch):
    """The KV cache starts at KV_START_SLOTS rows and grows (rows in use copied, buffers rebound) as the
    context needs: the logits equal those of a cache that never had to grow, and a fork starts small."""
    from valley_rt.backends import llm_onnx

    path = export_llm_onnx(hf_dirs["hd8"], tmp_path, quant="rtn4", group_size=32, prefill="none")
    roomy = OnnxLLM(path.parent)
    monkeypatch.setattr(llm_onnx, "KV_START_SLOTS", 4)
    small = OnnxLLM(path.parent)
    assert small.cache_slots == 4 and roomy.cache_slots > 16
    ids = list(range(3, 13))
    runs = []
    for llm in (roomy, small):
        out = [llm.prefill(llm.embed(ids[:3])), llm.prefill(llm.embed(ids[3:]))]  # 3 rows, then 10: grows
        out += [llm.decode(t) for t in (5, 6, 7, 8, 9, 10, 11)]  # 17 rows: grows again
        runs.append(np.stack(out))
    assert small.cache_slots >= 17
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    assert small.fork().cache_slots == 4


def test_append_chunks_bound_the_materialized_attention_scratch():
    from valley_rt.backends.llm_onnx import append_chunks

    assert append_chunks(554, 0, 32, "flash") == [554]
    assert append_chunks(1, 4000, 32, "materialized") == [1]
    assert append_chunks(554, 0, 32, "materialized") == [554]  # 32 x 554 x 554 x 4 B = 39 MB: one run
    for s, past in ((4096, 0), (3000, 1000), (700, 3000), (10_000, 0)):
        chunks = append_chunks(s, past, 32, "materialized")
        assert sum(chunks) == s and max(chunks) - min(chunks) <= 1
        assert 32 * max(chunks) * (past + s) * 4 <= 256 * 2**20


def test_gqa_kernels_agree_and_a_chunked_prompt_equals_one_run(hf_dirs, tmp_path, monkeypatch):
    """ONNX Runtime's two CPU GroupQueryAttention kernels (flash; scores materialized) give the same
    logits to fp32 rounding, and a prompt split into chunks (a small scratch budget) gives the logits
    and the cache of one run, so decoding continues alike. On the int4 graph to 1e-4; on the W8A8
    prompt graph by cosine, since its per-token int8 activations turn a last-bit difference into a
    whole quantization step now and then. Which kernel a session got shows in ORT's variable at its
    creation: checked too."""
    from valley_rt.backends import llm_onnx

    monkeypatch.setenv("VALLEY_RT_DECODE", "onnxruntime")  # ORT's graphs, both opened (not native decode)
    path = export_llm_onnx(hf_dirs["hd32"], tmp_path, quant="rtn4", group_size=32)
    seen = []
    real = llm_onnx.session_options

    def spy(*args):
        seen.append(os.environ.get(llm_onnx.ORT_GQA_FLASH_OFF))
        return real(*args)

    monkeypatch.setattr(llm_onnx, "session_options", spy)
    ids = list(range(3, 100))  # >= PREFILL_MIN_TOKENS: the prompt graph when the engine's is loaded
    chunks = llm_onnx.append_chunks
    assert len(chunks(len(ids), 0, 4, "materialized", 20000)) > 1  # the budget below splits the prompt
    for prefill in ("int4", "int8"):
        monkeypatch.setenv("VALLEY_RT_PREFILL", prefill)
        runs = {}
        for kernel, scratch in (("flash", None), ("materialized", None), ("materialized", 20000)):
            monkeypatch.setenv("VALLEY_RT_GQA", kernel)
            monkeypatch.setattr(llm_onnx, "append_chunks",
                                lambda s, past, heads, k, b=scratch or llm_onnx.ATTN_SCRATCH_BYTES: chunks(s, past, heads, k, b))
            seen.clear()
            llm = OnnxLLM(path.parent)
            assert llm.gqa_kernel == kernel and llm.has_prefill_graph == (prefill == "int8")
            assert seen == [None if kernel == "flash" else "1"] * (2 if prefill == "int8" else 1)
            out = [llm.prefill(llm.embed(ids))] + [llm.decode(t) for t in (5, 6, 7)]
            runs[(kernel, scratch)] = np.stack(out)
        assert os.environ.get(llm_onnx.ORT_GQA_FLASH_OFF) is None  # restored after each creation
        flash, whole, chunked = runs[("flash", None)], runs[("materialized", None)], runs[("materialized", 20000)]
        if prefill == "int4":
            np.testing.assert_allclose(whole, flash, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-4)
        else:
            for a, b in ((whole, flash), (chunked, whole)):
                assert min(_cos(x, y) for x, y in zip(a, b)) > 0.999


def test_gqa_kernel_policy(monkeypatch):
    from valley_rt.backends.llm_onnx import gqa_kernel_policy

    monkeypatch.delenv("ORT_GQA_DISABLE_FLASH_ATTENTION", raising=False)
    monkeypatch.delenv("VALLEY_RT_GQA", raising=False)
    assert gqa_kernel_policy() == "materialized"
    monkeypatch.setenv("VALLEY_RT_GQA", "flash")
    assert gqa_kernel_policy() == "flash"
    monkeypatch.setenv("VALLEY_RT_GQA", "fast")
    with pytest.raises(EngineError, match="VALLEY_RT_GQA"):
        gqa_kernel_policy()
    monkeypatch.setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "0")  # the user's own ORT setting decides
    assert gqa_kernel_policy() == "flash"
    monkeypatch.setenv("ORT_GQA_DISABLE_FLASH_ATTENTION", "1")
    assert gqa_kernel_policy() == "materialized"
