"""Streamed GPTQ (export/gptq_stream.py) on a tiny LLaMA: the layer-by-layer run equals a whole-model run of
the same algorithm, GPTQ beats round-to-nearest on output error, the folder is a standard GPTQ folder
(load_gptq_as_torch, the ONNX repacker), the held-out figures equal compare_quantized's on whole models,
and bad input is refused before work."""

import io
import json

import pytest
import torch

from valley_rt.errors import CheckpointError, DataError
from valley_rt.export.gptq import GPTQSettings, compare_quantized, load_gptq_as_torch
from valley_rt.export.gptq_stream import (HESSIAN_OF, LINEARS, gptq_linear, project_total,
                                          quantize_llm_streamed)
from valley_rt.progress import Progress

VOCAB, HIDDEN, INTER, LAYERS, GROUP = 500, 128, 256, 3, 32


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A 3-layer LLaMA (4 heads / 2 KV heads), saved sharded in fp16 like a real release."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.05)
    LlamaForCausalLM(cfg).half().save_pretrained(d, max_shard_size="300KB")
    return d


def _model(llm_dir):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32).eval()
    m.config._attn_implementation = "sdpa"
    return m


def _examples(llm_dir, n, length, seed, labelled=False):
    table = _model(llm_dir).model.embed_tokens.weight.detach()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        ex = {"inputs_embeds": table[ids].clone()}
        if labelled:
            ex["labels"] = torch.cat([torch.full((length // 2,), -100), ids[length // 2:]])
        out.append(ex)
    return out


@torch.no_grad()
def _whole_model_gptq(llm_dir, calibration, settings):
    """The same algorithm, non-streamed: the whole model in memory; layer i's Hessians come from a full
    forward pass of the model whose layers < i already carry their dequantized weights."""
    model = _model(llm_dir)
    codes = {}
    for i, layer in enumerate(model.model.layers):
        sums, count = {}, [0]
        hooks = []
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            def hook(_m, args, kind=HESSIAN_OF[name]):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[kind] = sums.get(kind, 0) + x.t() @ x
                if kind == "attn_in":
                    count[0] += x.shape[0]
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
        for ex in calibration:
            model(inputs_embeds=ex["inputs_embeds"][None])
        for h in hooks:
            h.remove()
        for name in LINEARS:
            lin = layer.get_submodule(name)
            g = gptq_linear(lin.weight, sums[HESSIAN_OF[name]] * (2.0 / count[0]), bits=settings.bits,
                            group_size=settings.group_size, sym=settings.sym, damp=settings.damp)
            lin.weight.data = g.dequantize().t().contiguous()
            codes[f"model.layers.{i}.{name}"] = g
    return model, codes


@pytest.fixture(scope="module")
def streamed(llm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "gptq"
    settings = GPTQSettings(group_size=GROUP)
    calibration = _examples(llm_dir, 4, 40, seed=1)
    held_out = _examples(llm_dir, 2, 32, seed=2, labelled=True)
    log = io.StringIO()
    report = quantize_llm_streamed(llm_dir, out, calibration=calibration, held_out=held_out, settings=settings,
                                   progress=Progress("gptq", stream=log, every_s=0))
    return out, report, calibration, held_out, settings, log.getvalue().splitlines()


def test_streamed_equals_whole_model(llm_dir, streamed):
    out, report, calibration, _, settings, lines = streamed
    _, codes = _whole_model_gptq(llm_dir, calibration, settings)
    from safetensors.torch import load_file

    from valley_rt.export.gptq_format import GPTQLinear

    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    assert len(list(out.glob("*.safetensors"))) == 1 or (out / "model.safetensors.index.json").is_file()
    total = mismatched = 0
    for prefix, ref in codes.items():
        got = GPTQLinear.from_checkpoint(stored[prefix + ".qweight"], stored[prefix + ".qzeros"],
                                         stored[prefix + ".scales"], stored[prefix + ".g_idx"], bits=4,
                                         group_size=GROUP, zeros_stored_minus_one=True)
        assert torch.equal(got.zeros, ref.zeros)
        torch.testing.assert_close(got.scales, ref.scales.half().float(), rtol=0, atol=0)
        total += ref.q.numel()
        mismatched += int((got.q != ref.q).sum())
    # same algorithm on the same activations: codes agree but for float summation-order ties
    assert mismatched <= 1e-3 * total, f"{mismatched} of {total} codes differ"
    assert len(report.seconds_per_layer) == LAYERS
    # a stage line, then one line per layer: an estimate while layers are left, none after the last
    assert len(lines) == 1 + LAYERS and lines[0].startswith("gptq: GPTQ, one decoder layer at a time")
    assert "about" in lines[1] and "left" in lines[1] and lines[-1].startswith("gptq: GPTQ") and \
        f"{LAYERS}/{LAYERS} layers (100 %)" in lines[-1] and "left" not in lines[-1]


def test_gptq_beats_rtn_on_output_error():
    torch.manual_seed(3)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs: where GPTQ helps
    h = 2.0 / x.shape[0] * x.t() @ x
    g = gptq_linear(w, h, bits=4, group_size=32, sym=True)
    rtn = gptq_linear(w, torch.eye(128) * 1e-6, bits=4, group_size=32, sym=True)  # no curvature = RTN
    ref = x @ w.t()
    err_gptq = (x @ g.dequantize() - ref).pow(2).mean()
    err_rtn = (x @ rtn.dequantize() - ref).pow(2).mean()
    assert err_gptq < 0.7 * err_rtn


def test_folder_is_standard_gptq(llm_dir, streamed):
    out, *_ = streamed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["quantization_config"]["checkpoint_format"] == "gptq"
    q = load_gptq_as_torch(out)
    x = torch.randint(3, VOCAB, (1, 16))
    ref = _model(llm_dir)
    lr, lq = ref(input_ids=x).logits, q(input_ids=x).logits
    cos = torch.nn.functional.cosine_similarity(lr.flatten(), lq.flatten(), dim=0)
    assert cos > 0.9  # 4-bit on a tiny random LLaMA; the error bar against RTN is test_gptq_beats_rtn_on_output_error


def test_onnx_export_reads_it(streamed, tmp_path):
    from valley_rt.export.llm_onnx import export_llm_onnx

    out, *_ = streamed
    path = export_llm_onnx(out, tmp_path / "llm", quant="gptq", prefill="none")
    assert path.is_file()


def test_figures_equal_whole_model_comparison(llm_dir, streamed):
    out, report, _, held_out, _, _ = streamed
    quant = load_gptq_as_torch(out)
    ref = _model(llm_dir)
    whole = compare_quantized(ref, quant, held_out)
    for k in ("ppl_ref", "ppl_quant", "cosine", "agreement", "tokens"):
        assert report.figures[k] == pytest.approx(whole[k], rel=1e-3), k


def test_bad_input_refused_before_work(llm_dir, tmp_path):
    ex = _examples(llm_dir, 1, 8, seed=4)
    with pytest.raises(DataError, match=r"inputs_embeds \[S, 128\]"):
        quantize_llm_streamed(llm_dir, tmp_path / "a", calibration=[{"inputs_embeds": torch.zeros(8, 64)}])
    with pytest.raises(DataError, match="at least one"):
        quantize_llm_streamed(llm_dir, tmp_path / "a", calibration=[])
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="found other files"):
        quantize_llm_streamed(llm_dir, other, calibration=ex)
    assert (other / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="desc_act"):
        quantize_llm_streamed(llm_dir, tmp_path / "b", calibration=ex, settings=GPTQSettings(desc_act=True))


def test_project_total():
    assert project_total([10.0, 4.0, 6.0], 32) == pytest.approx(20.0 + 29 * 5.0)


def make_checkpoint(path):
    """A tiny random Valley with its own 300-word tokenizer (as tests/test_manifest.py makes one)."""
    from valley_rt.checkpoint import save_checkpoint
    from valley_rt.config import preset
    from valley_rt.demo.tokenizer import token_layout, train_tokenizer
    from valley_rt.model import build_model

    tok = train_tokenizer(["A red square moves left and a blue circle stays still. ### Human: what moves? "
                           "Assistant:"] * 4, vocab_size=300)
    cfg = preset("tiny")
    cfg.tokens = token_layout(tok)
    cfg.llm.vocab_size = len(tok)
    return save_checkpoint(build_model(cfg, seed=2), path, tokenizer=tok)


def test_export_engine_streams_gptq(tmp_path, shared_dir):
    """export --quant gptq --gptq-stream yes: the LLM is never loaded (only its embedding table), the
    multimodal calibration runs layer by layer, the gate's figures go into the manifest, the engine runs."""
    from valley_rt.engine_format import LLM_DIR
    from valley_rt.export import manifest as mf
    from valley_rt.export.engine import export_engine

    ckpt = make_checkpoint(tmp_path / "ckpt")
    videos = ["snowmobile.mp4", "gray.mp4", "vp9.webm", "yuv444.mp4", "mpeg4.avi"]
    records = [{"id": f"r{i}", "video": str(shared_dir / "videos" / v), "conversations": [
        {"from": "human", "value": "<video>\nWhat moves in the video?"},
        {"from": "gpt", "value": f"A red square moves left {i}."}]} for i, v in enumerate(videos)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "engine"
    m = export_engine(ckpt, out, precision="fp32", quant="gptq", group_size=32, calib=data, keep_failed_gate=True,
                      gpu="no", gptq_stream="yes")
    llm = m["parity"]["llm"]
    assert m["precision"]["llm"] == "gptq4-g32" and llm["streamed"] is True
    assert llm["calibration"] == "multimodal" and llm["calibration_examples"] == 3 and llm["held_out_examples"] == 2
    assert {"ppl_delta", "agreement", "cosine", "sqnr_db", "gate"} <= set(llm)
    assert mf.load_manifest(out) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "data.json", "engine"]  # GPTQ scratch removed
    from valley_rt.backends.llm_onnx import OnnxLLM

    llm_backend = OnnxLLM(out / LLM_DIR)
    assert llm_backend.prefill(llm_backend.embed([1, 5, 7])).shape == (llm_backend.vocab_size,)
