"""NVIDIA: fp16 vision engines through onnxruntime-gpu (TensorRT / CUDA execution providers) or TensorRT's
own builder.

UNVERIFIED: this project's machine has no GPU, no onnxruntime-gpu and no tensorrt, so nothing here has run.
Tests (tests/test_export_vision.py) skip it with that reason; the README says so.

Two artifacts, both from the same traced graph as the CPU engine (onnx_vision.export_raw):
* `gpu/vision_fp16.onnx`: ONNX Runtime's transformer fusions for GPU (`use_gpu=True`), weights converted
  to fp16 with fp32 inputs/outputs kept (`keep_io_types`; the uint8 input is untouched), LayerNorm and
  Softmax left in fp32 by the converter's op block list. It runs on the CUDA EP as is.
* TensorRT EP over the *unfused* fp32 graph (`gpu/vision_trt.onnx`) with `trt_fp16_enable`: TensorRT does
  its own fusion, and the com.microsoft fused ops of the CPU graph would otherwise split the graph into
  TensorRT and CUDA partitions. Its engine is built at export time, with one optimization profile
  covering 1..64 frames (opt 8), and cached in `gpu/trt_cache/` (part of the engine folder and of the
  manifest), so the first request does not pay the build.
`build_native_engine` builds the same profile with the `tensorrt` Python builder into a serialized plan,
for deployments without ONNX Runtime.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from valley_rt.config import ValleyConfig

from valley_rt.backends.ort_session import gpu_providers, gpu_providers_available  # noqa: F401
from valley_rt.engine_format import (FP16_FILE, GPU_DIR, MAX_FRAMES, MIN_FRAMES, OPT_FRAMES,  # noqa: F401
                                     TRT_CACHE, TRT_FILE)


def why_no_gpu() -> str | None:
    """None when a CUDA device and onnxruntime-gpu are usable, else the reason (for skips and messages)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


def providers(cache_dir: str | Path | None, cfg: ValleyConfig) -> list:
    """TensorRT (fp16, engine cache, profile 1..64 frames) then CUDA then CPU, for InferenceSession."""
    return gpu_providers(cache_dir, cfg.preprocess.crop_size)


def export_fp16(raw: str | Path, dst: str | Path, cfg: ValleyConfig) -> dict[str, int]:
    """GPU fusions + fp16 weights (fp32 I/O) of the traced graph `raw`; returns the fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    v = cfg.vision
    opt = optimize_model(str(raw), model_type="clip", num_heads=v.num_heads, hidden_size=v.hidden_size,
                         opt_level=0, use_gpu=True)
    opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(dst))
    return {k: int(n) for k, n in opt.get_fused_operator_statistics().items() if n}


def export_gpu(model, raw: str | Path, engine_dir: str | Path, *, frames: int = 8) -> dict:
    """Write gpu/ into an engine folder being built and measure its parity; returns the manifest's "gpu" entry.

    raw: the traced, unfused fp32 graph (onnx_vision.export_raw). Needs a CUDA machine (why_no_gpu()).
    """
    from valley_rt.export.onnx_vision import parity, sample_crops, session

    reason = why_no_gpu()
    if reason:
        raise RuntimeError(f"GPU export: {reason}")
    cfg = model.cfg
    gpu = Path(engine_dir) / GPU_DIR
    (gpu / TRT_CACHE).mkdir(parents=True, exist_ok=True)
    fusions = export_fp16(raw, gpu / FP16_FILE, cfg)
    shutil.copy2(raw, gpu / TRT_FILE)
    crops = sample_crops(cfg, frames, seed=1)
    entry: dict = {"vision": f"{GPU_DIR}/{FP16_FILE}", "fusions_gpu": fusions}
    cuda = session(gpu / FP16_FILE, providers=providers(None, cfg))
    entry["parity_cuda_fp16"] = parity(model, cuda, crops)
    del cuda
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        trt = session(gpu / TRT_FILE, providers=providers(gpu / TRT_CACHE, cfg))  # builds the engine
        for t in (MIN_FRAMES, OPT_FRAMES, MAX_FRAMES):  # every profile corner runs once at export
            trt.run(None, {"crops": sample_crops(cfg, t, seed=t)})
        entry.update({"trt": f"{GPU_DIR}/{TRT_FILE}", "trt_cache": f"{GPU_DIR}/{TRT_CACHE}",
                      "parity_trt_fp16": parity(model, trt, crops),
                      "profile_frames": [MIN_FRAMES, OPT_FRAMES, MAX_FRAMES]})
    return entry


def build_native_engine(onnx_path: str | Path, plan_path: str | Path, cfg: ValleyConfig, *,
                        workspace_gib: float = 4.0) -> Path:
    """TensorRT's own builder: fp16, one profile over 1..64 frames, serialized to plan_path."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 1024**3))
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    c = cfg.preprocess.crop_size
    profile.set_shape("crops", (MIN_FRAMES, c, c, 3), (OPT_FRAMES, c, c, 3), (MAX_FRAMES, c, c, 3))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path = Path(plan_path)
    plan_path.write_bytes(bytes(plan))
    return plan_path
