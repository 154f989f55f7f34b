"""End-to-end `ask`: the valley-rt runtime vs the PyTorch reference path, whole process and per stage.

Each side runs in a fresh subprocess (imports, model load, video decode, preprocess, vision, prefill,
a fixed number of greedy decode tokens with stop strings and eos disabled), so "whole process" means
what a user waits for at the shell, and peak RSS is that process's own.

* fast: `valley_rt.runtime` on an engine folder: PyAV keyframe-seeking reader, ONNX Runtime vision
  graph (int8/fp32 as exported), int4 ONNX LLM with KV cache.
* reference: what the original Valley does: every frame decoded with PyAV then indexed, PIL preprocessing,
  the PyTorch reference model in fp32, transformers `generate(inputs_embeds=...)`.

Models: (a) the bundled demo model and its engine; (b) real shapes: ViT-L/14 at 224 + 8 frames and a
1.1B LLaMA (the "bench-1b" preset, random weights, built once under /tmp, LLM exported as int4 RTN —
the same MatMulNBits kernel GPTQ weights run on).

    python benchmarks/bench_ask.py                    # both models
    python benchmarks/bench_ask.py --models demo      # just the demo

Prints a table, writes benchmarks/results/bench_ask.png (stage breakdown) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import hardware  # benchmarks/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIP = REPO.parent / "shared" / "videos" / "snowmobile.mp4"
WORK = Path(os.environ.get("VALLEY_RT_BENCH_DIR", "/tmp/valley-rt-bench"))
STAGES = ("startup_ms", "video_decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "decode_ms")


# -- the two sides, each run as `bench_ask.py --child SIDE ...` in a fresh process ----------------------
def child_fast(args) -> dict:
    import torch  # noqa: F401  (import cost is part of startup)

    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import load

    t_load = time.time()
    valley = load(args.model)
    t_ready = time.time()
    ctx = valley.encode_video(args.video)
    t_ask = time.time()
    ans = valley.ask(ctx, args.question, params=SamplingParams(max_new_tokens=args.tokens), stop=(), ignore_eos=True)
    t_end = time.time()
    t = ans.timings
    first_token_abs = t_ask + (t["prompt_ms"] + t["first_token_ms"]) / 1e3
    return {
        "startup_ms": (t_ready - args.t0) * 1e3, "load_ms": (t_ready - t_load) * 1e3,
        "video_decode_ms": t["video_decode_ms"], "preprocess_ms": t["preprocess_ms"], "vision_ms": t["vision_ms"],
        "prefill_ms": t["prompt_ms"] + t["first_token_ms"], "decode_ms": t["generate_ms"] - t["first_token_ms"],
        "ttft_ms": (first_token_abs - t_ready) * 1e3, "cold_start_s": first_token_abs - args.t0,
        "decode_tokens_per_s": t["decode_tokens_per_s"], "tokens_in": ans.tokens_in, "tokens_out": ans.tokens_out,
        "process_s": t_end - args.t0, "backends": ans.backends,
    }


def child_reference(args) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from valley_rt.checkpoint import load_checkpoint, load_tokenizer
    from valley_rt.prompt import Turn, encode, format_conversation
    from valley_rt.video import preprocess, read_video_naive

    t_load = time.time()
    model = load_checkpoint(args.model)
    tok = load_tokenizer(args.model)
    t_ready = time.time()
    clip = read_video_naive(args.video, num_frames=model.cfg.sampling.num_frames)
    t1 = time.time()
    pixel_values = preprocess(clip.frames, model.cfg.preprocess)[None]
    t2 = time.time()
    text, _ = format_conversation([Turn("human", "<video>\n" + args.question)], system=model.cfg.system_prompt)
    ids, _ = encode(tok, text, cfg=model.cfg, num_frames=pixel_values.shape[1])
    with torch.no_grad():
        embeds = model.embed_inputs(torch.tensor([ids]), pixel_values)
    t3 = time.time()

    class Clock(LogitsProcessor):  # called once per generated token, right after its forward pass
        stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.time())
            return scores

    clock = Clock()
    with torch.no_grad():
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    t_end = time.time()
    s = clock.stamps
    return {
        "startup_ms": (t_ready - args.t0) * 1e3, "load_ms": (t_ready - t_load) * 1e3,
        "video_decode_ms": (t1 - t_ready) * 1e3, "preprocess_ms": (t2 - t1) * 1e3, "vision_ms": (t3 - t2) * 1e3,
        "prefill_ms": (s[0] - t3) * 1e3, "decode_ms": (t_end - s[0]) * 1e3,
        "ttft_ms": (s[0] - t_ready) * 1e3, "cold_start_s": s[0] - args.t0,
        "decode_tokens_per_s": (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else 0.0,
        "tokens_in": len(ids), "tokens_out": int(out.shape[1]), "process_s": t_end - args.t0,
        "backends": {"vision": "torch-reference-fp32", "llm": "transformers-generate-fp32", "kind": "reference"},
    }


def run_side(side: str, model: Path, video: Path, question: str, tokens: int) -> dict:
    t0 = time.time()
    cmd = [sys.executable, __file__, "--child", side, "--model", str(model), "--video", str(video),
           "--question", question, "--tokens", str(tokens), "--t0", repr(t0)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


# -- models -----------------------------------------------------------------------------------------
def demo_model() -> tuple[Path, Path, Path, str]:
    from valley_rt.runtime import DEMO_CHECKPOINT, demo_engine

    clips = REPO / "valley_rt" / "assets" / "clips"
    first = json.loads((clips / "questions.json").read_text())["clips"][0]  # {"video", "questions": [...]}
    question = next(q["question"] for q in first["questions"] if q["task"] == "long_description")
    return DEMO_CHECKPOINT, demo_engine(), clips / first["video"], question


def real_model() -> tuple[Path, Path, Path, str]:
    """bench-1b: ViT-L/14 at 224 + 1.1B LLaMA, random weights; checkpoint and engine built once."""
    from valley_rt.checkpoint import save_checkpoint
    from valley_rt.config import preset
    from valley_rt.model import build_model

    ckpt, engine = WORK / "bench-1b", WORK / "bench-1b-engine"
    if not (ckpt / "valley.json").is_file():
        print("building the random bench-1b checkpoint (once) ...", file=sys.stderr)
        save_checkpoint(build_model(preset("bench-1b"), seed=0), ckpt, tokenizer=_byte_tokenizer(preset("bench-1b")))
    if not (engine / "manifest.json").is_file():
        print("exporting its engine (once) ...", file=sys.stderr)
        # in its own process: the export's peak memory (fp32 model + traced graphs) is released after
        subprocess.run([sys.executable, "-m", "valley_rt", "export", str(ckpt), "--out", str(engine),
                        "--quant", "rtn4", "--overwrite"], check=True)
    video = SHARED_CLIP if SHARED_CLIP.is_file() else sorted((REPO / "valley_rt/assets/clips").glob("*.mp4"))[0]
    return ckpt, engine, video, "What happens in this video? Describe it."


def _byte_tokenizer(cfg):
    """A LLaMA-sized (32000 + 6) tokenizer for random weights: byte-level BPE trained on a tiny text,
    padded with filler tokens so the vocabulary matches the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from valley_rt.config import SPECIAL_TOKENS

    base = cfg.tokens.im_patch
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What happens in this video? Describe it. A person rides a snowmobile."] * 10, trainer)
    tok.add_tokens([f"<filler_{i}>" for i in range(base - tok.get_vocab_size())])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert fast.convert_tokens_to_ids("<vi_end>") == cfg.tokens.vi_end
    return fast


# -- report -----------------------------------------------------------------------------------------
def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{m}\n{side}", r) for m, sides in results.items() for side, r in sides.items()]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.8 * len(rows)))
    colors = ["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974"]
    for i, (label, r) in enumerate(rows):
        left = 0.0
        for stage, color in zip(STAGES, colors):
            w = r[stage] / 1e3
            ax.barh(i, w, left=left, color=color, label=stage.replace("_ms", "") if i == 0 else None)
            left += w
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (one `ask` process: startup = interpreter + imports + model load)")
    ax.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("valley-rt ask vs PyTorch reference, per stage")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["fast", "reference"])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--video", type=Path)
    ap.add_argument("--question", default="")
    ap.add_argument("--tokens", type=int, default=32, help="answer length (fixed: stop strings and eos off)")
    ap.add_argument("--t0", type=float, default=0.0)
    ap.add_argument("--models", default="demo,real")
    ap.add_argument("--repeat", type=int, default=2, help="runs per side; the fastest is kept")
    ap.add_argument("--chart", type=Path, default=REPO / "benchmarks" / "results" / "bench_ask.png")
    args = ap.parse_args()
    if args.child:
        result = (child_fast if args.child == "fast" else child_reference)(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    results, summary = {}, {}
    for name in args.models.split(","):
        ckpt, engine, video, question = demo_model() if name == "demo" else real_model()
        sides = {}
        for side, model in (("reference", ckpt), ("fast", engine)):
            runs = [run_side(side, model, video, question, args.tokens) for _ in range(args.repeat)]
            sides[side] = min(runs, key=lambda r: r["process_wall_s"])
            sides[side]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        results[name] = sides
        ref, fast = sides["reference"], sides["fast"]
        summary[name] = {
            "ttft_speedup": ref["ttft_ms"] / fast["ttft_ms"],
            "process_speedup": ref["process_wall_s"] / fast["process_wall_s"],
            "fast_cold_start_s": fast["cold_start_s"],
            "rss_ratio": fast["peak_rss_mb"] / ref["peak_rss_mb"],
        }
        print(f"\n== {name}: {video.name}, {fast['tokens_in']} prompt tokens, {args.tokens} answer tokens")
        print(f"{'':24}{'reference':>14}{'valley-rt':>14}{'ratio':>9}")
        for key in ("process_wall_s", "cold_start_s", "ttft_ms", "startup_ms", "video_decode_ms", "preprocess_ms",
                    "vision_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s", "peak_rss_mb"):
            a, b = ref[key], fast[key]
            ratio = (b / a if key == "decode_tokens_per_s" else a / b) if a and b else float("nan")
            print(f"{key:24}{a:14.1f}{b:14.1f}{ratio:8.1f}x")
        print(f"backends: reference {ref['backends']}, valley-rt {fast['backends']}")
    chart(results, args.chart)
    print(f"\nchart: {args.chart}")
    print(json.dumps({"bench": "ask", "hardware": hardware(), "answer_tokens": args.tokens,
                      "summary": summary, "results": results}))


if __name__ == "__main__":
    main()
