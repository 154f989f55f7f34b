"""Valley's vision stage as one ONNX graph: uint8 crops -> (pooled patch tokens, frame tokens).

    crops uint8 [T, H, W, 3]           (already resized + centre-cropped: valley_rt.video.resize_crop)
      -> /255, CLIP mean/std             (in the graph: 4x less input than float pixels, no host pass)
      -> CLIP ViT up to select_layer     [T, 1+N, C]   (later layers are not in the graph)
      -> projector on the T CLS rows     frames [T, D]
      -> temporal pooling + projector    pooled [N, D]

Trade-offs taken here, each checked against `ValleyModel.encode_video` by tests/test_export_vision.py:
* Mean and importance pooling commute with the affine projector (spec: temporal modules), so the graph
  pools the C-wide raw features first and projects N rows instead of T*N. Importance scores use the
  projector folded into the score weights (`fold_importance_weights`: w' = w.view(N, D) @ W,
  b' = b0 + sum(w.view(N, D) @ b)); the softmax weights sum to one, so projecting the weighted sum
  equals the weighted sum of projections. Max and transformer need every projected token.
  At ViT-L/14 the projector is < 1 % of the FLOPs, so this is a small saving there; the tower is the cost.
* The temporal transformer's output is only read at the last frame, and it is one post-norm layer, so
  the graph computes the query, attention, residuals and feed-forward for that one row (keys/values
  still cover all frames): T times less work than the reference, same numbers.
* The CLIP tower is traced with HF's *eager* attention (the graph pattern ONNX Runtime's "clip" fusion
  recognises: Attention, SkipLayerNormalization, QuickGelu fire; with SDPA no Attention fuses).
* Exporter: the TorchScript one (`dynamo=False`). torch 2.13's dynamo exporter needs `onnxscript`, which
  valley-rt does not depend on; the TorchScript exporter traces this fixed-signature wrapper cleanly.
* CPU int8: ONNX Runtime dynamic quantization (int8 weights per channel, uint8 activations per tensor,
  computed at run time: MatMulInteger/DynamicQuantizeMatMul, QAttention; VNNI on this CPU).
  bf16 is not offered: ONNX Runtime 1.32's CPU provider has no bf16 MatMul kernel at all (a bf16
  MatMul graph fails with NOT_IMPLEMENTED; its bf16 fast-math GEMM option is ARM64-only), so a bf16
  engine could only be casts around fp32 kernels, slower than fp32.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from typing import TYPE_CHECKING

from valley_rt.backends.ort_session import vision_session
from valley_rt.backends.vision import folded_importance_score, pool_before_projector
from valley_rt.engine_format import VISION_FEATURES, VISION_INPUT, VISION_OUTPUTS

if TYPE_CHECKING:  # annotations only: the runtime loads this module without transformers
    from valley_rt.model import ValleyModel

OPSET = 17
INPUT = VISION_INPUT  # uint8 [T, H, W, 3]
OUTPUTS = VISION_OUTPUTS  # float32 [N, D], [T, D]
FEATURES = VISION_FEATURES  # optional extra output: float32 [T, 1+N, C], the selected layer's hidden states
PRECISIONS = ("fp32", "int8")
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, minus headroom for the graph


# -- the export-only wrapper ---------------------------------------------------------------------
class VisionGraph(nn.Module):
    """A fixed, trace-friendly signature over the reference model's vision modules (shares its weights)."""

    def __init__(self, model: ValleyModel, *, with_features: bool = False):
        super().__init__()
        cfg = model.cfg
        self.model = model
        self.mode = cfg.temporal.mode
        self.with_features = with_features
        self.register_buffer("mean", torch.tensor(cfg.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))
        if self.mode == "importance":
            w, b = folded_importance_score(model)
            self.register_buffer("score_weight", w)  # [N, C]
            self.register_buffer("score_bias", b.reshape(()))
        if self.mode == "transformer":
            enc = model.temporal.transformer_delta_encoder
            layer = enc.layers[0]
            if len(enc.layers) != 1 or enc.norm is not None or layer.norm_first:
                raise ValueError("the export expects Valley's temporal encoder: one post-norm layer, no final norm")

    def forward(self, crops: torch.Tensor):
        # crops: uint8 [T, H, W, 3]
        x = crops.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std  # [T, 3, H, W], exactly valley_rt.video.normalize
        feats = self.model.vision_features(x[None])[0]  # [T, 1+N, C]
        proj = self.model.mm_projector
        if self.mode in ("mean", "importance"):  # pool first: N rows through the projector, not T*N
            score = (self.score_weight, self.score_bias) if self.mode == "importance" else None
            pooled, frames = pool_before_projector(feats[None], self.mode, proj, score=score, backend="reference")
            return (pooled[0], frames[0], feats) if self.with_features else (pooled[0], frames[0])
        frames = proj(feats[:, 0])  # [T, D]
        patches = feats[:, 1:]  # [T, N, C]
        if self.mode == "max":
            pooled = proj(patches).amax(0)
        else:
            pooled = self._transformer(proj(patches).transpose(0, 1))  # [N, T, D]
        if self.with_features:
            return pooled, frames, feats
        return pooled, frames

    def _transformer(self, p: torch.Tensor) -> torch.Tensor:
        """delta + mean for p [N, T, D]; the encoder layer evaluated at the last frame's row only."""
        layer = self.model.temporal.transformer_delta_encoder.layers[0]
        attn = layer.self_attn
        n, t, d = p.shape
        heads = attn.num_heads
        h = p + self.model.temporal.position_matrix[:t]  # [N, T, D]
        wq, wk, wv = attn.in_proj_weight.chunk(3)
        bq, bk, bv = attn.in_proj_bias.chunk(3)
        last = h[:, -1:]  # [N, 1, D]: the only row whose output is read
        q = (last @ wq.t() + bq).view(n, 1, heads, d // heads).transpose(1, 2)  # [N, H, 1, dh]
        k = (h @ wk.t() + bk).view(n, t, heads, d // heads).transpose(1, 2)  # [N, H, T, dh]
        v = (h @ wv.t() + bv).view(n, t, heads, d // heads).transpose(1, 2)
        a = ((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // heads))).softmax(-1) @ v  # [N, H, 1, dh]
        a = attn.out_proj(a.transpose(1, 2).reshape(n, 1, d))
        y = layer.norm1(last + a)
        y = layer.norm2(y + layer.linear2(layer.activation(layer.linear1(y))))
        return y[:, 0] + p.mean(1)  # [N, D]


@contextlib.contextmanager
def _eager_attention(model: ValleyModel):
    """Trace the CLIP tower with HF eager attention (the pattern ORT fuses), restoring the setting after."""
    config = model.vision_tower.config
    old = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = old


# -- export, optimize, quantize ------------------------------------------------------------------
def sample_crops(cfg, frames: int, seed: int = 0) -> np.ndarray:
    """Deterministic smooth-ish uint8 test crops [T, crop, crop, 3] (noise plus gradients, like images)."""
    rng = np.random.default_rng(seed)
    s = cfg.preprocess.crop_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    base = np.stack([yy, xx, (yy + xx) / 2], -1) * 160.0
    out = base[None] + rng.normal(0, 40, (frames, s, s, 3)) + rng.uniform(0, 60, (frames, 1, 1, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def export_raw(model: ValleyModel, path: str | Path, *, with_features: bool = False, frames: int = 2) -> Path:
    """torch.onnx.export of VisionGraph with a dynamic frame axis; weights beside the graph when > 2 GB."""
    path = Path(path)
    graph = VisionGraph(model, with_features=with_features).eval()
    example = torch.from_numpy(sample_crops(model.cfg, frames))
    names = list(OUTPUTS) + ([FEATURES] if with_features else [])
    dynamic = {INPUT: {0: "frames"}, "frames": {0: "frames"}, FEATURES: {0: "frames"}}
    with torch.no_grad(), _eager_attention(model), warnings_quiet():
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT], output_names=names,
                          dynamic_axes={k: v for k, v in dynamic.items() if k in [INPUT, *names]},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return path


@contextlib.contextmanager
def warnings_quiet():
    """The TorchScript exporter warns about every Python-level shape check it freezes; they are known."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _save(model_proto, path: Path) -> None:
    import onnx

    big = model_proto.ByteSize() > EXTERNAL_DATA_BYTES if _fits_bytesize(model_proto) else True
    if big:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))


def _fits_bytesize(model_proto) -> bool:
    try:
        model_proto.ByteSize()
        return True
    except Exception:  # protobuf refuses to size a message over 2 GB
        return False


def optimize(src: str | Path, dst: str | Path, model: ValleyModel) -> dict[str, int]:
    """ONNX Runtime's transformer fusions, offline ("clip" model type); returns the fused-op counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    v = model.cfg.vision
    options = FusionOptions("clip")
    # The fusions fire without ONNX shape inference (same counts at ViT-L/14), and skipping it halves the
    # optimizer's peak memory (7.9 -> 3.8 GB at ViT-L/14) and time (30 -> 12 s).
    options.enable_shape_inference = False
    with warnings_quiet():
        opt = optimize_model(str(src), model_type="clip", num_heads=v.num_heads, hidden_size=v.hidden_size,
                             opt_level=0, optimization_options=options)  # 0: Python fusions only; ORT's run at load
    big = not _fits_bytesize(opt.model) or opt.model.ByteSize() > EXTERNAL_DATA_BYTES
    opt.save_model_to_file(str(dst), use_external_data_format=big)  # also declares the com.microsoft opset
    return {k: int(n) for k, n in opt.get_fused_operator_statistics().items() if n}


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Dynamic int8 (weights int8 per output channel, activations uint8 per tensor at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {t.name: len(t.dims) for t in graph.initializer}
    # Only true weight GEMMs: the importance score is a matrix-vector product (1-D weight) whose
    # per-channel quantization ORT rejects, and it is too small to matter.
    skip = [n.name for n in graph.node if n.op_type == "MatMul" and weights.get(n.input[1], 0) != 2]
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=skip,
                     use_external_data_format=Path(src).stat().st_size > EXTERNAL_DATA_BYTES,
                     extra_options={"MatMulConstBOnly": True,
                                    # contrib ops (Attention) have no ONNX shape inference: fp32 by default
                                    "DefaultTensorType": onnx.TensorProto.FLOAT})


def session(path: str | Path, *, threads: int | None = None, providers: list | None = None):
    """An InferenceSession over a vision graph (`valley_rt.backends.ort_session.vision_session`)."""
    return vision_session(path, threads=threads, providers=providers)


# -- parity --------------------------------------------------------------------------------------
def compare(ref: torch.Tensor | np.ndarray, got: torch.Tensor | np.ndarray) -> dict[str, float]:
    """max abs error, that relative to the reference's value range, and the worst per-token cosine."""
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float64).reshape(-1, np.shape(ref)[-1])
    g = torch.as_tensor(np.asarray(got), dtype=torch.float64).reshape(-1, np.shape(got)[-1])
    if r.shape != g.shape:
        raise ValueError(f"compare: reference {list(r.shape)} vs engine {list(g.shape)}")
    err = (r - g).abs().max().item()
    value_range = (r.max() - r.min()).item()
    cos = torch.nn.functional.cosine_similarity(r, g, dim=-1).min().item()
    return {"max_abs_err": err, "rel_err": err / max(value_range, 1e-30), "min_cosine": cos}


@torch.no_grad()
def reference_outputs(model: ValleyModel, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (pooled [N, D], frames [T, D]) for uint8 crops."""
    from valley_rt.video import normalize

    pooled, frames = model.encode_video(normalize(crops, model.cfg.preprocess)[None])
    return pooled[0], frames[0]


def parity(model: ValleyModel, sess, crops: np.ndarray) -> dict[str, dict[str, float]]:
    """Engine vs reference on the same crops: figures for pooled and frame tokens."""
    ref_pooled, ref_frames = reference_outputs(model, crops)
    pooled, frames = sess.run(list(OUTPUTS), {INPUT: crops})[:2]
    return {"pooled": compare(ref_pooled, pooled), "frames": compare(ref_frames, frames)}


def time_session(sess, crops: np.ndarray, repeats: int = 2) -> float:
    """Best-of-`repeats` wall ms after one warm-up run."""
    sess.run(list(OUTPUTS), {INPUT: crops})
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(list(OUTPUTS), {INPUT: crops})
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# -- one call: the vision half of an engine ------------------------------------------------------
INT8_MIN_COSINE = 0.999  # a lower-precision variant is kept only at >= this cosine per token
FP32_MAX_REL_ERR = 1e-4  # fp32 engine: max abs error / value range


@dataclass
class VisionExport:
    path: Path  # the kept vision.onnx
    precision: str  # "fp32" | "int8"
    figures: dict  # everything measured: fusions, parity per variant, ms per variant, decision


def export_vision(model: ValleyModel, out_dir: str | Path, *, precision: str = "auto", frames: int = 8,
                  timing_repeats: int = 1, name: str = "vision.onnx", raw: str | Path | None = None) -> VisionExport:
    """Export, fuse and (optionally) int8-quantize the vision stage into out_dir/name, measuring parity.

    precision: "fp32"; "int8" (kept only if cosine >= INT8_MIN_COSINE per token, else ValueError);
    "auto" (int8 when it is both faster on `frames` sample frames and accurate, else fp32).
    raw: an already traced graph (`export_raw`; the GPU graphs of export/tensorrt.py start from the same
    one), else the model is traced here.
    """
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto, fp32 or int8, got {precision!r}")
    out_dir = Path(out_dir)
    crops = sample_crops(model.cfg, frames, seed=1)
    figures: dict = {"parity_frames": frames, "input": f"uint8 [T, {model.cfg.preprocess.crop_size}, "
                                                        f"{model.cfg.preprocess.crop_size}, 3] crops"}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".vision-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if raw is None:
            raw = export_raw(model, tmp / "raw.onnx")
        figures["fusions"] = optimize(raw, tmp / "fp32.onnx", model)
        figures["export_s"] = {"fp32": time.perf_counter() - t0}
        sess = session(tmp / "fp32.onnx")
        variants = {"fp32": parity(model, sess, crops)}
        ms = {"fp32": time_session(sess, crops, timing_repeats)} if precision == "auto" else {}
        del sess
        if precision in ("auto", "int8"):
            t0 = time.perf_counter()
            quantize_int8(tmp / "fp32.onnx", tmp / "int8.onnx")
            figures["export_s"]["int8"] = time.perf_counter() - t0
            sess = session(tmp / "int8.onnx")
            variants["int8"] = parity(model, sess, crops)
            if precision == "auto":
                ms["int8"] = time_session(sess, crops, timing_repeats)
            del sess
        figures["parity"] = variants
        if ms:
            figures["ms"] = ms
        fp32_err = max(v["rel_err"] for v in variants["fp32"].values())
        if fp32_err > FP32_MAX_REL_ERR:
            raise ValueError(f"fp32 vision engine deviates from the reference: rel err {fp32_err:.2e} > {FP32_MAX_REL_ERR}")
        chosen = precision
        if "int8" in variants:
            cos = min(v["min_cosine"] for v in variants["int8"].values())
            accurate = cos >= INT8_MIN_COSINE
            if precision == "int8" and not accurate:
                raise ValueError(f"int8 vision engine: worst per-token cosine {cos:.5f} < {INT8_MIN_COSINE} "
                                 f"vs the reference; use --precision fp32")
            if precision == "auto":
                faster = ms["int8"] < ms["fp32"]
                chosen = "int8" if accurate and faster else "fp32"
                figures["decision"] = (f"int8 {'kept' if chosen == 'int8' else 'dropped'}: cosine {cos:.5f} "
                                       f"(need >= {INT8_MIN_COSINE}), {ms['int8']:.0f} ms vs fp32 {ms['fp32']:.0f} ms")
        dst = out_dir / name
        src = tmp / f"{chosen}.onnx"
        os.replace(src, dst)
        data = Path(str(src) + ".data")  # external weights (name recorded inside the graph: keep it)
        if data.exists():
            _relocate_external(dst, data, out_dir)
    return VisionExport(path=dst, precision=chosen, figures=figures)


def _relocate_external(graph_path: Path, data: Path, out_dir: Path) -> None:
    """Rewrite an external-data graph so its weights file sits next to it as <graph>.data."""
    import onnx

    model_proto = onnx.load(str(graph_path), load_external_data=False)
    onnx.load_external_data_for_model(model_proto, str(data.parent))
    _save(model_proto, graph_path)
