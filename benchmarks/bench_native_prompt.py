"""A prompt appended after a stored prefix, on each prompt kernel valley-rt has, side by side.

Sides (each where it runs): the native decoder's AMX-INT8 kernel ("native-amx"), its AVX512-VNNI kernel
("native-vnni"), the engine's W8A8 prompt graph on ONNX Runtime ("w8a8-graph", MLAS QGEMM) and the int4
graph ("int4-graph", MatMulNBits). Every side appends the same --prompt tokens after the same --past rows
(the int4 graph's, as `ask` appends a video and question after the stored system prompt), --rounds
times, alternating sides. Reports per side the median time, tokens/s and GOP/s of the linears, their share
of the bf16 GEMM rate measured in the same run (`common.gemm_gflops`), and the last-position logits'
cosine to the int4 graph's. Ends with one JSON line (hardware included).

    python benchmarks/bench_native_prompt.py ENGINE_LLM_DIR [--past 271] [--prompt 283] [--rounds 3] [--threads 2]
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

from common import gemm_gflops, hardware, linear_macs_per_token  # noqa: E402  (benchmarks/common.py)


def linear_macs(meta: dict) -> int:
    """Multiply-adds of the decoder's linears per token (the vocabulary projection runs for one)."""
    s = meta["shape"]
    return int(s["num_layers"]) * linear_macs_per_token(int(s["hidden_size"]), int(s["num_heads"]),
                                                        int(s["num_kv_heads"]), int(s["intermediate_size"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", type=Path, help="an engine's LLM folder (llm.onnx, llm_onnx.json, ...)")
    ap.add_argument("--past", type=int, default=271, help="rows already in the cache (the stored prefix)")
    ap.add_argument("--prompt", type=int, default=283, help="tokens appended after them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    os.environ["VALLEY_RT_DECODE"] = "onnxruntime"  # graph sides; the native decoder is opened below
    os.environ["VALLEY_RT_PREFILL"] = "int4"
    from valley_rt.backends.llm_onnx import OnnxLLM
    from valley_rt.backends.native_decode import NativeDecoder, amx_usable

    hw = hardware()
    print(f"# {hw['cpu']} ({hw['cpu_kind']}), ISA {', '.join(hw['isa'])}; {args.threads} threads; load average "
          f"{hw['load_avg_1min']}", flush=True)
    gemm = gemm_gflops(args.threads)
    int4 = OnnxLLM(args.engine, threads=args.threads)
    rng = np.random.default_rng(0)
    past = int4.embed(rng.integers(3, int4.vocab_size, args.past).tolist())
    prompt = int4.embed(rng.integers(3, int4.vocab_size, args.prompt).tolist())
    int4.prefill(past)
    int4._ensure_slots(args.past + args.prompt)
    cache0 = [c.copy() for c in int4._cache]

    def graph_side(llm):
        def run():
            llm.truncate(args.past)
            return llm.prefill(prompt)
        return run

    sides = {}
    native, why = NativeDecoder.open(int4._model_file, int4.meta, args.threads)
    if native is not None:
        native.warm()
        logits = np.zeros(int4.vocab_size, np.float32)

        def native_side(amx: int):
            def run():
                native._model.amx = amx
                cache = [c.copy() for c in cache0]
                native.append(prompt, cache, args.past, logits)
                return logits.copy()
            return run
        if amx_usable(native._lib):
            sides["native-amx"] = native_side(1)
        sides["native-vnni"] = native_side(0)
    else:
        print(f"native decoder: not here ({why})")
    meta = int4.meta
    if (meta.get("prefill") or {}).get("file"):
        os.environ["VALLEY_RT_PREFILL"] = "int8"
        w8a8 = OnnxLLM(args.engine, threads=args.threads)
        w8a8._ensure_slots(args.past + args.prompt)
        for a, b in zip(w8a8._cache, cache0):
            a[...] = b
        w8a8._pos = args.past
        sides["w8a8-graph"] = graph_side(w8a8)
    sides["int4-graph"] = graph_side(int4)

    times = {k: [] for k in sides}
    last = {}
    for _ in range(args.rounds):
        for name, run in sides.items():
            t = time.perf_counter()
            last[name] = run()
            times[name].append(time.perf_counter() - t)
    macs = linear_macs(meta) * args.prompt
    out = {}
    for name, ts in times.items():
        s = float(np.median(ts))
        gops = 2 * macs / s / 1e9
        ref = last["int4-graph"]
        cos = float(np.dot(last[name], ref) / (np.linalg.norm(last[name]) * np.linalg.norm(ref)))
        out[name] = {"s": round(s, 4), "tokens_per_s": round(args.prompt / s, 1), "linear_gops": round(gops, 1),
                     "pct_bf16_gemm": round(100 * gops / gemm["bf16"], 1), "logits_cosine_to_int4_graph": round(cos, 5),
                     "runs_s": [round(t, 4) for t in ts]}
        print(f"{name:12s} {s:6.3f} s = {args.prompt / s:7.1f} tok/s; linears {gops:6.0f} GOP/s = "
              f"{100 * gops / gemm['bf16']:4.0f} % of the bf16 GEMM rate ({gemm['bf16']:.0f} GFLOP/s); "
              f"logits cosine to the int4 graph {cos:.5f}", flush=True)
    base = "w8a8-graph" if "w8a8-graph" in out else "int4-graph"
    best = "native-amx" if "native-amx" in out else ("native-vnni" if "native-vnni" in out else base)
    ratio = out[base]["s"] / out[best]["s"]
    print(f"{best} / {base}: {ratio:.2f}x")
    print(json.dumps({"bench": "native_prompt", "hardware": hw, "engine": str(args.engine), "threads": args.threads,
                      "past": args.past, "prompt": args.prompt, "rounds": args.rounds, "gemm_gflops": gemm,
                      "linear_macs_per_token": linear_macs(meta), "sides": out,
                      "speedup": {"best": best, "baseline": base, "ratio": round(ratio, 3)}}))


if __name__ == "__main__":
    main()
