"""The GPU LLM backend: LLaMA on int4 GPTQ weights, a static KV cache, each decode step one CUDA graph.

gpt-fast's recipe on this project's kernels: the decoder is ~100 lines of plain torch (RMSNorm, rotary,
SDPA attention over a preallocated cache, SiLU MLP) whose linears are `kernels.int4_linear` (Triton
GEMV/GEMM on the packed GPTQ tensors, or torch's tinygemm where measured faster). Batch-1 decoding
launches ~10 small kernels per layer; in eager mode the CPU cannot issue them as fast as the GPU runs
them (the fp16 transformers path measured 74-79 tokens/s on an H200, ~4 % of its roofline). Captured
once in a CUDA graph, the whole step is one launch.

Choices, and the trade-offs they take:
* Weights come from the engine folder's ONNX graph (`load_engine_llm`): its MatMulNBits initializers
  are an exact repacking of the GPTQ tensors (export/llm_onnx.py), and reading them back gives the same
  int4 codes, zero points and scales, so the GPU answers what the CPU engine answers, on every engine
  already exported (the bundled demo included), with no second copy of the weights on disk. Fused
  q|k|v and gate|up stay fused (one GEMV each); head padding (heads narrower than 16) is dropped by
  selecting columns; act-order's down_proj permutation was already folded into gate|up's columns by the
  exporter. lm_head (int8 in the engine) is dequantized to a dense fp16 matrix: ~7 % more bytes per
  token at 7B than int8, and no second kernel to maintain.
* The KV cache is static, [1, kv_heads, max_context, head_dim] per layer, written in place with
  index_copy_ at the step's positions. A graph needs fixed shapes, so decode attends over a fixed
  number of cache rows: one graph per length bucket (256, 512, 1024, ... up to max_context), captured
  the first time a decode step needs it, rows past the position masked out. Attention then reads at
  most twice the rows it needs instead of the whole max_context (at 7B and 4096 rows the full cache is
  2 GB, more than the int4 weights).
* Prefill runs eagerly (its shapes vary; it is one call per prompt), attention with SDPA and a causal
  mask offset by the tokens already cached.
* The token id and position enter the graph through static device buffers; logits leave through a
  static fp32 buffer. `sample` keeps sampling on the device (argmax, or temperature / top-k / top-p
  with generate.sample's exact rules and a device generator), so one int crosses per token.
* `graphs=False` (eager) runs the same math on any device and dtype: CPU tests compare it with
  transformers and with the ONNX engine; only the graph capture needs CUDA.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from valley_rt.engine_format import LlamaShape
from valley_rt.errors import EngineError
from valley_rt.kernels.int4_linear import Int4Weight, int4_linear, pack_rows, pack_zeros_v1, unpack_zeros_v1

GRAPH_BUCKET_MIN = 256  # smallest number of cache rows a decode graph attends over


# ------------------------------------------------------------------------------------------- weights


Linear = Int4Weight | Tensor  # int4 weights, or a dense [K, N] matrix
# A list of Linears sharing one input, outputs concatenated: q, k, v stored apart because act-order gave
# them different input permutations (one GEMV each instead of one fused GEMV).
Linears = Linear | list


def _each(w, fn):
    """Apply fn to a Linear, or to each Linear of a list."""
    return [fn(p) for p in w] if isinstance(w, list) else fn(w)


@dataclass
class LayerWeights:
    ln1: Tensor  # [H] input RMSNorm weight
    qkv: Linears  # H -> (nh + 2 kvh) * hd, columns [q | k | v]
    o: Linear  # nh * hd -> H
    ln2: Tensor  # [H] post-attention RMSNorm weight
    gate_up: Linears  # H -> 2 I, columns [gate | up] (possibly permuted alike: down's input order)
    down: Linear  # I -> H


@dataclass
class LlamaWeights:
    shape: LlamaShape
    embed: Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: Tensor  # [H]
    lm_head: Linear  # H -> V
    source: str = ""

    def to(self, device, dtype: torch.dtype) -> "LlamaWeights":
        """Move to `device`; float tensors (norms, embeddings, dense matrices) in `dtype`."""

        def mv(w):
            if isinstance(w, Int4Weight):
                return w.to(device)
            return w.to(device=device, dtype=dtype)

        layers = [LayerWeights(*(_each(getattr(lw, f), mv) for f in LayerWeights.__dataclass_fields__))
                  for lw in self.layers]
        return LlamaWeights(self.shape, mv(self.embed), layers, mv(self.norm), mv(self.lm_head), self.source)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> "LlamaWeights":
        """Every int4 linear as its dense dequantization in `dtype` (input rows back in checkpoint
        order): the reference the int4 path is checked against. One linear at a time in fp32."""

        def dq(w):
            if not isinstance(w, Int4Weight):
                return w
            d = w.dequantize()  # [K, N] rows in sorted order
            if w.perm is not None:
                out = torch.empty_like(d)
                out[w.perm.to(d.device)] = d  # x[..., perm] @ d == x @ out
                d = out
            return d.to(dtype)

        def dq_cat(w):
            return torch.cat([dq(p) for p in w], dim=1) if isinstance(w, list) else dq(w)

        layers = [LayerWeights(lw.ln1, dq_cat(lw.qkv), dq(lw.o), lw.ln2, dq_cat(lw.gate_up), dq(lw.down))
                  for lw in self.layers]
        return LlamaWeights(self.shape, self.embed, layers, self.norm, dq(self.lm_head), self.source)

    def weight_bytes_per_token(self) -> int:
        """Bytes a decode step streams from weights: every linear + norms + one embedding row."""

        def nb(w):
            return w.nbytes() if isinstance(w, Int4Weight) else w.numel() * w.element_size()

        total = nb(self.lm_head) + nb(self.norm) + self.embed.shape[1] * self.embed.element_size()
        for lw in self.layers:
            total += sum(sum(_each(w, nb)) if isinstance(w, list) else nb(w)
                         for w in (lw.ln1, lw.qkv, lw.o, lw.ln2, lw.gate_up, lw.down))
        return total


def nbits_to_int4(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, k: int, n: int,
                  block_size: int, perm: np.ndarray | None) -> Int4Weight:
    """MatMulNBits 4-bit tensors (B [N, blocks, bs/2] uint8, low nibble = even k; scales [N, blocks];
    zero points [N, ceil(blocks/2)] uint8, low nibble first) -> the kernel's GPTQ v1 layout, exactly.
    Each MatMulNBits block becomes one GPTQ group (block size <= group size, sharing its scale/zero)."""
    blocks = k // block_size
    bt = torch.from_numpy(np.array(b)).reshape(n, blocks * block_size // 2).to(torch.int32)
    codes = torch.stack([bt & 0xF, bt >> 4], dim=-1).reshape(n, k)  # [N, K]
    zp = torch.from_numpy(np.array(zero_points)).to(torch.int32)
    zeros = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(n, -1)[:, :blocks]  # [N, blocks]
    s32 = torch.from_numpy(np.ascontiguousarray(scales.T)).float()  # [blocks, N]
    s16 = s32.half()
    return Int4Weight(
        qweight=pack_rows(codes.t().contiguous()),
        qzeros=pack_zeros_v1(zeros.t().contiguous()),
        # fp32 in the engine: fp16 when exact (GPTQ checkpoints store fp16), else fp32 (round-to-nearest
        # exports), so the weights are exactly the engine's
        scales=s16 if torch.equal(s16.float(), s32) else s32,
        group_size=block_size,
        perm=None if perm is None else torch.from_numpy(perm.astype(np.int64)),
    )


def _dequantize_nbits8(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, n: int,
                       block_size: int) -> Tensor:
    """MatMulNBits 8-bit (the engine's lm_head) -> dense float32 [K, N]."""
    q = torch.from_numpy(np.array(b)).reshape(n, k // block_size, block_size).float()
    z = torch.from_numpy(np.array(zero_points)).reshape(n, -1)[:, : k // block_size].float()
    s = torch.from_numpy(np.array(scales)).float()
    return (s[:, :, None] * (q - z[:, :, None])).reshape(n, k).t().contiguous()


class _OnnxWeights:
    """The initializers and MatMulNBits attributes of an exported llm.onnx, by linear name."""

    def __init__(self, model_file: Path):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(model_file), load_external_data=True)
        self.arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.attrs = {}
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                self.attrs[node.input[1]] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.file = model_file

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise EngineError(f"{self.file}: expected initializer {name!r}, not found (not an llm_onnx export?)")
        return self.arrays[name]

    def has(self, prefix: str) -> bool:
        return prefix + ".qweight" in self.arrays or prefix + ".weight" in self.arrays

    def linear(self, prefix: str) -> Linear:
        if prefix + ".weight" in self.arrays:  # fp32 MatMul, [K, N]
            return torch.from_numpy(self.arrays[prefix + ".weight"].copy())
        a = self.attrs.get(prefix + ".qweight")
        if a is None:
            raise EngineError(f"{self.file}: expected a MatMulNBits node reading {prefix}.qweight, not found")
        perm = self.arrays.get(prefix + ".perm")
        b, s, z = self.get(prefix + ".qweight"), self.get(prefix + ".scales"), self.get(prefix + ".qzeros")
        if a["bits"] == 8:
            if perm is not None:
                raise EngineError(f"{self.file}: {prefix}: an 8-bit linear with an input permutation is not supported")
            return _dequantize_nbits8(b, s, z, a["K"], a["N"], a["block_size"])
        if a["bits"] != 4:
            raise EngineError(f"{self.file}: {prefix}: expected 4- or 8-bit MatMulNBits, got {a['bits']} bits")
        return nbits_to_int4(b, s, z, k=a["K"], n=a["N"], block_size=a["block_size"], perm=perm)


def _select_columns(w: Linear, cols: Tensor) -> Linear:
    return w.select_columns(cols) if isinstance(w, Int4Weight) else w[:, cols].contiguous()


def _concat_columns(parts: list[Linear]) -> Linears:
    """Fuse separately stored q, k, v (or gate, up) into one linear; the list itself where their
    layouts differ (act-order permutations of their own)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Tensor) for p in parts):
        return torch.cat(parts, dim=1)
    if all(isinstance(p, Int4Weight) for p in parts):
        first = parts[0]
        same = all(p.group_size == first.group_size and (
            (p.perm is None and first.perm is None) or (p.perm is not None and first.perm is not None
                                                         and torch.equal(p.perm, first.perm))) for p in parts)
        if same:
            zeros = torch.cat([unpack_zeros_v1(p.qzeros, p.n) for p in parts], dim=1)
            return Int4Weight(torch.cat([p.qweight for p in parts], 1), pack_zeros_v1(zeros),
                              torch.cat([p.scales for p in parts], 1), first.group_size, first.perm)
    return parts


def load_engine_llm(llm_dir) -> LlamaWeights:
    """An engine's llm/ folder (llm.onnx + embed_tokens.npy + llm_onnx.json) -> LlamaWeights on the CPU."""
    from valley_rt.engine_format import LLM_EMBED_FILE as EMBED_FILE
    from valley_rt.engine_format import LLM_FORMAT_VERSION as FORMAT_VERSION
    from valley_rt.engine_format import LLM_META_FILE as META_FILE
    from valley_rt.engine_format import LLM_MODEL_FILE as MODEL_FILE
    from valley_rt.engine_format import head_columns

    llm_dir = Path(llm_dir)
    meta_file = llm_dir / META_FILE
    for f in (meta_file, llm_dir / MODEL_FILE, llm_dir / EMBED_FILE):
        if not f.is_file():
            raise EngineError(f"{f}: expected an exported LLM file (valley_rt.export.llm_onnx), not found")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{meta_file}: expected LLM format_version {FORMAT_VERSION}, got {meta.get('format_version')}")
    shape = LlamaShape(**meta["shape"])
    src = _OnnxWeights(llm_dir / MODEL_FILE)
    nh, kvh, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
    layers = []
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        parts = [src.linear(f"{p}.self_attn.qkv{j}") for j in range(3) if src.has(f"{p}.self_attn.qkv{j}")]
        if shape.cache_head_dim != hd:  # drop the zero columns that padded each head to 16 for ONNX Runtime
            maps = [head_columns(shape, nh, True), head_columns(shape, kvh, True), head_columns(shape, kvh, False)]
            maps = maps if len(parts) == 3 else [np.concatenate(maps)]  # source column or -1 per padded column
            parts = [_select_columns(w, torch.from_numpy(np.nonzero(m >= 0)[0])) for w, m in zip(parts, maps)]
        qkv = _concat_columns(parts)
        gate_up = _concat_columns([src.linear(f"{p}.mlp.gate_up{j}") for j in range(2) if src.has(f"{p}.mlp.gate_up{j}")])
        layers.append(LayerWeights(
            ln1=torch.from_numpy(src.get(f"{p}.input_layernorm.weight").copy()), qkv=qkv,
            o=src.linear(f"{p}.self_attn.o_proj"),
            ln2=torch.from_numpy(src.get(f"{p}.post_attention_layernorm.weight").copy()), gate_up=gate_up,
            down=src.linear(f"{p}.mlp.down_proj")))
    embed = torch.from_numpy(np.load(llm_dir / EMBED_FILE))
    return LlamaWeights(shape, embed, layers, torch.from_numpy(src.get("model.norm.weight").copy()),
                        src.linear("lm_head"), source=str(llm_dir))


def weights_from_hf(model, *, group_size: int | None = None) -> LlamaWeights:
    """A transformers LlamaForCausalLM -> LlamaWeights: dense, or int4 round-to-nearest (group_size)."""
    from valley_rt.kernels.int4_linear import quantize_rtn

    cfg = model.config
    heads = cfg.num_attention_heads
    shape = LlamaShape(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, heads,
                  cfg.num_key_value_heads or heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                  cfg.vocab_size, cfg.max_position_embeddings, cfg.rms_norm_eps,
                  float(getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    sd = model.state_dict()

    def lin(*names):
        w = torch.cat([sd[n + ".weight"].float().t() for n in names], dim=1)  # [K, N]
        return w if group_size is None else quantize_rtn(w, group_size)

    layers = []
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        layers.append(LayerWeights(
            sd[f"{p}.input_layernorm.weight"].float(), lin(*(f"{p}.self_attn.{n}_proj" for n in "qkv")),
            lin(f"{p}.self_attn.o_proj"), sd[f"{p}.post_attention_layernorm.weight"].float(),
            lin(f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), lin(f"{p}.mlp.down_proj")))
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).float().t().contiguous()
    return LlamaWeights(shape, sd["model.embed_tokens.weight"].float(), layers, sd["model.norm.weight"].float(), head)


def random_weights(shape: LlamaShape, *, device, group_size: int = 128, quant: bool = True, seed: int = 0) -> LlamaWeights:
    """Random LLaMA weights built directly on `device` (benchmarks: real shapes without an export);
    int4 by round-to-nearest into the GPTQ layout (quant=True), else dense fp16."""
    from valley_rt.kernels.int4_linear import quantize_rtn

    gen = torch.Generator(device=device).manual_seed(seed)
    H, I, nh, kvh, hd = shape.hidden_size, shape.intermediate_size, shape.num_heads, shape.num_kv_heads, shape.head_dim

    def lin(k, n):
        w = torch.randn(k, n, device=device, dtype=torch.float16, generator=gen) * (1.0 / math.sqrt(k))
        return quantize_rtn(w, group_size) if quant else w

    def norm():
        return 1.0 + 0.1 * torch.randn(H, device=device, dtype=torch.float16, generator=gen)

    layers = [LayerWeights(norm(), lin(H, (nh + 2 * kvh) * hd), lin(nh * hd, H), norm(), lin(H, 2 * I), lin(I, H))
              for _ in range(shape.num_layers)]
    embed = torch.randn(shape.vocab_size, H, device=device, dtype=torch.float16, generator=gen)
    head = torch.randn(H, shape.vocab_size, device=device, dtype=torch.float16, generator=gen) * (4.0 / math.sqrt(H))
    return LlamaWeights(shape, embed, layers, norm(), head, source="random")


def quant_linears(weights: LlamaWeights) -> list[Int4Weight]:
    """Every int4 linear of the decoder, in layer order."""
    out = []
    for lw in weights.layers:
        for w in (lw.qkv, lw.o, lw.gate_up, lw.down):
            out += [p for p in (w if isinstance(w, list) else [w]) if isinstance(p, Int4Weight)]
    return out


def choose_int4_backend(weights: LlamaWeights) -> tuple[str, dict[str, float]]:
    """Triton kernel or torch's tinygemm, whichever runs the first layer's linears faster at batch 1 on
    this GPU (tinygemm only where every linear fits its layout and its output matches the reference);
    the loser's packing is dropped. Returns (backend, microseconds per layer for each candidate)."""
    from valley_rt.kernels.int4_linear import choose_backend, to_tinygemm

    linears = quant_linears(weights)
    first = linears[: len(linears) // max(1, weights.shape.num_layers)]
    for w in first:
        w.tinygemm = to_tinygemm(w)
    times = choose_backend(first)
    best = min(times, key=times.get)
    for w in linears:
        w.tinygemm = to_tinygemm(w) if best == "tinygemm" else None
    return best, times


def hf_llama(weights: LlamaWeights):
    """A transformers LlamaForCausalLM over dense LlamaWeights, sharing their tensors (nn.Linear holds
    the [N, K] transposed view): the fp16 eager baseline and an independent reference implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = weights.shape
    cfg = LlamaConfig(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
                      head_dim=s.head_dim, max_position_embeddings=s.max_position_embeddings, rms_norm_eps=s.rms_norm_eps,
                      rope_theta=s.rope_theta, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim

    def put(module, w):
        if isinstance(w, list) or isinstance(w, Int4Weight):
            raise ValueError("hf_llama needs dense weights (LlamaWeights.dequantized())")
        module.weight = torch.nn.Parameter(w.t(), requires_grad=False)

    model.model.embed_tokens.weight = torch.nn.Parameter(weights.embed, requires_grad=False)
    for layer, lw in zip(model.model.layers, weights.layers):
        for proj, part in zip((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                              lw.qkv.split([q, kv, kv], dim=1)):
            put(proj, part)
        put(layer.self_attn.o_proj, lw.o)
        gate, up = lw.gate_up.chunk(2, dim=1)
        put(layer.mlp.gate_proj, gate)
        put(layer.mlp.up_proj, up)
        put(layer.mlp.down_proj, lw.down)
        layer.input_layernorm.weight = torch.nn.Parameter(lw.ln1, requires_grad=False)
        layer.post_attention_layernorm.weight = torch.nn.Parameter(lw.ln2, requires_grad=False)
    model.model.norm.weight = torch.nn.Parameter(weights.norm, requires_grad=False)
    put(model.lm_head, weights.lm_head)
    with torch.device(weights.embed.device):  # real inv_freq buffers instead of meta ones
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


# ------------------------------------------------------------------------------------------- the model


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, cast back, then scale."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_tables(shape: LlamaShape, device) -> tuple[Tensor, Tensor]:
    """cos, sin [max_pos, head_dim] fp32, laid out for rotate_half (as LlamaRotaryEmbedding)."""
    dim = shape.head_dim
    inv = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(shape.max_position_embeddings, dtype=torch.int64).float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _linear(x: Tensor, w: Linears, backend: str | None) -> Tensor:
    if isinstance(w, list):
        return torch.cat([_linear(x, p, backend) for p in w], dim=-1)
    return int4_linear(x, w, backend) if isinstance(w, Int4Weight) else x @ w


class LlamaDecoder:
    """The decoder's math on a static KV cache (any device / dtype); `CudaLLM` wraps it in graphs."""

    def __init__(self, weights: LlamaWeights, *, max_context: int, dtype: torch.dtype, device,
                 int4_backend: str | None = None):
        s = weights.shape
        self.w, self.shape, self.dtype, self.device = weights, s, dtype, torch.device(device)
        self.backend = int4_backend
        self.max_context = max_context
        cos, sin = rotary_tables(s, self.device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        kv = (1, s.num_kv_heads, max_context, s.head_dim)
        self.k_cache = [torch.zeros(kv, dtype=dtype, device=self.device) for _ in range(s.num_layers)]
        self.v_cache = [torch.zeros(kv, dtype=dtype, device=self.device) for _ in range(s.num_layers)]
        self.kv_rows = torch.arange(max_context, device=self.device)  # [L] cache row indices

    def forward(self, x: Tensor, pos: Tensor, kv_len: int) -> Tensor:
        """x [1, S, H] (dtype) at positions pos [S] (int64, on the device) -> last-position logits [V] fp32.
        Keys/values of the S positions are written into the cache; attention reads rows [0, kv_len)."""
        s, (nh, kvh, hd) = self.shape, (self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim)
        S = x.shape[1]
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]  # [1, 1, S, hd]
        mask = self.kv_rows[None, :kv_len] <= pos[:, None]  # [S, kv_len]: causal, offset by the cache
        for i, lw in enumerate(self.w.layers):
            h = rms_norm(x, lw.ln1, s.rms_norm_eps)
            qkv = _linear(h, lw.qkv, self.backend)  # [1, S, (nh + 2 kvh) hd]
            q, k, v = qkv.split([nh * hd, kvh * hd, kvh * hd], dim=-1)
            q = q.view(1, S, nh, hd).transpose(1, 2)  # [1, nh, S, hd]
            k = k.view(1, S, kvh, hd).transpose(1, 2)
            v = v.view(1, S, kvh, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k_cache[i].index_copy_(2, pos, k)
            self.v_cache[i].index_copy_(2, pos, v)
            keys, values = self.k_cache[i][:, :, :kv_len], self.v_cache[i][:, :, :kv_len]
            if kvh != nh:  # GQA: each kv head serves nh / kvh query heads
                keys = keys.repeat_interleave(nh // kvh, dim=1)
                values = values.repeat_interleave(nh // kvh, dim=1)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [1, nh, S, hd]
            x = x + _linear(a.transpose(1, 2).reshape(1, S, nh * hd), lw.o, self.backend)
            h = rms_norm(x, lw.ln2, s.rms_norm_eps)
            gate, up = _linear(h, lw.gate_up, self.backend).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, lw.down, self.backend)
        last = rms_norm(x[:, -1], self.w.norm, s.rms_norm_eps)  # [1, H]
        return _linear(last, self.w.lm_head, self.backend)[0].float()  # [V]


# ------------------------------------------------------------------------------------------- sampling


def sample_on_device(logits: Tensor, temperature: float, top_p: float, top_k: int,
                     generator: torch.Generator | None) -> Tensor:
    """generate.sample's rules on logits' device: argmax at temperature 0; else logits / temperature,
    keep the top_k, softmax, drop tokens whose predecessors already reach top_p, draw one. -> 0-dim int64."""
    if temperature == 0.0:
        return torch.argmax(logits)
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[0]


# ------------------------------------------------------------------------------------------- the backend


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    logits: Tensor  # [V] fp32, the graph's output buffer


class CudaLLM:
    """One batch-1 session over LlamaWeights (implements generate.LLMBackend).

    graphs=True (CUDA only): each decode step replays a captured CUDA graph. graphs=False: eager, on any
    device; the CPU tests run it in float32.
    """

    def __init__(self, weights: LlamaWeights, *, device="cuda", dtype: torch.dtype = torch.float16,
                 max_context: int | None = None, graphs: bool | None = None, int4_backend: str | None = None):
        device = torch.device(device)
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        s = weights.shape
        self.hidden_size, self.vocab_size = s.hidden_size, s.vocab_size
        self.max_context = int(min(max_context or s.max_position_embeddings, s.max_position_embeddings))
        self.weights = weights.to(device, dtype)
        self.int4_timings: dict[str, float] = {}
        if quant_linears(self.weights) and device.type == "cuda" and int4_backend is None:
            int4_backend, self.int4_timings = choose_int4_backend(self.weights)
        self.model = LlamaDecoder(self.weights, max_context=self.max_context, dtype=dtype, device=device,
                                  int4_backend=int4_backend)
        self.int4_backend = int4_backend
        self.device, self.dtype = device, dtype
        quant = isinstance(weights.layers[0].o, Int4Weight)
        self.name = f"{'int4' if quant else str(dtype).split('.')[-1]}-{device.type}{'-graphs' if self.graphs else ''}"
        self.weight_bytes_per_token = self.weights.weight_bytes_per_token()
        self._pos = 0
        self._tok = torch.zeros(1, dtype=torch.long, device=device)  # the graph's token-id input
        self._at = torch.zeros(1, dtype=torch.long, device=device)  # the graph's position input
        self._graphs: dict[int, _Graph] = {}
        self._pool = None
        self._generators: dict[int, torch.Generator] = {}

    @classmethod
    def from_engine(cls, llm_dir, **kwargs) -> "CudaLLM":
        t0 = time.perf_counter()
        llm = cls(load_engine_llm(llm_dir), **kwargs)
        llm.load_s = time.perf_counter() - t0
        return llm

    # ------------------------------------------------------------------------------ LLMBackend

    @property
    def position(self) -> int:
        return self._pos

    def embed(self, ids: Sequence[int]) -> Tensor:
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        # [S, H] float32 on the host: the runtime splices the visual rows in NumPy (generate.LLMBackend)
        return self.weights.embed[ids.to(self.weights.embed.device)].float().cpu().numpy()

    @torch.inference_mode()
    def prefill(self, embeds) -> Tensor:
        """embeds: [S, H] (NumPy or a tensor) -> last-position logits [V], left on the device for `sample`."""
        S = embeds.shape[0]
        self._check_room(S)
        x = torch.as_tensor(embeds).to(device=self.device, dtype=self.dtype)[None]  # [1, S, H]
        pos = torch.arange(self._pos, self._pos + S, device=self.device)
        logits = self.model.forward(x, pos, self._pos + S)
        self._pos += S
        return logits

    @torch.inference_mode()
    def decode(self, token_id: int) -> Tensor:
        self._check_room(1)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside [0, {self.vocab_size})")
        self._tok.fill_(token_id)
        self._at.fill_(self._pos)
        if not self.graphs:
            logits = self._step(self._pos + 1)
        else:
            bucket = self._bucket(self._pos + 1)
            g = self._graphs.get(bucket)
            if g is None:
                logits = self._step(bucket).clone()  # eager first: a real step, and it compiles the kernels
                self._graphs[bucket] = self._capture(bucket)
            else:
                g.graph.replay()
                logits = g.logits.clone()  # the buffer is overwritten by the next replay
        self._pos += 1
        return logits

    def truncate(self, position: int) -> None:
        if not 0 <= position <= self._pos:
            raise ValueError(f"truncate to {position} outside the cache of {self._pos} tokens")
        self._pos = position  # rows past it are masked out and overwritten later

    def reset(self) -> None:
        self._pos = 0

    def sample(self, logits: Tensor, params, generator) -> int:
        """generate.sample on the device (one int crosses). The host generator (generate's
        numpy.random.Generator, seeded; or a torch CPU generator) seeds a device generator once, so
        seeded runs repeat."""
        gen = None
        if params.temperature != 0.0 and generator is not None:
            if isinstance(generator, torch.Generator) and generator.device == logits.device:
                gen = generator
            else:
                gen = self._generators.get(id(generator))
                if gen is None:
                    if isinstance(generator, np.random.Generator):
                        seed = int(generator.integers(0, 2**62))
                    else:
                        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                    gen = torch.Generator(device=logits.device).manual_seed(seed)
                    self._generators = {id(generator): gen}  # only the current generation's
        return int(sample_on_device(logits, params.temperature, params.top_p, params.top_k, gen))

    # ------------------------------------------------------------------------------ internals

    def _check_room(self, n: int) -> None:
        if self._pos + n > self.max_context:
            raise ValueError(f"{self._pos + n} tokens exceed the KV cache of {self.max_context}")

    def _bucket(self, rows: int) -> int:
        b = GRAPH_BUCKET_MIN
        while b < rows:
            b *= 2
        return min(b, self.max_context)

    def _step(self, kv_len: int) -> Tensor:
        """One decode step from the static inputs (token id, position), attending over kv_len rows."""
        x = self.weights.embed[self._tok][None]  # [1, 1, H]
        return self.model.forward(x, self._at, kv_len)

    def _capture(self, bucket: int) -> _Graph:
        """Capture the decode step at this bucket. Capture only records: caches are not touched."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):  # on a side stream, synchronized around the capture
            logits = self._step(bucket)
        return _Graph(graph, logits)

    def warm_up(self, buckets: Sequence[int] = (GRAPH_BUCKET_MIN,)) -> None:
        """Capture the graphs of these buckets now (load time) instead of in the first answer."""
        if not self.graphs:
            return
        saved = self._pos
        for b in buckets:
            b = self._bucket(b)
            if b not in self._graphs:
                self._pos = min(b, self.max_context) - 1  # a step at the bucket's last row
                self.decode(0)
        self._pos = saved
