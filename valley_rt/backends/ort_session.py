"""ONNX Runtime session set-up shared by the engine's two graphs (and by the exporters' parity checks).

* `llm_session_options`: the LLM graph is decoded at batch 1, ~10 ops per layer per token, so the
  options favour latency: a fixed intra-op pool, spinning threads, basic optimizations only (the
  graph is fused by construction, so session creation stays fast).
* `vision_session`: the vision graph is one big batched run per video; full graph optimizations.
* `gpu_providers`: TensorRT (fp16, engine cache, one profile over MIN..MAX frames) then CUDA then CPU,
  for the GPU vision graphs under ENGINE/gpu/.
"""

from __future__ import annotations

from pathlib import Path

from valley_rt.engine_format import MAX_FRAMES, MIN_FRAMES, OPT_FRAMES, VISION_INPUT


def llm_session_options(threads: int | None = None, spinning: bool = True):
    """ORT options for batch-1 decoding: a fixed thread pool (None: one thread per physical core);
    spinning threads cut the wake-up latency between the ~10 ops of each layer (turn off when sharing
    cores with other busy work)."""
    import onnxruntime as ort

    from valley_rt.cpu import default_threads

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The graph is already fused by construction; basic optimizations (constant folding, dead-node
    # removal) are all that is left to do and keep session creation fast.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def vision_session(path: str | Path, *, threads: int | None = None, providers: list | None = None):
    """An InferenceSession over a vision graph with `threads` intra-op threads (None: one per physical
    core; CPU provider by default)."""
    import onnxruntime as ort

    from valley_rt.cpu import default_threads

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def gpu_providers_available() -> bool:
    return "CUDAExecutionProvider" in available_providers()


def _shape(crop_size: int, frames: int) -> str:
    return f"{VISION_INPUT}:{frames}x{crop_size}x{crop_size}x3"


def gpu_providers(cache_dir: str | Path | None, crop_size: int) -> list:
    """TensorRT (fp16, engine cache, profile MIN..MAX frames) then CUDA then CPU, for InferenceSession.
    cache_dir None: no TensorRT (the fp16 graph on the CUDA provider)."""
    available = available_providers()
    chain: list = []
    if cache_dir is not None and "TensorrtExecutionProvider" in available:
        chain.append(("TensorrtExecutionProvider", {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True,
            "trt_profile_min_shapes": _shape(crop_size, MIN_FRAMES),
            "trt_profile_opt_shapes": _shape(crop_size, OPT_FRAMES),
            "trt_profile_max_shapes": _shape(crop_size, MAX_FRAMES),
        }))
    if "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
    chain.append("CPUExecutionProvider")
    return chain
