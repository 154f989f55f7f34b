"""A prompt and the decode steps, native (valley_rt/backends/native_decode.c) vs ONNX Runtime's int4 graph.

Both sides read the same int4 weights. First each prefills the same --prompt tokens (ONNX Runtime's int4
graph; the native decoder's int8 GEMMs), timed once; then both start from the int4 graph's KV cache and
each decodes the same --steps tokens, alternating sides for --rounds rounds. Reports
per side the median step time, tokens/s, the weight bytes streamed per second and their share of the
read roofline (`common.read_bandwidth_gbs`, best of the samples taken before and after each round), and
how the two agree: logit cosine per step and the greedy argmax. Ends with one JSON line (hardware
included).

    python benchmarks/bench_native_decode.py ENGINE_LLM_DIR [--prompt 554] [--steps 48] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from common import hardware, read_bandwidth_gbs  # noqa: E402  (benchmarks/common.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", type=Path, help="an engine's LLM folder (llm.onnx, llm_onnx.json, ...)")
    ap.add_argument("--prompt", type=int, default=554)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    os.environ["VALLEY_RT_DECODE"] = "onnxruntime"  # the graph side; the native decoder is opened below
    os.environ.setdefault("VALLEY_RT_PREFILL", "int4")  # the int4 graph alone: one copy of the weights
    from valley_rt.backends.llm_onnx import OnnxLLM
    from valley_rt.backends.native_decode import NativeDecoder

    hw = hardware()
    print(f"# {hw['cpu']} ({hw['cpu_kind']}), ISA {', '.join(hw['isa'])}; {args.threads} threads; load average "
          f"{hw['load_avg_1min']}", flush=True)
    llm = OnnxLLM(args.engine, threads=args.threads)
    t0 = time.perf_counter()
    native, why = NativeDecoder.open(llm._model_file, llm.meta, args.threads)
    if native is None:
        sys.exit(f"error: the native decoder cannot run here: {why}")
    native.warm()
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = llm.embed(rng.integers(3, llm.vocab_size, args.prompt).tolist())
    t = time.perf_counter()
    want = llm.prefill(prompt)
    prompt_s = {"onnxruntime": time.perf_counter() - t}
    start, cache0 = llm.position, [c.copy() for c in llm._cache]
    got = np.zeros(llm.vocab_size, np.float32)
    t = time.perf_counter()
    native.append(prompt, llm._new_cache(llm.cache_slots), 0, got)
    prompt_s["native"] = time.perf_counter() - t
    prompt_cos = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    print(f"prompt of {args.prompt} tokens: onnxruntime {prompt_s['onnxruntime']:.2f} s "
          f"({args.prompt / prompt_s['onnxruntime']:.1f} tok/s), native {prompt_s['native']:.2f} s "
          f"({args.prompt / prompt_s['native']:.1f} tok/s); last-position logits cosine {prompt_cos:.5f}", flush=True)
    tokens = rng.integers(3, llm.vocab_size, args.steps).tolist()
    weight_bytes = llm.weight_bytes_per_token
    times = {"onnxruntime": [], "native": []}
    reads, cosines, same_argmax = [], [], 0
    logits = np.zeros(llm.vocab_size, np.float32)
    for r in range(args.rounds):
        reads.append(read_bandwidth_gbs(args.threads))
        want = []
        llm.truncate(start)
        for tok in tokens:
            t = time.perf_counter()
            want.append(llm.decode(tok))
            times["onnxruntime"].append(time.perf_counter() - t)
        cache = [c.copy() for c in cache0]
        for i, tok in enumerate(tokens):
            x = llm.embed([tok])[0]
            t = time.perf_counter()
            native.step(x, cache, start + i, logits)
            times["native"].append(time.perf_counter() - t)
            if r == 0:
                cosines.append(float(np.dot(logits, want[i]) / (np.linalg.norm(logits) * np.linalg.norm(want[i]))))
                same_argmax += int(logits.argmax() == want[i].argmax())
        reads.append(read_bandwidth_gbs(args.threads))
    roof = max(reads)
    sides = {}
    for side, ts in times.items():
        step = float(np.median(ts))
        gbs = weight_bytes / step / 1e9
        sides[side] = {"step_ms": round(step * 1e3, 2), "tokens_per_s": round(1 / step, 2), "weight_gbs": round(gbs, 2),
                       "roofline_pct": round(100 * gbs / roof, 1)}
        print(f"{side:12s} {step * 1e3:7.2f} ms per step = {1 / step:6.2f} tok/s; {gbs:5.1f} GB/s of weights = "
              f"{100 * gbs / roof:3.0f} % of the best read sample ({roof:.1f} GB/s)", flush=True)
    speedup = sides["native"]["tokens_per_s"] / sides["onnxruntime"]["tokens_per_s"]
    print(f"native / onnxruntime: {speedup:.2f}x; logits cosine min {min(cosines):.5f} median {np.median(cosines):.5f}; "
          f"greedy argmax equal in {same_argmax}/{len(tokens)} steps; native open + warm {open_s:.2f} s")
    print(json.dumps({"bench": "native_decode", "hardware": hw, "engine": str(args.engine), "threads": args.threads,
                      "prompt": args.prompt, "steps": args.steps, "rounds": args.rounds,
                      "weight_bytes_per_token": weight_bytes, "read_gbs_samples": [round(x, 2) for x in reads],
                      "read_gbs": round(roof, 2), "sides": sides, "speedup": round(speedup, 3),
                      "logits_cosine_min": round(min(cosines), 6), "logits_cosine_median": round(float(np.median(cosines)), 6),
                      "argmax_equal": same_argmax, "native_open_s": round(open_s, 3),
                      "prompt_s": {k: round(v, 3) for k, v in prompt_s.items()},
                      "prompt_tokens_per_s": {k: round(args.prompt / v, 2) for k, v in prompt_s.items()},
                      "prompt_logits_cosine": round(prompt_cos, 6)}))


if __name__ == "__main__":
    main()
