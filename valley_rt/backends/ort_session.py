"""ONNX Runtime session set-up shared by the engine's two graphs (and by the exporters' parity checks).

* `llm_session_options`: the LLM graph is decoded at batch 1, ~10 ops per layer per token, so the
  options favour latency: a fixed intra-op pool, spinning threads, basic optimizations only (the
  graph is fused by construction, so session creation stays fast).
* `vision_session`: the vision graph is one big batched run per video; full graph optimizations,
  done once per machine: `optimized_cpu_session` keeps ORT's optimized graph in the user cache.
* `gpu_providers`: TensorRT (fp16, engine cache, one profile over MIN..MAX frames) then CUDA then CPU,
  for the GPU vision graphs under ENGINE/gpu/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from valley_rt.engine_format import (MAX_FRAMES, MIN_FRAMES, OPT_FRAMES, RACY_NS, VISION_INPUT, cache_root,
                                     file_stat, prune_cache_entries, sha256_file, source_record, touch_entry)
from valley_rt.errors import EngineError


SPIN_KEY = "session.intra_op.allow_spinning"
VISION_SPIN_ENV = "VALLEY_RT_VISION_SPIN"  # "off" (default) or "on": the vision session's threads spin between ops


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
    so.add_session_config_entry(SPIN_KEY, "1" if spinning else "0")
    return so


def vision_spinning() -> bool:
    """$VALLEY_RT_VISION_SPIN: whether the vision session's intra-op threads spin between ops."""
    choice = os.environ.get(VISION_SPIN_ENV, "off")
    if choice not in ("on", "off"):
        raise EngineError(f"{VISION_SPIN_ENV}={choice!r}: expected on or off")
    return choice == "on"


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
    # A few hundred large ops: spinning between them saves little, and where the LLM graphs open on a
    # worker thread at the same time (the first question) spinning threads take its cores.
    opts.add_session_config_entry(SPIN_KEY, "1" if vision_spinning() else "0")
    if not providers or list(providers) == ["CPUExecutionProvider"]:
        return optimized_cpu_session(path, opts)[0]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


# -- ORT's optimized graph, kept per machine ---------------------------------------------------------
OPTIMIZED_DIR = "ort-optimized"  # under $VALLEY_RT_CACHE
OPTIMIZED_MODEL, OPTIMIZED_DATA, OPTIMIZED_STAMP = "model.onnx", "model.onnx.data", "stamp.json"
OPTIMIZED_CACHE_ENV = "VALLEY_RT_ORT_CACHE"  # "on" (default) or "off": always optimize at session creation


def optimized_cpu_session(path: str | Path, opts) -> tuple[object, str]:
    """A CPU InferenceSession over `path` with `opts`' graph optimizations, done once per machine.

    The first call optimizes as usual and has ORT save the optimized graph (weights as external data)
    under $VALLEY_RT_CACHE/ort-optimized/<key>/; later calls open that with optimizations off. The key
    hashes the source file's stat (size, mtime, ctime, inode, device: any write changes ctime), the ORT
    version, the optimization level and the CPU's flags, because an ENABLE_ALL graph may carry kernels
    and layouts chosen for this CPU. The saved files are stamped (stat + sha256) when written; a cache
    whose files changed since, or that ORT cannot open, is rebuilt from the source. ViT-L/14: 1.5 s to
    create the session from the source, 0.9 s from the cache (docs/cpu_latency.md). The stamp names the
    source; writing an entry prunes those whose source is gone or rewritten, or that went unused for
    `engine_format.UNUSED_DAYS` (`prune_cache_entries`).

    Returns (session, how): how is "cached", "written", "rebuilt" or "uncached" (no usable cache folder,
    or VALLEY_RT_ORT_CACHE=off: the plain session)."""
    import onnxruntime as ort

    path = Path(path)
    providers = ["CPUExecutionProvider"]
    choice = os.environ.get(OPTIMIZED_CACHE_ENV, "on")
    if choice not in ("on", "off"):
        raise EngineError(f"{OPTIMIZED_CACHE_ENV}={choice!r}: expected on or off")
    try:
        if choice == "off":
            raise OSError("cache off")
        folder = _optimized_folder(path, opts)
    except OSError:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers), "uncached"
    how = "written"
    if folder.exists() and not (folder / OPTIMIZED_STAMP).is_file():  # not an entry valley-rt wrote: left alone
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers), "uncached"
    if (folder / OPTIMIZED_STAMP).is_file():
        if _stamp_holds(folder):
            cached = _copy_options(opts)
            cached.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                session = ort.InferenceSession(str(folder / OPTIMIZED_MODEL), sess_options=cached, providers=providers)
                touch_entry(folder / OPTIMIZED_STAMP)
                return session, "cached"
            except Exception:  # ORT's own exception types: a cache file ORT cannot read; rebuild it
                pass
        how = "rebuilt"
    shutil.rmtree(folder, ignore_errors=True)  # our own entry (its stamp is there), being rebuilt
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers), "uncached"
    saving = _copy_options(opts)
    saving.optimized_model_filepath = str(tmp / OPTIMIZED_MODEL)
    saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPTIMIZED_DATA)
    saving.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    session = ort.InferenceSession(str(path), sess_options=saving, providers=providers)
    with contextlib.suppress(OSError):  # a cache that cannot be written costs only the next load's optimization
        _write_stamp(tmp, source=path)
        os.replace(tmp, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    prune_cache_entries(folder.parent, OPTIMIZED_STAMP, keep=folder)
    return session, how


def _optimized_folder(path: Path, opts) -> Path:
    import onnxruntime as ort

    from valley_rt.cpu import cpu_flags

    st = path.stat()
    key = json.dumps([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, ort.__version__,
                      int(opts.graph_optimization_level), sorted(cpu_flags())])
    root = cache_root() / OPTIMIZED_DIR
    root.mkdir(parents=True, exist_ok=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:32]


def _copy_options(opts):
    """SessionOptions cannot be copied; the fields these sessions set."""
    import onnxruntime as ort

    out = ort.SessionOptions()
    for name in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "log_severity_level",
                 "execution_mode"):
        setattr(out, name, getattr(opts, name))
    with contextlib.suppress(Exception):  # ORT raises its own error for an entry never set
        out.add_session_config_entry(SPIN_KEY, opts.get_session_config_entry(SPIN_KEY))
    return out


def _write_stamp(folder: Path, source: Path) -> None:
    files = [p.name for p in sorted(folder.iterdir())]
    stamp = {"written_ns": time.time_ns(),
             "files": {n: {"stat": file_stat(folder / n), "sha256": sha256_file(folder / n)} for n in files},
             "source": source_record(source)}
    (folder / OPTIMIZED_STAMP).write_text(json.dumps(stamp))


def _stamp_holds(folder: Path) -> bool:
    """The folder holds exactly the stamped files, unchanged: by stat, or by sha256 when the stat
    differs or is racy (changed within RACY_NS of the stamp, as right after writing). Files that hash
    right are stamped again, so the next call trusts their stat."""
    try:
        stamp = json.loads((folder / OPTIMIZED_STAMP).read_text())
        written, files = int(stamp["written_ns"]), dict(stamp["files"])
        if sorted(files) != sorted(p.name for p in folder.iterdir() if p.name != OPTIMIZED_STAMP):
            return False
        rehashed = False
        for name, entry in files.items():
            now = file_stat(folder / name)
            if now == entry["stat"] and now[2] + RACY_NS < written:
                continue
            if now[0] != entry["stat"][0] or sha256_file(folder / name) != entry["sha256"]:
                return False
            entry["stat"], rehashed = now, True
        if rehashed:
            with contextlib.suppress(OSError):
                tmp = folder / f"{OPTIMIZED_STAMP}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps({**stamp, "written_ns": time.time_ns(), "files": files}))
                os.replace(tmp, folder / OPTIMIZED_STAMP)
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
