"""The GPU vision stage's buffer-writing path against the reference model's encode_video: eagerly on the
CPU (the pooling kernel's torch twin), graphed on a GPU (skipped without one)."""

import pytest
import torch

from valley_rt.backends.vision_cuda import CudaVision
from valley_rt.config import preset
from valley_rt.model import build_model

CUDA = torch.cuda.is_available()


def _model(mode: str, device="cpu", dtype=torch.float32):
    cfg = preset("tiny")
    cfg.temporal.mode = mode
    return build_model(cfg, device=device, dtype=dtype, seed=1)


@pytest.mark.parametrize("mode", ["mean", "max", "importance", "transformer"])
def test_encode_into_writes_reference_rows_at_offsets(mode):
    model = _model(mode)
    cfg, t = model.cfg, 3
    pixels = torch.randn(t, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, frames = model.encode_video(pixels[None])  # [1, N, D], [1, T, D]
    n, d = cfg.num_patches, cfg.llm.hidden_size
    buf = torch.zeros(5 + n + 2 + t + 4, d)
    CudaVision(model, graphs=False).encode_into(pixels, buf, patch_offset=5)
    torch.testing.assert_close(buf[5:5 + n], pooled[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf[5 + n + 2:5 + n + 2 + t], frames[0], atol=1e-5, rtol=1e-5)
    untouched = torch.cat([buf[:5], buf[5 + n:5 + n + 2], buf[5 + n + 2 + t:]])
    assert not untouched.any()  # text rows are left alone


def test_encode_returns_runtime_shapes():
    model = _model("transformer")
    frames = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
    pooled, frame_tokens = CudaVision(model, graphs=False).encode(frames)
    assert pooled.shape == (model.cfg.num_patches, model.cfg.llm.hidden_size) and frame_tokens.shape[0] == 2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CUDA graphs, the Triton pooling kernel)")
@pytest.mark.parametrize("t", [3, 8])
def test_graphed_vision_equals_eager_on_cuda(t):
    model = _model("mean", device="cuda", dtype=torch.float16)
    cfg = model.cfg
    pixels = torch.randn(t, 3, cfg.vision.image_size, cfg.vision.image_size, device="cuda", dtype=torch.float16)
    n, d = cfg.num_patches, cfg.llm.hidden_size
    a, b = (torch.zeros(n + 2 + t + 1, d, device="cuda", dtype=torch.float16) for _ in range(2))
    graphed = CudaVision(model)
    graphed.encode_into(pixels, a, patch_offset=1)
    graphed.encode_into(pixels, a, patch_offset=1)  # a replay, not the capture run
    CudaVision(model, graphs=False, pool_backend="reference").encode_into(pixels, b, patch_offset=1)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    assert set(graphed._graphs) == {4 if t == 3 else 8}
