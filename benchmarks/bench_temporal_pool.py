"""Benchmark the fused Triton temporal-pooling kernel against the hardware limit and plain torch.

For x [B, T, 1+N, C] (element size s bytes) the kernel moves, from and to DRAM:
    mean, max:    B*T*(1+N)*C*s  (read every frame once: patches + CLS rows)
                + B*(N+T)*C*s    (write pooled rows + CLS rows)
    transformer:  the above + B*N*C*s                      (read delta)
    importance:   the above + B*T*N*C*s + N*C*4 + B*T*SPLIT*8 (score pass re-reads the patches, w in fp32)
GB/s = bytes / time, compared with the device's measured copy bandwidth (2 * bytes of a 1 GiB
`dst.copy_(src)` / time), and with the unfused torch sequence a user would write in x's dtype (pool,
then assign the pooled rows and the CLS rows into the embedding buffer). The fp32 reference
(`temporal_pool_reference`) is timed too. Times are medians of `triton.testing.do_bench` (L2 flushed
between runs). Issue-7 goals: >= 80 % of copy bandwidth at large B; >= 3x the unfused sequence at
T=8, N=256, C=1024, fp16, B=1 and B=32.

Usage: python benchmarks/bench_temporal_pool.py [--batches 1 32 256] [--modes mean importance ...]
CUDA only: without a GPU it says so and prints a JSON line with "skipped". Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from valley_rt.kernels import temporal_pool as tp


def _unfused(x, mode, w, bias, delta, out, po, fo):
    """The torch sequence a user would write, in x's dtype (reductions accumulate in fp32 inside torch)."""
    B, T, N1, C = x.shape
    N = N1 - 1
    patches = x[:, :, 1:]
    if mode == "mean":
        pooled = patches.mean(1)
    elif mode == "max":
        pooled = patches.amax(1)
    elif mode == "importance":
        scores = patches.reshape(B, T, N * C) @ w.reshape(N * C)  # [B, T]
        s = torch.softmax(scores.float() + bias, dim=1).to(x.dtype)
        pooled = (s[:, :, None, None] * patches).sum(1)
    else:
        pooled = delta + patches.mean(1)
    out[:, po : po + N] = pooled
    out[:, fo : fo + T] = x[:, :, 0]


def _bytes_moved(mode, B, T, N, C, s, split):
    n = B * T * (1 + N) * C * s + B * (N + T) * C * s
    if mode == "transformer":
        n += B * N * C * s
    if mode == "importance":
        n += B * T * N * C * s + N * C * 4 + B * T * split * 8
    return n


def measure_copy_gbps(do_bench) -> float:
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def run(*, batches, modes, T, N, C, dtype) -> dict:
    import triton
    from triton.testing import do_bench

    device = torch.device("cuda")
    copy_gbps = measure_copy_gbps(do_bench)
    s = torch.tensor([], dtype=dtype).element_size()
    rows = []
    print(f"device: {torch.cuda.get_device_name(device)}  copy bandwidth: {copy_gbps:.0f} GB/s")
    header = ("B", "mode", "fused ms", "GB/s", "% copy", "unfused ms", "speedup", "ref fp32 ms")
    print("{:>4} {:>11} {:>9} {:>7} {:>7} {:>10} {:>8} {:>11}".format(*header))
    for B in batches:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(B, T, 1 + N, C, generator=g, device=device, dtype=dtype)
        w = torch.randn(N, C, generator=g, device=device) / (N * C) ** 0.5
        w_x = w.to(dtype)
        bias = torch.zeros((), device=device)
        delta = torch.randn(B, N, C, generator=g, device=device, dtype=dtype)
        po, fo = 40, 40 + N + 2  # visual rows inside a [B, L, C] embedding buffer, Valley's layout
        out = torch.zeros(B, fo + T + 30, C, device=device, dtype=dtype)
        split = tp._pick_blocks(B, T, N * C, device)[2]
        for mode in modes:
            kw = dict(score_weight=w, score_bias=bias, delta=delta, out=out, patch_offset=po, frame_offset=fo)
            ref_out = out.clone()
            tp.temporal_pool_reference(x, mode, **{**kw, "out": ref_out})
            tp._temporal_pool_triton(x, mode, **kw)
            tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}[dtype]
            torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)  # fused is right first
            fused = do_bench(lambda: tp._temporal_pool_triton(x, mode, **kw), return_mode="median")
            unfused = do_bench(lambda: _unfused(x, mode, w_x, bias, delta, out, po, fo), return_mode="median")
            ref = do_bench(lambda: tp.temporal_pool_reference(x, mode, **kw), return_mode="median")
            gbps = _bytes_moved(mode, B, T, N, C, s, split) / fused / 1e6
            row = dict(B=B, mode=mode, fused_ms=round(fused, 4), fused_gbps=round(gbps, 1),
                       pct_of_copy=round(100 * gbps / copy_gbps, 1), unfused_ms=round(unfused, 4),
                       speedup_vs_unfused=round(unfused / fused, 2), reference_fp32_ms=round(ref, 4))  # fmt: skip
            rows.append(row)
            print(f"{B:>4} {mode:>11} {fused:>9.4f} {gbps:>7.0f} {row['pct_of_copy']:>6.1f}% {unfused:>10.4f} "
                  f"{row['speedup_vs_unfused']:>7.2f}x {ref:>11.4f}")  # fmt: skip
        del x, delta, out
        torch.cuda.empty_cache()
    big = max(batches)
    return {
        "bench": "temporal_pool",
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"T": T, "N": N, "C": C, "dtype": str(dtype).removeprefix("torch.")},
        "copy_gbps": round(copy_gbps, 1),
        "results": rows,
        "goal_80pct_copy_at_large_B": all(r["pct_of_copy"] >= 80 for r in rows if r["B"] == big),
        "goal_3x_unfused_B1_B32": all(r["speedup_vs_unfused"] >= 3 for r in rows if r["B"] in (1, 32)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--modes", nargs="+", default=list(tp.MODES), choices=tp.MODES)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--patches", type=int, default=256)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args()
    if not torch.cuda.is_available() or not tp.triton_available():
        why = "no CUDA GPU" if not torch.cuda.is_available() else "triton is not installed"
        print(f"bench_temporal_pool: skipped, {why} (this benchmark runs on CUDA only)", file=sys.stderr)
        print(json.dumps({"bench": "temporal_pool", "skipped": why}))
        return 0
    result = run(batches=args.batches, modes=args.modes, T=args.frames, N=args.patches, C=args.channels,
                 dtype=getattr(torch, args.dtype))  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
