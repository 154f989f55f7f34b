"""Parity of the Triton temporal-pooling kernel with the plain-torch reference.

On CPU the kernel runs under the Triton interpreter. `@triton.jit` reads TRITON_INTERPRET when a kernel
is defined (triton's own helpers too, when triton is first imported), so it is set here around the
import and put back afterwards, so other test files do not inherit it; an autouse fixture sets it again
while these tests run (the interpreter reads it at run time too). If something imported triton earlier
in the same process without it (valley_rt.model does, through transformers), the kernel tests skip
here and `test_kernel_tests_in_fresh_process` runs them all in a fresh process instead (a conftest.py
setting TRITON_INTERPRET=1 for CPU-only runs would make that unnecessary). A compile-only test builds
the real CUDA kernels for sm_90 and sm_80 without a GPU; the @pytest.mark.gpu tests run them on CUDA.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
_saved = os.environ.get("TRITON_INTERPRET")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
from valley_rt.kernels import temporal_pool as tp  # noqa: E402

if tp.triton_available():
    from triton.runtime.interpreter import InterpretedFunction
if _saved is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved

MODES = tp.MODES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # atol = rtol, outputs in dtype
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# The kernel can run here: on CUDA, or on CPU when triton (and so tl.sum, itself a @triton.jit function)
# was first imported under TRITON_INTERPRET=1. When another test file imported triton first, the kernel
# tests run instead in a fresh process (test_kernel_tests_in_fresh_process).
KERNEL_RUNS = tp.triton_available() and (not INTERPRET or isinstance(tp.tl.sum, InterpretedFunction))
needs_triton = pytest.mark.skipif(not tp.triton_available(), reason="triton is not installed")
needs_kernel = pytest.mark.skipif(
    not KERNEL_RUNS, reason="triton was imported without TRITON_INTERPRET: see test_kernel_tests_in_fresh_process"
)


def _inputs(B, T, N, C, dtype, device=DEVICE, seed=0, score_scale=2.0):
    """x [B, T, 1+N, C], score weight [N, C] (scores of std ~score_scale), delta [B, N, C]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 1 + N, C, generator=g).to(dtype)
    w = torch.randn(N, C, generator=g) * (score_scale / (N * C) ** 0.5)
    delta = torch.randn(B, N, C, generator=g).to(dtype)
    return x.to(device), w.to(device), delta.to(device)


def _run_both(x, mode, w, delta, **blocks):
    """(kernel, reference) outputs; `blocks` override the kernel's block sizes."""
    args = dict(score_weight=w, score_bias=torch.tensor(0.25, device=x.device), delta=delta)
    return tp._temporal_pool_triton(x, mode, **args, **blocks), tp.temporal_pool_reference(x, mode, **args)


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


# Shapes cover T = 1, 3, 8, 64; N = 256, 49; C = 1024, 100; B = 1, 3; the big one is the real shape.
SHAPES = [(1, 8, 256, 1024), (3, 3, 49, 100), (1, 64, 49, 100), (3, 1, 49, 1024)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}N{}C{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_reference(shape, dtype, mode):
    if shape == SHAPES[0] and dtype != torch.float16 and DEVICE == "cpu":
        pytest.skip("real shape runs in fp16 only under the interpreter (time); other dtypes covered below")
    x, w, delta = _inputs(*shape, dtype)
    (pooled, cls), (ref_pooled, ref_cls) = _run_both(x, mode, w, delta)
    assert pooled.shape == (shape[0], shape[2], shape[3]) and pooled.dtype == dtype
    assert cls.shape == (shape[0], shape[1], shape[3]) and cls.dtype == dtype
    _close(pooled, ref_pooled, dtype)
    assert torch.equal(cls, ref_cls)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_many_blocks_and_splits(mode):
    """Small blocks: several patch and CLS programs, several score splits, ragged tails (N*C = 4900)."""
    x, w, delta = _inputs(2, 5, 49, 100, torch.float32)
    (pooled, cls), (ref_pooled, ref_cls) = _run_both(x, mode, w, delta, block=256, score_block=128, split=8)
    _close(pooled, ref_pooled, torch.float32)
    assert torch.equal(cls, ref_cls)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=str)
def test_writes_into_buffer_at_offsets(mode, out_dtype):
    B, T, N, C = 3, 4, 49, 100
    x, w, delta = _inputs(B, T, N, C, torch.float16)
    L, patch_offset = 70, 5
    sentinel = torch.full((B, L, C), -7.0, dtype=out_dtype, device=DEVICE)
    out = sentinel.clone()
    pooled, cls = tp._temporal_pool_triton(x, mode, score_weight=w, delta=delta, out=out, patch_offset=patch_offset)
    frame_offset = patch_offset + N + 2  # default: Valley's layout, <im_end> <vi_start> in between
    assert pooled.data_ptr() == out[:, patch_offset].data_ptr() and cls.data_ptr() == out[:, frame_offset].data_ptr()
    ref_out = sentinel.clone()
    tp.temporal_pool_reference(x, mode, score_weight=w, delta=delta, out=ref_out, patch_offset=patch_offset)
    _close(out, ref_out, torch.float16)
    untouched = torch.ones(L, dtype=torch.bool)
    untouched[patch_offset : patch_offset + N] = False
    untouched[frame_offset : frame_offset + T] = False
    assert torch.equal(out[:, untouched], sentinel[:, untouched])
    # explicit frame rows before the patch rows
    out2 = sentinel.clone()
    tp._temporal_pool_triton(x, mode, score_weight=w, delta=delta, out=out2, patch_offset=20, frame_offset=3)
    _close(out2[:, 20 : 20 + N], ref_out[:, patch_offset : patch_offset + N], torch.float16)
    assert torch.equal(out2[:, 3 : 3 + T], out[:, frame_offset : frame_offset + T])
    assert torch.equal(out2[:, :3], sentinel[:, :3]) and torch.equal(out2[:, 20 + N :], sentinel[:, 20 + N :])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_importance_is_stable_for_huge_scores(dtype):
    """Scores of order 1e30 (differences too): a naive exp overflows to inf/inf = NaN; ours picks the max frame."""
    B, T, N, C = 2, 6, 49, 100
    x, _, _ = _inputs(B, T, N, C, dtype)
    w = torch.zeros(N, C, device=DEVICE)
    w[0, 0] = 1e30
    x[:, :, 1, 0] = torch.arange(T, dtype=dtype, device=DEVICE).flip(0)  # frame 0 has the biggest score
    x[1, :, 1, 0] = torch.arange(T, dtype=dtype, device=DEVICE)  # batch 1: the last frame
    pooled, _ = tp._temporal_pool_triton(x, "importance", score_weight=w)
    ref, _ = tp.temporal_pool_reference(x, "importance", score_weight=w)
    assert torch.isfinite(pooled.float()).all()
    assert torch.equal(pooled[0], x[0, 0, 1:]) and torch.equal(pooled[1], x[1, -1, 1:])
    _close(pooled, ref, dtype)
    # tied huge scores: an even average of the tied frames, still finite
    x2 = x.clone()
    x2[:, :, 1, 0] = 3
    pooled2, _ = tp._temporal_pool_triton(x2, "importance", score_weight=w)
    _close(pooled2, x2[:, :, 1:].float().mean(1), dtype)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_no_overflow_on_large_fp16_magnitudes(mode):
    """Frames near fp16's max (65504): the sum over frames overflows fp16 but not the fp32 accumulator."""
    x, w, delta = _inputs(1, 8, 49, 100, torch.float16)
    x = (x.sign() * 60000.0 + x).to(torch.float16)  # |x| ~ 6e4, 8 frames sum to ~5e5
    delta = torch.zeros_like(delta)
    (pooled, cls), (ref_pooled, _) = _run_both(x, mode, w * 1e-3, delta)
    assert torch.isfinite(pooled).all() and torch.isfinite(cls).all()
    _close(pooled, ref_pooled, torch.float16)


@needs_kernel
@pytest.mark.parametrize("mode", ["mean", "max"])
def test_nan_propagates_like_torch(mode):
    """A NaN in one frame gives NaN in that pooled element only (torch.amax propagates NaN too)."""
    x, w, delta = _inputs(1, 5, 49, 100, torch.float16)
    x[0, 2, 1 + 7, 30] = float("nan")
    x[0, 4, 1 + 9, 31] = float("nan")  # in the last loop iteration's first slot (T=5: 4 + 1)
    (pooled, _), (ref, _) = _run_both(x, mode, w, delta)
    assert torch.equal(torch.isnan(pooled), torch.isnan(ref)) and torch.isnan(ref).sum() == 2
    _close(pooled.nan_to_num(), ref.nan_to_num(), torch.float16)


def test_reference_matches_original_formulation():
    """Importance pooling as the original writes it, on projected tokens; and folded on raw features."""
    torch.manual_seed(0)
    B, T, N, C, D = 2, 5, 16, 24, 32
    x = torch.randn(B, T, 1 + N, C, dtype=torch.float64)
    projector = torch.nn.Linear(C, D).double()
    pooling_layer = torch.nn.Linear(D * N, 1).double()
    with torch.no_grad():
        pooling_layer.weight.mul_(4.0)  # scores spread over several units
        P = projector(x)  # [B, T, 1+N, D]
        expected = []
        for b in range(B):
            patches = P[b, :, 1:]  # [T, N, D]
            s = torch.softmax(pooling_layer(patches.flatten(1)), dim=0)  # [T, 1]
            expected.append((s[:, :, None] * patches).sum(0))
        expected = torch.stack(expected)
        # on projected tokens
        pooled, cls = tp.temporal_pool_reference(
            P, "importance", score_weight=pooling_layer.weight.view(N, D), score_bias=pooling_layer.bias
        )
        torch.testing.assert_close(pooled, expected)
        assert torch.equal(cls, P[:, :, 0])
        # on raw features, projector folded into the score, projector applied after pooling
        w2, b2 = tp.fold_importance_weights(pooling_layer.weight, pooling_layer.bias, projector.weight, projector.bias)
        assert w2.shape == (N, C) and b2.shape == ()
        raw_pooled, raw_cls = tp.temporal_pool_reference(x, "importance", score_weight=w2, score_bias=b2)
        torch.testing.assert_close(projector(raw_pooled).double(), expected, atol=1e-4, rtol=1e-4)  # w2 is fp32
        torch.testing.assert_close(projector(raw_cls), P[:, :, 0])
        # the other modes against their one-line originals
        torch.testing.assert_close(tp.temporal_pool_reference(P, "mean")[0], P[:, :, 1:].mean(1))
        torch.testing.assert_close(tp.temporal_pool_reference(P, "max")[0], P[:, :, 1:].max(1).values)
        delta = torch.randn(B, N, D, dtype=torch.float64)
        pooled_tf, _ = tp.temporal_pool_reference(P, "transformer", delta=delta)
        torch.testing.assert_close(pooled_tf, delta + P[:, :, 1:].mean(1))
        # the scalar bias cancels in the softmax (the kernel does not read it)
        torch.testing.assert_close(
            tp.temporal_pool_reference(x, "importance", score_weight=w2, score_bias=b2 + 100.0)[0], raw_pooled
        )


@needs_kernel
def test_folded_kernel_matches_original():
    torch.manual_seed(1)
    B, T, N, C, D = 2, 4, 49, 100, 64
    x = torch.randn(B, T, 1 + N, C, device=DEVICE)
    projector = torch.nn.Linear(C, D).to(DEVICE)
    pooling_layer = torch.nn.Linear(D * N, 1).to(DEVICE)
    with torch.no_grad():
        P = projector(x)
        s = torch.softmax(pooling_layer(P[:, :, 1:].flatten(2)), dim=1)  # [B, T, 1]
        expected = (s[..., None] * P[:, :, 1:]).sum(1)
        w2, b2 = tp.fold_importance_weights(pooling_layer.weight, pooling_layer.bias, projector.weight, projector.bias)
        pooled, _ = tp._temporal_pool_triton(x, "importance", score_weight=w2, score_bias=b2)
        torch.testing.assert_close(projector(pooled), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
def test_gpu_dispatch_picks_triton(monkeypatch):
    monkeypatch.delenv(tp.BACKEND_ENV, raising=False)
    assert tp.pick_backend(torch.zeros(1, device="cuda")) == "triton"


def test_dispatch(monkeypatch):
    x, w, delta = _inputs(1, 2, 4, 8, torch.float32, device="cpu")
    monkeypatch.delenv(tp.BACKEND_ENV, raising=False)
    assert tp.pick_backend(x) == "reference"  # CPU tensors default to the reference
    assert tp.pick_backend(x, "triton") == "triton"
    monkeypatch.setenv(tp.BACKEND_ENV, "triton")
    assert tp.pick_backend(x) == "triton"
    assert tp.pick_backend(x, "reference") == "reference"  # the argument wins over the env
    monkeypatch.setenv(tp.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        tp.temporal_pool(x, "mean")
    monkeypatch.setenv(tp.BACKEND_ENV, "reference")
    pooled, cls = tp.temporal_pool(x, "mean")
    torch.testing.assert_close(pooled, x[:, :, 1:].mean(1))
    if KERNEL_RUNS and DEVICE == "cpu":
        monkeypatch.setenv(tp.BACKEND_ENV, "triton")
        pooled_t, cls_t = tp.temporal_pool(x, "mean")
        torch.testing.assert_close(pooled_t, pooled)
        assert torch.equal(cls_t, cls)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_arguments_raise(backend):
    if backend == "triton" and not KERNEL_RUNS:
        pytest.skip("the triton kernel cannot run in this process (see KERNEL_RUNS)")
    fn = tp._temporal_pool_triton if backend == "triton" else tp.temporal_pool_reference
    x, w, delta = _inputs(2, 3, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="mode must be one of"):
        fn(x, "median")
    with pytest.raises(ValueError, match=r"x must be \[B, T, 1\+N, C\]"):
        fn(x[0], "mean")
    with pytest.raises(ValueError, match=r"score_weight \[4, 8\], got \[4, 7\]"):
        fn(x, "importance", score_weight=w[:, :7])
    with pytest.raises(ValueError, match=r"delta \[2, 4, 8\], got None"):
        fn(x, "transformer")
    with pytest.raises(ValueError, match="must fit"):
        fn(x, "mean", out=torch.empty(2, 8, 8, device=DEVICE))
    with pytest.raises(ValueError, match="overlap"):
        fn(x, "mean", out=torch.empty(2, 20, 8, device=DEVICE), patch_offset=0, frame_offset=2)
    with pytest.raises(ValueError, match=r"out must be \[2, L, 8\]"):
        fn(x, "mean", out=torch.empty(2, 20, 9, device=DEVICE))
    if backend == "triton":
        with pytest.raises(ValueError, match="x must be contiguous"):
            fn(x.transpose(0, 1).contiguous().transpose(0, 1), "mean")
        with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
            fn(x.double(), "mean")


def test_module_works_without_triton(monkeypatch):
    """Triton is optional: with it missing the module imports, dispatches to the reference, and asking
    for the triton backend says why it cannot."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.find_spec("valley_rt.kernels.temporal_pool")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert not fresh.triton_available() and not hasattr(fresh, "_temporal_pool_kernel")
    x = torch.randn(2, 3, 5, 8)
    assert fresh.pick_backend(x) == "reference"
    torch.testing.assert_close(fresh.temporal_pool(x, "max")[0], x[:, :, 1:].amax(1))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.temporal_pool(x, "mean", backend="triton")


def test_fold_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"pool_weight: expected \[1, N\*32\], got \[1, 100\]"):
        tp.fold_importance_weights(torch.zeros(1, 100), torch.zeros(1), torch.zeros(32, 8), torch.zeros(32))


@pytest.mark.skipif(KERNEL_RUNS or not tp.triton_available(), reason="the kernel tests ran in this process")
def test_kernel_tests_in_fresh_process():
    """Triton was imported in this process before TRITON_INTERPRET was set (e.g. via transformers), so
    the interpreter cannot run the kernel here: run this file's tests in a fresh process instead."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-rs", "-m", "not slow and not gpu",
           "-p", "no:cacheprovider"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout and "see test_kernel_tests_in_fresh_process" not in proc.stdout, proc.stdout[-3000:]


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, re, sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from valley_rt.kernels import temporal_pool as tp
    result = {}
    pool, scores = tp._temporal_pool_kernel, tp._importance_scores_kernel
    # the divisibility-by-16 facts the launcher derives at run time for the real shape (C = 1024)
    div16 = ["x_ptr", "w_ptr", "partial_ptr", "delta_ptr", "pooled_ptr", "cls_ptr", "NC", "C",
             "pooled_stride_b", "cls_stride_b", "CHUNK"]
    def compile(kernel, sig, constexprs, num_warps):
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16 if n in sig}
        src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
        loads = []
        for capability in (90, 80) if "fp16" in sig["x_ptr"] else (90,):  # H100 (and A100 for fp16)
            target = GPUTarget("cuda", capability, 32)
            ptx = triton.compile(src, target=target, options={"num_warps": num_warps}).asm["ptx"]
            loads += re.findall(r"ld\\.global[\\w.:]*", ptx)
        return sorted(set(loads))
    for dt in ("fp16", "bf16", "fp32"):
        for mode in range(4):
            sig = dict(x_ptr=f"*{dt}", partial_ptr="*fp32", delta_ptr=f"*{dt}", pooled_ptr=f"*{dt}", cls_ptr=f"*{dt}",
                       T="i32", NC="i32", C="i32", pooled_stride_b="i32", cls_stride_b="i32", NUM_PATCH_BLOCKS="i32",
                       MODE="constexpr", SPLIT="constexpr", BLOCK="constexpr")
            result[f"pool-{mode}-{dt}"] = compile(pool, sig, dict(MODE=mode, SPLIT=16, BLOCK=1024), 4)
        sig = dict(x_ptr=f"*{dt}", w_ptr="*fp32", partial_ptr="*fp32", NC="i32", C="i32", CHUNK="i32",
                   SPLIT="constexpr", BLOCK="constexpr")
        result[f"scores-{dt}"] = compile(scores, sig, dict(SPLIT=16, BLOCK=4096), 8)
    print(json.dumps(result))
    """
)


@needs_triton
def test_kernels_compile_for_cuda_with_vector_loads():
    """Compile for sm_90 and sm_80 (no GPU needed: Triton -> PTX -> ptxas) every mode x dtype, as the
    launcher specializes them for the real shape; the loads must be 128-bit vectors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loads = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(loads) == 15
    for name, kinds in loads.items():
        assert any(".v4." in k for k in kinds), f"{name}: no 128-bit loads in {kinds}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_triton
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_kernel_matches_reference_real_shape(B, dtype, mode):
    x, w, delta = _inputs(B, 8, 256, 1024, dtype, device="cuda")
    out = torch.zeros(B, 300, 1024, dtype=dtype, device="cuda")
    ref_out = out.clone()
    kw = dict(score_weight=w, score_bias=torch.tensor(0.5, device="cuda"), delta=delta, patch_offset=3)
    pooled, cls = tp._temporal_pool_triton(x, mode, out=out, **kw)
    tp.temporal_pool_reference(x, mode, out=ref_out, **kw)
    _close(out, ref_out, dtype)
    assert torch.equal(cls, x[:, :, 0])
