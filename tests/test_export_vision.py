"""The ONNX vision engine against the PyTorch reference, staged, on tiny configs in every temporal mode.

Stages: selected-layer features -> pooled patch tokens / projected frame tokens -> the whole model's
logits with engine-made visual tokens. fp32: max abs error <= 1e-4 of the reference's value range;
int8: cosine >= 0.999 per token. Frame counts 1, 3, 8, 64 run through one graph (dynamic axis).
"""

import numpy as np
import pytest
import torch

from valley_rt.backends.vision import OnnxVision, TorchVision
from valley_rt.config import TEMPORAL_MODES, preset
from valley_rt.export import onnx_vision as ov
from valley_rt.export import tensorrt
from valley_rt.model import build_model, sinusoid_table
from valley_rt.video import normalize

FP32_REL = 1e-4
INT8_COS = 0.999


def tiny_model(mode):
    cfg = preset("tiny")
    cfg.temporal.mode = mode
    model = build_model(cfg, seed=3)
    if mode == "transformer":
        # build_model leaves this buffer as uninitialised memory (to_empty, then restore_buffers only
        # refills it while it is still on the meta device): set the spec's table explicitly.
        model.temporal.position_matrix.copy_(sinusoid_table(*model.temporal.position_matrix.shape))
    if mode == "importance":  # the 0.02-std init gives near-uniform frame weights; make them matter
        with torch.no_grad():
            model.temporal.pooling_layer.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
            model.temporal.pooling_layer.bias.fill_(0.3)
    return model


@pytest.fixture(scope="module", params=TEMPORAL_MODES)
def exported(request, tmp_path_factory):
    """(model, fp32 session with the extra features output, int8 session) for one temporal mode."""
    model = tiny_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    ov.export_raw(model, d / "raw.onnx", with_features=True)
    fusions = ov.optimize(d / "raw.onnx", d / "fp32.onnx", model)
    ov.quantize_int8(d / "fp32.onnx", d / "int8.onnx")
    return model, ov.session(d / "fp32.onnx"), ov.session(d / "int8.onnx"), fusions


def rel_err(ref, got):
    return ov.compare(ref, got)["rel_err"]


@pytest.mark.parametrize("frames", [1, 3, 8, 64])
def test_fp32_staged_parity(exported, frames):
    model, sess, _, _ = exported
    crops = ov.sample_crops(model.cfg, frames, seed=frames)
    pooled, frame_tokens, feats = sess.run(["pooled", "frames", "features"], {"crops": crops})
    with torch.no_grad():
        ref_feats = model.vision_features(normalize(crops, model.cfg.preprocess)[None])[0]
    ref_pooled, ref_frames = ov.reference_outputs(model, crops)
    assert feats.shape == tuple(ref_feats.shape) == (frames, 1 + model.cfg.num_patches, model.cfg.vision.hidden_size)
    assert pooled.shape == (model.cfg.num_patches, model.cfg.llm.hidden_size)
    assert frame_tokens.shape == (frames, model.cfg.llm.hidden_size)
    assert rel_err(ref_feats, feats) <= FP32_REL
    assert rel_err(ref_pooled, pooled) <= FP32_REL
    assert rel_err(ref_frames, frame_tokens) <= FP32_REL


def test_fusions_fire(exported):
    """ORT's clip fusions really rewrote the tower: one Attention and QuickGelu per layer run."""
    model, _, _, fusions = exported
    layers = model.cfg.vision.layers_run
    assert fusions.get("Attention") == layers and fusions.get("QuickGelu") == layers
    assert fusions.get("SkipLayerNormalization", 0) >= layers


def layout_ids(cfg, n_patch, n_frame):
    t = cfg.tokens
    return torch.tensor([[1, 5, 6, t.im_start, *[t.im_patch] * n_patch, t.im_end, t.vi_start,
                          *[t.vi_frame] * n_frame, t.vi_end, 7, 8]])


def test_logits_with_engine_tokens(exported):
    """The whole model fed engine-made visual tokens gives the reference's logits."""
    model, sess, _, _ = exported
    crops = ov.sample_crops(model.cfg, 5, seed=11)
    pooled, frame_tokens = sess.run(["pooled", "frames"], {"crops": crops})
    ids = layout_ids(model.cfg, model.cfg.num_patches, 5)
    with torch.no_grad():
        ref = model(ids, pixel_values=normalize(crops, model.cfg.preprocess)[None]).logits
        got = model(ids, visual=(torch.from_numpy(pooled)[None], torch.from_numpy(frame_tokens)[None])).logits
    assert rel_err(ref[0], got[0]) <= FP32_REL
    assert torch.equal(ref.argmax(-1), got.argmax(-1))


@pytest.mark.parametrize("frames", [1, 8])
def test_int8_cosine(exported, frames):
    model, _, sess, _ = exported
    crops = ov.sample_crops(model.cfg, frames, seed=20 + frames)
    figures = ov.parity(model, sess, crops)
    assert figures["pooled"]["min_cosine"] >= INT8_COS, figures
    assert figures["frames"]["min_cosine"] >= INT8_COS, figures
    assert figures["pooled"]["rel_err"] > 1e-6  # really quantized (not the fp32 graph by mistake)


def test_export_vision_records_and_decides(tmp_path):
    """precision=auto measures both variants, keeps one by the rule, and writes the figures down."""
    model = tiny_model("mean")
    res = ov.export_vision(model, tmp_path, precision="auto", frames=4)
    f = res.figures
    assert res.path == tmp_path / "vision.onnx" and res.path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["vision.onnx"]  # temporary files gone
    assert set(f["parity"]) == {"fp32", "int8"} and set(f["ms"]) == {"fp32", "int8"}
    cos = min(v["min_cosine"] for v in f["parity"]["int8"].values())
    expect = "int8" if cos >= INT8_COS and f["ms"]["int8"] < f["ms"]["fp32"] else "fp32"
    assert res.precision == expect and f["decision"].startswith(f"int8 {'kept' if expect == 'int8' else 'dropped'}")
    ops = {n.op_type for n in __import__("onnx").load(str(res.path)).graph.node}
    assert ("DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops) == (expect == "int8")


def test_export_vision_fp32_only(tmp_path):
    res = ov.export_vision(tiny_model("max"), tmp_path, precision="fp32", frames=2)
    assert res.precision == "fp32" and set(res.figures["parity"]) == {"fp32"}
    assert max(v["rel_err"] for v in res.figures["parity"]["fp32"].values()) <= FP32_REL


@pytest.mark.parametrize("mode", TEMPORAL_MODES)
def test_torch_vision_backend_matches_reference(mode):
    """TorchVision (pool-first + folded importance weights, temporal_pool dispatch) == encode_video."""
    model = tiny_model(mode)
    crops = ov.sample_crops(model.cfg, 6, seed=5)
    ref_pooled, ref_frames = ov.reference_outputs(model, crops)
    pooled, frames = TorchVision(model).encode(crops)
    assert rel_err(ref_pooled, pooled) <= FP32_REL and rel_err(ref_frames, frames) <= FP32_REL
    pooled2, _ = TorchVision(model).encode(normalize(crops, model.cfg.preprocess))  # float pixel values too
    assert torch.allclose(pooled, pooled2)


def test_onnx_vision_backend_full_frames(exported, tmp_path):
    """OnnxVision on full-size frames resizes + crops on the host exactly like the reference path."""
    model, _, _, _ = exported
    ov.export_raw(model, tmp_path / "v.onnx")
    backend = OnnxVision(tmp_path / "v.onnx", model.cfg)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 90, 120, 3), dtype=np.uint8)  # not crop-sized: host resize + crop
    pooled, frame_tokens = backend.encode(frames)
    ref_pooled, ref_frames = TorchVision(model).encode(frames)
    assert rel_err(ref_pooled, pooled) <= FP32_REL and rel_err(ref_frames, frame_tokens) <= FP32_REL
    with pytest.raises(ValueError, match="uint8"):
        backend.encode(torch.zeros(2, 3, 64, 64))


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt.why_no_gpu() is not None, reason=f"GPU path unverified here: {tensorrt.why_no_gpu()}")
def test_gpu_fp16_and_tensorrt(tmp_path):
    model = tiny_model("mean")
    ov.export_raw(model, tmp_path / "raw.onnx")
    entry = tensorrt.export_gpu(model, tmp_path / "raw.onnx", tmp_path)
    for key in ("parity_cuda_fp16", "parity_trt_fp16"):
        if key in entry:
            assert min(v["min_cosine"] for v in entry[key].values()) >= INT8_COS, entry


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_external_data_path(tmp_path, monkeypatch, precision):
    """Graphs over the 2 GB protobuf limit keep weights in <graph>.data beside them (threshold lowered here)."""
    monkeypatch.setattr(ov, "EXTERNAL_DATA_BYTES", 10_000)
    model = tiny_model("mean")
    res = ov.export_vision(model, tmp_path, precision=precision, frames=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert (tmp_path / "vision.onnx").stat().st_size < 200_000 < (tmp_path / "vision.onnx.data").stat().st_size
    figures = ov.parity(model, ov.session(res.path), ov.sample_crops(model.cfg, 3, seed=4))
    assert min(v["min_cosine"] for v in figures.values()) >= INT8_COS
