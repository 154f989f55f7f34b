"""Build one ONNX graph for a whole LLaMA decoder, from a GPTQ folder or plain HF weights.

Why one hand-built graph: batch-1 decoding on a CPU is bound by how fast the weights stream from
memory. ONNX Runtime's `MatMulNBits` (accuracy_level 4: activations quantized to int8 per block)
streams int4 weights at the memory roofline, `GroupQueryAttention` does rotary + KV cache append +
attention in one op over a preallocated max-length cache (past and present share one buffer, so a
decode step copies nothing), and `(Skip)SimplifiedLayerNormalization` fuse residual add + RMSNorm.
The graph computes logits for the last position only, so a 300-token prefill does not pay for 300
vocabulary GEMVs. This mirrors onnxruntime-genai's model builder, written for our one model family.

Per layer (x: [1, S, H] residual stream):
    n      = SkipSimplifiedLN(x_prev_out, residual)      -> normed, new residual
    qkv    = MatMulNBits(n, W_qkv)                       # [1, S, (nh + 2 kvh) * hd], q/k/v fused
    a, K, V= GroupQueryAttention(qkv, past K/V, seqlens_k, total_len, cos, sin)
    o      = MatMulNBits(a, W_o)
    n2     = SkipSimplifiedLN(o, residual)
    gu     = MatMulNBits(n2, W_gate_up)                  # [1, S, 2 I], gate/up fused
    down   = MatMulNBits(QuickGelu(gate, alpha=1) * up, W_down)   # QuickGelu with alpha 1 is SiLU

Weights:
  * quant="gptq": a GPTQ v1/v2 folder (`quantization_config` in config.json; int32-packed qweight
    [in/8, out], qzeros [groups, out/8], fp16 scales [groups, out], g_idx [in]) is repacked exactly
    into MatMulNBits' layout: uint8 B [out, blocks, block/2] (low nibble = even k), fp32 scales
    [out, blocks], packed uint8 zero points. Act-order (desc_act) is handled by sorting the input rows
    by group (x @ W == x[perm] @ W[perm]): the activation gets one row Gather between Transposes and, for
    down_proj, the permutation is folded into gate/up's output columns instead (free).
  * quant="rtn4": round-to-nearest int4 of fp weights, group 128 (group_size), asymmetric - the same GPTQ tensors
    without error compensation, through the same repacker (for tests and benchmarks without GPTQ).
  * quant="none": fp32 MatMul.
  * lm_head (2048 x 32000 at 1.1B scale, ~11 % of the int4 bytes if int8): int8 RTN, block 32, via
    MatMulNBits bits=8 by default (near lossless, ~4x fewer bytes than fp32); "int4" halves it again
    at some accuracy cost; "fp32" keeps it exact (the default with quant="none").
  * heads narrower than 16 (GroupQueryAttention's CPU kernel needs head_size % 16 == 0; the tiny test
    preset has 8) are zero-padded inside the graph: q/k/v get zero output columns laid out so that
    rotary pairs stay pairs, the padded rotary angles are 0, the softmax scale stays 1/sqrt(head_dim)
    and the padding is sliced off the attention output. Exact; costs only on tiny models.
The embedding table is saved beside the graph as a .npy file the runtime memory-maps: the graph takes
`inputs_embeds`, so text and visual tokens enter the same way.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from valley_rt.engine_format import LLM_DATA_FILE as DATA_FILE  # the format the runtime reads
from valley_rt.engine_format import LLM_EMBED_FILE as EMBED_FILE
from valley_rt.engine_format import LLM_FORMAT_VERSION as FORMAT_VERSION
from valley_rt.engine_format import LLM_META_FILE as META_FILE
from valley_rt.engine_format import LLM_MODEL_FILE as MODEL_FILE
from valley_rt.engine_format import LlamaShape, head_columns  # noqa: F401  (LlamaShape: re-exported)
from valley_rt.errors import CheckpointError
from valley_rt.export.gptq_format import GPTQLinear
from valley_rt.export.manifest import hash_folder
from valley_rt.progress import Progress, or_silent

PREFILL_FILE = "llm_prefill.onnx"  # optional W8A8 prompt graph (same inputs, outputs and KV cache)
PREFILL_DATA_FILE = "llm_prefill.onnx.data"
PREFILLS = ("int8", "none")
QUANTS = ("gptq", "rtn4", "none")
LM_HEADS = ("int8", "int4", "fp32")
EXTERNAL_MIN_BYTES = 1024  # initializers at least this big live in DATA_FILE, smaller ones in the graph


# ------------------------------------------------------------------------------------------- shapes


# ------------------------------------------------------------------------------------------- GPTQ tensors


RTN_CLIP_RATIOS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)  # group ranges tried by rtn_scales; 1.0 = min-max
RTN_SEARCH_MIN_GROUP = 64  # smaller groups, and codes wider than 4 bits, keep min-max
RTN_SEARCH_MAX_QMAX = 15


def rtn_scales(wg: torch.Tensor, *, dim: int, qmax: int, sym: bool = False,
               ratios: tuple[float, ...] = RTN_CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point (a float holding an integer) of each group of wg, a group
    being wg's values along `dim`, for codes 0..qmax. A group's range (always holding 0) is shrunk by
    each of `ratios` in turn and the one with the least squared rounding error over the group is kept
    (min-max, ratio 1.0, wins ties): clipping the few outermost values buys a finer step for all the
    others. At 4 bits this leaves ~10 % less squared error than min-max in groups of 128 and takes ~10 %
    off the int4 model's KL divergence from fp32 in groups of 64 and 128 (docs/peers.md); in groups of
    32 the extremes are milder and the gain is nil, so groups under RTN_SEARCH_MIN_GROUP and codes of
    more than 4 bits keep min-max. Symmetric: zero point (qmax + 1) / 2 and codes -(qmax + 1) / 2 ..
    qmax / 2 around it."""
    if wg.shape[dim] < RTN_SEARCH_MIN_GROUP or qmax > RTN_SEARCH_MAX_QMAX:
        ratios = (1.0,)
    lo, hi = wg.amin(dim).clamp(max=0), wg.amax(dim).clamp(min=0)
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    err = torch.empty_like(wg) if len(ratios) > 1 else None
    for r in ratios:
        if sym:
            scales = (2 * torch.maximum(-lo, hi) * r / qmax).clamp(min=1e-8)
            zeros = torch.full_like(scales, float((qmax + 1) // 2))
        else:
            scales = ((hi - lo) * r / qmax).clamp(min=1e-8)
            zeros = torch.round(-lo * r / scales).clamp_(0, qmax)
        if err is None:
            return scales, zeros
        s, z = scales.unsqueeze(dim), zeros.unsqueeze(dim)
        torch.div(wg, s, out=err).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s).sub_(wg)  # dequantized - w
        sq = err.square_().sum(dim)
        if best is None:
            best = (sq, scales, zeros)
        else:
            better = sq < best[0]
            best = (torch.where(better, sq, best[0]), torch.where(better, scales, best[1]),
                    torch.where(better, zeros, best[2]))
    assert best is not None
    return best[1], best[2]


def quantize_rtn(w: torch.Tensor, *, bits: int, group_size: int, sym: bool = False,
                 g_idx: torch.Tensor | None = None) -> GPTQLinear:
    """Round-to-nearest quantization of w [in, out] (float) into GPTQ form. `g_idx` (optional, a
    grouping like act-order produces: every group exactly `group_size` rows) says which group each
    input row belongs to."""
    w = w.float()
    k, n = w.shape
    if g_idx is None:
        g_idx = torch.arange(k) // group_size
    g_idx = g_idx.to(torch.int64)
    perm = torch.argsort(g_idx, stable=True)
    if k % group_size or not torch.equal(g_idx[perm], torch.arange(k) // group_size):
        raise ValueError(f"g_idx must split {k} rows into groups of {group_size}")
    identity = bool(torch.equal(perm, torch.arange(k)))
    wg = (w if identity else w[perm]).view(k // group_size, group_size, n)  # [G, gs, N], a group's rows together
    qmax = (1 << bits) - 1
    scales, zeros = rtn_scales(wg, dim=1, qmax=qmax, sym=sym)  # [G, N]
    zeros = zeros.to(torch.int64)
    qg = wg.div(scales[:, None]).round_().add_(zeros[:, None]).clamp_(0, qmax).to(torch.int64)  # [G, gs, N]
    if identity:
        q = qg.view(k, n)
    else:
        q = torch.empty(k, n, dtype=torch.int64)
        q[perm] = qg.view(k, n)
    return GPTQLinear(q=q, zeros=zeros, scales=scales, g_idx=g_idx, bits=bits, group_size=group_size)


# ------------------------------------------------------------------------------------------- MatMulNBits


@dataclass
class NBitsWeight:
    """A linear in MatMulNBits layout (y = x[..., perm] @ W), N = out_features, K = in_features."""

    b: np.ndarray  # [N, blocks, block_size * bits / 8] uint8
    scales: np.ndarray  # [N, blocks] float32
    zero_points: np.ndarray  # [N, ceil(blocks * bits / 8)] uint8, packed like b
    perm: np.ndarray | None  # [K] int64: input rows sorted by group; None = identity
    bits: int
    block_size: int
    k: int
    n: int

    def nbytes(self) -> int:
        return self.b.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def permute_outputs(self, order: np.ndarray) -> "NBitsWeight":
        return NBitsWeight(self.b[order], self.scales[order], self.zero_points[order], self.perm, self.bits,
                           self.block_size, self.k, self.n)


def _pack_fields(fields: np.ndarray, bits: int) -> np.ndarray:
    """[..., L] fields < 2**bits -> [..., ceil(L * bits / 8)] uint8, first field in the low bits."""
    if bits == 8:
        return fields.astype(np.uint8)
    per = 8 // bits
    pad = (-fields.shape[-1]) % per
    if pad:
        fields = np.concatenate([fields, np.zeros(fields.shape[:-1] + (pad,), fields.dtype)], axis=-1)
    f = fields.reshape(fields.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(f.shape[:-1], np.uint8)
    for i in range(per):
        out |= f[..., i] << (i * bits)
    return out


def _block_size_for(group_size: int, k: int) -> int:
    """MatMulNBits needs a power-of-two block >= 16 dividing the group (then each block repeats its
    group's scale and zero exactly); pick the largest one up to 128."""
    for bs in (128, 64, 32, 16):
        if group_size % bs == 0 and k % bs == 0:
            return bs
    raise CheckpointError(f"GPTQ group_size {group_size} (in_features {k}): expected a multiple of 16")


def to_matmul_nbits(lin: GPTQLinear) -> NBitsWeight:
    """Repack a GPTQ linear exactly. Rows are sorted by group (identity unless act-order), then each
    group's rows form consecutive MatMulNBits blocks sharing the group's scale and zero point."""
    k, n = lin.q.shape
    g = lin.g_idx
    perm = torch.argsort(g, stable=True)
    sorted_g = g[perm]
    gs = lin.group_size
    if not torch.equal(sorted_g, torch.arange(k) // gs):
        raise CheckpointError(f"g_idx does not split {k} input rows into groups of {gs}: "
                              f"group sizes {torch.bincount(g).tolist()[:8]}...")
    bs = _block_size_for(gs, k)
    blocks = k // bs
    identity = bool(torch.equal(perm, torch.arange(k)))
    q = (lin.q if identity else lin.q[perm]).to(torch.uint8).T.contiguous().numpy()  # [N, K], rows grouped
    block_group = (torch.arange(blocks) * bs) // gs  # [blocks] group of each block
    scales = lin.scales[block_group].T.contiguous().numpy().astype(np.float32)  # [N, blocks]
    zeros = lin.zeros[block_group].to(torch.uint8).T.contiguous().numpy()  # [N, blocks]
    b = _pack_fields(q.reshape(n, blocks, bs), lin.bits)  # [N, blocks, bs*bits/8]
    zp = _pack_fields(zeros, lin.bits)  # [N, ceil(blocks*bits/8)]
    return NBitsWeight(b=b, scales=scales, zero_points=zp, perm=None if identity else perm.numpy(),
                       bits=lin.bits, block_size=bs, k=k, n=n)


def concat_outputs(parts: list[NBitsWeight]) -> NBitsWeight | None:
    """Fuse linears sharing an input along N (q|k|v, gate|up); None when layouts differ."""
    first = parts[0]
    for p in parts[1:]:
        same_perm = (p.perm is None and first.perm is None) or (
            p.perm is not None and first.perm is not None and np.array_equal(p.perm, first.perm))
        if not same_perm or p.block_size != first.block_size or p.bits != first.bits or p.k != first.k:
            return None
    return NBitsWeight(np.concatenate([p.b for p in parts]), np.concatenate([p.scales for p in parts]),
                       np.concatenate([p.zero_points for p in parts]), first.perm, first.bits,
                       first.block_size, first.k, sum(p.n for p in parts))


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """The float weight a MatMulNBits computes with, [K, N] float32, rows in the order of the op's
    input (i.e. un-permuted when w.perm is set, so that x @ result == x[..., perm] @ W_sorted)."""
    per = 8 // w.bits
    fields = np.stack([(w.b >> (i * w.bits)) & ((1 << w.bits) - 1) for i in range(per)], axis=-1)
    q = fields.reshape(w.n, -1, w.block_size).astype(np.float32)  # [N, blocks, bs]
    zf = np.stack([(w.zero_points >> (i * w.bits)) & ((1 << w.bits) - 1) for i in range(per)], axis=-1)
    zeros = zf.reshape(w.n, -1)[:, :q.shape[1]].astype(np.float32)  # [N, blocks]
    wt = ((q - zeros[:, :, None]) * w.scales[:, :, None]).reshape(w.n, w.k)  # [N, K] rows sorted by group
    if w.perm is not None:
        out = np.empty_like(wt)
        out[:, w.perm] = wt
        wt = out
    return np.ascontiguousarray(wt.T)


def quantize_int8_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: w [K, N] ~= q [K, N] int8 * scales [N] float32."""
    scales = np.maximum(np.abs(w).max(axis=0), 1e-12).astype(np.float32) / 127  # [N]
    q = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    return q, scales


def rtn_matmul_nbits(w: torch.Tensor, *, bits: int, group_size: int, name: str = "weight",
                     ranges: tuple[torch.Tensor, torch.Tensor] | None = None, keep: dict | None = None) -> NBitsWeight:
    """Round-to-nearest (asymmetric) of w [out, in] as checkpoints store it, straight into MatMulNBits
    layout: the same bytes as to_matmul_nbits(quantize_rtn(w.T, bits, group_size)), which it is tested
    against, without the transposes and int64 intermediates (2.4x faster on a 4096x11008 linear: a
    7B's rtn4 LLM export is bound by this). Groups run along `in`, i.e. along each row of w.
    ranges: the [N, G] scales and zero points `rtn_scales` chose for this w before (else they are
    chosen now); keep: a dict that receives them under "ranges"."""
    n, k = w.shape
    if k % group_size:
        raise CheckpointError(f"{name}: group size {group_size} does not divide in_features {k} "
                              f"(pass a --group-size that does)")
    bs = _block_size_for(group_size, k)
    qmax = (1 << bits) - 1
    wg = w.float().view(n, k // group_size, group_size)  # [N, G, gs]
    scales, zeros = ranges if ranges is not None else rtn_scales(wg, dim=-1, qmax=qmax)  # [N, G]
    if keep is not None:
        keep["ranges"] = (scales, zeros)
    q = wg.div(scales[..., None]).round_().add_(zeros[..., None]).clamp_(0, qmax).to(torch.uint8)
    del wg
    per_group = group_size // bs  # MatMulNBits blocks per group: each repeats its group's scale and zero
    scales_b = scales.repeat_interleave(per_group, dim=1).numpy().astype(np.float32)  # [N, blocks]
    zeros_b = zeros.to(torch.uint8).repeat_interleave(per_group, dim=1).numpy()
    if bits == 4:  # two fields per byte, the even k in the low nibble (what _pack_fields does, in torch)
        pairs = q.view(n, k // bs, bs // 2, 2)
        b = (pairs[..., 0] | (pairs[..., 1] << 4)).numpy()  # [N, blocks, bs/2]
    else:
        b = _pack_fields(q.numpy().reshape(n, k // bs, bs), bits)  # [N, blocks, bs*bits/8]
    return NBitsWeight(b=b, scales=scales_b, zero_points=_pack_fields(zeros_b, bits), perm=None, bits=bits,
                       block_size=bs, k=k, n=n)


# ------------------------------------------------------------------------------------------- weight source


class _Tensors:
    """Lazy access to every tensor in a folder's *.safetensors files (single or sharded): all headers are
    read and checked up front, then each get() reads one tensor with plain file reads (valley_rt.shards),
    so exporting a 7B holds one layer's weights, not the model."""

    def __init__(self, folder: Path):
        from valley_rt.shards import TensorIndex

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: expected *.safetensors weight files, found none")
        self.index = TensorIndex(folder, files=files)
        self.folder = folder

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> torch.Tensor:
        if key not in self.index:
            raise CheckpointError(f"{self.folder}: expected tensor {key!r} in the safetensors files, not found")
        return self.index.get(key)


@dataclass
class QuantSettings:
    quant: str  # "gptq" | "rtn4" | "none"
    lm_head: str  # "int8" | "int4" | "fp32"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool | None = None  # symmetric (zero point fixed at 2^(bits-1)); None: not quantized
    zeros_stored_minus_one: bool = True


class _WeightSource:
    """Reads linears from an HF folder as either fp32 [in, out] arrays or NBitsWeight."""

    def __init__(self, folder: Path, settings: QuantSettings, *, passes: int = 1):
        self.t = _Tensors(folder)
        self.s = settings
        # rtn4 read in two passes (the int4 graph, then the W8A8 one from the same int4 weights): the
        # first keeps each linear's searched ranges (5 bytes a group, ~250 MB at 7B) and the second
        # reuses them instead of searching again
        self._ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if passes > 1 else None

    def linear(self, prefix: str) -> np.ndarray | NBitsWeight:
        s = self.s
        if s.quant == "gptq":
            lin = GPTQLinear.from_checkpoint(
                self.t.get(prefix + ".qweight"), self.t.get(prefix + ".qzeros"), self.t.get(prefix + ".scales"),
                self.t.get(prefix + ".g_idx") if prefix + ".g_idx" in self.t else None,
                bits=s.bits, group_size=s.group_size, zeros_stored_minus_one=s.zeros_stored_minus_one)
            return to_matmul_nbits(lin)
        if s.quant == "rtn4":
            w = self.t.get(prefix + ".weight")
            if self._ranges is None:
                return rtn_matmul_nbits(w, bits=4, group_size=s.group_size, name=prefix)
            kept = self._ranges.pop(prefix, None)
            if kept is not None:  # the second pass: the first one's ranges
                return rtn_matmul_nbits(w, bits=4, group_size=s.group_size, name=prefix,
                                        ranges=(kept[0], kept[1].float()))
            keep: dict = {}
            nb = rtn_matmul_nbits(w, bits=4, group_size=s.group_size, name=prefix, keep=keep)
            scales, zeros = keep["ranges"]
            self._ranges[prefix] = (scales, zeros.to(torch.uint8))
            return nb
        return self.t.get(prefix + ".weight").float().T.contiguous().numpy()  # [out, in] -> [in, out]

    def lm_head(self, shape: LlamaShape) -> np.ndarray | NBitsWeight:
        if self.s.quant == "gptq" and "lm_head.qweight" in self.t:
            return self.linear("lm_head")  # GPTQModel quantized the lm_head too (lm_head=True): keep it
        key = "lm_head.weight" if "lm_head.weight" in self.t else "model.embed_tokens.weight"
        if "lm_head.weight" not in self.t and not shape.tie_word_embeddings:
            raise CheckpointError(f"{self.t.folder}: expected 'lm_head.weight' (embeddings are not tied)")
        if self.s.lm_head == "fp32":
            return self.t.get(key).float().T.contiguous().numpy()  # [H, V]
        bits = 8 if self.s.lm_head == "int8" else 4
        return rtn_matmul_nbits(self.t.get(key), bits=bits, group_size=32 if bits == 8 else 64, name=key)

    def vector(self, key: str) -> np.ndarray:
        return self.t.get(key).float().numpy()


# ------------------------------------------------------------------------------------------- graph


class _Graph:
    """Accumulates nodes and initializers; names are made unique with a counter.

    With `data_file`, every initializer of at least EXTERNAL_MIN_BYTES is appended to that file as it is
    made (4096-byte aligned, so ONNX Runtime can map it) and kept in the graph as an external reference:
    the process never holds more than the layer being built. Without it, initializers stay in memory."""

    def __init__(self, accuracy_level: int, int8_linears: bool = False, data_file=None):
        self.data_file = data_file  # an open binary file beside the .onnx file, or None
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self.int8_linears = int8_linears  # the W8A8 prompt graph: decoder linears as int8 GEMMs
        self._quantized: dict[str, tuple[str, str]] = {}  # activation -> (uint8 codes, row scales)
        self._n = 0
        self.weight_bytes = 0  # bytes of weights each token streams (decode), for the benchmark

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, name: str, array: np.ndarray, streamed: bool = True) -> str:
        array = np.ascontiguousarray(array)
        if self.data_file is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
            self.inits.append(_external_tensor(self.data_file, name, array))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        if streamed:
            self.weight_bytes += array.nbytes
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        name = self.name(op_type)
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def linear(self, x: str, w: np.ndarray | NBitsWeight, name: str, int8: bool = False) -> str:
        """x: [1, S, K] -> [1, S, N]. int8=True (prompt graph): an int8 GEMM, see linear_int8."""
        if int8 and self.int8_linears and isinstance(w, NBitsWeight):
            return self.linear_int8(x, w, name)
        if isinstance(w, np.ndarray):
            return self.op("MatMul", [x, self.const(name + ".weight", w.astype(np.float32))])[0]
        if w.perm is not None:
            # x[..., perm] as Transpose -> Gather rows -> Transpose: ORT's Gather on the last axis copies one
            # element at a time (183 us for [1, 128, 192], 1.9 ms for [1, 128, 2048]); on rows it is a
            # memcpy each (17 us / 296 us); the same at S = 1.
            t = self.op("Transpose", [x], perm=[2, 0, 1])[0]  # [K, 1, S]
            g = self.op("Gather", [t, self.const(name + ".perm", w.perm.astype(np.int64), streamed=False)],
                        axis=0)[0]
            x = self.op("Transpose", [g], perm=[1, 2, 0])[0]
        inputs = [x, self.const(name + ".qweight", w.b), self.const(name + ".scales", w.scales),
                  self.const(name + ".qzeros", w.zero_points)]
        return self.op("MatMulNBits", inputs, domain="com.microsoft", K=w.k, N=w.n, bits=w.bits,
                       block_size=w.block_size, accuracy_level=self.accuracy_level)[0]


    def quantize_rows(self, x: str) -> tuple[str, str]:
        """x: [1, S, K] float -> (uint8 codes [1, S, K], scales [1, S, 1]): symmetric int8 per token,
        stored offset by 128 (x ~= (codes - 128) * scale), by one per-axis QuantizeLinear (a fused
        scale-round-saturate pass). Shared by every linear reading x."""
        if x not in self._quantized:
            c = lambda base, v: self.const(self.name(base), v, streamed=False)  # noqa: E731
            absmax = self.op("ReduceMax", [self.op("Abs", [x])[0]], axes=[-1], keepdims=0)[0]  # [1, S]
            step = self.op("Max", [self.op("Mul", [absmax, c("inv127", np.array(1 / 127, np.float32))])[0],
                                   c("tiny", np.array(1e-30, np.float32))])[0]
            step = self.op("Reshape", [step, c("flat", np.array([-1], np.int64))])[0]  # [S]
            zero = self.op("Expand", [c("u128", np.array(128, np.uint8)), self.op("Shape", [step])[0]])[0]  # [S]
            codes = self.op("QuantizeLinear", [x, step, zero], axis=1)[0]  # [1, S, K] uint8
            rows = self.op("Unsqueeze", [step, c("last", np.array([-1], np.int64))])[0]  # [S, 1]
            self._quantized[x] = (codes, rows)
        return self._quantized[x]

    def linear_int8(self, x: str, w: NBitsWeight, name: str) -> str:
        """W8A8 linear: per-token int8 activations x per-column int8 weights (the int4 weight
        dequantized, then requantized: its int8 grid is ~8x finer than the int4 one), int32 accumulate.
        MatMulIntegerToFloat (uint8 A, int8 B; the column scales applied in its output pass) runs on
        MLAS's QGEMM: AMX-INT8 tiles where the CPU has them, AVX512-VNNI / AVX2 otherwise, with B
        prepacked at session creation. Then one multiply by the row scales."""
        q, scales = quantize_int8_columns(dequantize_nbits(w))
        codes, rows = self.quantize_rows(x)
        c = lambda base, v: self.const(self.name(base), v, streamed=False)  # noqa: E731
        y = self.op("MatMulIntegerToFloat", [codes, self.const(name + ".int8", q, streamed=False),
                                             c("one", np.array(1.0, np.float32)),
                                             self.const(name + ".int8_scales", scales, streamed=False),
                                             c("u128", np.array(128, np.uint8))], domain="com.microsoft")[0]
        return self.op("Mul", [y, rows])[0]  # [1, S, N] * [S, 1]


def _external_tensor(f, name: str, array: np.ndarray) -> onnx.TensorProto:
    """Append `array` to the open data file `f` at a 4096-aligned offset; a TensorProto pointing at it."""
    offset = f.seek(0, 2)
    pad = (-offset) % 4096
    f.write(b"\0" * pad)
    f.write(array.data if array.flags.c_contiguous else array.tobytes())
    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", Path(f.name).name), ("offset", str(offset + pad)), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _rotary_cache(shape: LlamaShape) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_pos, head_dim/2], computed as transformers' LlamaRotaryEmbedding does (fp32)."""
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    pos = torch.arange(shape.max_position_embeddings, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]  # [max_pos, hd/2]
    pad = (shape.cache_head_dim - dim) // 2  # padded rotary pairs are zeros: rotate them by angle 0
    cos = torch.cat([freqs.cos(), torch.ones(len(pos), pad)], dim=1)
    sin = torch.cat([freqs.sin(), torch.zeros(len(pos), pad)], dim=1)
    return cos.numpy(), sin.numpy()


def _expand_columns(w, cols: np.ndarray):
    """Output columns of w picked by `cols`, zeros where cols == -1 (fp [K, N] or NBitsWeight)."""
    keep = cols >= 0
    if isinstance(w, np.ndarray):
        out = np.zeros((w.shape[0], len(cols)), w.dtype)
        out[:, keep] = w[:, cols[keep]]
        return out
    b = np.zeros((len(cols),) + w.b.shape[1:], np.uint8)
    scales = np.zeros((len(cols),) + w.scales.shape[1:], np.float32)  # scale 0: the column is 0
    zp = np.zeros((len(cols),) + w.zero_points.shape[1:], np.uint8)
    b[keep], scales[keep], zp[keep] = w.b[cols[keep]], w.scales[cols[keep]], w.zero_points[cols[keep]]
    return NBitsWeight(b, scales, zp, w.perm, w.bits, w.block_size, w.k, len(cols))


def _layer_linears(src: _WeightSource, shape: LlamaShape, i: int) -> dict[str, list]:
    """The layer's linears, fused where the layouts allow: {"qkv": [...], "o": [...], ...}."""
    p = f"model.layers.{i}"
    q, k, v = (src.linear(f"{p}.self_attn.{n}_proj") for n in "qkv")
    o = src.linear(f"{p}.self_attn.o_proj")
    gate, up, down = (src.linear(f"{p}.mlp.{n}_proj") for n in ("gate", "up", "down"))
    if shape.cache_head_dim != shape.head_dim:
        q = _expand_columns(q, head_columns(shape, shape.num_heads, rotary=True))
        k = _expand_columns(k, head_columns(shape, shape.num_kv_heads, rotary=True))
        v = _expand_columns(v, head_columns(shape, shape.num_kv_heads, rotary=False))
    if isinstance(down, NBitsWeight) and down.perm is not None:
        # x @ W_down == x[perm] @ W_down[perm]: produce the activation already permuted by
        # permuting gate/up output columns (silu(gate) * up is elementwise).
        gate, up = gate.permute_outputs(down.perm), up.permute_outputs(down.perm)
        down = NBitsWeight(down.b, down.scales, down.zero_points, None, down.bits, down.block_size, down.k, down.n)
    if isinstance(q, np.ndarray):
        qkv, gu = [np.concatenate([q, k, v], axis=1)], [np.concatenate([gate, up], axis=1)]
    else:
        fused = concat_outputs([q, k, v])
        qkv = [fused] if fused is not None else [q, k, v]
        fused = concat_outputs([gate, up])
        gu = [fused] if fused is not None else [gate, up]
    return {"qkv": qkv, "o": [o], "gate_up": gu, "down": [down]}


def build_graph(src: _WeightSource, shape: LlamaShape, *, accuracy_level: int = 4,
                int8_linears: bool = False, data_file=None,
                progress: Progress | None = None) -> tuple[onnx.ModelProto, int]:
    """The whole decoder as one ONNX model; returns it and the weight bytes streamed per token.

    int8_linears=True builds the prompt graph: the same inputs, outputs, KV cache and ops, except that
    the decoder's int4 linears become W8A8 int8 GEMMs (compute bound at prompt lengths, where the CPU's
    int8 matrix units beat MatMulNBits); the lm_head (last position only) stays as in the decode graph.
    data_file: an open binary file the weights are streamed into as each layer is built (see _Graph)."""
    g = _Graph(accuracy_level, int8_linears, data_file)
    H, kvh, hd = shape.hidden_size, shape.num_kv_heads, shape.cache_head_dim
    eps = shape.rms_norm_eps
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "sequence_length", H]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),  # total tokens - 1
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, shape.vocab_size])]
    cos, sin = _rotary_cache(shape)
    cos_name, sin_name = g.const("cos_cache", cos, streamed=False), g.const("sin_cache", sin, streamed=False)

    x = "inputs_embeds"  # [1, S, H]
    residual = None
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        w = _layer_linears(src, shape, i)
        ln1 = g.const(f"{p}.input_layernorm.weight", src.vector(f"{p}.input_layernorm.weight"))
        if residual is None:
            normed = g.op("SimplifiedLayerNormalization", [x, ln1], axis=-1, epsilon=eps, stash_type=1)[0]
            residual = x
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [x, residual, ln1], n_out=4,
                                          domain="com.microsoft", epsilon=eps)
        qkv = [g.linear(normed, lw, f"{p}.self_attn.qkv{j}", int8=True) for j, lw in enumerate(w["qkv"])]
        qkv_inputs = qkv if len(qkv) == 3 else [qkv[0], "", ""]  # packed QKV or separate q, k, v
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        for name in (past_k, past_v):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, kvh, "max_cache_length", hd]))
        attn_out = f"{p}.attn_out"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        for name in (present_k, present_v):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, kvh, "max_cache_length", hd]))
        g.nodes.append(helper.make_node(
            "GroupQueryAttention",
            qkv_inputs + [past_k, past_v, "seqlens_k", "total_sequence_length", cos_name, sin_name],
            [attn_out, present_k, present_v], name=f"{p}.GroupQueryAttention", domain="com.microsoft",
            num_heads=shape.num_heads, kv_num_heads=kvh, do_rotary=1, rotary_interleaved=0,
            scale=1.0 / math.sqrt(shape.head_dim)))
        if hd != shape.head_dim:  # drop the zero padding of every head: [1, S, nh*hp] -> [1, S, nh*hd]
            heads = g.op("Reshape", [attn_out, g.const(g.name("shape"), np.array([0, 0, shape.num_heads, hd]),
                                                       streamed=False)])[0]
            heads = g.op("Slice", [heads, g.const(g.name("zero"), np.array([0]), streamed=False),
                                   g.const(g.name("hd"), np.array([shape.head_dim]), streamed=False),
                                   g.const(g.name("axis"), np.array([3]), streamed=False)])[0]
            attn_out = g.op("Reshape", [heads, g.const(g.name("shape"), np.array([0, 0, shape.num_heads * shape.head_dim]),
                                                        streamed=False)])[0]
        o = g.linear(attn_out, w["o"][0], f"{p}.self_attn.o_proj", int8=True)
        ln2 = g.const(f"{p}.post_attention_layernorm.weight", src.vector(f"{p}.post_attention_layernorm.weight"))
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, ln2], n_out=4,
                                      domain="com.microsoft", epsilon=eps)
        gu = [g.linear(normed, lw, f"{p}.mlp.gate_up{j}", int8=True) for j, lw in enumerate(w["gate_up"])]
        if len(gu) == 1:
            sizes = g.const("gate_up_split", np.array([shape.intermediate_size] * 2, np.int64), streamed=False) \
                if i == 0 else "gate_up_split"
            gate, up = g.op("Split", [gu[0], sizes], n_out=2, axis=-1)
        else:
            gate, up = gu
        silu = g.op("QuickGelu", [gate], domain="com.microsoft", alpha=1.0)[0]  # x * sigmoid(1.0 * x) = silu
        act = g.op("Mul", [silu, up])[0]
        x = g.linear(act, w["down"][0], f"{p}.mlp.down_proj", int8=True)
        if progress is not None:
            progress.advance(i + 1)

    # Only the last position needs logits: slice before the final norm and the vocabulary GEMV.
    starts, ends, axes = (g.const(n, np.array(v, np.int64), streamed=False)
                          for n, v in (("last_start", [-1]), ("last_end", [2**62]), ("seq_axis", [1])))
    x_last = g.op("Slice", [x, starts, ends, axes])[0]
    res_last = g.op("Slice", [residual, starts, ends, axes])[0]
    norm_w = g.const("model.norm.weight", src.vector("model.norm.weight"))
    final = g.op("SkipSimplifiedLayerNormalization", [x_last, res_last, norm_w], domain="com.microsoft",
                 epsilon=eps)[0]
    logits = g.linear(final, src.lm_head(shape), "lm_head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))

    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model, g.weight_bytes


# ------------------------------------------------------------------------------------------- export


def _read_settings(src: Path, cfg: dict, quant: str, lm_head: str, group_size: int) -> QuantSettings:
    qc = cfg.get("quantization_config")
    if quant == "gptq":
        if not qc:
            raise CheckpointError(f"{src / 'config.json'}: expected a GPTQ quantization_config for quant='gptq', found none")
        method = qc.get("quant_method", "gptq")
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if method != "gptq" or fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{src / 'config.json'}: expected quant_method 'gptq' with checkpoint_format "
                                  f"'gptq' or 'gptq_v2', got {method!r} / {fmt!r}")
        if int(qc["bits"]) != 4:
            raise CheckpointError(f"{src / 'config.json'}: expected 4-bit GPTQ weights, got bits={qc['bits']}")
        return QuantSettings("gptq", lm_head, bits=4, group_size=int(qc["group_size"]),
                             desc_act=bool(qc.get("desc_act", False)), sym=bool(qc.get("sym", True)),
                             zeros_stored_minus_one=fmt == "gptq")
    if qc:
        raise CheckpointError(f"{src / 'config.json'}: a quantized checkpoint; expected fp weights for quant={quant!r}")
    return QuantSettings(quant, lm_head, group_size=group_size, sym=False if quant == "rtn4" else None)


def export_llm_onnx(src_dir, out_dir, *, quant: str = "gptq", lm_head: str | None = None,
                    group_size: int = 128, accuracy_level: int = 4, prefill: str | None = None,
                    source_sha256: str | None = None, progress: Progress | None = None) -> Path:
    """Convert an HF LLaMA folder (GPTQ or fp) into `out_dir/llm.onnx` (+ .data, embedding table, meta).

    quant: "gptq" (the folder holds GPTQ weights), "rtn4" (int4 round-to-nearest of fp weights) or
    "none" (fp32). lm_head: "int8" (default with int4 layers), "int4" or "fp32" (default with none).
    prefill: "int8" (default with int4 layers) also writes `llm_prefill.onnx`, the W8A8 prompt graph
    the runtime uses for long prompts on CPUs with int8 matrix units; "none" (default with fp32) does not.
    progress: a line per stage and per few layers, with an estimate (valley_rt.progress).
    Returns the path of the .onnx file.
    """
    src, out = Path(src_dir), Path(out_dir)
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    lm_head = lm_head or ("fp32" if quant == "none" else "int8")
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: expected an HF LLaMA config.json, not found")
    cfg = json.loads(cfg_path.read_text())
    shape = LlamaShape.from_hf_config(cfg, cfg_path)
    prefill = prefill or ("none" if quant == "none" else "int8")
    if prefill not in PREFILLS or (prefill == "int8" and quant == "none"):
        raise ValueError(f"prefill must be one of {PREFILLS} ('int8' needs int4 layers), got {prefill!r}")
    settings = _read_settings(src, cfg, quant, lm_head, group_size)
    source = _WeightSource(src, settings, passes=2 if prefill == "int8" else 1)

    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / MODEL_FILE, out / DATA_FILE, out / PREFILL_FILE, out / PREFILL_DATA_FILE):
        stale.unlink(missing_ok=True)
    progress = or_silent(progress)
    progress.stage(f"LLM graph: {settings.bits}-bit decode graph" if quant != "none" else "LLM graph: fp32",
                   total=shape.num_layers, unit="layers")
    with open(out / DATA_FILE, "wb") as data:  # weights go here layer by layer; the graph stays small
        model, weight_bytes = build_graph(source, shape, accuracy_level=accuracy_level, data_file=data,
                                          progress=progress)
    onnx.save_model(model, str(out / MODEL_FILE))
    del model
    if prefill == "int8":  # the weights are read again, at the ranges the first pass searched
        progress.stage("LLM graph: W8A8 prompt graph", total=shape.num_layers, unit="layers")
        with open(out / PREFILL_DATA_FILE, "wb") as data:
            model, _ = build_graph(source, shape, accuracy_level=accuracy_level, int8_linears=True, data_file=data,
                                   progress=progress)
        onnx.save_model(model, str(out / PREFILL_FILE))
        del model
    embed = source.t.get("model.embed_tokens.weight")
    np.save(out / EMBED_FILE, embed.numpy() if embed.dtype in (torch.float16, torch.float32) else embed.float().numpy())
    meta = {
        "format_version": FORMAT_VERSION,
        "shape": asdict(shape),
        "cache_head_dim": shape.cache_head_dim,  # KV cache rows are this wide (zero-padded heads)
        "quant": asdict(settings),
        "accuracy_level": accuracy_level,
        "prefill": {"file": PREFILL_FILE, "linears": "w8a8: int8 per-column weights, int8 per-token activations"}
        if prefill == "int8" else None,
        "weight_bytes_per_token": weight_bytes,
        # no machine's path; source_sha256: hash_folder(src) already computed by the caller
        "source": {"name": src.resolve().name, "sha256": source_sha256 or hash_folder(src)},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out / MODEL_FILE


def iter_linear_names(shape: LlamaShape) -> Iterator[str]:
    """Prefixes of every quantizable linear, in checkpoint naming."""
    for i in range(shape.num_layers):
        for n in ("q", "k", "v", "o"):
            yield f"model.layers.{i}.self_attn.{n}_proj"
        for n in ("gate", "up", "down"):
            yield f"model.layers.{i}.mlp.{n}_proj"



# ------------------------------------------------------------------------------ the standard GPTQ folder
GPTQ_SHARD_BYTES = 2 << 30  # model-XXXXX-of-YYYYY.safetensors shards of about this size


def write_rtn_gptq_folder(src_dir, out_dir, *, bits: int = 4, group_size: int = 128, sym: bool = True) -> Path:
    """The standard GPTQ folder (as GPTQModel writes it: config.json with `quantization_config`,
    `qweight / qzeros / scales / g_idx` per linear, checkpoint_format "gptq") of an fp HF LLaMA folder
    quantized round-to-nearest (`quantize_rtn`; scales stored in fp16, as GPTQ stores them). Symmetric
    by default: vLLM's GPTQ loader (its CPU WNA16 kernel; GPTQ-Marlin on NVIDIA) refuses asymmetric
    GPTQ. Embeddings, norms and the lm_head stay fp16. Reads one tensor at a time; writes shards of
    about GPTQ_SHARD_BYTES."""
    from safetensors.torch import save_file

    from valley_rt.checkpoint import TEXT_FILES
    from valley_rt.export.gptq_format import to_gptq_checkpoint

    src, out = Path(src_dir), Path(out_dir)
    cfg = json.loads((src / "config.json").read_text())
    shape = LlamaShape.from_hf_config(cfg, src / "config.json")
    tensors = _Tensors(src)
    linears = set(iter_linear_names(shape))
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in tensors.index.keys():
        prefix = key.rsplit(".", 1)[0]
        if prefix in linears and key.endswith(".weight"):
            lin = quantize_rtn(tensors.get(key).float().T, bits=bits, group_size=group_size, sym=sym)
            parts = {f"{prefix}.{k}": v.contiguous() for k, v in to_gptq_checkpoint(lin).items()}
        else:
            parts = {key: tensors.get(key).half().contiguous()}
        nbytes = sum(v.numel() * v.element_size() for v in parts.values())
        if size and size + nbytes > GPTQ_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1].update(parts)
        size += nbytes
    index = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
                                  "sym": sym, "lm_head": False, "checkpoint_format": "gptq",
                                  "true_sequential": True, "damp_percent": 0.0,
                                  "meta": {"quantizer": "valley-rt round-to-nearest"}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TEXT_FILES:  # the tokenizer and generation config, verbatim (as gptq.quantize_llm keeps them)
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out
