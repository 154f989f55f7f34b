"""int4 GPTQ linear for small batches: one Triton dequantize-and-multiply kernel, torch's int4 matmul,
a plain-torch reference, one dispatch.

y [M, N] = x [M, K] @ W [K, N], with W held as GPTQ v1 tensors, exactly as GPTQModel writes them:
  qweight [K/8, N] int32: 8 4-bit codes per word along K, code of row k at bits 4*(k % 8);
  qzeros  [G, ceil(N/8)] int32: zero points packed along N, "minus one" over the whole word (v1: the
          packer subtracts 0x11111111 from the word, borrows included, so zero point 0 reads back as a
          field of 15 with a borrow out of the field above; adding 0x11111111 to the word undoes it);
  scales  [G, N] fp16; g_idx [K]: group of each input row (act-order makes it a permutation of groups).
  W[k, n] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n]).

Design, and the trade-off it takes:
* Decode is batch 1: a GEMV that streams every weight byte once, so it is bound by memory bandwidth and
  int4 reads ~3.6x fewer bytes than fp16. One kernel serves M = 1 (broadcast multiply + sum over K in
  fp32, no tensor cores, nothing wasted) and M > 1 (`tl.dot` on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
  tiles, weights dequantized to the activation dtype in registers). Each program owns BLOCK_N output
  columns of one BLOCK_M row block and one slice of K; at batch 1 there are too few column blocks to fill
  a GPU (N = 4096 / 64 = 64 programs on 132 SMs), so K is split SPLIT_K ways and the slices are summed
  with fp32 atomics into a zeroed buffer (two more tiny launches: zero-fill and the cast back; fine
  inside a CUDA graph, where launches cost ~1 us).
* Act-order is resolved once at load (`Int4Weight.from_gptq`): input rows are sorted by group so that
  each group is a contiguous run of K and a BLOCK_K tile never straddles two groups (BLOCK_K divides the
  group size), so a tile needs one row of scales and zero words. The activation is then permuted the
  same way, x[..., perm] (x @ W == x[:, perm] @ W[perm]): one gather of M*K elements, negligible next to
  the weights; the decoder folds it away where it can (down_proj's perm into gate/up's output columns).
* The zero point is decoded in the kernel from the stored v1 words (one 32-bit add per word), so the
  weights stay byte-identical to the checkpoint's and need no second copy.
* torch's own int4 matmul (`torch._weight_int4pack_mm`, tinygemm) fits when the layout allows it (group
  size 32..256, N % 8 == 0, K % 64 == 0 after the same row sort) and computes w = (q - 8) * s + z with one
  float zero per group, i.e. z = s * (8 - zero): exact in real numbers but bf16 (8 mantissa bits) in its
  scales, activations and output. It is used only where `choose_backend` measured it faster on this GPU.
* Triton is optional (imported in a try block): without it the reference still runs. On CPU tensors the
  kernel runs under the Triton interpreter (TRITON_INTERPRET=1 set before triton is first imported).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

BACKENDS = ("triton", "tinygemm", "reference")
BACKEND_ENV = "VALLEY_RT_INT4_BACKEND"  # override of the dispatch: "triton", "tinygemm" or "reference"
V1_ZERO_WORD = 0x11111111  # the v1 packer subtracts 1 from each of the 8 fields as one 32-bit word

try:  # optional: the reference works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr,  # [M, K] activations (fp16 / bf16 / fp32), row stride stride_xm, unit stride along K
        qw_ptr,  # [K/8, N] int32 packed codes, contiguous: word (k // 8, n) holds code (k, n) at bits 4*(k % 8)
        qz_ptr,  # [G, NZ] int32 GPTQ v1 zero points (whole word stored minus 0x11111111), contiguous
        s_ptr,  # [G, N] fp16 (or fp32) scales, contiguous; row g serves input rows [g*GROUP, (g+1)*GROUP)
        y_ptr,  # [M, N] out, row stride stride_ym: x's dtype when SPLIT_K == 1, else fp32 accumulated atomically
        M, N, K,  # sizes
        NZ,  # words per row of qzeros: ceil(N / 8)
        stride_xm, stride_ym,  # row strides of x and y, in elements
        GROUP,  # rows per quantization group (a multiple of BLOCK_K)
        K_SPLIT,  # rows of K per program along axis 1 (a multiple of BLOCK_K)
        BLOCK_M: tl.constexpr,  # rows of x per program; 1 selects the GEMV path (no tl.dot)
        BLOCK_N: tl.constexpr,  # output columns per program
        BLOCK_K: tl.constexpr,  # input rows per iteration (a multiple of 8 dividing GROUP)
        SPLIT_K: tl.constexpr,  # programs along K; > 1 accumulates with atomics
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_n = offs_n < N
        offs_w = tl.arange(0, BLOCK_K // 8)  # [BK/8] word rows of one tile
        shifts = tl.arange(0, 8) * 4  # [8] bit offset of code j inside a word
        z_shift = (offs_n % 8) * 4  # [BN] bit offset of column n's zero inside its word
        if BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * K_SPLIT
        for k0 in range(k_start, k_start + K_SPLIT, BLOCK_K):
            # the last split may run past K (whole tiles only: K % BLOCK_K == 0); a tensor, not a scalar
            # bool, because the interpreter rejects scalar masks
            mask_kn = mask_n & ((offs_n * 0 + k0) < K)  # [BN]
            words = tl.load(qw_ptr + ((k0 // 8) + offs_w)[:, None] * N + offs_n[None, :],
                            mask=mask_kn[None, :], other=0)  # [BK/8, BN]
            codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BK/8, 8, BN]
            codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))  # row k0 + 8*i + j = word row i, field j
            g = k0 // GROUP  # the whole tile lies in one group
            scale = tl.load(s_ptr + g * N + offs_n, mask=mask_kn, other=0.0).to(tl.float32)  # [BN]
            zw = tl.load(qz_ptr + g * NZ + offs_n // 8, mask=mask_kn, other=0)  # [BN] words
            zw = zw.to(tl.uint32, bitcast=True) + 0x11111111  # V1_ZERO_WORD: undo v1's whole-word "minus one" (mod 2**32)
            zero = ((zw >> z_shift.to(tl.uint32)) & 0xF).to(tl.int32)  # [BN]
            w = (codes - zero[None, :]).to(tl.float32) * scale[None, :]  # [BK, BN] dequantized
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if BLOCK_M == 1:
                xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # [BK]
                acc += tl.sum(xv[:, None] * w, axis=0)
            else:
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                             mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)  # [BM, BK]
                acc += tl.dot(xv, w.to(xv.dtype))
        if BLOCK_M == 1:
            out = y_ptr + offs_n
            if SPLIT_K == 1:
                tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
            else:
                tl.atomic_add(out, acc, mask=mask_n)
        else:
            out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            mask = mask_m[:, None] & mask_n[None, :]
            if SPLIT_K == 1:
                tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
            else:
                tl.atomic_add(out, acc, mask=mask)


# ----------------------------------------------------------------------------------------------------
# weights


def unpack_rows(packed: Tensor) -> Tensor:
    """[R, C] int32 words -> [8R, C] int32 codes: row 8r + j = bits 4j..4j+3 of word row r."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, packed.shape[1])


def pack_rows(codes: Tensor) -> Tensor:
    """Inverse of unpack_rows: [8R, C] codes in [0, 16) -> [R, C] int32."""
    k, n = codes.shape
    c = codes.to(torch.int64).reshape(k // 8, 8, n)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (c << shifts[None, :, None]).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_zeros_v1(qzeros: Tensor, n: int) -> Tensor:
    """GPTQ v1 qzeros [G, ceil(N/8)] -> zero points [G, N] int32 (GPTQModel's semantics: the stored word
    is the packed zeros minus 0x11111111 as one 32-bit subtraction)."""
    words = (qzeros.to(torch.int64) + V1_ZERO_WORD) & 0xFFFFFFFF  # [G, NZ]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qzeros.device)
    return ((words[:, :, None] >> shifts) & 0xF).reshape(qzeros.shape[0], -1)[:, :n].to(torch.int32)


def pack_zeros_v1(zeros: Tensor) -> Tensor:
    """Inverse of unpack_zeros_v1: zero points [G, N] in [0, 16) -> qzeros [G, ceil(N/8)] int32 (v1)."""
    g, n = zeros.shape
    z = torch.nn.functional.pad(zeros.to(torch.int64), (0, (-n) % 8)).reshape(g, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=zeros.device)
    words = ((z << shifts).sum(-1) - V1_ZERO_WORD) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None,
                    group_size: int) -> Tensor:
    """The truth: GPTQ v1 tensors -> float32 W [K, N] (x @ W is the layer), rows in checkpoint order."""
    codes = unpack_rows(qweight)  # [K, N]
    k, n = codes.shape
    g = torch.arange(k, device=codes.device) // group_size if g_idx is None else g_idx.long()
    zeros = unpack_zeros_v1(qzeros, n)  # [G, N]
    return scales.float()[g] * (codes - zeros[g]).float()


@dataclass
class Int4Weight:
    """One linear's int4 weights in the kernel's layout: GPTQ v1 tensors with rows sorted by group.

    y = x[..., perm] @ W, W[k, n] = scales[k // group_size, n] * (code[k, n] - zero[k // group_size, n]).
    """

    qweight: Tensor  # [K/8, N] int32
    qzeros: Tensor  # [G, ceil(N/8)] int32, v1 (minus one)
    scales: Tensor  # [G, N] fp16 (GPTQ), or fp32 where fp16 would round (engines exported round-to-nearest)
    group_size: int  # rows per group, a multiple of 16 dividing K
    perm: Tensor | None = None  # [K] int64: input rows in group order (act-order); None = identity
    tinygemm: tuple[Tensor, Tensor] | None = None  # (packed weight, scales_and_zeros) for torch's int4 mm
    # the reference's dequantized [K, N] fp32, kept on CPU (where the reference is the path that runs)
    dense_cpu: Tensor | None = field(default=None, repr=False)

    @property
    def k(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def n(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        """Bytes a GEMV streams (codes + scales + zero words)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales))

    @classmethod
    def from_gptq(cls, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None,
                  group_size: int) -> "Int4Weight":
        """GPTQ v1 tensors (GPTQModel layout, group_size -1 = one group) -> rows sorted by group."""
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        gs = k if group_size == -1 else group_size
        groups = -(-k // gs)
        if gs % 16 or k % gs:
            raise ValueError(f"int4 linear: group_size {gs} must be a multiple of 16 dividing K={k}")
        if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, -(-n // 8)):
            raise ValueError(f"int4 linear: expected scales [{groups}, {n}] and qzeros [{groups}, {-(-n // 8)}], "
                             f"got {list(scales.shape)} and {list(qzeros.shape)}")
        perm = None
        if g_idx is not None:
            g = g_idx.long()
            if g.shape != (k,):
                raise ValueError(f"int4 linear: g_idx must be [{k}], got {list(g.shape)}")
            order = torch.argsort(g, stable=True)
            if not torch.equal(g[order], torch.arange(k, device=g.device) // gs):
                raise ValueError(f"int4 linear: g_idx does not split {k} rows into groups of {gs}")
            if not torch.equal(order, torch.arange(k, device=g.device)):
                perm = order
                qweight = pack_rows(unpack_rows(qweight)[order])
        return cls(qweight.contiguous(), qzeros.to(torch.int32).contiguous(), scales.half().contiguous(), gs, perm)

    def to(self, device) -> "Int4Weight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, qweight=mv(self.qweight), qzeros=mv(self.qzeros), scales=mv(self.scales),
                       perm=mv(self.perm), dense_cpu=None, tinygemm=None if self.tinygemm is None else tuple(map(mv, self.tinygemm)))

    def dequantize(self) -> Tensor:
        """float32 [K, N] in sorted row order (pair with x[..., perm])."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, None, self.group_size)

    def select_columns(self, cols: Tensor) -> "Int4Weight":
        """The weight restricted to output columns `cols` (repacks the zero words)."""
        zeros = unpack_zeros_v1(self.qzeros, self.n)[:, cols]
        return replace(self, qweight=self.qweight[:, cols].contiguous(), qzeros=pack_zeros_v1(zeros),
                       scales=self.scales[:, cols].contiguous(), tinygemm=None, dense_cpu=None)


def quantize_rtn(w: Tensor, group_size: int, *, sym: bool = False) -> Int4Weight:
    """Round-to-nearest int4 of w [K, N] (any float dtype, any device) straight into the kernel's layout;
    for benchmarks at shapes where running GPTQ would take too long. The range always holds 0."""
    k, n = w.shape
    wg = w.float().reshape(k // group_size, group_size, n)  # [G, gs, N]
    lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)  # [G, N]
    if sym:
        scales = (2 * torch.maximum(-lo, hi) / 15).clamp(min=1e-8)
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).to(torch.int64).clamp(0, 15)
    scales = scales.half().float().clamp(min=6e-8)  # the stored fp16 scale is what the codes are rounded with
    codes = (wg / scales[:, None]).round_().add_(zeros[:, None]).clamp_(0, 15).reshape(k, n)
    return Int4Weight(pack_rows(codes), pack_zeros_v1(zeros), scales.half().contiguous(), group_size)


def to_tinygemm(w: Int4Weight, inner_k_tiles: int = 8) -> tuple[Tensor, Tensor] | None:
    """(packed weight, scales_and_zeros [G, N, 2] bf16) for torch._weight_int4pack_mm, on w's device
    (CUDA only); None when the layout does not fit. tinygemm dequantizes (q - 8) * s + z, so z = s (8 - zero)."""
    if not w.qweight.is_cuda or w.group_size not in (32, 64, 128, 256) or w.n % 8 or w.k % (inner_k_tiles * 16):
        return None
    codes = unpack_rows(w.qweight).t()  # [N, K]
    packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), inner_k_tiles)
    zeros = unpack_zeros_v1(w.qzeros, w.n).float()
    s = w.scales.float()
    return packed, torch.stack([s, s * (8 - zeros)], dim=-1).to(torch.bfloat16).contiguous()


# ----------------------------------------------------------------------------------------------------
# host side


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_blocks(m: int, n: int, k: int, group_size: int, device: torch.device) -> dict:
    """Block sizes: BLOCK_K = the largest of 128/64/32/16 dividing the group; at decode (M <= 16) split K
    until the grid covers the SMs about four times (each program still runs >= 2 tiles). Chosen by
    reasoning about occupancy, not yet measured on a GPU (bench_gpu_llm.py reports the result)."""
    block_k = next(b for b in (128, 64, 32, 16) if group_size % b == 0)
    if device.type != "cuda":  # interpreter: few big programs run fastest
        return {"block_m": 1 if m == 1 else 16, "block_n": 64, "block_k": block_k, "split_k": 1, "num_warps": 4}
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if m > 16:  # prefill: compute-bound tiles; a [64, 128] fp32 accumulator wants 8 warps and BLOCK_K <= 64
        return {"block_m": 64, "block_n": 128, "block_k": min(block_k, 64), "split_k": 1, "num_warps": 8}
    block_m, block_n = (1 if m == 1 else 16), 64
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split * 2 <= 4 * sms and k // (split * 2) >= 2 * block_k:
        split *= 2
    return {"block_m": block_m, "block_n": block_n, "block_k": block_k, "split_k": split, "num_warps": 4}


def _check_runnable(x: Tensor) -> None:
    if triton is None:
        raise RuntimeError("int4_linear: backend 'triton' requested but triton is not installed")
    if x.is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not (isinstance(_int4_matmul_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)):
        raise RuntimeError(f"int4_linear: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           f"triton is first imported; got x on {x.device}")


def _int4_linear_triton(x: Tensor, w: Int4Weight, **blocks) -> Tensor:
    """Host wrapper: x [M, K] -> [M, N] in x's dtype. `blocks` overrides pick_blocks' choice (tests)."""
    _check_runnable(x)
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"int4_linear: x must be [M, {w.k}], got {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int4_linear: x must be fp16, bf16 or fp32, got {x.dtype}")
    for name, t, dtypes in (("qweight", w.qweight, (torch.int32,)), ("qzeros", w.qzeros, (torch.int32,)),
                            ("scales", w.scales, (torch.float16, torch.float32))):
        if t.dtype not in dtypes or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"int4_linear: {name} must be contiguous {' or '.join(map(str, dtypes))} on {x.device}, "
                             f"got {t.dtype} on {t.device}, strides {t.stride()}")
    if w.perm is not None:
        x = x[:, w.perm]
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = w.n
    cfg = {**pick_blocks(m, n, k, w.group_size, x.device), **blocks}
    bm, bn, bk, split = cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["split_k"]
    if w.group_size % bk or bk % 8:
        raise ValueError(f"int4_linear: block_k {bk} must be a multiple of 8 dividing group_size {w.group_size}")
    if bm == 1 and m != 1:
        raise ValueError(f"int4_linear: block_m 1 (the GEMV path) needs M == 1, got M={m}")
    k_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1 else x.new_empty(m, n)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    _int4_matmul_kernel[grid](
        x, w.qweight, w.qzeros, w.scales, y, m, n, k, w.qzeros.shape[1], x.stride(0), y.stride(0),
        w.group_size, k_split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y.to(x.dtype) if split > 1 else y


def _int4_linear_tinygemm(x: Tensor, w: Int4Weight) -> Tensor:
    """torch._weight_int4pack_mm (bf16 in and out), x [M, K] -> [M, N] in x's dtype."""
    if w.tinygemm is None:
        raise ValueError("int4_linear: backend 'tinygemm' needs w.tinygemm (to_tinygemm: CUDA, group 32..256, N % 8 == 0)")
    if w.perm is not None:
        x = x[:, w.perm]
    packed, sz = w.tinygemm
    return torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, w.group_size, sz).to(x.dtype)


def int4_linear_reference(x: Tensor, w: Int4Weight, **_) -> Tensor:
    """Plain torch: dequantize, then matmul in fp32; x [M, K] -> [M, N] in x's dtype."""
    xs = x if w.perm is None else x[:, w.perm]
    if x.is_cuda:
        return (xs.float() @ w.dequantize()).to(x.dtype)
    if w.dense_cpu is None:
        w.dense_cpu = w.dequantize()
    return (xs.float() @ w.dense_cpu).to(x.dtype)


@functools.cache
def triton_available() -> bool:
    return triton is not None


_CHOSEN: dict[str, str] = {}  # device type -> backend measured fastest there (choose_backend)


def pick_backend(x: Tensor, backend: str | None = None) -> str:
    """The one dispatch point: explicit argument, else $VALLEY_RT_INT4_BACKEND, else what choose_backend
    measured on this device, else CUDA + triton -> triton, else the reference."""
    choice = backend or os.environ.get(BACKEND_ENV) or None
    if choice is None:
        if not x.is_cuda or not triton_available():
            return "reference"
        return _CHOSEN.get("cuda", "triton")
    if choice not in BACKENDS:
        raise ValueError(f"int4_linear: backend must be one of {BACKENDS} (argument or ${BACKEND_ENV}), got {choice!r}")
    return choice


def int4_linear(x: Tensor, w: Int4Weight, backend: str | None = None) -> Tensor:
    """x [..., K] @ W -> [..., N] in x's dtype (leading dims flattened into M)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    choice = pick_backend(x2, backend)
    if choice == "tinygemm" and w.tinygemm is None:
        choice = "triton"  # this layer's layout does not fit tinygemm
    fn = {"triton": _int4_linear_triton, "tinygemm": _int4_linear_tinygemm, "reference": int4_linear_reference}[choice]
    return fn(x2, w).reshape(*lead, w.n)


def choose_backend(weights: list[Int4Weight], m: int = 1, iters: int = 50) -> dict[str, float]:
    """Time triton vs tinygemm on these (CUDA) weights at batch m, remember the faster for pick_backend,
    and return {backend: microseconds for the whole list}. tinygemm is considered only if every weight
    has a tinygemm packing and its output matches the reference within 1 % of the output's scale."""
    x = torch.randn(m, weights[0].k, device=weights[0].qweight.device, dtype=torch.float16)
    times: dict[str, float] = {}
    candidates = ["triton"] + (["tinygemm"] if all(w.tinygemm is not None for w in weights) else [])
    for name in candidates:
        if name == "tinygemm" and not all(_tinygemm_matches(w, m) for w in weights):
            continue
        xs = [x if w.k == x.shape[1] else torch.randn(m, w.k, device=x.device, dtype=x.dtype) for w in weights]
        for _ in range(3):
            for xi, w in zip(xs, weights):
                int4_linear(xi, w, name)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            for xi, w in zip(xs, weights):
                int4_linear(xi, w, name)
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) * 1e3 / iters
    _CHOSEN["cuda"] = min(times, key=times.get)
    return times


def _tinygemm_matches(w: Int4Weight, m: int = 1) -> bool:
    """tinygemm's output vs the reference on random input, within 1 % of the output's scale (bf16)."""
    x = torch.randn(m, w.k, device=w.qweight.device, dtype=torch.float16)
    ref = int4_linear_reference(x, w).float()
    got = _int4_linear_tinygemm(x, w).float()
    return bool((got - ref).abs().max() <= 0.01 * ref.abs().max() + 1e-3)
