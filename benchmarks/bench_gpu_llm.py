"""LLM decode on a CUDA GPU: int4 GPTQ in CUDA graphs vs fp16 vs the memory roofline, one process.

Per shape (bench-1b: TinyLlama-1.1B's; 7b: LLaMA-2-7B's), random weights built on the GPU, int4 by
round-to-nearest straight into the GPTQ layout (an export would take far longer and decode speed does
not depend on the values):
* int4-graphs: valley_rt.backends.llm_cuda (Triton int4 GEMV or tinygemm, whichever it measured faster;
  one CUDA graph per decode step);
* fp16-graphs: the same decoder on the dequantized weights in fp16 (what graphs alone give);
* fp16-eager: transformers' LlamaForCausalLM on those same fp16 weights (the path the GPU ran before);
* roofline: copy bandwidth measured in this run (read + write of a 2 GiB buffer) / weight bytes per token.
Decode tokens/s are for TOKENS greedy tokens after a PROMPT-token prompt (sampling included, one int
back to the host per token). TTFT at real shapes: ViT-L/14 over 8 frames (fp16, SDPA; video already
decoded), the temporal pooling kernel writing into the input-embedding buffer, prefill of the whole
Valley prompt (256 pooled + 8 frame tokens + text), first token sampled.

Correctness (exit code 1 when it fails): the int4 graph path's logits against transformers fp16 on the
dequantized weights, after the prompt and along int4's own greedy continuation (teacher-forced):
cosine >= 0.995 at every step and >= 90 % greedy agreement.

    python benchmarks/bench_gpu_llm.py                 # CUDA
    python benchmarks/bench_gpu_llm.py --dry-run       # tiny shapes on the CPU, eager: checks the script
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import hardware  # benchmarks/common.py

from valley_rt.backends.llm_cuda import CudaLLM, hf_llama, random_weights
from valley_rt.engine_format import LlamaShape
from valley_rt.backends.llm_torch import TorchLLM

SHAPES = {
    "bench-1b": LlamaShape(2048, 5632, 22, 32, 4, 64, 32006, 2048, 1e-5, 10000.0),
    "7b": LlamaShape(4096, 11008, 32, 32, 32, 128, 32006, 4096, 1e-5, 10000.0),
    "tiny": LlamaShape(64, 128, 2, 4, 2, 16, 512, 512, 1e-6, 10000.0),  # --dry-run
}
MIN_COSINE, MIN_AGREEMENT = 0.995, 0.90


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 2 / best


def decode_rate(llm, prompt: list[int], tokens: int, device) -> float:
    """Greedy tokens/s after `prompt` (one warm-up run first: graph capture, kernel compilation)."""
    from valley_rt.generate import SamplingParams, sampler

    params = SamplingParams(max_new_tokens=tokens)
    sample = sampler(llm)
    rates = []
    for _ in range(2):
        llm.reset()
        tok = sample(llm.prefill(llm.embed(prompt)), params, None)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = sample(llm.decode(tok), params, None)
        sync(device)
        rates.append(tokens / (time.perf_counter() - t0))
    return rates[-1]


def check(int4, ref, prompt: list[int], steps: int) -> dict:
    """int4 logits vs the reference's along int4's greedy continuation (teacher-forced on the reference)."""
    int4.reset()
    ref.reset()
    def t(x):  # CudaLLM logits stay on the device; the other backends return NumPy
        return torch.as_tensor(x).float()

    a, b = t(int4.prefill(int4.embed(prompt))), t(ref.prefill(ref.embed(prompt)))
    cos, agree = [], []
    for _ in range(steps):
        cos.append(float(torch.cosine_similarity(a, b.to(a.device), dim=0)))
        tok = int(a.argmax())
        agree.append(tok == int(b.argmax()))
        a, b = t(int4.decode(tok)), t(ref.decode(tok))
    return {"min_cosine": min(cos), "greedy_agreement": sum(agree) / len(agree), "steps": steps,
            "passed": min(cos) >= MIN_COSINE and sum(agree) / len(agree) >= MIN_AGREEMENT}


def bench_shape(name: str, device, dtype, tokens: int, graphs: bool, prompt_len: int) -> dict:
    shape = SHAPES[name]
    t0 = time.perf_counter()
    weights = random_weights(shape, device=device, group_size=128 if shape.hidden_size >= 128 else 32)
    sync(device)
    build_s = time.perf_counter() - t0
    int4 = CudaLLM(weights, device=device, dtype=dtype, graphs=graphs)
    dense_w = weights.dequantized(dtype)
    dense = CudaLLM(dense_w, device=device, dtype=dtype, graphs=graphs)
    hf = TorchLLM(hf_llama(dense.weights).to(dtype))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, shape.vocab_size, (prompt_len,), generator=gen).tolist()

    result = {"shape": name, "build_s": round(build_s, 1), "int4_backend": int4.int4_backend,
              "int4_backend_us_per_layer": {k: round(v, 1) for k, v in int4.int4_timings.items()},
              "weight_bytes_per_token": {"int4": int4.weight_bytes_per_token, "fp16": dense.weight_bytes_per_token}}
    result["check"] = check(int4, hf, prompt, steps=min(32, tokens))
    bw = copy_bandwidth(device, gib=2.0 if device.type == "cuda" else 0.05)
    result["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    rates = {"int4-graphs" if graphs else "int4-eager": decode_rate(int4, prompt, tokens, device),
             "fp16-graphs" if graphs else "fp16-eager-ours": decode_rate(dense, prompt, tokens, device),
             "fp16-eager": decode_rate(hf, prompt, tokens, device)}
    roof = {"int4": bw / int4.weight_bytes_per_token, "fp16": bw / dense.weight_bytes_per_token}
    result["decode_tokens_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    result["roofline_tokens_per_s"] = {k: round(v, 1) for k, v in roof.items()}
    result["fraction_of_roofline"] = {k: round(v / roof["int4" if k.startswith("int4") else "fp16"], 3)
                                      for k, v in rates.items()}
    int4_key = next(k for k in rates if k.startswith("int4"))
    result["speedup_int4_vs_fp16_eager"] = round(rates[int4_key] / rates["fp16-eager"], 2)
    result["achieved_GBps"] = {k: round(v * (int4.weight_bytes_per_token if k.startswith("int4")
                                             else dense.weight_bytes_per_token) / 1e9, 1) for k, v in rates.items()}
    del hf, dense, dense_w
    result["_int4"] = int4  # kept for TTFT (removed before printing)
    return result


def ttft(llm, device, dtype, dry_run: bool) -> dict:
    """Vision (8 frames) + pooling into the embedding buffer + prefill of the Valley prompt + 1st token."""
    from valley_rt.backends.vision_cuda import CudaVision
    from valley_rt.config import preset
    from valley_rt.model import build_model

    cfg = preset("tiny" if dry_run else "bench-1b")
    # only the vision half is used: an LLM of one small layer, as wide as the benchmarked one (the
    # projector writes rows of the LLM's width)
    cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.intermediate_size = llm.hidden_size, 1, 256
    model = build_model(cfg, device=device, dtype=dtype, seed=0)
    vision = CudaVision(model, graphs=device.type == "cuda")
    frames = 8
    pixels = torch.randn(frames, 3, cfg.vision.image_size, cfg.vision.image_size, device=device, dtype=dtype)
    text_before, text_after = 40, 20  # system prompt + question tokens around the visual rows
    n_visual = cfg.num_patches + frames + 4  # <im_start> patches <im_end> <vi_start> frames <vi_end>
    S = text_before + n_visual + text_after
    buf = torch.zeros(S, llm.hidden_size, device=device, dtype=dtype)
    out = {}
    for _ in range(3):  # warm-up, then keep the last
        llm.reset()
        sync(device)
        t0 = time.perf_counter()
        vision.encode_into(pixels, buf, patch_offset=text_before + 1)
        sync(device)
        t1 = time.perf_counter()
        logits = llm.prefill(buf)
        tok = int(logits.argmax())
        sync(device)
        t2 = time.perf_counter()
        out = {"frames": frames, "prompt_tokens": S, "vision_ms": round((t1 - t0) * 1e3, 2),
               "vision_ms_per_frame": round((t1 - t0) * 1e3 / frames, 2), "prefill_ms": round((t2 - t1) * 1e3, 2),
               "ttft_ms": round((t2 - t0) * 1e3, 2), "first_token": tok}
    out["vision_graphed"] = vision.graphs
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, eager (checks the script)")
    ap.add_argument("--shapes", default="bench-1b,7b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the timed decode")
    args = ap.parse_args()
    if args.dry_run:
        device, dtype, graphs, shapes, tokens = torch.device("cpu"), torch.float32, False, ["tiny"], min(args.tokens, 8)
    else:
        if not torch.cuda.is_available():
            print(json.dumps({"bench": "gpu_llm", "skipped": "no CUDA GPU (use --dry-run on a CPU)"}))
            return 0
        device, dtype, graphs, shapes, tokens = torch.device("cuda"), torch.float16, True, args.shapes.split(","), args.tokens
    results = []
    ok = True
    for name in shapes:
        r = bench_shape(name, device, dtype, tokens, graphs, args.prompt)
        int4 = r.pop("_int4")
        if name in ("7b", "tiny"):
            try:
                r["ttft"] = ttft(int4, device, dtype, args.dry_run)
            except Exception as e:  # reported in the JSON and in the exit code, the decode figures kept
                r["ttft"] = {"error": f"{type(e).__name__}: {e}"}
                ok = False
        del int4
        if device.type == "cuda":
            r["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ok &= r["check"]["passed"]
        results.append(r)
        rates = r["decode_tokens_per_s"]
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} tok/s ({100 * r['fraction_of_roofline'][k]:.1f} % of roofline)"
                                      for k, v in rates.items())
              + f"; check {'passed' if r['check']['passed'] else 'FAILED'} {r['check']}", file=sys.stderr)
    print(json.dumps({"bench": "gpu_llm", "dry_run": args.dry_run, "hardware": hardware(), "tokens": tokens,
                      "results": results, "passed": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
