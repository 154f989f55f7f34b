"""The CUDA LLM backend's math, eager on the CPU, against transformers and against the ONNX engine;
its CUDA graphs against its own eager steps on a GPU (skipped without one).

Tiny LLaMAs from test_llm_backend (GQA; head_dim 8, which the ONNX export pads to 16 and the reader
must un-pad). The weights of the engine tests are read back from llm.onnx, so these also test the
MatMulNBits -> GPTQ layout conversion (fused q|k|v and gate|up, act-order permutations, int8 lm_head).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tiny LLaMA helpers of test_llm_backend (importlib mode)
from test_llm_backend import tiny_llama, write_tiny_gptq  # noqa: E402

from valley_rt.backends.llm_cuda import CudaLLM, hf_llama, load_engine_llm, sample_on_device, weights_from_hf  # noqa: E402
from valley_rt.backends.llm_onnx import OnnxLLM  # noqa: E402
from valley_rt.backends.llm_torch import TorchLLM  # noqa: E402
from valley_rt.export.llm_onnx import export_llm_onnx  # noqa: E402
from valley_rt.generate import SamplingParams, generate, sample  # noqa: E402
from valley_rt.kernels.int4_linear import Int4Weight  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graphs, compiled int4 kernels)")
DEMO_ENGINE = Path(__file__).resolve().parents[1] / "valley_rt" / "assets" / "demo_engine"
IDS = [5, 17, 300, 42, 999, 1, 64, 128, 7, 250, 31, 2, 600, 77, 19]


def _eager(weights, **kw) -> CudaLLM:
    return CudaLLM(weights, device="cpu", dtype=torch.float32, graphs=False, **kw)


def _run(llm, ids=IDS, steps=(11, 500, 3)) -> list[torch.Tensor]:
    """Prefill, a few decode steps, truncate back into the prompt and prefill again: every logits row."""
    llm.reset()
    out = [llm.prefill(llm.embed(ids))]
    out += [llm.decode(t) for t in steps]
    llm.truncate(len(ids) - 4)
    out.append(llm.prefill(llm.embed(ids[-4:])))
    return [torch.as_tensor(o).float().cpu() for o in out]  # CudaLLM: tensors; OnnxLLM: NumPy


class _Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("kind", ["hd8", "hd32"])
def test_eager_dense_matches_transformers(kind):
    model = tiny_llama(kind)
    got, want = _run(_eager(weights_from_hf(model))), _run(TorchLLM(model))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)


def test_eager_int4_matches_dequantized_transformers():
    model = tiny_llama("hd8", seed=1)
    weights = weights_from_hf(model, group_size=32)
    assert isinstance(weights.layers[0].qkv, Int4Weight)
    ref = TorchLLM(hf_llama(weights.dequantized()))  # transformers on the dequantized weights
    for g, w in zip(_run(_eager(weights)), _run(ref)):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)


def test_eager_int4_triton_kernel_greedy_equals_reference():
    """The same decoder with its linears in the Triton kernel (the interpreter here) and in the reference."""
    weights = weights_from_hf(tiny_llama("hd8", seed=2), group_size=32)
    params = SamplingParams(max_new_tokens=4)
    device = "cuda" if CUDA else "cpu"  # without CUDA the kernel runs under TRITON_INTERPRET (conftest.py)
    runs = [generate(CudaLLM(weights, device=device, dtype=torch.float32, graphs=False, int4_backend=b), _Tok(),
                     input_ids=IDS[:6], params=params) for b in ("triton", "reference")]
    assert runs[0].token_ids == runs[1].token_ids


@pytest.mark.parametrize("lm_head", ["fp32", "int8"])
def test_engine_readback_matches_onnx_rtn(tmp_path, lm_head):
    model = tiny_llama("hd8", seed=4)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "llm"
    # accuracy_level 0: fp32 activations in MatMulNBits, so only float rounding separates the two
    export_llm_onnx(tmp_path / "hf", out, quant="rtn4", group_size=32, lm_head=lm_head, accuracy_level=0)
    got, want = _run(_eager(load_engine_llm(out))), _run(OnnxLLM(out))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=1e-3)


def test_engine_readback_gptq_act_order_matches_dequantized_reference(tmp_path):
    """GPTQ v1 folder with act-order (layer 1's v_proj unfused) -> engine -> read back: equals the
    dequantized reference model (transformers) and the ONNX engine."""
    gdir = tmp_path / "gptq"
    gdir.mkdir()
    ref_model = write_tiny_gptq(tiny_llama("hd8", seed=3), gdir, group_size=32, desc_act=True)
    out = tmp_path / "llm"
    export_llm_onnx(gdir, out, quant="gptq", lm_head="fp32", accuracy_level=0)
    weights = load_engine_llm(out)
    assert weights.layers[0].qkv.perm is not None  # act-order survived the round trip
    got = _run(_eager(weights))
    for g, w in zip(got, _run(TorchLLM(ref_model))):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=1e-3)
    for g, w in zip(got, _run(OnnxLLM(out))):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=1e-3)


def test_demo_engine_greedy_tokens_equal_onnx():
    """The bundled demo engine (GPTQ act-order, group 32, int8 lm_head; ONNX with int8 activations):
    the eager decoder on its read-back weights generates the CPU engine's greedy tokens."""
    llm_dir = DEMO_ENGINE / "llm"
    if not llm_dir.is_dir():
        pytest.skip(f"{llm_dir} is not present")
    cuda_llm, onnx_llm = _eager(load_engine_llm(llm_dir)), OnnxLLM(llm_dir)
    params = SamplingParams(max_new_tokens=16)
    ids = [t % cuda_llm.vocab_size for t in IDS]
    a = generate(cuda_llm, _Tok(), input_ids=ids, params=params)
    b = generate(onnx_llm, _Tok(), input_ids=ids, params=params)
    assert a.token_ids == b.token_ids


def test_device_sampling_follows_generate_rules():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    assert int(sample_on_device(logits, 0.0, 1.0, 0, None)) == sample(logits, SamplingParams(), None) == 0
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for temperature, top_p, top_k, allowed in ((1.0, 1.0, 2, {0, 1}), (1.0, 0.7, 0, {0, 1}), (5.0, 1.0, 0, set(range(6)))):
        drawn = {int(sample_on_device(logits, temperature, top_p, top_k, gen)) for _ in range(300)}
        ref = {sample(logits.numpy(), SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k), rng)
               for _ in range(300)}
        assert drawn == ref == allowed


def test_backend_sample_seeded_repeats():
    llm = _eager(weights_from_hf(tiny_llama("hd8")))
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=11)
    a = generate(llm, _Tok(), input_ids=IDS[:5], params=params).token_ids
    llm.reset()
    assert generate(llm, _Tok(), input_ids=IDS[:5], params=params).token_ids == a


def test_errors():
    llm = _eager(weights_from_hf(tiny_llama("hd8")), max_context=16)
    with pytest.raises(ValueError, match="exceed the KV cache of 16"):
        llm.prefill(llm.embed(list(range(17))))
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.embed([1000])
    with pytest.raises(ValueError, match="truncate to 3"):
        llm.truncate(3)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CudaLLM(weights_from_hf(tiny_llama("hd8")), device="cpu", graphs=True)


@gpu
def test_cuda_graph_decode_equals_eager_across_buckets():
    """300 decode steps (crossing the 256-row bucket into 512) replayed from graphs vs eager, fp16."""
    weights = weights_from_hf(tiny_llama("hd32", seed=5), group_size=32)
    weights.shape.max_position_embeddings = 1024  # tiny_llama's 128 would fit in one bucket
    graphed = CudaLLM(weights, device="cuda")
    eager = CudaLLM(weights, device="cuda", graphs=False)
    ids = IDS[:10]
    a, b = graphed.prefill(graphed.embed(ids)), eager.prefill(eager.embed(ids))
    torch.testing.assert_close(a, b)
    tok = int(a.argmax())
    for _ in range(300):
        a, b = graphed.decode(tok), eager.decode(tok)
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
        tok = int(b.argmax())
    assert sorted(graphed._graphs) == [256, 512]


@gpu
def test_cuda_int4_logits_close_to_dequantized_fp16():
    weights = weights_from_hf(tiny_llama("hd32", seed=6), group_size=32)
    int4 = CudaLLM(weights, device="cuda")
    dense = CudaLLM(weights.dequantized(), device="cuda", graphs=False)
    a, b = int4.prefill(int4.embed(IDS)), dense.prefill(dense.embed(IDS))
    assert torch.cosine_similarity(a, b, dim=0) > 0.999
    for t in (3, 9, 27):
        a, b = int4.decode(t), dense.decode(t)
        assert torch.cosine_similarity(a, b, dim=0) > 0.999


def _demo_answers(valley) -> list[str]:
    import json

    clips = DEMO_ENGINE.parent / "clips"
    answers = []
    for clip in json.loads((clips / "questions.json").read_text())["clips"]:
        ctx = valley.encode_video(clips / clip["video"])
        for q in clip["questions"]:
            valley.reset()
            answers.append(valley.ask(ctx, q["question"], params=SamplingParams(max_new_tokens=96)).answer)
    return answers


def _demo_records() -> list[str]:
    import json

    data = json.loads((DEMO_ENGINE.parent / "clips" / "questions.json").read_text())
    return [q["demo_answer"] for clip in data["clips"] for q in clip["questions"]]


@pytest.mark.slow
def test_demo_answers_with_the_cuda_backend_eager_equal_the_engine():
    """The runtime with its LLM swapped for this backend (eager, fp32, CPU) answers the bundled demo
    questions exactly as the CPU engine does."""
    from valley_rt.runtime import load

    if not (DEMO_ENGINE / "manifest.json").is_file():
        pytest.skip(f"{DEMO_ENGINE} is not present")
    valley = load(DEMO_ENGINE)
    want = _demo_answers(valley)
    valley.llm = CudaLLM.from_engine(DEMO_ENGINE / "llm", device="cpu", dtype=torch.float32, graphs=False)
    got = _demo_answers(valley)
    assert len(got) == len(_demo_records()) and got == want


@gpu
def test_demo_engine_on_cuda_answers_like_the_cpu_engine():
    """load(engine, device="cuda"): int4 LLM in CUDA graphs; greedy answers equal the CPU engine's."""
    from valley_rt.runtime import load

    gpu_valley = load(DEMO_ENGINE, device="cuda")
    assert gpu_valley.backends["kind"] == "engine-cuda" and gpu_valley.llm.graphs
    got = _demo_answers(gpu_valley)
    want = _demo_answers(load(DEMO_ENGINE))
    same = sum(a == b for a, b in zip(got, want))
    assert same == len(want), f"{same}/{len(want)} answers equal the CPU engine's"
