"""The GPU vision stage: CLIP tower in fp16 with SDPA, one CUDA graph per frame-count bucket, and the
temporal-pooling kernel writing pooled patch rows and frame rows straight into an embedding buffer.

Frames are encoded independently by the tower, so a graph captured for a bucket of Tb frames serves
any T <= Tb: the pixels are copied into the first T slots of a static [Tb, 3, H, W] input, the graph
replays, and only the first T frames' features are used (the padding frames cost tower time, at most
as much again as needed; buckets are powers of two up to 64). Projector, temporal encoder (transformer
mode) and pooling run eagerly after the graph: their shapes depend on T, and they are a few launches.

Pooling runs on projected tokens, in the original's order (projector, then pool), so the kernel's rows
are already the LLM's width and go straight to `out` at the caller's row offsets: the pooled patch rows
at patch_offset, the frame rows 2 rows later (<im_end>, <vi_start> between them), as the prompt lays
them out. On the CPU (graphs=False) the same code runs with the kernel's torch twin.

The runtime's GPU path (`load(checkpoint, device="cuda")`) encodes through `visual_tokens`: a video's
visual tokens are cached per video (chat turns, the server's encoder cache), so it writes into a buffer
laid out as the prompt's visual span [N + 2 + T, D] and copies that to the host once. `encode_into`
writes into any caller's buffer, e.g. a whole prompt's input embeddings (benchmarks/bench_gpu_llm.py).
A graph capture that fails (a driver or library that cannot capture the tower) falls back to the same
code run eagerly, and the backend's name says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from valley_rt.kernels.temporal_pool import VALLEY_GAP, temporal_pool

FRAME_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class CudaVision:
    """Vision tower + projector + temporal module of a ValleyModel (its device and dtype)."""

    def __init__(self, model, *, graphs: bool | None = None, pool_backend: str | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.mode = self.cfg.temporal.mode
        self.device = model.mm_projector.weight.device
        self.dtype = model.mm_projector.weight.dtype
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.pool_backend = pool_backend
        self.name = f"torch-{self.device.type}-{str(self.dtype).split('.')[-1]}{'-graphs' if self.graphs else ''}+temporal_pool"
        self._graphs: dict[int, tuple[object, Tensor, Tensor]] = {}  # bucket -> (graph, pixels in, feats out)
        self._score = None
        if self.mode == "importance":  # the original scores projected tokens with Linear(N*D, 1)
            layer = model.temporal.pooling_layer
            n, d = self.cfg.num_patches, self.cfg.llm.hidden_size
            self._score = (layer.weight.reshape(n, d).contiguous(), layer.bias)

    @torch.inference_mode()
    def features(self, pixels: Tensor) -> Tensor:
        """pixels [T, 3, H, W] (normalized) -> tower features [1, T, 1+N, C]."""
        pixels = pixels.to(self.device, self.dtype)
        if not self.graphs:
            return self.model.vision_features(pixels[None])
        t = pixels.shape[0]
        bucket = next((b for b in FRAME_BUCKETS if b >= t), None)
        if bucket is None:
            raise ValueError(f"{t} frames exceed the largest graphed bucket {FRAME_BUCKETS[-1]}")
        if bucket not in self._graphs:
            try:
                self._graphs[bucket] = self._capture(bucket, pixels.shape[1:])
            except RuntimeError as e:  # capture unsupported here: run eagerly from now on
                self.graphs = False
                self.name = self.name.replace("-graphs", "") + " (eager: CUDA graph capture failed)"
                self.capture_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                return self.model.vision_features(pixels[None])
        graph, static_in, static_out = self._graphs[bucket]
        static_in[:t].copy_(pixels)
        graph.replay()
        return static_out[:, :t]

    def _capture(self, bucket: int, frame_shape) -> tuple[object, Tensor, Tensor]:
        static_in = torch.zeros(bucket, *frame_shape, device=self.device, dtype=self.dtype)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture (cuDNN/cuBLAS plans, lazy inits)
            self.model.vision_features(static_in[None])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model.vision_features(static_in[None])
        return graph, static_in, static_out

    @torch.inference_mode()
    def encode_into(self, pixels: Tensor, out: Tensor, *, patch_offset: int, frame_offset: int | None = None) -> None:
        """Encode pixels [T, 3, H, W] and write the N pooled rows at out[patch_offset:] and the T frame
        rows at out[frame_offset:] (default patch_offset + N + 2), out [S, D] or [1, S, D] in any float dtype."""
        buf = out if out.dim() == 3 else out[None]
        feats = self.features(pixels)  # [1, T, 1+N, C]
        p = self.model.mm_projector(feats).contiguous()  # [1, T, 1+N, D]
        kw = {}
        if self.mode == "transformer":
            kw["delta"] = self._delta(p)
        elif self.mode == "importance":
            kw["score_weight"], kw["score_bias"] = self._score
        temporal_pool(p, self.mode, out=buf, patch_offset=patch_offset, frame_offset=frame_offset,
                      backend=self.pool_backend, **kw)

    def pixel_values(self, frames) -> Tensor:
        """uint8 frames -> normalized float [T, 3, crop, crop]; float pixel values pass through."""
        from valley_rt.backends.vision import TorchVision

        return TorchVision.pixel_values(self, frames)

    preprocess = pixel_values  # the runtime's preprocessing step

    def visual_tokens(self, x):
        """The runtime's boundary: encode, then float32 NumPy on the host."""
        return tuple(t.float().cpu().numpy() for t in self.encode(x))

    def encode(self, frames) -> tuple[Tensor, Tensor]:
        """frames -> (pooled [N, D], frames [T, D]) in the model's dtype, on its device, via encode_into."""
        pixels = self.pixel_values(frames)  # normalized [T, 3, H, W]
        n, t = self.cfg.num_patches, pixels.shape[0]
        buf = torch.empty(1, n + VALLEY_GAP + t, self.cfg.llm.hidden_size, device=self.device, dtype=self.dtype)
        self.encode_into(pixels, buf, patch_offset=0)
        return buf[0, :n], buf[0, n + VALLEY_GAP:]

    def _delta(self, p: Tensor) -> Tensor:
        from valley_rt.backends.vision import TorchVision

        return TorchVision._delta(self, p)
