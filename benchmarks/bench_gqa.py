"""ONNX Runtime's two CPU GroupQueryAttention kernels side by side: flash (ORT's default) and materialized.

The engine's LLM graphs run attention in com.microsoft.GroupQueryAttention with the KV cache bound as
both past input and present output. ORT builds one of two CPU kernels for it, chosen by
ORT_GQA_DISABLE_FLASH_ATTENTION when the session is created: a tiled online-softmax ("flash") kernel,
or one that materializes each head's [S, T] scores and runs both products on MLAS' SGEMM. This times
both on a decoder's worth of GQA nodes (bench-1b: 22 layers, 32 heads, 4 KV heads, head size 64) for
a prompt, a prompt after cached rows, and decode steps, alternating, and checks both against a float64
NumPy attention.

    python benchmarks/bench_gqa.py [--layers 22] [--heads 32 --kv-heads 4 --head-size 64] [--repeat 5]

Ends with one JSON line (hardware included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from common import hardware  # noqa: E402  (benchmarks/common.py)

CASES = [(554, 0), (283, 271), (1, 560), (1, 1500)]  # (appended tokens, cached tokens)
KERNELS = ("flash", "materialized")


def graph(layers: int, heads: int, kv_heads: int, head_size: int, max_len: int) -> bytes:
    """`layers` GroupQueryAttention nodes on one packed-QKV input, each with its own KV buffers."""
    from onnx import TensorProto, helper

    inv = 1.0 / 10000 ** (np.arange(head_size // 2) / (head_size // 2))
    angles = np.outer(np.arange(max_len), inv)
    inits = [helper.make_tensor("cos", TensorProto.FLOAT, angles.shape, np.cos(angles).astype(np.float32).ravel()),
             helper.make_tensor("sin", TensorProto.FLOAT, angles.shape, np.sin(angles).astype(np.float32).ravel())]
    width = (heads + 2 * kv_heads) * head_size
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "S", width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs, nodes = [], []
    for i in range(layers):
        for kv in ("k", "v"):
            shape = [1, kv_heads, max_len, head_size]
            inputs.append(helper.make_tensor_value_info(f"past_{kv}{i}", TensorProto.FLOAT, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kv}{i}", TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, "S", heads * head_size]))
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"],
            [f"out{i}", f"present_k{i}", f"present_v{i}"], domain="com.microsoft", num_heads=heads,
            kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=1 / math.sqrt(head_size)))
    model = helper.make_model(helper.make_graph(nodes, "gqa", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def session(model: bytes, kernel: str, threads: int):
    """A session whose GQA kernels are `kernel`, whatever the caller's environment says: ORT reads the
    variable while it builds them; the caller's value is put back afterwards."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    name = "ORT_GQA_DISABLE_FLASH_ATTENTION"
    before = os.environ.pop(name, None)
    if kernel == "materialized":
        os.environ[name] = "1"
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before


def run_case(sess, layers: int, kv_heads: int, head_size: int, max_len: int, qkv: np.ndarray, past: int,
             cache: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    """Median seconds of one run appending qkv [1, S, width] after `past` rows of `cache`; layer 0's output."""
    import onnxruntime as ort

    binding = sess.io_binding()
    values = []
    for i in range(layers):
        for kv, rows in (("k", cache[0]), ("v", cache[1])):
            buf = np.zeros((1, kv_heads, max_len, head_size), np.float32)
            buf[:, :, :past] = rows[:, :, :past]
            v = ort.OrtValue.ortvalue_from_numpy(buf)
            values.append((buf, v))
            binding.bind_ortvalue_input(f"past_{kv}{i}", v)
            binding.bind_ortvalue_output(f"present_{kv}{i}", v)
        binding.bind_output(f"out{i}")
    s = qkv.shape[1]
    binding.bind_cpu_input("qkv", qkv)
    binding.bind_cpu_input("seqlens_k", np.array([past + s - 1], np.int32))
    binding.bind_cpu_input("total", np.array(past + s, np.int32))
    sess.run_with_iobinding(binding)  # first run: ORT's one-time set-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)  # the same rows rewritten in place: every run does the same work
        times.append(time.perf_counter() - t0)
    out0 = binding.get_outputs()[[o.name for o in sess.get_outputs()].index("out0")].numpy()
    return float(np.median(times)), out0


def reference(qkv: np.ndarray, cache: np.ndarray, past: int, heads: int, kv_heads: int, head_size: int) -> np.ndarray:
    """Float64 attention of the appended rows over cache[:past] + the new rows (rotary on the new q/k)."""
    x = qkv[0].astype(np.float64)
    s = x.shape[0]
    q = x[:, :heads * head_size].reshape(s, heads, head_size)
    k = x[:, heads * head_size:(heads + kv_heads) * head_size].reshape(s, kv_heads, head_size)
    v = x[:, (heads + kv_heads) * head_size:].reshape(s, kv_heads, head_size)
    inv = 1.0 / 10000 ** (np.arange(head_size // 2) / (head_size // 2))
    ang = np.outer(np.arange(past, past + s), inv)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rotate(t):
        a, b = t[..., :head_size // 2], t[..., head_size // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    q, k = rotate(q), rotate(k)
    keys = np.concatenate([cache[0][0, :, :past].transpose(1, 0, 2).astype(np.float64), k])  # [T, kvh, hd]
    vals = np.concatenate([cache[1][0, :, :past].transpose(1, 0, 2).astype(np.float64), v])
    out = np.zeros((s, heads, head_size))
    causal = np.arange(past + s)[None, :] > (past + np.arange(s))[:, None]
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = q[:, h] @ keys[:, g].T / math.sqrt(head_size)
        scores[causal] = -np.inf
        p = np.exp(scores - scores.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ vals[:, g]
    return out.reshape(1, s, heads * head_size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case and kernel (median)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternating the two kernels")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    hw = hardware()
    print(f"# {hw['cpu']} ({hw['cpu_kind']}), {args.threads} threads, load average {hw['load_avg_1min']}; "
          f"{args.layers} GQA nodes, {args.heads} heads, {args.kv_heads} KV heads, head size {args.head_size}",
          flush=True)
    max_len = 2048
    model = graph(args.layers, args.heads, args.kv_heads, args.head_size, max_len)
    sessions = {k: session(model, k, args.threads) for k in KERNELS}
    rng = np.random.default_rng(0)
    width = (args.heads + 2 * args.kv_heads) * args.head_size
    rows = []
    for s, past in CASES:
        qkv = rng.standard_normal((1, s, width)).astype(np.float32)
        cache = rng.standard_normal((2, 1, args.kv_heads, max_len, args.head_size)).astype(np.float32)
        want = reference(qkv, cache, past, args.heads, args.kv_heads, args.head_size)
        times = {k: [] for k in KERNELS}
        err = {}
        for _ in range(args.rounds):
            for k in KERNELS:
                t, out = run_case(sessions[k], args.layers, args.kv_heads, args.head_size, max_len, qkv, past,
                                  cache, args.repeat)
                times[k].append(t)
                err[k] = float(np.abs(out - want).max())
        row = {"append": s, "cached": past, **{f"{k}_ms": [round(1e3 * t, 2) for t in times[k]] for k in KERNELS},
               "ratio": round(float(np.median(times["flash"]) / np.median(times["materialized"])), 2),
               **{f"{k}_max_err_vs_fp64": err[k] for k in KERNELS}}
        rows.append(row)
        print(f"append {s:4d} after {past:4d}: flash {np.median(times['flash']) * 1e3:8.2f} ms, materialized "
              f"{np.median(times['materialized']) * 1e3:8.2f} ms ({row['ratio']}x); max error vs float64: flash "
              f"{err['flash']:.2e}, materialized {err['materialized']:.2e}", flush=True)
    print(json.dumps({"bench": "gqa_kernels", "hardware": hw, "layers": args.layers, "heads": args.heads,
                      "kv_heads": args.kv_heads, "head_size": args.head_size, "threads": args.threads,
                      "load_avg_end": round(os.getloadavg()[0], 2), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
