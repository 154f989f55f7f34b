"""`ask` on a CUDA GPU: the runtime's torch GPU path vs the PyTorch reference on the same GPU, one process.

* fast: `valley_rt.runtime`'s torch GPU path (what `load(ckpt)` picks on CUDA): fp16 vision tower,
  temporal pooling in the fused Triton kernel (importance scores folded through the projector), fp16
  LLM with a KV cache reused across turns.
* reference: the same weights in fp32 on the same GPU with the reference modules (unfused pooling,
  original PIL preprocessing, every frame decoded).

Models: the bundled demo checkpoint (its held-out clips: answers compared, greedy), and bench-1b
(ViT-L/14 at 224, 8 frames, 1.1B LLaMA; random weights built in memory, so only speed is compared).
Per side: vision (decode + preprocess + encode, median of 3 after a warm-up), time to first token and
decode tokens/s for a fixed 64-token answer (stop strings and eos off), and the process's peak GPU
memory during each side's answers (both sides' weights are resident throughout, so it is not per side).

    python benchmarks/bench_gpu_ask.py     # CUDA only; without a GPU it prints a "skipped" JSON line

Ends with one JSON line. Exit status: 1 when, on the demo, the fraction of answers equal to the CPU
record (either side) or identical between the sides is below --min-agreement; 0 otherwise (also when
skipped: the JSON line then has a "skipped" key, which gpu_check.sh reports as SKIPPED).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from common import hardware  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIP = REPO.parent / "shared" / "videos" / "snowmobile.mp4"
TOKENS = 64
DEVICE = "cuda"  # --device cpu: a dry run of this script's code paths on a machine without a GPU


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None


def measure(valley, video: Path, question: str) -> dict:
    from valley_rt.generate import SamplingParams

    params = SamplingParams(max_new_tokens=TOKENS)
    valley.reset()
    valley.ask(valley.encode_video(video), question, params=params, stop=(), ignore_eos=True)  # warm-up
    vis = []
    for _ in range(3):
        _sync()
        t0 = time.perf_counter()
        ctx = valley.encode_video(video)
        _sync()
        vis.append((time.perf_counter() - t0) * 1e3)
    ttft, tps = [], []
    for _ in range(3):
        valley.reset()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ans = valley.ask(ctx, question, params=params, stop=(), ignore_eos=True)
        t = ans.timings
        ttft.append(t["prompt_ms"] + t["first_token_ms"])
        tps.append(t["decode_tokens_per_s"])
    return {"vision_ms": statistics.median(vis), "ttft_ms": statistics.median(ttft),
            "decode_tok_s": statistics.median(tps), "peak_gpu_mb": _peak_mb(),
            "backends": valley.backends}


def _sides(model, half, tokenizer, source: str):
    """The fast side on the fp16 copy, the reference side on the fp32 model, both on DEVICE."""
    from valley_rt.runtime import torch_valley

    return torch_valley(half, tokenizer, source=source), torch_valley(model, tokenizer, source=source, reference=True)


def demo_sides():
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer
    from valley_rt.runtime import DEMO_CHECKPOINT

    model = load_checkpoint(DEMO_CHECKPOINT, device=DEVICE)
    half = load_checkpoint(DEMO_CHECKPOINT, device=DEVICE, dtype=torch.float16)
    return _sides(model, half, load_tokenizer(DEMO_CHECKPOINT), str(DEMO_CHECKPOINT))


def bench1b_sides():
    from bench_ask import _byte_tokenizer  # benchmarks/bench_ask.py

    from valley_rt.config import preset
    from valley_rt.model import build_model

    cfg = preset("bench-1b")
    # one seed, two dtypes: init_weights draws in fp32 and rounds into the fp16 tensors (= model.half())
    model = build_model(cfg, device=DEVICE, dtype=torch.float32, seed=0)
    half = build_model(cfg, device=DEVICE, dtype=torch.float16, seed=0)
    return _sides(model, half, _byte_tokenizer(cfg), "bench-1b (random weights)")


def demo_agreement(fast, ref) -> dict:
    """Greedy answers of both sides to the bundled held-out clips' questions (short and long), and how many
    of each side's equal `demo_answer`, the CPU fp32 reference's answer recorded in questions.json (the two
    sides agreeing proves nothing if both are wrong the same way, as when a transformers version dropped
    the KV cache argument)."""
    from valley_rt.generate import SamplingParams

    clips = REPO / "valley_rt" / "assets" / "clips"
    same = total = 0
    as_cpu = [0, 0]
    for clip in json.loads((clips / "questions.json").read_text())["clips"]:
        for q in clip["questions"]:
            a = [v.ask(clips / clip["video"], q["question"], params=SamplingParams(max_new_tokens=96)).answer
                 for v in (fast, ref)]
            for v in (fast, ref):
                v.reset()
            same += a[0] == a[1]
            for i in (0, 1):
                as_cpu[i] += a[i] == q["demo_answer"]
            total += 1
    return {"identical_answers": same, "questions": total, "fast_as_cpu_record": as_cpu[0],
            "reference_as_cpu_record": as_cpu[1]}


def main() -> None:
    global DEVICE
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,bench-1b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run of the code paths")
    ap.add_argument("--min-agreement", type=float, default=16 / 17,
                    help="least fraction of demo answers equal to the CPU record (each side) and identical "
                         "between the sides; below it the script exits 1 (default 16/17)")
    args = ap.parse_args()
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_ask", "skipped": "no CUDA GPU visible to torch"}))
        return
    out = {"benchmark": "gpu_ask", "device": DEVICE, "hardware": hardware(), "tokens": TOKENS, "models": {}}
    clips = REPO / "valley_rt" / "assets" / "clips"
    first = json.loads((clips / "questions.json").read_text())["clips"][0]
    runs = [("demo", demo_sides, clips / first["video"], first["questions"][2]["question"])]
    video = SHARED_CLIP if SHARED_CLIP.is_file() else clips / first["video"]
    runs.append(("bench-1b", bench1b_sides, video, "What happens in this video? Describe it."))
    for name, sides, video, question in runs:
        if name not in args.models.split(","):
            continue
        fast, ref = sides()
        r = {"fast": measure(fast, video, question), "reference": measure(ref, video, question)}
        f, b = r["fast"], r["reference"]
        r["speedup"] = {"vision": b["vision_ms"] / f["vision_ms"], "ttft": b["ttft_ms"] / f["ttft_ms"],
                        "decode": f["decode_tok_s"] / b["decode_tok_s"]}
        if name == "demo":
            r["agreement"] = demo_agreement(fast, ref)
        out["models"][name] = r
        line = (f"{name:9s} vision {f['vision_ms']:8.1f} vs {b['vision_ms']:8.1f} ms ({r['speedup']['vision']:.2f}x)"
                f" | ttft {f['ttft_ms']:7.1f} vs {b['ttft_ms']:7.1f} ms ({r['speedup']['ttft']:.2f}x)"
                f" | decode {f['decode_tok_s']:6.1f} vs {b['decode_tok_s']:6.1f} tok/s ({r['speedup']['decode']:.2f}x)")
        if DEVICE == "cuda":
            line += f" | peak GPU {f['peak_gpu_mb']:.0f} vs {b['peak_gpu_mb']:.0f} MB"
        if "agreement" in r:
            g = r["agreement"]
            line += (f" | identical answers {g['identical_answers']}/{g['questions']}, as the CPU record: fast "
                     f"{g['fast_as_cpu_record']}, reference {g['reference_as_cpu_record']}")
        print(line, file=sys.stderr)
        del fast, ref
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    failed = below_threshold(out["models"].get("demo", {}).get("agreement"), args.min_agreement)
    out["failed"] = failed
    print(json.dumps(out))
    if failed:
        print("bench_gpu_ask: FAILED: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def below_threshold(agreement: dict | None, minimum: float) -> list[str]:
    """One line per demo agreement count below `minimum` (a fraction of the questions); [] passes."""
    if agreement is None:
        return []
    n = agreement["questions"]
    return [f"{key} {agreement[key]}/{n} < {minimum:.3f}" for key in
            ("fast_as_cpu_record", "reference_as_cpu_record", "identical_answers") if agreement[key] < minimum * n]


if __name__ == "__main__":
    main()
