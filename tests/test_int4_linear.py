"""The int4 GPTQ linear: Triton kernel (the interpreter on CPU, compiled on CUDA) and torch's tinygemm
against the dequantized reference built on GPTQModel's v1 semantics.

GPTQ tensors are built here from explicit codes / zero points / scales with an independent packer
(`_gptq_v1`, written from the format's definition), so the tests check the kernel against the format
itself, zero points 0 and 15 included (0 is the case where v1's whole-word "minus one" borrows).
Shapes are tiny: the interpreter runs every program as Python.
"""

import pytest
import torch

from valley_rt.kernels import int4_linear as il

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (tinygemm and compiled kernels)")
needs_triton = pytest.mark.skipif(not il.triton_available(), reason="triton is not installed")


def _gptq_v1(codes, zeros, scales, g_idx):
    """The GPTQModel v1 checkpoint tensors for W[k, n] = scales[g[k], n] * (codes[k, n] - zeros[g[k], n])."""
    k, n = codes.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        qweight |= codes[j::8].long() << (4 * j)
    npad = -(-n // 8) * 8
    z = torch.zeros(zeros.shape[0], npad, dtype=torch.int64)
    z[:, :n] = zeros
    words = torch.zeros(zeros.shape[0], npad // 8, dtype=torch.int64)
    for j in range(8):
        words |= z[:, j::8] << (4 * j)
    words = (words - 0x11111111) % 2**32  # v1: one 32-bit subtraction per word, borrows included
    as_i32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    return as_i32(qweight), as_i32(words), scales.half(), g_idx.to(torch.int32)


def _case(k, n, group, act_order, seed=0, extreme_zeros=True):
    """Random codes/zeros/scales; every group holds zero points 0 and 15 somewhere; act-order permutes g_idx."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (groups, n), generator=gen)
    if extreme_zeros:
        zeros[:, 0] = 0
        zeros[:, -1] = 15
        zeros[:, n // 2] = 0  # a zero of 0 in the middle of a word: its borrow reaches the field above
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half().float()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    ref_w = scales[g_idx] * (codes - zeros[g_idx]).float()  # [K, N], checkpoint row order
    return _gptq_v1(codes, zeros, scales, g_idx), ref_w


def test_reference_dequantize_matches_format():
    (qw, qz, s, g), ref_w = _case(64, 24, 16, act_order=True)
    torch.testing.assert_close(il.dequantize_gptq(qw, qz, s, g, 16), ref_w, rtol=0, atol=0)


def test_v1_zero_point_zero_borrows_whole_word():
    """zero point 0 stored minus one borrows from the field above: decoding field by field (+1) is wrong."""
    zeros = torch.tensor([[0, 3, 15, 0, 7, 0, 15, 1, 0]])
    qz = il.pack_zeros_v1(zeros)
    assert torch.equal(il.unpack_zeros_v1(qz, 9), zeros.int())
    per_field = ((qz[:, :1].long() & 0xFFFFFFFF) >> torch.arange(0, 32, 4)) & 0xF
    assert not torch.equal(per_field + 1, zeros[:, :8])  # the naive decoding differs


def test_from_gptq_sorts_rows_and_keeps_the_function():
    (qw, qz, s, g), ref_w = _case(64, 16, 16, act_order=True, seed=1)
    w = il.Int4Weight.from_gptq(qw, qz, s, g, 16)
    assert w.perm is not None
    x = torch.randn(3, 64)
    torch.testing.assert_close(il.int4_linear_reference(x, w), x @ ref_w, rtol=1e-5, atol=1e-5)


def test_from_gptq_rejects_bad_g_idx():
    (qw, qz, s, g), _ = _case(64, 16, 16, act_order=False)
    bad = g.clone()
    bad[0] = 1  # group 1 now has 17 rows
    with pytest.raises(ValueError, match="groups of 16"):
        il.Int4Weight.from_gptq(qw, qz, s, bad, 16)


@needs_triton
@pytest.mark.parametrize(
    "m,k,n,group,act_order,dtype,blocks",
    [
        (1, 64, 24, 16, False, torch.float32, {}),  # GEMV path
        (1, 128, 37, 32, True, torch.float32, {"split_k": 2, "block_k": 16}),  # odd N, act-order, split-K atomics
        (1, 64, 40, 64, True, torch.float16, {"block_n": 16}),  # one group (group_size = K), fp16, several N blocks
        (3, 64, 19, 16, True, torch.float32, {}),  # tl.dot path, M < BLOCK_M
        (5, 128, 24, 128, False, torch.float16, {"split_k": 2, "block_k": 32}),  # dot + split-K, fp16
        (17, 64, 16, 32, True, torch.float32, {"block_m": 16}),  # two row blocks
    ],
)
def test_triton_kernel_matches_reference(m, k, n, group, act_order, dtype, blocks):
    (qw, qz, s, g), ref_w = _case(k, n, group, act_order, seed=m + k + n)
    w = il.Int4Weight.from_gptq(qw, qz, s, g, group).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    got = il._int4_linear_triton(x, w, **blocks)
    want = x.float() @ ref_w.to(DEVICE)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_triton
def test_triton_kernel_checks_inputs():
    (qw, qz, s, g), _ = _case(64, 16, 16, act_order=False)
    w = il.Int4Weight.from_gptq(qw, qz, s, g, 16).to(DEVICE)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        il._int4_linear_triton(torch.randn(1, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"GEMV path\) needs M == 1"):
        il._int4_linear_triton(torch.randn(2, 64, device=DEVICE), w, block_m=1)


def test_dispatch_and_override(monkeypatch):
    x = torch.randn(1, 64)
    assert il.pick_backend(x) == ("triton" if x.is_cuda else "reference")
    monkeypatch.setenv(il.BACKEND_ENV, "triton")
    assert il.pick_backend(x) == "triton"
    monkeypatch.setenv(il.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        il.pick_backend(x)


def test_quantize_rtn_roundtrip_error_bounded():
    w = torch.randn(64, 24)
    q = il.quantize_rtn(w, 16)
    err = (q.dequantize() - w).abs()
    step = q.scales.float().repeat_interleave(16, 0)  # [K, N] the group's step
    assert bool((err <= 0.5 * step + 1e-6).all())


def test_tinygemm_scale_zero_convention_on_cpu():
    """tinygemm's (scale, zero) pair from our zero points, checked with torch's CPU twin of the op."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    (qw, qz, s, g), ref_w = _case(64, 16, 32, act_order=False, seed=3)
    w = il.Int4Weight.from_gptq(qw, qz, s, g, 32)
    codes = il.unpack_rows(w.qweight).t().contiguous()  # [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    zeros = il.unpack_zeros_v1(w.qzeros, w.n).float()
    sz = torch.stack([w.scales.float(), w.scales.float() * (8 - zeros)], -1)  # what to_tinygemm builds
    x = torch.randn(2, 64)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    torch.testing.assert_close(got, x @ ref_w, rtol=1e-4, atol=1e-4)


@gpu
def test_tinygemm_on_cuda_matches_reference():
    (qw, qz, s, g), ref_w = _case(256, 64, 64, act_order=True, seed=4)
    w = il.Int4Weight.from_gptq(qw, qz, s, g, 64).to("cuda")
    w.tinygemm = il.to_tinygemm(w)
    assert w.tinygemm is not None
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    want = x.float() @ ref_w.cuda()
    got = il.int4_linear(x, w, backend="tinygemm").float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@gpu
def test_choose_backend_on_cuda_times_both():
    ws = [il.quantize_rtn(torch.randn(1024, 1024, device="cuda"), 128) for _ in range(2)]
    for w in ws:
        w.tinygemm = il.to_tinygemm(w)
    times = il.choose_backend(ws, iters=5)
    assert "triton" in times and il.pick_backend(torch.zeros(1, device="cuda")) in times


_COMPILE_SCRIPT = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from valley_rt.kernels import int4_linear as il
k = il._int4_matmul_kernel
done = []
for dt in ("fp16", "bf16"):
    for bm, bn, bk, split, warps in ((1, 64, 128, 8, 4), (1, 64, 128, 1, 4), (16, 64, 128, 4, 4), (64, 128, 64, 1, 8)):
        out = "fp32" if split > 1 else dt
        sig = dict(x_ptr=f"*{dt}", qw_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", y_ptr=f"*{out}", M="i32", N="i32",
                   K="i32", NZ="i32", stride_xm="i32", stride_ym="i32", GROUP="i32", K_SPLIT="i32",
                   BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", SPLIT_K="constexpr")
        src = ASTSource(k, sig, constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split))
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        done.append(f"{dt}-{bm}x{bn}x{bk}-split{split}:{len(ptx)}")
print(json.dumps(done))
"""


@needs_triton
def test_kernel_compiles_for_sm90():
    """Triton -> PTX for an H100/H200 (no GPU needed) for every block shape pick_blocks can choose:
    catches what the interpreter lets through (globals in kernels, tl.dot shape rules)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])) == 8
