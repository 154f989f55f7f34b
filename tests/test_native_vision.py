"""The native vision encoder (backends/native_vision.c on the AMX tiles) against the fp32 reference, the
int8 ONNX graph it reads its weights from, and a float64 reference of its int8 linear; and when the
runtime picks it."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from valley_rt.backends import native_vision as nv
from valley_rt.backends.vision import OnnxVision, open_engine_vision, pick_vision
from valley_rt.config import preset

WHY = nv.cpu_reason()
needs_tiles = pytest.mark.skipif(WHY is not None, reason=f"native vision needs AMX tiles: {WHY}")
INT8_COS = 0.999  # the export's gate for an int8 vision graph


def native_cfg(mode: str = "mean", image: int = 64):
    """A small ViT the kernel computes: widths multiples of 64, head size 64 (2 heads)."""
    cfg = preset("tiny")
    cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_heads = 128, 256, 2
    cfg.vision.image_size = cfg.preprocess.crop_size = image
    cfg.preprocess.resize_short = image + 8
    cfg.temporal.mode = mode
    return cfg


def export_int8(cfg, folder):
    import torch

    from valley_rt.export import onnx_vision as ov
    from valley_rt.model import build_model

    model = build_model(cfg, seed=5)
    with torch.no_grad():  # LayerNorm weights away from 1 / 0, so a swapped gamma and beta shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    ov.export_raw(model, folder / "raw.onnx")
    ov.optimize(folder / "raw.onnx", folder / "fp32.onnx", model)
    ov.quantize_int8(folder / "fp32.onnx", folder / "vision.onnx")
    return model


def min_cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return float((np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@needs_tiles
@pytest.mark.parametrize("mode,image,frames", [("mean", 64, 8), ("max", 64, 3), ("mean", 24, 5)])
def test_native_encoder_matches_reference_and_graph(tmp_path, mode, image, frames):
    """257 tokens a frame (padded to 288 in the attention), and 37 (padded to 64); mean and max pooling."""
    from valley_rt.export import onnx_vision as ov

    cfg = native_cfg(mode, image)
    model = export_int8(cfg, tmp_path)
    vision, why = nv.NativeVision.open(tmp_path / "vision.onnx", cfg, threads=2)
    assert vision is not None, why
    crops = ov.sample_crops(cfg, frames, seed=frames)
    pooled, frame_tokens = vision.encode(crops)
    ref_pooled, ref_frames = (t.numpy() for t in ov.reference_outputs(model, crops))
    graph_pooled, graph_frames = OnnxVision(tmp_path / "vision.onnx", cfg).encode(crops)
    assert pooled.shape == ref_pooled.shape and frame_tokens.shape == ref_frames.shape
    assert min_cosine(pooled, ref_pooled) >= INT8_COS and min_cosine(frame_tokens, ref_frames) >= INT8_COS
    # as close to the reference as the int8 graph it reads its weights from (activations per token there)
    assert min_cosine(pooled, graph_pooled) >= INT8_COS and min_cosine(frame_tokens, graph_frames) >= INT8_COS
    again = vision.encode(crops)  # scratch reused: the same numbers
    np.testing.assert_array_equal(again[0], pooled)
    assert vision.stage_seconds.min() > 0
    # encodes from several threads at once (the scratch is shared): each its own clip's numbers
    clips = [ov.sample_crops(cfg, frames, seed=100 + i) for i in range(3)]
    alone = [vision.encode(c)[0] for c in clips]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda c: vision.encode(c)[0], clips))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


@needs_tiles
@pytest.mark.parametrize("m", [1, 5, 32, 33, 70])
def test_int8_linear_against_float64(m):
    """The kernel's linear (the projector's and every encoder linear's GEMM) against the same integer
    math in float64: tokens quantized per row (absmax / 127, round to nearest even), int32 sums, scales."""
    lib, why = nv.library()
    assert lib is not None, why
    rng = np.random.default_rng(m)
    k, n = 192, 96
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    w[:, 5] = 0  # an all-zero column
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 3, size=(m, 1))).astype(np.float32)
    x[0, :64] = 0.0
    scale, bias = rng.uniform(0.001, 0.01, n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    packed = np.empty(k * n, np.int8)
    assert lib.vv_pack(w.ctypes.data, k, n, packed.ctypes.data, 2) == 0
    lin = nv._Linear(packed.ctypes.data, scale.ctypes.data, bias.ctypes.data, n, k)
    mp = (m + 31) // 32 * 32
    y, q, sx = np.empty((m, n), np.float32), np.empty(mp * k, np.int8), np.empty(mp, np.float32)
    assert lib.vv_linear_rows(ctypes.byref(lin), x.ctypes.data, m, y.ctypes.data, q.ctypes.data, sx.ctypes.data, 2) == 0
    a = np.abs(x).max(1)
    inv = np.where(a > 0, np.float32(127.0) / np.maximum(a, np.float32(1e-30)), np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(x * inv[:, None]), -127, 127)
    want = (codes.astype(np.float64) @ w.astype(np.float64)) * (a / np.float32(127.0))[:, None] * scale + bias
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=2e-5 * np.abs(want).max())


def test_policy(monkeypatch):
    manifest = {"precision": {"vision": "int8"}, "config": {"temporal": {"mode": "mean"}}}
    monkeypatch.setattr(nv, "cpu_reason", lambda: None)
    assert nv.native_policy(manifest)
    assert not nv.native_policy({**manifest, "precision": {"vision": "fp32"}})  # no int8 weights to read
    assert not nv.native_policy({**manifest, "config": {"temporal": {"mode": "transformer"}}})
    assert not nv.native_policy(None)
    monkeypatch.setenv(nv.NATIVE_ENV, "off")
    assert not nv.native_policy(manifest)
    monkeypatch.setenv(nv.NATIVE_ENV, "maybe")
    with pytest.raises(Exception, match="expected auto or off"):
        nv.native_policy(manifest)
    monkeypatch.delenv(nv.NATIVE_ENV)
    monkeypatch.setattr(nv, "cpu_reason", lambda: "the CPU lacks amx_int8")
    assert not nv.native_policy(manifest)
    assert pick_vision("engine", device="cpu", native=True) == "native-cpu"
    assert pick_vision("engine", device="cpu", native=False, cpu=None) == "onnx-cpu"


def test_a_graph_it_cannot_read_opens_the_graph_runtime(tmp_path, monkeypatch):
    """The tiny preset's head size (24) is not one the kernel computes: the engine's own graph opens, and
    says why; asked for by name, native-cpu is an error instead."""
    cfg = preset("tiny")
    export_int8(cfg, tmp_path)
    manifest = {"config": cfg.to_dict(), "files": {}, "precision": {"vision": "int8"}}
    monkeypatch.delenv("VALLEY_RT_VISION", raising=False)
    vision = open_engine_vision(tmp_path, manifest, "native-cpu")
    assert isinstance(vision, OnnxVision)
    assert vision.native_declined
    monkeypatch.setenv("VALLEY_RT_VISION", "native-cpu")
    with pytest.raises(Exception, match="native-cpu cannot run"):
        open_engine_vision(tmp_path, manifest, "native-cpu")


@needs_tiles
def test_asymmetric_weights_are_declined_not_raised(tmp_path):
    """A graph whose int8 weights have zero points (which the kernel's math leaves out) is declined with
    the reason, so the engine opens its graph instead of failing."""
    import onnx
    from onnx import numpy_helper

    cfg = native_cfg()
    export_int8(cfg, tmp_path)
    model = onnx.load(str(tmp_path / "vision.onnx"))
    zp = next(t for t in model.graph.initializer if t.name.endswith("zero_point") and t.data_type == onnx.TensorProto.INT8)
    zp.CopyFrom(numpy_helper.from_array(np.ones(numpy_helper.to_array(zp).shape, np.int8), zp.name))
    onnx.save(model, str(tmp_path / "asym.onnx"))
    vision, why = nv.NativeVision.open(tmp_path / "asym.onnx", cfg)
    assert vision is None and "asymmetric" in why
