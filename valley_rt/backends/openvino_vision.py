"""The engine's vision graph under OpenVINO's CPU plugin (the optional `[openvino]` extra; no torch).

OpenVINO's CPU plugin runs bf16 matrix products on AMX-BF16 / AVX512-BF16 and int8 ones (the FakeQuantize
nodes NNCF's post-training quantization inserts) on AMX-INT8 / VNNI, with its own attention and
layer-norm fusions; ONNX Runtime's CPU provider has no bf16 GEMM on x86 and quantizes activations
dynamically (one scale per tensor, computed per run). The graph is an OpenVINO IR (ENGINE/openvino/
vision.xml + .bin) converted at export from the same traced ONNX graph as ENGINE/vision.onnx, with the
same input (uint8 crops [T, H, W, 3]) and outputs (pooled [N, D], frames [T, D]).

Precision: the IR's own weights (fp32, or int8 with FakeQuantize) plus an inference-precision hint:
"bf16" lets the plugin run the remaining floating-point ops in bf16 (its default on AMX CPUs), "f32"
keeps them in fp32. The hint the export measured is stored in the manifest ("vision_cpu").

Compiling an IR for the CPU plugin (its transformations and weight layouts; ~2.2-2.7 s for the int8
ViT-L/14 on 2 cores) is done once per machine: the engine's graph is compiled with OpenVINO's own
model cache in $VALLEY_RT_CACHE/openvino/<key of the IR file's stat>/ (inside, OpenVINO keys its blob
by the model, the device and the settings), and a later load reads the compiled blob (~0.3-0.5 s).
A new entry prunes those whose IR is gone or rewritten (`engine_format.prune_cache_entries`).
`VALLEY_RT_OV_CACHE=off` compiles from the IR every time; an unusable cache folder does the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from valley_rt.config import ValleyConfig
from valley_rt.engine_format import (VISION_INPUT, VISION_OUTPUTS, cache_root, prune_cache_entries, source_record,
                                     touch_entry)
from valley_rt.errors import EngineError

HINTS = ("f32", "bf16")
# variant -> (the IR's weights, the inference-precision hint): what the manifest's "vision_cpu" names
VARIANTS = {"fp32": ("fp32", "f32"), "bf16": ("fp32", "bf16"), "int8": ("int8", "f32"), "int8-bf16": ("int8", "bf16")}
# The variants worth measuring on each ISA class (`valley_rt.cpu.isa_class`), in the order the export
# tries them. bf16 needs bf16 dot products (AMX-BF16 or AVX512-BF16: elsewhere OpenVINO ignores the hint
# and runs fp32); int8 needs int8 dot products (AMX-INT8 or VNNI: without them int8 runs on plain
# AVX2 multiplies, no faster than fp32). fp32 is the floor everywhere.
CANDIDATES = {
    "amx": ("bf16", "int8", "int8-bf16"),
    "avx512_bf16": ("bf16", "int8", "int8-bf16"),
    "vnni": ("int8",),
    "avx2": ("fp32",),
    "other": ("fp32",),
}
_NEEDS = {"bf16": ("amx", "avx512_bf16"), "int8": ("amx", "avx512_bf16", "vnni")}


def openvino_available() -> bool:
    """Whether the `openvino` package imports (the `[openvino]` extra)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def variant_suits(variant: str, isa: str) -> bool:
    """Whether a CPU of ISA class `isa` has the matrix units `variant` was chosen for: its bf16 hint
    needs bf16 dot products, its int8 weights int8 dot products (else it would run slower than ONNX
    Runtime's graph, which the export measured against on the exporting CPU)."""
    if variant not in VARIANTS:
        return False
    weights, hint = VARIANTS[variant]
    return all(isa in _NEEDS[need] for need, on in (("int8", weights == "int8"), ("bf16", hint == "bf16")) if on)


CACHE_ENV = "VALLEY_RT_OV_CACHE"  # "on" (default) or "off": compile the IR at every load
CACHE_DIR, CACHE_MARKER = "openvino", "source.json"  # $VALLEY_RT_CACHE/openvino/<key>/source.json


def compiled_cache_dir(path: str | Path) -> Path | None:
    """The folder where OpenVINO keeps the compiled form of the IR at `path`, or None when the cache is
    off or the folder cannot be made. A new folder records its IR and prunes the entries of IRs that
    are gone or rewritten; a used one is marked used."""
    if os.environ.get(CACHE_ENV, "on").lower() == "off":
        return None
    root = cache_root() / CACHE_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
        record = source_record(Path(path))
        folder = root / hashlib.sha256(json.dumps(record).encode()).hexdigest()[:32]
        marker = folder / CACHE_MARKER
        if marker.is_file():
            touch_entry(marker)
        else:
            folder.mkdir(exist_ok=True)
            tmp = folder / f"{CACHE_MARKER}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"source": record}))
            os.replace(tmp, marker)
            prune_cache_entries(root, CACHE_MARKER, keep=folder)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def compile_vision(path: str | Path, *, hint: str = "f32", threads: int | None = None, cache: bool = False):
    """An OpenVINO CompiledModel for the CPU over an IR (.xml) or ONNX file, latency-oriented: one
    inference stream of `threads` threads (None: one per physical core), no core pinning (the CPU may
    be shared with other processes). cache: through OpenVINO's model cache (`compiled_cache_dir`)."""
    import openvino as ov

    from valley_rt.cpu import default_threads

    if hint not in HINTS:
        raise ValueError(f"OpenVINO precision hint must be one of {HINTS}, got {hint!r}")
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads or default_threads(),
        "INFERENCE_PRECISION_HINT": hint,
        "ENABLE_CPU_PINNING": False,
    }
    folder = compiled_cache_dir(path) if cache else None
    core = ov.Core()
    if folder is not None:
        # from the path, so that a cache hit skips reading the IR as well as compiling it
        return core.compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(folder)})
    return core.compile_model(core.read_model(str(path)), "CPU", config)


class OpenVinoVision:
    """An engine's OpenVINO vision graph; the same members as `backends.vision.OnnxVision`."""

    def __init__(self, path: str | Path, cfg: ValleyConfig, *, variant: str = "fp32", threads: int | None = None,
                 cache: bool = False):
        self.cfg = cfg
        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: OpenVINO vision graph missing")
        if not openvino_available():
            raise EngineError(f"{self.path}: an OpenVINO vision graph, but openvino is not installed "
                              f"(pip install 'valley-rt[openvino]')")
        if variant not in VARIANTS:
            raise EngineError(f"{self.path}: OpenVINO vision variant {variant!r}, expected one of {', '.join(VARIANTS)}")
        self.compiled = compile_vision(self.path, hint=VARIANTS[variant][1], threads=threads, cache=cache)
        self.request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output(name) for name in VISION_OUTPUTS]
        self.name = f"openvino-{variant}"

    def preprocess(self, frames) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> uint8 crops [T, crop, crop, 3] (the graph normalizes)."""
        from valley_rt.backends.vision import as_crops

        return as_crops(frames, self.cfg)

    def encode(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames [T, H, W, 3] -> (pooled [N, D], frames [T, D]) float32 (copies: the request's
        output buffers are reused by the next call)."""
        from valley_rt.backends.vision import as_crops

        result = self.request.infer({VISION_INPUT: as_crops(frames, self.cfg)})
        # 2-D as declared: the CPU plugin may hand an NNCF int8 graph's frame tokens back as [1, T, D]
        pooled, frame_tokens = (np.array(result[o], dtype=np.float32).reshape(-1, result[o].shape[-1])
                                for o in self._outputs)
        return pooled, frame_tokens

    visual_tokens = encode
