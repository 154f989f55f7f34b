"""OpenVINO IRs of the vision graph (the `[openvino]` extra): fp32, and int8 by NNCF post-training
quantization, converted from the traced (unfused) ONNX graph that `onnx_vision.export_raw` writes.

The unfused graph, not ORT's fused one: OpenVINO reads ONNX Runtime's contrib ops only in part, and its
own transformations fuse the attention, layer norms and GELU of the plain graph for its CPU plugin.

int8: NNCF's `ModelType.TRANSFORMER` scheme (int8 weights per output channel, int8 activations per
tensor with static scales from calibration frames, softmax and layer norms left in floating point),
with the patch embedding and the projector in floating point too (`float_scope`), first without
SmoothQuant and then with it (`INT8_SETTINGS`). Static scales come from the calibration clips: with
random weights and synthetic crops they are only as good as those crops, so the export keeps int8
only at cosine >= 0.999 per token against the PyTorch reference on held-out crops
(`onnx_vision.INT8_MIN_COSINE`), trying the next setting when one misses it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from valley_rt.engine_format import VISION_INPUT


def save_ir(model, dst: str | Path) -> Path:
    """Write an ov.Model as dst (.xml) + .bin, weights kept at their precision (no fp16 compression)."""
    import openvino as ov

    dst = Path(dst)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst


def convert_fp32(raw: str | Path, dst: str | Path) -> Path:
    """The traced ONNX graph as an fp32 IR (the bf16 variant is this IR with a bf16 hint)."""
    import openvino as ov

    return save_ir(ov.convert_model(str(raw)), dst)


# NNCF settings the export tries in turn, keeping the first whose graph passes the cosine bar.
# Without SmoothQuant first. Worst per-token cosine on the ViT-L/14 bench tower (random weights):
# NNCF's transformer defaults (SmoothQuant, every linear quantized) 0.992; without SmoothQuant 0.9988;
# without it and with `float_scope` in floating point 0.9996. A tower whose activations have outlier
# channels (as trained CLIP towers often do) may need SmoothQuant, the second setting.
INT8_SETTINGS = ("no-smoothquant", "smoothquant")


def float_scope(model) -> list[str]:
    """The ops kept in floating point in the int8 graph: the patch embedding (its input is the
    normalized image, its output every token's start) and the projector (its output is what the LLM
    reads). Together under 1 % of the tower's FLOPs."""
    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "Convolution"
            or (op.get_type_name() == "MatMul" and op.get_friendly_name().startswith("/mm_projector"))]


def quantize_int8(raw: str | Path, dst: str | Path, calibration: list[np.ndarray],
                  setting: str = INT8_SETTINGS[0]) -> Path:
    """NNCF static int8 of the traced ONNX graph; calibration: uint8 crops [T, H, W, 3] clips;
    setting: one of INT8_SETTINGS."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    if setting not in INT8_SETTINGS:
        raise ValueError(f"int8 setting {setting!r}: expected one of {', '.join(INT8_SETTINGS)}")
    model = ov.convert_model(str(raw))
    dataset = nncf.Dataset(calibration, lambda crops: {VISION_INPUT: crops})
    advanced = None
    if setting == "no-smoothquant":
        advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)  # its INFO lines (one per op left in float) are not the export's progress
    try:
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout carries the command's JSON
            quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(calibration), fast_bias_correction=True,
                                      ignored_scope=nncf.IgnoredScope(names=float_scope(model)),
                                      advanced_parameters=advanced)
    finally:
        log.setLevel(level)
    return save_ir(quantized, dst)


# -- the engine's choice -------------------------------------------------------------------------------
CPU_VISION = ("auto", "openvino", "onnxruntime")
# "auto" measures OpenVINO only for towers of at least this many FLOPs per frame: below it the vision
# stage takes milliseconds on any backend, less than NNCF's calibration costs the export.
AUTO_MIN_FRAME_FLOPS = 1e9


def installed() -> str | None:
    """None when openvino and nncf both import, else what is missing (the `[openvino]` extra)."""
    missing = []
    for name in ("openvino", "nncf"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return None if not missing else f"{' and '.join(missing)} not installed (pip install 'valley-rt[openvino]')"


def choose_cpu_vision(model, raw: str | Path, out_dir: str | Path, *, ort_path: str | Path, ort_precision: str,
                      frames: int = 8, timing_repeats: int = 2, isa: str | None = None, force: bool = False,
                      calibration_clips: int = 3, calibration_frames: int = 4) -> dict:
    """Measure, on this CPU, the OpenVINO variants its ISA class allows (`CANDIDATES`) against the
    engine's ONNX Runtime graph (ort_path, already chosen by `onnx_vision.export_vision`), each on the
    same `frames` sample crops: parity vs the PyTorch reference (worst per-token cosine over those
    crops and a one-frame clip) and best-of-`timing_repeats` ms after a warm-up, one variant in
    memory at a time. The fastest variant at cosine >= INT8_MIN_COSINE per
    token that beats ONNX Runtime is written to out_dir/openvino/ (the IR pair) and named in the
    returned manifest entry; else the entry names ONNX Runtime and nothing is written.

    Calibration (int8): `calibration_clips` clips of `calibration_frames` synthetic crops, other seeds
    than the parity crops. The int8 graph is quantized with each of INT8_SETTINGS in turn until one
    passes the bar at fp32 compute on the parity crops; `int8_settings` records each one tried."""
    from valley_rt.backends.openvino_vision import CANDIDATES, VARIANTS, OpenVinoVision
    from valley_rt.backends.vision import OnnxVision
    from valley_rt.cpu import cpu_flags, isa_class
    from valley_rt.engine_format import OPENVINO_FILE
    from valley_rt.export.onnx_vision import INT8_MIN_COSINE, compare, reference_outputs, sample_crops

    cfg = model.cfg
    isa = isa or isa_class()
    out_dir = Path(out_dir)
    crops = sample_crops(cfg, frames, seed=1)
    # parity on `frames` frames and on one: pooled patch tokens average T frames' errors, so one frame
    # is a quantized graph's worst case
    checks = [(c, reference_outputs(model, c)) for c in (crops, sample_crops(cfg, 1, seed=2))]
    candidates = CANDIDATES[isa]
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")))
    entry: dict = {"isa": isa, "flags": flags, "candidates": list(candidates), "parity_frames": frames}
    ms, parity, export_s = {}, {}, {}

    def measure(name: str, vision) -> None:
        parity[name] = min(compare(r, g)["min_cosine"] for c, ref in checks for r, g in zip(ref, vision.encode(c)))
        best = math.inf
        for _ in range(timing_repeats):
            t0 = time.perf_counter()
            vision.encode(crops)
            best = min(best, time.perf_counter() - t0)
        ms[name] = best * 1e3

    ort_name = f"onnxruntime-{ort_precision}"
    measure(ort_name, OnnxVision(ort_path, cfg))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".openvino-") as tmp:
        tmp = Path(tmp)
        irs = {}
        for weights in dict.fromkeys(VARIANTS[v][0] for v in candidates):  # each IR once, in order
            t0 = time.perf_counter()
            if weights == "fp32":
                irs[weights] = convert_fp32(raw, tmp / "fp32.xml")
                export_s[weights] = round(time.perf_counter() - t0, 2)
                continue
            calibration = [sample_crops(cfg, calibration_frames, seed=100 + i) for i in range(calibration_clips)]
            tried, quantize_s = {}, 0.0
            for setting in INT8_SETTINGS:  # the first setting whose graph passes the bar at fp32 compute
                t0 = time.perf_counter()
                irs[weights] = quantize_int8(raw, tmp / f"int8-{setting}.xml", calibration, setting)
                quantize_s += time.perf_counter() - t0
                # the int8 variant (a candidate wherever int8 weights are) measured here, not again below
                measure("openvino-int8", OpenVinoVision(irs[weights], cfg, variant="int8"))
                tried[setting] = round(parity["openvino-int8"], 6)
                if tried[setting] >= INT8_MIN_COSINE:
                    break
            entry["int8_settings"] = tried
            export_s[weights] = round(quantize_s, 2)
        for variant in candidates:
            if f"openvino-{variant}" not in ms:  # the int8 variant was measured with its setting above
                measure(f"openvino-{variant}", OpenVinoVision(irs[VARIANTS[variant][0]], cfg, variant=variant))
        accurate = [v for v in candidates if parity[f"openvino-{v}"] >= INT8_MIN_COSINE]
        best = min(accurate, key=lambda v: ms[f"openvino-{v}"], default=None)
        if force and best is None:
            raise ValueError(f"no OpenVINO vision variant reaches cosine {INT8_MIN_COSINE} per token on {isa}: "
                             + ", ".join(f"{k} {v:.5f}" for k, v in parity.items()))
        wins = best is not None and (force or ms[f"openvino-{best}"] < ms[ort_name])
        if wins:
            dst = out_dir / OPENVINO_FILE
            dst.parent.mkdir(parents=True, exist_ok=True)
            src = irs[VARIANTS[best][0]]
            os.replace(src, dst)
            os.replace(src.with_suffix(".bin"), dst.with_suffix(".bin"))
            entry.update(backend="openvino", variant=best, file=OPENVINO_FILE)
        else:
            entry.update(backend="onnxruntime", variant=ort_precision)
    rounded = {k: round(v, 1) for k, v in ms.items()}
    entry.update(ms=rounded, min_cosine={k: round(v, 6) for k, v in parity.items()}, export_s=export_s,
                 min_cosine_bar=INT8_MIN_COSINE)
    chosen = f"openvino-{best}" if wins else ort_name
    entry["decision"] = (f"{chosen} on {isa}: {rounded[chosen]:.0f} ms per {frames} frames, cosine "
                         f"{parity[chosen]:.5f} (need >= {INT8_MIN_COSINE}); measured "
                         + ", ".join(f"{k} {v:.0f} ms" for k, v in rounded.items()))
    return entry
