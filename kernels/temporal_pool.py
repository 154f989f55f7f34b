"""Fused temporal pooling of per-frame vision tokens: one Triton kernel, a plain-torch reference, one dispatch.

Input x [B, T, 1+N, C] (CLS row first in every frame). Outputs, in fp32 accumulation:
  pooled [B, N, C]: mean / max / importance-weighted sum over frames of the patch tokens x[:, :, 1:]
                    (transformer mode: delta + mean, i.e. the memory-bound tail around the encoder);
  cls    [B, T, C]: the per-frame CLS tokens x[:, :, 0] in frame order.
Both are written straight into a caller-given buffer (e.g. the rows of the LLM input embeddings where
the visual tokens go) at given row offsets, so no concatenation copy follows.

Design, and the trade-off it takes:
* The patch tokens of one frame, x[b, t, 1:], are N*C contiguous elements, and so are the pooled rows
  of one batch element in the output. The pooling kernel therefore works on a flat index over N*C: one
  program per (block of BLOCK flattened patch-row x channel elements, batch element), looping over T
  with an fp32 accumulator (4 frames per iteration, so 4 independent 16-byte loads per thread are in
  flight: at B=1 there are too few warps to hide DRAM latency otherwise), then one store. Every input
  byte is read once and every output byte written once: for mean / max / transformer this is the
  minimum traffic. A few extra programs per batch element copy the CLS rows (a strided gather of T
  rows of C) into the frame-token rows, so one launch does everything.
* Importance pooling needs, before the weighted sum over frames, a reduction over ALL N*C elements of
  every frame (score_t = <w, x[b, t, 1:]>), which no tile of the pooling grid sees on its own. We take
  two launches rather than one launch with a grid-wide barrier (spinning on atomics deadlocks when not
  all programs are resident) or buffering all T frames of a tile on chip (does not fit for T = 64):
  1. `_importance_scores_kernel`: a split reduction, grid (B*T, SPLIT); each program dots one chunk of
     the frame with w and writes one fp32 partial to partials [B*T, SPLIT] (deterministic, no atomics,
     no zero-fill launch). It is launched with the default cache policy so that at small B the frames
     are still in L2 when the second kernel reads them.
  2. `_temporal_pool_kernel` (MODE=importance): each program sums the SPLIT partials of each frame
     (T*SPLIT floats, from L2), takes their max, and pools its tile with weights exp(s_t - max) / sum,
     i.e. a max-subtracted softmax, so huge scores never overflow (no inf/inf NaN). Because all T scores
     are known before the tile loop, the max is taken in a scalar pre-loop over the T scores instead of
     an online softmax: identical result, and it avoids rescaling the [BLOCK] accumulator every frame.
  Cost: importance reads the patch tokens twice (2*B*T*N*C*s bytes instead of once, s = element size)
  and takes 2 launches; for B*T*N*C*s up to about the L2 size the second read mostly hits L2. The
  scalar bias of the score is accepted but not used by the kernel: softmax over t is shift-invariant,
  so it cancels exactly (adding a big bias in fp32 would only lose precision). The reference keeps it.
* Triton is optional (imported in a try block, kernels defined only when it is there): without it
  this module still imports and only the reference runs. On CPU tensors the Triton path runs under
  the Triton interpreter (TRITON_INTERPRET=1 set before triton is first imported), which is how CI
  tests the kernel without a GPU.

Math (VALLEY_SPEC.md, "Temporal modules"); the original computes importance on projected tokens P with
`pooling_layer = nn.Linear(D*N, 1)`: score = pooling_layer(P.flatten(1)), which is this kernel's score
with w = pooling_layer.weight.view(N, D). Mean and importance commute with the projector P = x W^T + b,
so raw features can be pooled first with the projector folded into the score weights:
`fold_importance_weights` gives w' = w.view(N, D) @ W [N, C] and bias' = bias + (w.view(N, D) @ b).sum().
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

MODES = ("mean", "max", "importance", "transformer")
_MODE_ID = {name: i for i, name in enumerate(MODES)}  # the kernel's MODE constexpr
BACKENDS = ("triton", "reference")
BACKEND_ENV = "VALLEY_RT_POOL_BACKEND"  # override of the dispatch: "triton" or "reference"
VALLEY_GAP = 2  # <im_end>, <vi_start> sit between the patch rows and the frame rows (spec: token layout)

try:  # optional: the reference works without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _load_frame(patches, t, T, frame_stride, mask, other):
        """Frame t's [BLOCK] patch elements as fp32; `other` past the last frame and outside `mask`."""
        in_range = tl.full(mask.shape, t, tl.int32) < T  # (a tensor: the interpreter rejects a bool mask)
        v = tl.load(patches + t * frame_stride, mask=mask & in_range, other=other, eviction_policy="evict_first")
        return v.to(tl.float32)

    @triton.jit
    def _frame_score(part_b, t, T, offs_s, SPLIT: tl.constexpr):
        """Importance score of frame t: the sum of its SPLIT fp32 partials; -inf past the last frame."""
        return tl.sum(tl.load(part_b + t * SPLIT + offs_s, mask=(offs_s * 0 + t) < T, other=float("-inf")), axis=0)

    @triton.jit
    def _nan_max(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # like torch.amax: NaN wins

    @triton.jit
    def _importance_scores_kernel(
        x_ptr,  # [B, T, 1+N, C] vision tokens, contiguous; frame (b, t) starts at (b*T + t) * (1+N) * C
        w_ptr,  # [N, C] importance score weights, contiguous, any float dtype (read as fp32)
        partial_ptr,  # [B*T, SPLIT] fp32 out: partial dot products <w, x[b, t, 1:]> over one chunk each
        NC,  # N*C: patch elements per frame
        C,  # channels: the CLS row of every frame is skipped by offsetting C elements
        CHUNK,  # elements per split (a multiple of BLOCK)
        SPLIT: tl.constexpr,  # programs per frame (power of two)
        BLOCK: tl.constexpr,  # elements per load
    ):
        frame = tl.program_id(0).to(tl.int64)  # b*T + t
        split = tl.program_id(1)
        patches = x_ptr + frame * (NC + C) + C  # this frame's N*C patch elements
        acc = tl.full([BLOCK], 0.0, dtype=tl.float32)
        for off in range(0, CHUNK, BLOCK):
            idx = split * CHUNK + off + tl.arange(0, BLOCK)
            mask = idx < NC
            xv = tl.load(patches + idx, mask=mask, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            acc += xv * wv
        tl.store(partial_ptr + frame * SPLIT + split, tl.sum(acc, axis=0))

    @triton.jit
    def _temporal_pool_kernel(
        x_ptr,  # [B, T, 1+N, C] vision tokens, contiguous, CLS row first in every frame
        partial_ptr,  # [B*T, SPLIT] fp32 importance partial scores (MODE=importance; else any pointer)
        delta_ptr,  # [B, N, C] encoder last-frame output, contiguous (MODE=transformer; else any pointer)
        pooled_ptr,  # [B, N, C] out view, unit stride over (N, C), batch stride pooled_stride_b
        cls_ptr,  # [B, T, C] out view, unit stride over (T, C), batch stride cls_stride_b
        T,  # frames
        NC,  # N*C: patch elements per frame
        C,  # channels
        pooled_stride_b,  # elements between batch elements of pooled (N*C, or L*C inside a [B, L, C] buffer)
        cls_stride_b,  # elements between batch elements of cls
        NUM_PATCH_BLOCKS,  # programs on axis 0 that pool patches; the rest copy CLS rows
        MODE: tl.constexpr,  # 0 mean, 1 max, 2 importance, 3 transformer (delta + mean)
        SPLIT: tl.constexpr,  # partial scores per frame (MODE=importance)
        BLOCK: tl.constexpr,  # flattened elements per program
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        frame_stride = NC + C  # elements per frame
        x_b = x_ptr + b * T * frame_stride
        if pid < NUM_PATCH_BLOCKS:
            idx = pid * BLOCK + tl.arange(0, BLOCK)  # flat (patch row, channel) index
            mask = idx < NC
            patches = x_b + C + idx  # frame 0; frame t is t * frame_stride further
            # Frames are read 4 per iteration (loads past the last frame are masked off) so that each
            # thread has 4 independent 16-byte loads in flight: at small B there are too few warps
            # per SM to hide DRAM latency with one load at a time.
            if MODE == 1:
                acc = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
                for t in range(0, T, 4):
                    v0 = _load_frame(patches, t, T, frame_stride, mask, float("-inf"))
                    v1 = _load_frame(patches, t + 1, T, frame_stride, mask, float("-inf"))
                    v2 = _load_frame(patches, t + 2, T, frame_stride, mask, float("-inf"))
                    v3 = _load_frame(patches, t + 3, T, frame_stride, mask, float("-inf"))
                    acc = _nan_max(acc, _nan_max(_nan_max(v0, v1), _nan_max(v2, v3)))
            elif MODE == 2:
                # softmax over frames of s_t = sum of the frame's SPLIT partials (the bias cancels);
                # s_t = -inf past the last frame, so those frames get weight 0
                offs_s = tl.arange(0, SPLIT)
                part_b = partial_ptr + b * T * SPLIT
                s_max = _frame_score(part_b, 0, T, offs_s, SPLIT)
                for t in range(0, T, 4):
                    s0 = _frame_score(part_b, t, T, offs_s, SPLIT)
                    s1 = _frame_score(part_b, t + 1, T, offs_s, SPLIT)
                    s2 = _frame_score(part_b, t + 2, T, offs_s, SPLIT)
                    s3 = _frame_score(part_b, t + 3, T, offs_s, SPLIT)
                    s_max = tl.maximum(s_max, tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)))
                acc = tl.full([BLOCK], 0.0, dtype=tl.float32)
                denom = s_max * 0.0
                for t in range(0, T, 4):
                    p0 = tl.exp(_frame_score(part_b, t, T, offs_s, SPLIT) - s_max)  # in [0, 1]
                    p1 = tl.exp(_frame_score(part_b, t + 1, T, offs_s, SPLIT) - s_max)
                    p2 = tl.exp(_frame_score(part_b, t + 2, T, offs_s, SPLIT) - s_max)
                    p3 = tl.exp(_frame_score(part_b, t + 3, T, offs_s, SPLIT) - s_max)
                    v0 = _load_frame(patches, t, T, frame_stride, mask, 0.0)
                    v1 = _load_frame(patches, t + 1, T, frame_stride, mask, 0.0)
                    v2 = _load_frame(patches, t + 2, T, frame_stride, mask, 0.0)
                    v3 = _load_frame(patches, t + 3, T, frame_stride, mask, 0.0)
                    acc += (p0 * v0 + p1 * v1) + (p2 * v2 + p3 * v3)
                    denom += (p0 + p1) + (p2 + p3)
                acc = acc / denom  # denom >= 1: the max frame contributes exp(0)
            else:
                acc = tl.full([BLOCK], 0.0, dtype=tl.float32)
                for t in range(0, T, 4):
                    v0 = _load_frame(patches, t, T, frame_stride, mask, 0.0)
                    v1 = _load_frame(patches, t + 1, T, frame_stride, mask, 0.0)
                    v2 = _load_frame(patches, t + 2, T, frame_stride, mask, 0.0)
                    v3 = _load_frame(patches, t + 3, T, frame_stride, mask, 0.0)
                    acc += (v0 + v1) + (v2 + v3)
                acc = acc / T
                if MODE == 3:
                    acc += tl.load(delta_ptr + b * NC + idx, mask=mask, other=0.0).to(tl.float32)
            out = pooled_ptr + b * pooled_stride_b + idx
            tl.store(out, acc.to(pooled_ptr.dtype.element_ty), mask=mask)
        else:
            idx = (pid - NUM_PATCH_BLOCKS) * BLOCK + tl.arange(0, BLOCK)  # flat (frame, channel) index
            mask = idx < T * C
            frame = idx // C
            v = tl.load(x_b + frame * frame_stride + (idx - frame * C), mask=mask, other=0.0)
            tl.store(cls_ptr + b * cls_stride_b + idx, v.to(cls_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# host side


def fold_importance_weights(
    pool_weight: Tensor, pool_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold the projector into the importance score so raw vision features can be pooled first.

    pool_weight [1, N*D], pool_bias [1]: the original `pooling_layer = nn.Linear(D*N, 1)`;
    proj_weight [D, C], proj_bias [D]: the projector. With P = x W^T + b,
    score = <w, P> + bias = <w W, x> + (bias + sum(w b)). Returns (w' [N, C] fp32, bias' scalar fp32).
    """
    D, C = proj_weight.shape
    if pool_weight.dim() != 2 or pool_weight.shape[0] != 1 or pool_weight.shape[1] % D != 0:
        raise ValueError(f"pool_weight: expected [1, N*{D}], got {list(pool_weight.shape)}")
    if proj_bias.shape != (D,):
        raise ValueError(f"proj_bias: expected [{D}], got {list(proj_bias.shape)}")
    w = pool_weight.float().view(-1, D)  # [N, D]
    folded_w = w @ proj_weight.float()  # [N, C]
    folded_b = pool_bias.float().reshape(()) + (w @ proj_bias.float()).sum()
    return folded_w, folded_b


def _check_and_outputs(
    x: Tensor,
    mode: str,
    score_weight: Tensor | None,
    delta: Tensor | None,
    out: Tensor | None,
    patch_offset: int,
    frame_offset: int | None,
) -> tuple[Tensor, Tensor]:
    """Validate the arguments shared by every backend; return the (pooled, cls) tensors to write."""
    if mode not in MODES:
        raise ValueError(f"temporal_pool: mode must be one of {MODES}, got {mode!r}")
    if x.dim() != 4 or x.shape[2] < 2:
        raise ValueError(f"temporal_pool: x must be [B, T, 1+N, C] with N >= 1, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"temporal_pool: x must be floating point, got {x.dtype}")
    B, T, N1, C = x.shape
    N = N1 - 1
    if mode == "importance" and (score_weight is None or tuple(score_weight.shape) != (N, C)):
        got = None if score_weight is None else list(score_weight.shape)
        raise ValueError(f"temporal_pool: importance mode needs score_weight [{N}, {C}], got {got}")
    if mode == "transformer" and (delta is None or tuple(delta.shape) != (B, N, C)):
        got = None if delta is None else list(delta.shape)
        raise ValueError(f"temporal_pool: transformer mode needs delta [{B}, {N}, {C}], got {got}")
    if out is None:
        pooled = torch.empty(B, N, C, dtype=x.dtype, device=x.device)
        cls = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        return pooled, cls
    if frame_offset is None:
        frame_offset = patch_offset + N + VALLEY_GAP
    if out.dim() != 3 or out.shape[0] != B or out.shape[2] != C:
        raise ValueError(f"temporal_pool: out must be [{B}, L, {C}], got {list(out.shape)}")
    L = out.shape[1]
    if not (0 <= patch_offset and patch_offset + N <= L and 0 <= frame_offset and frame_offset + T <= L):
        raise ValueError(
            f"temporal_pool: out has {L} rows; patch rows [{patch_offset}, {patch_offset + N}) and "
            f"frame rows [{frame_offset}, {frame_offset + T}) must fit"
        )
    if patch_offset < frame_offset + T and frame_offset < patch_offset + N:
        raise ValueError(
            f"temporal_pool: patch rows [{patch_offset}, {patch_offset + N}) overlap frame rows "
            f"[{frame_offset}, {frame_offset + T})"
        )
    if out.device != x.device:
        raise ValueError(f"temporal_pool: out is on {out.device}, x on {x.device}")
    return out[:, patch_offset : patch_offset + N], out[:, frame_offset : frame_offset + T]


def temporal_pool_reference(
    x: Tensor,
    mode: str,
    *,
    score_weight: Tensor | None = None,
    score_bias: Tensor | float | None = None,
    delta: Tensor | None = None,
    out: Tensor | None = None,
    patch_offset: int = 0,
    frame_offset: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain torch, the truth. Same contract as `temporal_pool` (`backend` is ignored)."""
    pooled_out, cls_out = _check_and_outputs(x, mode, score_weight, delta, out, patch_offset, frame_offset)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    patches = x[:, :, 1:].to(acc)  # [B, T, N, C]
    if mode == "mean":
        pooled = patches.mean(1)
    elif mode == "max":
        pooled = patches.amax(1)
    elif mode == "importance":
        scores = torch.einsum("btnc,nc->bt", patches, score_weight.to(acc))  # [B, T]
        if score_bias is not None:
            scores = scores + torch.as_tensor(score_bias, device=x.device).to(acc).reshape(())
        weights = torch.softmax(scores, dim=1)  # over frames
        pooled = torch.einsum("bt,btnc->bnc", weights, patches)
    else:  # transformer: the last frame's encoder output plus the mean of the features without positions
        pooled = delta.to(acc) + patches.mean(1)
    if out is None:  # returned as computed, not copied into fresh buffers: traceable for the ONNX export
        return pooled.to(x.dtype), x[:, :, 0].contiguous()
    pooled_out.copy_(pooled)
    cls_out.copy_(x[:, :, 0])
    return pooled_out, cls_out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_blocks(B: int, T: int, NC: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK of the pooling kernel, BLOCK and SPLIT of the score kernel)."""
    if device.type != "cuda":
        # interpreter: every program is a Python-level loop, so few big programs run fastest
        return 16384, 16384, 2
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # Pooling: 8 elements per thread (one 16-byte load per frame in fp16, see `_warps`); bigger blocks
    # once there are enough programs to fill every SM several times over, smaller ones at small B so
    # that more loads are in flight (B=1, N=256, C=1024 on 132 SMs: 512 elements -> 512 + 16 programs).
    block = 512
    while block < 2048 and B * NC >= (2 * block) * 4 * sms:
        block *= 2
    # Scores: split each frame so that B*T*SPLIT programs cover the SMs about four times.
    split = 1
    while B * T * split < 4 * sms and split < 64 and NC // (split * 2) >= 4096:
        split *= 2
    return block, 4096, split


def _warps(block: int) -> int:
    """8 elements per thread: 1024 elements -> 4 warps."""
    return max(1, min(8, block // 256))


def _check_runnable(x: Tensor) -> None:
    """CUDA tensors run compiled kernels; CPU tensors only under the Triton interpreter.

    `@triton.jit` (and triton.language's own helpers such as tl.sum) read TRITON_INTERPRET when triton
    is first imported, so the variable must be set before anything imports triton.
    """
    if triton is None:
        raise RuntimeError("temporal_pool: backend 'triton' requested but triton is not installed")
    if x.is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    # tl.sum is itself a @triton.jit function, decorated when triton was first imported
    if not (isinstance(_temporal_pool_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)):
        raise RuntimeError(
            f"temporal_pool: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
            f"is first imported; got x on {x.device}"
        )


def _temporal_pool_triton(
    x: Tensor,
    mode: str,
    *,
    score_weight: Tensor | None = None,
    score_bias: Tensor | float | None = None,
    delta: Tensor | None = None,
    out: Tensor | None = None,
    patch_offset: int = 0,
    frame_offset: int | None = None,
    backend: str | None = None,
    block: int | None = None,
    score_block: int | None = None,
    split: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Host wrapper: checks shape, dtype, contiguity; picks block sizes; launches 1 (2 for importance) kernels.

    `block`, `score_block`, `split` override the picked sizes (powers of two; tests use them to cover
    multi-block and multi-split paths). `score_bias` is not needed: it cancels in the softmax.
    """
    _check_runnable(x)
    pooled, cls = _check_and_outputs(x, mode, score_weight, delta, out, patch_offset, frame_offset)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"temporal_pool: x must be fp16, bf16 or fp32, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"temporal_pool: x must be contiguous, got strides {x.stride()}")
    B, T, N1, C = x.shape
    N, NC = N1 - 1, (N1 - 1) * C
    for name, view in (("pooled", pooled), ("cls", cls)):
        if view.stride(2) != 1 or view.stride(1) != C:
            raise ValueError(f"temporal_pool: {name} rows must be contiguous [*, {C}], got strides {view.stride()}")
        if view.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"temporal_pool: {name} must be fp16, bf16 or fp32, got {view.dtype}")
    for name, t in (("score_weight", score_weight if mode == "importance" else None),
                    ("delta", delta if mode == "transformer" else None)):
        if t is not None and (not t.is_contiguous() or t.device != x.device):
            raise ValueError(
                f"temporal_pool: {name} must be contiguous on {x.device}, got {t.device}, strides {t.stride()}"
            )

    auto_block, auto_score_block, auto_split = _pick_blocks(B, T, NC, x.device)
    block, score_block, split = block or auto_block, score_block or auto_score_block, split or auto_split
    partials = x  # unused pointer outside importance mode
    if mode == "importance":
        partials = torch.empty(B * T, split, dtype=torch.float32, device=x.device)
        chunk = triton.cdiv(triton.cdiv(NC, split), score_block) * score_block
        _importance_scores_kernel[(B * T, split)](
            x, score_weight, partials, NC, C, chunk, SPLIT=split, BLOCK=score_block, num_warps=_warps(score_block)
        )
    num_patch_blocks = triton.cdiv(NC, block)
    grid = (num_patch_blocks + triton.cdiv(T * C, block), B)
    _temporal_pool_kernel[grid](
        x, partials, delta if mode == "transformer" else x, pooled, cls,
        T, NC, C, pooled.stride(0), cls.stride(0), num_patch_blocks,
        MODE=_MODE_ID[mode], SPLIT=split, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return pooled, cls


@functools.cache
def triton_available() -> bool:
    return triton is not None


def pick_backend(x: Tensor, backend: str | None = None) -> str:
    """The one dispatch point: explicit argument, else $VALLEY_RT_POOL_BACKEND, else CUDA+triton -> triton."""
    choice = backend or os.environ.get(BACKEND_ENV) or None
    if choice is None:
        return "triton" if x.is_cuda and triton_available() else "reference"
    if choice not in BACKENDS:
        raise ValueError(
            f"temporal_pool: backend must be one of {BACKENDS} (argument or ${BACKEND_ENV}), got {choice!r}"
        )
    return choice


def temporal_pool(
    x: Tensor,
    mode: str,
    *,
    score_weight: Tensor | None = None,
    score_bias: Tensor | float | None = None,
    delta: Tensor | None = None,
    out: Tensor | None = None,
    patch_offset: int = 0,
    frame_offset: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Pool x [B, T, 1+N, C] over frames; return (pooled [B, N, C], cls [B, T, C]).

    mode: "mean" | "max" | "importance" (score_weight [N, C], optional score_bias) | "transformer"
    (delta [B, N, C]: the temporal encoder's last-frame output; result delta + mean).
    out: optional [B, L, C] buffer; pooled rows go to out[:, patch_offset:patch_offset+N] and CLS rows to
    out[:, frame_offset:frame_offset+T] (default frame_offset: patch_offset + N + 2, Valley's layout with
    <im_end>, <vi_start> in between), in out's dtype; the returned tensors are views of out.
    Without out, both are allocated in x's dtype. Accumulation is fp32.
    """
    fn = _temporal_pool_triton if pick_backend(x, backend) == "triton" else temporal_pool_reference
    return fn(
        x, mode, score_weight=score_weight, score_bias=score_bias, delta=delta, out=out,
        patch_offset=patch_offset, frame_offset=frame_offset,
    )  # fmt: skip
