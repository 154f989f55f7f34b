"""Max error of the PyTorch reference vs the original Valley code's outputs (../shared fixtures).

For each original-layout fixture checkpoint (mean / importance / transformer pooling): convert it, run
the recorded inputs through valley-rt's reference and report the max absolute error (and the max of
the reference value, for scale) at each stage the fixture records: select-layer features, pooled
tokens, frame tokens, logits. Also the preprocessing fixture (uint8 frames -> pixel values).

    python benchmarks/parity_original.py [--shared ../shared]

Prints a table and ends with one JSON line. Errors are float32 rounding (the original ran the same
math in another order), not zero: quote them as measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
MODES = ["model_mean", "model_importance", "model_transformer"]


def model_errors(fixtures: Path, tmp: Path) -> dict:
    from valley_rt.checkpoint import convert_original, load_checkpoint

    out = {}
    for name in MODES:
        model = load_checkpoint(convert_original(original_dir=fixtures / name, out_dir=tmp / name))
        io = load_file(str(fixtures / name / "io.safetensors"))
        with torch.no_grad():
            got = {"select_layer_features": model.vision_features(io["pixel_values"])[0]}
            pooled, frames = model.encode_video(io["pixel_values"])
            got.update(pooled_tokens=pooled[0], frame_tokens=frames[0],
                       logits=model(io["input_ids"], io["pixel_values"]).logits)
        out[name] = {k: {"max_abs_err": float((v - io[k]).abs().max()), "max_abs": float(io[k].abs().max())}
                     for k, v in got.items()}
    return out


def preprocess_error(shared: Path) -> dict | None:
    """snowmobile.mp4's 8 sampled frames through valley_rt.video.preprocess vs the original transform's output."""
    from valley_rt.config import PreprocessConfig
    from valley_rt.video import preprocess, read_video

    path = shared / "fixtures" / "original_valley" / "preprocess" / "expected.safetensors"
    video = shared / "videos" / "snowmobile.mp4"
    if not (path.is_file() and video.is_file()):
        return None
    expected = load_file(str(path))
    clip = read_video(video, num_frames=8)
    err = float((preprocess(clip.frames, PreprocessConfig()) - expected["pixel_values"]).abs().max())
    return {"max_abs_err": err, "same_indices": clip.indices == expected["frame_indices"].tolist()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = ap.parse_args()
    fixtures = args.shared / "fixtures" / "original_valley"
    if not fixtures.is_dir():
        print(json.dumps({"benchmark": "parity_original", "skipped": f"{fixtures} not present"}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        models = model_errors(fixtures, Path(tmp))
    worst = max(s["max_abs_err"] for m in models.values() for s in m.values())
    for name, stages in models.items():
        print(f"{name:18s} " + "  ".join(f"{k} {v['max_abs_err']:.2e} (of {v['max_abs']:.2f})"
                                         for k, v in stages.items()), file=sys.stderr)
    pre = preprocess_error(args.shared)
    print(json.dumps({"benchmark": "parity_original", "models": models, "worst_max_abs_err": worst,
                      "preprocess": pre}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
