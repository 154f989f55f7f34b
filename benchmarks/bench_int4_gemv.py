"""The int4 decode kernel alone: ONNX Runtime's MatMulNBits at M = 1 on a LLaMA's linears, against the
read bandwidth measured in the same run.

A decode step is memory bound: it multiplies one row by every weight, so its speed is the rate at
which the int4 weights stream from memory. This times MatMulNBits (the engine's decode kernel) on
`--layers` decoder layers' linears of a shape (bench-1b: qkv 2048x2560, o 2048x2048, gate|up
2048x11264, down 5632x2048; by default enough layers for 2.5x the last-level cache: on a CPU with a
300 MiB L3, six bench-1b layers (141 MB) stream from the cache, not memory), for each group size and
accuracy level asked (4: int8 activations, VNNI dot products, the engine's setting; 0: fp32), and
prints GB/s and the fraction of the read roofline (`common.read_bandwidth_gbs`, same threads).

    python benchmarks/bench_int4_gemv.py [--layers N] [--groups 128,64,32] [--levels 4,0] [--threads 1,2]

Ends with one JSON line (hardware included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from common import hardware, last_level_cache_bytes, read_bandwidth_gbs  # noqa: E402  (benchmarks/common.py)

SHAPES = {"bench-1b": [(2048, 2560), (2048, 2048), (2048, 11264), (5632, 2048)],  # (K, N) per layer
          "valley2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]}


def graph(weights, accuracy_level: int):
    """One MatMulNBits node per weight, each with its own [1, K] input."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, inputs, outputs = [], [], [], []
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w.b, f"b{i}"), numpy_helper.from_array(w.scales.reshape(-1), f"s{i}"),
                  numpy_helper.from_array(w.zero_points.reshape(-1), f"z{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{i}", f"b{i}", f"s{i}", f"z{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=w.k, N=w.n, bits=4, block_size=w.block_size,
                                      accuracy_level=accuracy_level))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, w.k]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.n]))
    g = helper.make_graph(nodes, "gemv", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def time_gemv(weights, accuracy_level: int, threads: int, repeats: int = 5, inner: int = 10) -> float:
    """Best-of-`repeats` seconds for one pass over every weight (mean of `inner` passes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    sess = ort.InferenceSession(graph(weights, accuracy_level).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"x{i}": rng.standard_normal((1, w.k), dtype=np.float32) for i, w in enumerate(weights)}
    for _ in range(3):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            sess.run(None, feeds)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def main() -> None:
    import torch

    from valley_rt.export.llm_onnx import rtn_matmul_nbits

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    ap.add_argument("--layers", type=int, default=None, help="default: 2.5x the last-level cache, at least 6")
    ap.add_argument("--groups", default="128,64,32")
    ap.add_argument("--levels", default="4,0", help="MatMulNBits accuracy levels (4: int8 compute; 0: fp32)")
    ap.add_argument("--threads", default="2", help="thread counts, comma-separated; each against the read "
                                                    "bandwidth of as many threads")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    if args.layers is None:  # int4 bytes of one layer at group 128: K x N / 2 plus the scales
        layer = sum(k * n // 2 + k * n // 128 * 5 for k, n in SHAPES[args.shape])
        args.layers = max(6, -(-int(2.5 * last_level_cache_bytes()) // layer))
    hw = hardware()
    print(f"# {hw['cpu']} ({hw['cpu_kind']}), ISA {', '.join(hw['isa'])}; threads {args.threads}; "
          f"load average {hw['load_avg_1min']}", flush=True)
    roof = {t: read_bandwidth_gbs(t) for t in counts}
    print("# read bandwidth (roofline): " + ", ".join(f"{roof[t]:.1f} GB/s on {t} thread(s)" for t in counts)
          + f"; {args.layers} layers, last-level cache {hw['last_level_cache_mb']} MB", flush=True)
    torch.manual_seed(0)
    rows = []
    for group in (int(g) for g in args.groups.split(",")):
        weights = [rtn_matmul_nbits(torch.randn(n, k) * 0.02, bits=4, group_size=group)
                   for _ in range(args.layers) for k, n in SHAPES[args.shape]]
        nbytes = sum(w.b.nbytes + w.scales.nbytes + w.zero_points.nbytes for w in weights)
        for level in (int(a) for a in args.levels.split(",")):
            for threads in counts:
                s = time_gemv(weights, level, threads)
                row = {"group_size": group, "accuracy_level": level, "threads": threads, "mb": round(nbytes / 1e6, 1),
                       "ms": round(s * 1e3, 3), "gbs": round(nbytes / s / 1e9, 2),
                       "roofline_frac": round(nbytes / s / 1e9 / roof[threads], 3)}
                rows.append(row)
                print(f"group {group:4d}, accuracy level {level}, {threads} thread(s): {row['ms']:8.2f} ms for "
                      f"{row['mb']:.0f} MB -> {row['gbs']:5.1f} GB/s = {100 * row['roofline_frac']:.0f} % of the "
                      f"read roofline", flush=True)
    roof_after = {t: read_bandwidth_gbs(t) for t in counts}
    print("# read bandwidth after: " + ", ".join(f"{roof_after[t]:.1f} GB/s on {t}" for t in counts))
    print(json.dumps({"bench": "int4_gemv", "hardware": hw, "shape": args.shape, "layers": args.layers,
                      "threads": counts, "read_gbs": round(roof[counts[-1]], 2),
                      "read_gbs_after": round(roof_after[counts[-1]], 2),
                      "read_gbs_by_threads": {str(t): round(roof[t], 2) for t in counts},
                      "read_gbs_after_by_threads": {str(t): round(roof_after[t], 2) for t in counts},
                      "rows": rows}))


if __name__ == "__main__":
    main()
