"""Vision backends: video frames -> the visual tokens the LLM splices in, (pooled [N, D], frames [T, D]).

Two interchangeable backends with one method, `encode(frames)`:
* `OnnxVision` runs an engine's vision.onnx with ONNX Runtime: the CPU provider by default (one thread per
  physical core unless told otherwise), CUDA / TensorRT providers when the engine has a GPU graph and they are present.
  Its graph takes uint8 crops and normalizes inside, so the host only resizes and crops.
* `TorchVision` runs the PyTorch reference model's modules: the CLIP tower, then temporal pooling through
  `valley_rt.kernels.temporal_pool` (its dispatch picks the fused Triton kernel on CUDA and the torch
  reference on CPU) and the projector. Mean and importance pool the raw features before the projector
  (importance with the projector folded into the score weights); max and transformer pool projected tokens.

`frames` may be uint8 [T, H, W, 3] RGB video frames (resized + centre-cropped here unless they already
are crops) or, for TorchVision only, float pixel_values [T, 3, crop, crop] already normalized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from valley_rt.config import ValleyConfig
from valley_rt.errors import EngineError


def as_crops(frames, cfg: ValleyConfig) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, crop, crop, 3] contiguous (resize + centre crop when not already crops)."""
    from valley_rt.video import resize_crop

    arr = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    c = cfg.preprocess.crop_size
    if arr.shape[1:3] != (c, c):
        arr = resize_crop(arr, cfg.preprocess)
    return np.ascontiguousarray(arr)


class OnnxVision:
    """An engine's vision graph in an ONNX Runtime session."""

    def __init__(self, path: str | Path, cfg: ValleyConfig, *, threads: int | None = None, providers: list | None = None):
        from valley_rt.export.onnx_vision import INPUT, OUTPUTS, session

        self.cfg = cfg
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: vision graph missing")
        self._input, self._outputs = INPUT, list(OUTPUTS)
        self.session = session(self.path, threads=threads, providers=providers)
        self.providers = self.session.get_providers()

    @classmethod
    def from_engine(cls, engine_dir: str | Path, *, manifest: dict | None = None, verify: bool = True,
                    threads: int | None = None, device: str = "auto") -> "OnnxVision":
        """Load ENGINE/vision.onnx (manifest checked); device "auto" uses the GPU graph when possible."""
        from valley_rt.export import tensorrt
        from valley_rt.export.manifest import artifact_path, load_manifest

        engine_dir = Path(engine_dir)
        manifest = manifest or load_manifest(engine_dir, verify=verify)
        cfg = ValleyConfig.from_dict(manifest["config"])
        gpu = manifest.get("gpu") or {}
        if device in ("auto", "cuda") and gpu.get("vision") and tensorrt.gpu_providers_available():
            import onnxruntime as ort

            if gpu.get("trt") and "TensorrtExecutionProvider" in ort.get_available_providers():
                # the unfused graph under TensorRT fp16, engine from the cache built at export
                return cls(artifact_path(engine_dir, gpu["trt"], where="gpu.trt"), cfg, threads=threads,
                           providers=tensorrt.providers(artifact_path(engine_dir, gpu["trt_cache"], where="gpu.trt_cache"), cfg))
            return cls(artifact_path(engine_dir, gpu["vision"], where="gpu.vision"), cfg, threads=threads, providers=tensorrt.providers(None, cfg))
        if device == "cuda":
            raise EngineError(f"{engine_dir}: a CUDA vision backend needs an engine exported on a GPU machine "
                              f"(gpu graph: {bool(gpu.get('vision'))}) and onnxruntime-gpu")
        vision_file = artifact_path(engine_dir, manifest.get("files", {}).get("vision", "vision.onnx"), where="files.vision")
        return cls(vision_file, cfg, threads=threads)

    def encode(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [T, H, W, 3] -> (pooled [N, D], frames [T, D]) float32."""
        if isinstance(frames, torch.Tensor) and frames.is_floating_point():
            raise ValueError("OnnxVision takes uint8 frames (it normalizes in its graph), got float pixel values")
        crops = as_crops(frames, self.cfg)
        pooled, frame_tokens = self.session.run(self._outputs, {self._input: crops})
        return torch.from_numpy(pooled), torch.from_numpy(frame_tokens)


class TorchVision:
    """The reference model's vision stage, with fused temporal pooling (Triton on CUDA, torch on CPU)."""

    def __init__(self, model, *, pool_backend: str | None = None):
        from valley_rt.kernels.temporal_pool import fold_importance_weights

        self.model = model.eval()
        self.cfg = model.cfg
        self.mode = self.cfg.temporal.mode
        self.pool_backend = pool_backend  # None: temporal_pool's own dispatch
        self._score = None
        if self.mode == "importance":
            pool, proj = model.temporal.pooling_layer, model.mm_projector
            bias = proj.bias if proj.bias is not None else torch.zeros(proj.out_features, device=proj.weight.device)
            w, b = fold_importance_weights(pool.weight, pool.bias, proj.weight, bias)  # w' [N, C] fp32
            self._score = (w.to(proj.weight.dtype).contiguous(), b)

    @property
    def device(self) -> torch.device:
        return self.model.mm_projector.weight.device

    def pixel_values(self, frames) -> torch.Tensor:
        """uint8 frames -> normalized float [T, 3, crop, crop]; float pixel values pass through."""
        from valley_rt.video import normalize

        if isinstance(frames, torch.Tensor) and frames.is_floating_point():
            if frames.dim() != 4 or frames.shape[1] != 3:
                raise ValueError(f"pixel_values must be [T, 3, H, W], got {list(frames.shape)}")
            return frames
        return normalize(as_crops(frames, self.cfg), self.cfg.preprocess)

    @torch.no_grad()
    def encode(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """frames -> (pooled [N, D], frames [T, D]) in the model's dtype, on its device."""
        from valley_rt.kernels.temporal_pool import temporal_pool

        m, dtype = self.model, self.model.mm_projector.weight.dtype
        x = self.pixel_values(frames).to(self.device, dtype)[None]  # [1, T, 3, H, W]
        feats = m.vision_features(x).contiguous()  # [1, T, 1+N, C]
        if self.mode in ("mean", "importance"):
            kw = {"score_weight": self._score[0], "score_bias": self._score[1]} if self._score else {}
            pooled, cls = temporal_pool(feats, self.mode, backend=self.pool_backend, **kw)  # C-wide
            return m.mm_projector(pooled)[0], m.mm_projector(cls)[0]
        p = m.mm_projector(feats).contiguous()  # [1, T, 1+N, D]
        delta = self._delta(p) if self.mode == "transformer" else None
        pooled, cls = temporal_pool(p, self.mode, delta=delta, backend=self.pool_backend)
        return pooled[0], cls[0]

    def _delta(self, p: torch.Tensor) -> torch.Tensor:
        """The temporal encoder's last-frame output for projected tokens p [1, T, 1+N, D] -> [1, N, D]."""
        temporal = self.model.temporal
        _, t, n1, d = p.shape
        x = p[0, :, 1:].transpose(0, 1)  # [N, T, D]: each patch's frames are a sequence
        if t > temporal.position_matrix.shape[0]:
            raise ValueError(f"{t} frames exceed the temporal transformer's {temporal.position_matrix.shape[0]} positions")
        delta = temporal.transformer_delta_encoder(x + temporal.position_matrix[:t].to(x.dtype))[:, -1]
        return delta.reshape(1, n1 - 1, d).contiguous()
