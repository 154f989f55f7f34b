"""Vision backends: video frames -> the visual tokens the LLM splices in, (pooled [N, D], frames [T, D]).

Every backend has the same three members, and the runtime calls nothing else:
* `name`: what `Answer.backends["vision"]` reports;
* `preprocess(frames)`: uint8 [T, H, W, 3] RGB video frames -> the backend's own input;
* `visual_tokens(x)`: that input -> (pooled [N, D], frames [T, D]) as NumPy float32 arrays.

Backends, and the one place that chooses between them (`pick_vision`, with the $VALLEY_RT_VISION
override for tests, like the pooling kernel's `pick_backend`):
* "onnx-cpu" / "onnx-cuda" / "onnx-tensorrt" (`OnnxVision`, this module, no torch): an engine's
  vision graph under ONNX Runtime's CPU provider, the fp16 CUDA graph, or the unfused graph under
  TensorRT fp16 (ENGINE/gpu/, written when the engine was exported on a CUDA machine). The graph
  takes uint8 crops and normalizes inside, so the host only resizes and crops.
* "openvino-cpu" (`backends.openvino_vision.OpenVinoVision`, no torch, the optional `[openvino]`
  extra): the engine's OpenVINO IR (ENGINE/openvino/, bf16 or NNCF int8 on AMX / AVX512-BF16 / VNNI),
  when the export measured it faster than ONNX Runtime at cosine >= 0.999 (manifest "vision_cpu").
  Without the openvino package, or on a CPU that lacks the ISA the variant needs, the engine falls
  back to its ONNX Runtime graph with a one-line notice on stderr.
* "native-cpu" (`backends.native_vision.NativeVision`, no torch): an int8 engine's ViT encoder in native
  code on the CPU's AMX tiles, with the ONNX graph's own int8 weights; chosen over the graphs above on
  CPUs with usable AMX tiles (`native_vision.native_policy`; $VALLEY_RT_VISION_NATIVE=off keeps the
  graphs). Where the graph's layout is not the one it computes, the engine opens its graph instead.
* "torch" (`TorchVision`): the reference model's modules on a GPU, temporal pooling through
  `valley_rt.kernels.temporal_pool` (its dispatch picks the fused Triton kernel on CUDA and the torch
  reference on CPU) and the projector. Mean and importance pool the raw features before the projector
  (importance with the projector folded into the score weights); max and transformer pool projected
  tokens. It also takes float pixel_values [T, 3, crop, crop] already normalized.
* "reference" (`ReferenceVision`): exactly the original (every frame decoded, PIL preprocessing, the
  reference pooling): the truth the others are tested against.
The torch backends import torch when they are built, so this module imports without it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from valley_rt.config import ValleyConfig
from valley_rt.engine_format import VISION_FILE, VISION_INPUT, VISION_OUTPUTS, artifact_path
from valley_rt.errors import EngineError, ValleyError

if TYPE_CHECKING:
    import torch

VISION_BACKENDS = ("onnx-cpu", "openvino-cpu", "native-cpu", "onnx-cuda", "onnx-tensorrt", "torch", "reference")
ENGINE_BACKENDS = ("onnx-cpu", "openvino-cpu", "native-cpu", "onnx-cuda", "onnx-tensorrt")
VISION_ENV = "VALLEY_RT_VISION"  # override of the dispatch, e.g. onnx-cpu on a GPU machine
DEVICES = ("auto", "cpu", "cuda")


def _no_grad(fn):
    """torch.no_grad for the torch backends' methods, importing torch only when they run."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


# -- the ONNX Runtime backend ---------------------------------------------------------------------------
def as_crops(frames, cfg: ValleyConfig) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, crop, crop, 3] contiguous (resize + centre crop when not already crops)."""
    from valley_rt.video import resize_crop

    arr = np.asarray(frames.cpu() if hasattr(frames, "cpu") else frames)  # a torch tensor is read on the host
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    c = cfg.preprocess.crop_size
    if arr.shape[1:3] != (c, c):
        arr = resize_crop(arr, cfg.preprocess)
    return np.ascontiguousarray(arr)


class OnnxVision:
    """An engine's vision graph in an ONNX Runtime session."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, cfg: ValleyConfig, *, threads: int | None = None, providers: list | None = None):
        from valley_rt.backends.ort_session import vision_session

        self.cfg = cfg
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: vision graph missing")
        self._input, self._outputs = VISION_INPUT, list(VISION_OUTPUTS)
        self.session = vision_session(self.path, threads=threads, providers=providers)
        self.providers = self.session.get_providers()

    @classmethod
    def from_engine(cls, engine_dir: str | Path, *, manifest: dict | None = None, verify: bool = True,
                    threads: int | None = None, device: str = "auto") -> "OnnxVision":
        """Load ENGINE's vision graph (manifest checked) for `device`, as `pick_vision` chooses."""
        from valley_rt.backends.native_vision import native_policy
        from valley_rt.engine_format import load_manifest

        manifest = manifest or load_manifest(engine_dir, verify=verify)
        name = pick_vision("engine", device=device, gpu=manifest.get("gpu"), cpu=manifest.get("vision_cpu"),
                           native=native_policy(manifest))
        return open_engine_vision(engine_dir, manifest, name, threads=threads)

    def preprocess(self, frames) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> uint8 crops [T, crop, crop, 3] (the graph normalizes)."""
        return as_crops(frames, self.cfg)

    def encode(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames [T, H, W, 3] -> (pooled [N, D], frames [T, D]) float32. Float pixel values are
        refused (the graph normalizes itself)."""
        pooled, frame_tokens = self.session.run(self._outputs, {self._input: as_crops(frames, self.cfg)})
        return pooled, frame_tokens

    visual_tokens = encode  # crops pass through as_crops unchanged


class TorchVision:
    """The reference model's vision stage, with fused temporal pooling (Triton on CUDA, torch on CPU)."""

    name = "torch"

    def __init__(self, model, *, pool_backend: str | None = None):
        self.model = model.eval()
        self.cfg = model.cfg
        self.mode = self.cfg.temporal.mode
        self.pool_backend = pool_backend  # None: temporal_pool's own dispatch
        self._score = None
        if self.mode == "importance":
            w, b = folded_importance_score(model)  # w' [N, C] fp32
            self._score = (w.to(model.mm_projector.weight.dtype).contiguous(), b)

    @property
    def device(self) -> torch.device:
        return self.model.mm_projector.weight.device

    def pixel_values(self, frames) -> torch.Tensor:
        """uint8 frames -> normalized float [T, 3, crop, crop]; float pixel values pass through."""
        import torch

        from valley_rt.video import normalize

        if isinstance(frames, torch.Tensor) and frames.is_floating_point():
            if frames.dim() != 4 or frames.shape[1] != 3:
                raise ValueError(f"pixel_values must be [T, 3, H, W], got {list(frames.shape)}")
            return frames
        return normalize(as_crops(frames, self.cfg), self.cfg.preprocess)

    def preprocess(self, frames) -> torch.Tensor:
        return self.pixel_values(frames)

    def visual_tokens(self, x) -> tuple[np.ndarray, np.ndarray]:
        """The runtime's boundary: encode, then float32 NumPy on the host."""
        return tuple(t.float().cpu().numpy() for t in self.encode(x))

    @_no_grad
    def encode(self, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """frames -> (pooled [N, D], frames [T, D]) in the model's dtype, on its device."""
        from valley_rt.kernels.temporal_pool import temporal_pool

        m, dtype = self.model, self.model.mm_projector.weight.dtype
        x = self.pixel_values(frames).to(self.device, dtype)[None]  # [1, T, 3, H, W]
        feats = m.vision_features(x).contiguous()  # [1, T, 1+N, C]
        if self.mode in ("mean", "importance"):
            pooled, cls = pool_before_projector(feats, self.mode, m.mm_projector, score=self._score,
                                                backend=self.pool_backend)
            return pooled[0], cls[0]
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


def folded_importance_score(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance scores on raw features: (w' [N, C], b' scalar), fp32, the projector folded in
    (`kernels.temporal_pool.fold_importance_weights`)."""
    import torch

    from valley_rt.kernels.temporal_pool import fold_importance_weights

    pool, proj = model.temporal.pooling_layer, model.mm_projector
    bias = proj.bias if proj.bias is not None else torch.zeros(proj.out_features, device=proj.weight.device)
    return fold_importance_weights(pool.weight.detach(), pool.bias.detach(), proj.weight.detach(), bias.detach())


def pool_before_projector(feats: torch.Tensor, mode: str, projector, *, score=None,
                          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean / importance pooling on the raw vision features, then the projector: the one definition
    TorchVision runs and the ONNX vision graph traces (export/onnx_vision.py, backend "reference").

    feats [B, T, 1+N, C] -> (pooled [B, N, D], frame tokens [B, T, D]). Both modes commute with the
    affine projector (the softmax weights of importance sum to one), so N rows go through it instead
    of T*N. score: (w' [N, C], b') from `folded_importance_score`, for importance. backend:
    `temporal_pool`'s (None: its own dispatch, the Triton kernel on CUDA)."""
    from valley_rt.kernels.temporal_pool import temporal_pool

    if mode not in ("mean", "importance"):
        raise ValueError(f"only mean and importance pooling commute with the projector, got {mode!r}")
    kw = {"score_weight": score[0], "score_bias": score[1]} if mode == "importance" else {}
    pooled, cls = temporal_pool(feats, mode, backend=backend, **kw)  # C-wide
    return projector(pooled), projector(cls)


class ReferenceVision:
    """The PyTorch reference's vision stage on frames preprocessed exactly as the original (PIL)."""

    name = "torch-reference"

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> normalized float [T, 3, crop, crop] (PIL resize, as the original)."""
        from valley_rt.video import preprocess

        return preprocess(frames, self.cfg.preprocess)

    @_no_grad
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.model.mm_projector.weight
        pooled, frame_tokens = self.model.encode_video(pixels[None].to(weight.device, weight.dtype))
        return pooled[0], frame_tokens[0]

    def visual_tokens(self, pixels) -> tuple[np.ndarray, np.ndarray]:
        return tuple(t.float().cpu().numpy() for t in self.encode(pixels))


# -- the dispatch -------------------------------------------------------------------------------------
def engine_gpu_backend(gpu: dict | None) -> str | None:
    """The GPU vision backend an engine's manifest "gpu" entry allows here, or None."""
    from valley_rt.backends.ort_session import available_providers

    providers = available_providers()
    gpu = gpu or {}
    if gpu.get("trt") and "TensorrtExecutionProvider" in providers:
        return "onnx-tensorrt"
    if gpu.get("vision") and "CUDAExecutionProvider" in providers:
        return "onnx-cuda"
    return None


def torch_cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False without torch: the checkpoint paths need it anyway).

    On Linux without the NVIDIA driver (/proc/driver/nvidia) the answer is False without importing
    torch, which alone costs over a second: the engine path on a CPU never pays it."""
    if sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def engine_cpu_backend(cpu: dict | None, *, notice=None) -> str:
    """The CPU vision backend for an engine whose manifest "vision_cpu" entry is `cpu`: openvino-cpu
    when the export chose OpenVINO, the package imports and this CPU has the ISA the chosen variant
    needs (`openvino_vision.variant_suits`); else onnx-cpu, with one line to `notice` (default:
    stderr) saying why, when OpenVINO had been chosen."""
    from valley_rt.backends.openvino_vision import openvino_available, variant_suits
    from valley_rt.cpu import isa_class

    if not cpu or cpu.get("backend") != "openvino":
        return "onnx-cpu"
    say = notice or (lambda line: print(line, file=sys.stderr))
    variant, isa = cpu.get("variant", "?"), isa_class()
    if not openvino_available():
        say(f"valley-rt: this engine's fastest CPU vision graph is OpenVINO {variant}, but openvino is not "
            f"installed (pip install 'valley-rt[openvino]'); using its ONNX Runtime graph")
        return "onnx-cpu"
    if not variant_suits(variant, isa):
        say(f"valley-rt: this engine's OpenVINO {variant} vision graph was chosen on a {cpu.get('isa')} CPU; "
            f"this CPU is {isa}, without the matrix units it needs; using the ONNX Runtime graph")
        return "onnx-cpu"
    return "openvino-cpu"


def pick_vision(kind: str, *, device: str = "auto", reference: bool = False, gpu: dict | None = None,
                backend: str | None = None, cpu: dict | None = None, native: bool = False) -> str:
    """The one dispatch point for the vision stage (and so for the whole path: the LLM follows it).

    kind: "engine" (an exported folder) or "checkpoint". device: "auto" / "cpu" / "cuda". gpu, cpu:
    an engine manifest's "gpu" and "vision_cpu" entries; native: `native_vision.native_policy` of the
    engine's manifest. backend: explicit choice, else $VALLEY_RT_VISION, else:
      engine:     cpu -> native-cpu when `native`, else the CPU graph (`engine_cpu_backend`: openvino-cpu
                  when the export chose it and this machine can run it, else onnx-cpu); auto / cuda -> the
                  GPU graph when the engine has one and ONNX Runtime has its provider, else the CPU choice
                  above (cuda also runs the LLM in CUDA graphs, so it needs torch to see a GPU).
      checkpoint: reference -> reference; cuda (or auto with a CUDA GPU) -> torch;
                  otherwise onnx-cpu, i.e. the checkpoint must first be exported to an engine.
    """
    if device not in DEVICES:
        raise ValleyError(f"--device must be auto, cpu or cuda, got {device!r}")
    if kind not in ("engine", "checkpoint"):
        raise ValueError(f"kind must be engine or checkpoint, got {kind!r}")
    if reference and kind == "engine":
        raise EngineError("--reference needs a checkpoint folder, this is an engine folder")
    choice = backend or (None if reference else os.environ.get(VISION_ENV)) or None
    if choice is not None:
        if choice not in VISION_BACKENDS:
            raise ValleyError(f"vision backend must be one of {', '.join(VISION_BACKENDS)} "
                              f"(argument or ${VISION_ENV}), got {choice!r}")
        if kind == "engine" and choice not in ENGINE_BACKENDS:
            raise EngineError(f"vision backend {choice}: needs a checkpoint folder, this is an engine folder")
        return choice
    if reference:
        return "reference"
    if kind == "engine":
        if device == "cpu":
            return "native-cpu" if native else engine_cpu_backend(cpu)
        if device == "cuda" and not torch_cuda_available():  # the engine's LLM runs in CUDA graphs (llm_cuda)
            raise EngineError("--device cuda: torch sees no CUDA GPU on this machine")
        # the GPU vision graph when the engine has one and ONNX Runtime its provider, else the CPU one
        return engine_gpu_backend(gpu) or ("native-cpu" if native else engine_cpu_backend(cpu))
    if device == "cpu":
        return "onnx-cpu"
    cuda = torch_cuda_available()
    if device == "cuda" and not cuda:
        raise ValleyError("--device cuda: torch sees no CUDA GPU on this machine")
    return "torch" if cuda else "onnx-cpu"


def open_engine_vision(engine_dir: str | Path, manifest: dict, name: str, *, threads: int | None = None):
    """The engine's vision stage for backend `name` (native-cpu / onnx-cpu / openvino-cpu / onnx-cuda /
    onnx-tensorrt). native-cpu, where the graph's layout declines it, opens the engine's CPU graph instead
    (its `native_declined` says why), unless $VALLEY_RT_VISION asked for native-cpu: then an EngineError."""
    from valley_rt.backends.ort_session import gpu_providers

    engine_dir = Path(engine_dir)
    cfg = ValleyConfig.from_dict(manifest["config"])
    gpu = manifest.get("gpu") or {}
    crop = cfg.preprocess.crop_size
    if name == "native-cpu":
        from valley_rt.backends.native_vision import NativeVision

        graph = artifact_path(engine_dir, manifest.get("files", {}).get("vision", VISION_FILE), where="files.vision")
        vision, why = NativeVision.open(graph, cfg, threads=threads)
        if vision is not None:
            return vision
        if os.environ.get(VISION_ENV) == "native-cpu":
            raise EngineError(f"{engine_dir}: vision backend native-cpu cannot run: {why}")
        vision = open_engine_vision(engine_dir, manifest, engine_cpu_backend(manifest.get("vision_cpu")),
                                    threads=threads)
        vision.native_declined = why
        return vision
    if name == "onnx-tensorrt":
        # the unfused graph under TensorRT fp16, engine from the cache built at export
        vision = OnnxVision(artifact_path(engine_dir, gpu["trt"], where="gpu.trt"), cfg, threads=threads,
                            providers=gpu_providers(artifact_path(engine_dir, gpu["trt_cache"], where="gpu.trt_cache"),
                                                    crop))
        vision.name = "onnxruntime-tensorrt-fp16"
    elif name == "onnx-cuda":
        vision = OnnxVision(artifact_path(engine_dir, gpu["vision"], where="gpu.vision"), cfg, threads=threads,
                            providers=gpu_providers(None, crop))
        vision.name = "onnxruntime-cuda-fp16"
    elif name == "openvino-cpu":
        from valley_rt.backends.openvino_vision import OpenVinoVision

        cpu = manifest.get("vision_cpu") or {}
        if cpu.get("backend") != "openvino" or not cpu.get("file"):
            raise EngineError(f"{engine_dir / 'manifest.json'}: vision backend openvino-cpu, but this engine has "
                              f"no OpenVINO vision graph (export it with openvino installed)")
        vision = OpenVinoVision(artifact_path(engine_dir, cpu["file"], where="vision_cpu.file"), cfg,
                                variant=cpu.get("variant", "fp32"), threads=threads, cache=True)
    elif name == "onnx-cpu":
        vision = OnnxVision(artifact_path(engine_dir, manifest.get("files", {}).get("vision", VISION_FILE),
                                          where="files.vision"), cfg, threads=threads)
        vision.name = f"onnxruntime-{manifest.get('precision', {}).get('vision', '?')}"
    else:
        raise ValueError(f"{name}: not an engine vision backend")
    return vision
