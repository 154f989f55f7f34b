"""Where an int4 engine's prompt and decode time goes: ONNX Runtime's per-node profile, summed by op type.

Opens the engine as the runtime does (OnnxLLM, W8A8 prompt graph where the CPU has AMX-INT8) with ORT
profiling on, runs one prompt of --prompt tokens and --steps decode steps, and prints per op type the
time per prompt / per step and its share, plus MatMulNBits' GB/s (int4 weight bytes it streams per
step / its time per step) against the read bandwidth measured in the same run. Ends with one JSON line.

    python benchmarks/profile_llm.py ENGINE_LLM_DIR [--prompt 300] [--steps 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from common import hardware, read_bandwidth_gbs  # benchmarks/common.py


def _by_op(profile_file: str) -> dict[str, float]:
    """Seconds per op type over every Node event of one ORT profile."""
    events = json.loads(Path(profile_file).read_text())
    total = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"] / 1e6
    return dict(total)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", type=Path, help="the LLM folder of an engine (llm.onnx, llm_onnx.json, ...)")
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    # ORT's node profile covers ORT's graphs: keep the decode steps on the int4 graph
    os.environ.setdefault("VALLEY_RT_DECODE", "onnxruntime")
    import valley_rt.backends.llm_onnx as llm_onnx

    tmp = tempfile.mkdtemp(prefix="ort_profile_")
    plain = llm_onnx.session_options

    def profiled(threads, spinning):
        so = plain(threads, spinning)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "llm")
        return so

    llm_onnx.session_options = profiled
    try:
        llm = llm_onnx.OnnxLLM(args.engine, threads=args.threads)
    finally:
        llm_onnx.session_options = plain
    bw = read_bandwidth_gbs(args.threads)
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, llm.vocab_size, args.prompt).tolist()
    # With a prompt graph loaded, the decode graph's profile holds the decode steps only; without one
    # it holds the prompt too (said in the output).
    llm.prefill(llm.embed(prompt))
    for t in rng.integers(3, llm.vocab_size, args.steps).tolist():
        llm.decode(t)
    decode = _by_op(llm.session.end_profiling())
    prefill = _by_op(llm.prefill_session.end_profiling()) if llm.prefill_session is not None else None
    bw = max(bw, read_bandwidth_gbs(args.threads))

    hw = hardware()
    print(f"hardware: {hw['cpu']} ({' '.join(hw['isa'])}); threads {args.threads}; load average "
          f"{os.getloadavg()[0]:.1f}; read bandwidth {bw:.1f} GB/s; engine {llm.name}")
    result = {"bench": "profile_llm", "engine": str(args.engine), "hardware": hw, "threads": args.threads,
              "read_bw_gb_s": round(bw, 2), "prompt_tokens": args.prompt, "steps": args.steps,
              "load_avg": round(os.getloadavg()[0], 2)}
    for label, ops, n in (("decode step", decode, args.steps), ("prompt", prefill, 1)):
        if not ops:
            continue
        tot = sum(ops.values())
        print(f"\n{label}: {1e3 * tot / n:.1f} ms of kernel time" + (" (incl. the int4 prompt)" if prefill is None and n > 1 else ""))
        for op, s in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"  {op:<28} {1e3 * s / n:>9.2f} ms {100 * s / tot:>5.1f} %")
        result[label.replace(" ", "_")] = {op: round(1e3 * s / n, 3) for op, s in ops.items()}
    if "MatMulNBits" in decode:
        # every decode weight streams through MatMulNBits (int4 layers; the lm_head as bits=8 or 4)
        mm_s = decode["MatMulNBits"] / args.steps
        gbs = llm.weight_bytes_per_token / mm_s / 1e9
        print(f"\nMatMulNBits: {gbs:.1f} GB/s over the engine's {llm.weight_bytes_per_token / 1e6:.0f} MB/token: "
              f"{100 * gbs / bw:.0f} % of the read bandwidth")
        result["matmulnbits_gb_s"] = round(gbs, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
