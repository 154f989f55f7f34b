"""End-to-end `ask`: the valley-rt runtime vs the PyTorch reference path, whole process and per stage.

Each side runs in a fresh subprocess (imports, model load, video decode, preprocess, vision, prefill,
a fixed number of greedy decode tokens with stop strings and eos disabled), so "whole process" means
what a user waits for at the shell, and peak RSS is that process's own (VmHWM; printed beside /usr/bin/time's figure for the same child).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (cpu_kind, gemm_gflops, hardware, linear_macs_per_token, peak_rss_mb,  # benchmarks/common.py
                    read_bandwidth_gbs)

REPO = Path(__file__).resolve().parents[1]
SHARED_CLIP = REPO.parent / "shared" / "videos" / "snowmobile.mp4"
WORK = Path(os.environ.get("VALLEY_RT_BENCH_DIR", "/tmp/valley-rt-bench"))
GNU_TIME = "/usr/bin/time"
TIME_TAG = "VALLEY_RT_OUTSIDE_MAXRSS_KB"
STAGES = ("startup_ms", "video_decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "decode_ms")


# -- the two sides, each run as `bench_ask.py --child SIDE ...` in a fresh process ----------------------
def child_fast(args) -> dict:
    import torch  # noqa: F401  (import cost is part of startup)

    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import load

    t_load = time.time()
    valley = load(args.model)
    t_ready = time.time()
    waits = getattr(valley.llm, "load_wait_s", 0.0), getattr(valley.llm, "prompt_wait_s", 0.0)  # the load's own
    ctx = valley.encode_video(args.video)
    t_ask = time.time()
    ans = valley.ask(ctx, args.question, params=SamplingParams(max_new_tokens=args.tokens), stop=(), ignore_eos=True)
    t_end = time.time()
    t = ans.timings
    first_token_abs = t_ask + (t["prompt_ms"] + t["first_token_ms"]) / 1e3
    # the prompt waiting for the prompt graph; the first decode step for the decode graph (opened once needed)
    wait_ms = (getattr(valley.llm, "prompt_wait_s", 0.0) - waits[1]) * 1e3
    decode_wait_ms = (getattr(valley.llm, "load_wait_s", 0.0) - waits[0]) * 1e3 - wait_ms
    steady_s = (t["generate_ms"] - t["first_token_ms"] - decode_wait_ms) / 1e3
    return {
        "llm_load_wait_ms": wait_ms, "llm_background_load_ms": getattr(valley.llm, "background_load_s", 0.0) * 1e3,
        "decode_graph_wait_ms": decode_wait_ms,
        "decode_tokens_per_s_after_wait": (ans.tokens_out - 1) / steady_s if ans.tokens_out > 1 and steady_s > 0 else 0.0,
        "prefill_compute_ms": t["prompt_ms"] + t["first_token_ms"] - wait_ms,
        "startup_ms": (t_ready - args.t0) * 1e3, "load_ms": (t_ready - t_load) * 1e3,
        "video_decode_ms": t["video_decode_ms"], "preprocess_ms": t["preprocess_ms"], "vision_ms": t["vision_ms"],
        "prefill_ms": t["prompt_ms"] + t["first_token_ms"], "decode_ms": t["generate_ms"] - t["first_token_ms"],
        "ttft_ms": (first_token_abs - t_ready) * 1e3, "cold_start_s": first_token_abs - args.t0,
        "decode_tokens_per_s": t["decode_tokens_per_s"], "tokens_in": ans.tokens_in, "tokens_out": ans.tokens_out,
        "tokens_prefilled": ans.tokens_prefilled, "prefix_tokens_stored": t.get("prefix_tokens_stored", 0),
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


# side name -> (child, environment overrides): "fast-eager-load" loads the engine as before the load-time
# work: every LLM graph opened and warmed before load returns (VALLEY_RT_LLM_LOAD=eager), the vision graph
# optimized at session creation (VALLEY_RT_ORT_CACHE=off). "fast-first-run": a new, empty user cache for
# each run (no verified stamp, no cached vision graph, no stored system-prompt KV rows): a machine's first
# `ask` on a new engine. "fast-no-prefix": the whole prompt prefilled at once (VALLEY_RT_PREFIX_CACHE=off).
# "fast-gqa-flash": ONNX Runtime's default (flash) GroupQueryAttention kernel (VALLEY_RT_GQA=flash).
# "fast-vision-spin": the vision session's threads spin between ops (VALLEY_RT_VISION_SPIN=on).
# "fast-vision-ort": the engine's ONNX Runtime vision graph even where its manifest chose OpenVINO
# (VALLEY_RT_VISION=onnx-cpu). "fast-both-graphs": both LLM graphs opened at once in the background, the
# decode graph before the first prompt instead of when the first decode step needs it
# (VALLEY_RT_LLM_LOAD=background-both). "fast-ort-decode": decode steps on ONNX Runtime's int4 graph
# instead of the native decode step (VALLEY_RT_DECODE=onnxruntime). "fast-w8a8-prompt": the engine's W8A8
# prompt graph even where the native decoder runs prompts on AMX tiles (VALLEY_RT_PREFILL=int8).
# "fast-graph-vision": the engine's vision graph (OpenVINO or ONNX Runtime, as its manifest chose) even where
# the native encoder runs it on AMX tiles (VALLEY_RT_VISION_NATIVE=off).
FRESH = "<a new folder per run>"
SIDES = {"reference": ("reference", {}), "fast": ("fast", {}),
         "fast-eager-load": ("fast", {"VALLEY_RT_LLM_LOAD": "eager", "VALLEY_RT_ORT_CACHE": "off"}),
         "fast-first-run": ("fast", {"VALLEY_RT_CACHE": FRESH}),
         "fast-no-prefix": ("fast", {"VALLEY_RT_PREFIX_CACHE": "off"}),
         "fast-gqa-flash": ("fast", {"VALLEY_RT_GQA": "flash"}),
         "fast-vision-spin": ("fast", {"VALLEY_RT_VISION_SPIN": "on"}),
         "fast-vision-ort": ("fast", {"VALLEY_RT_VISION": "onnx-cpu"}),
         "fast-both-graphs": ("fast", {"VALLEY_RT_LLM_LOAD": "background-both"}),
         "fast-ort-decode": ("fast", {"VALLEY_RT_DECODE": "onnxruntime"}),
         "fast-w8a8-prompt": ("fast", {"VALLEY_RT_PREFILL": "int8"}),
         "fast-graph-vision": ("fast", {"VALLEY_RT_VISION_NATIVE": "off"})}


def run_side(side: str, model: Path, video: Path, question: str, tokens: int, env: dict | None = None) -> dict:
    t0 = time.time()
    cmd = [sys.executable, __file__, "--child", side, "--model", str(model), "--video", str(video),
           "--question", question, "--tokens", str(tokens), "--t0", repr(t0)]
    if Path(GNU_TIME).is_file():  # an outside measurement of the child's peak RSS, to check ours against
        cmd = [GNU_TIME, "-f", f"{TIME_TAG} %M"] + cmd
    env = dict(env or {})
    fresh = [k for k, v in env.items() if v == FRESH]
    with tempfile.TemporaryDirectory(prefix="bench-ask-cache-") as tmp:
        env.update({k: str(Path(tmp) / k) for k in fresh})
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    outside = [line.split()[1] for line in p.stderr.splitlines() if line.startswith(TIME_TAG)]
    result["peak_rss_mb_outside"] = int(outside[-1]) / 1024 if outside else None  # /usr/bin/time's %M, KB
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
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the median is reported")
    ap.add_argument("--sides", default="reference,fast",
                    help=f"comma-separated, from {', '.join(SIDES)}; runs alternate between them")
    ap.add_argument("--save", action="store_true",
                    help="write benchmarks/results/bench_ask_<model>_<cpu kind>.json (one per CPU kind)")
    ap.add_argument("--tag", default="", help="appended to the --save file name (bench_ask_<model>_<cpu kind>_<tag>.json)")
    ap.add_argument("--chart", type=Path, default=REPO / "benchmarks" / "results" / "bench_ask.png")
    args = ap.parse_args()
    if args.child:
        result = (child_fast if args.child == "fast" else child_reference)(args)
        result["peak_rss_mb"] = peak_rss_mb()
        result["load_avg_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(result))
        return

    threads = 2
    yard = {"gemm_gflops": gemm_gflops(threads), "read_gbs": read_bandwidth_gbs(threads),
            "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(f"yardsticks ({threads} threads): torch 2048^3 matmul bf16 {yard['gemm_gflops']['bf16']:.0f} GFLOP/s, "
          f"fp32 {yard['gemm_gflops']['fp32']:.0f} GFLOP/s; read bandwidth {yard['read_gbs']:.1f} GB/s; "
          f"load average {yard['load_avg_1min']}")
    results, summary = {}, {}
    for name in args.models.split(","):
        ckpt, engine, video, question = demo_model() if name == "demo" else real_model()
        runs = {side: [] for side in args.sides.split(",")}
        for _ in range(args.repeat):  # sides alternate, so a change in the machine's load hits each alike
            for side in runs:
                child, env = SIDES[side]
                runs[side].append(run_side(child, ckpt if child == "reference" else engine, video, question,
                                           args.tokens, env=env))
        sides = {side: median_run(r) for side, r in runs.items()}
        results[name] = sides
        ref, fast = sides.get("reference"), sides.get("fast", next(iter(sides.values())))
        limits = against_limits(fast, engine, yard)
        summary[name] = {
            "fast_cold_start_s": fast["cold_start_s"], "fast_load_s": fast["load_ms"] / 1e3,
            "fast_ttft_after_load_s": fast["ttft_ms"] / 1e3, **limits,
        }
        if ref is not None:
            summary[name].update({"ttft_speedup": ref["ttft_ms"] / fast["ttft_ms"],
                                  "process_speedup": ref["process_wall_s"] / fast["process_wall_s"],
                                  "rss_ratio": fast["peak_rss_mb"] / ref["peak_rss_mb"]})
        print(f"\n== {name}: {video.name}, {fast['tokens_in']} prompt tokens, {args.tokens} answer tokens, "
              f"median of {args.repeat} runs per side")
        base = "reference" if ref is not None else next(iter(sides))
        print(f"{'':32}" + "".join(f"{side:>18}" for side in sides) + f"  ratio {base}/fast")
        for key in ("process_wall_s", "cold_start_s", "ttft_ms", "startup_ms", "load_ms", "video_decode_ms",
                    "preprocess_ms", "vision_ms", "prefill_ms", "llm_load_wait_ms", "prefill_compute_ms",
                    "tokens_prefilled", "decode_ms", "decode_graph_wait_ms", "decode_tokens_per_s",
                    "decode_tokens_per_s_after_wait", "peak_rss_mb", "peak_rss_mb_outside"):
            values = [r.get(key) for r in sides.values()]
            if all(v is None for v in values):
                continue
            a, b = sides[base].get(key), fast.get(key)
            ratio = (b / a if key.startswith("decode_tokens_per_s") else a / b) if a and b else float("nan")
            print(f"{key:32}" + "".join(f"{'-':>18}" if v is None else f"{v:18.1f}" for v in values)
                  + f"{ratio:21.1f}x")
        print(f"prefill ({limits['prefill_tokens']} of {fast['tokens_in']} prompt tokens; the rest: the system prompt's "
              f"stored KV rows): {limits['prefill_tokens_per_s']:.0f} tokens/s, {limits['prefill_gflops']:.0f} GFLOP/s = "
              f"{limits['prefill_pct_bf16_gemm']:.0f} % of the bf16 GEMM rate ({limits['prefill_pct_best_gemm']:.0f} % of the "
              f"best GEMM rate measured); decode: "
              f"{limits['decode_gbs']:.1f} GB/s = {limits['decode_pct_roofline']:.0f} % of the read roofline")
        for side, r in sides.items():
            print(f"{side}: backends {r['backends']}; load average per run {[x['load_avg_1min'] for x in runs_of(r)]}")
    chart(results, args.chart)
    print(f"\nchart: {args.chart}")
    line = {"bench": "ask", "hardware": hardware(), "yardsticks": yard, "answer_tokens": args.tokens,
            "repeat": args.repeat, "summary": summary, "results": results}
    if args.save:
        for name in results:
            out = REPO / "benchmarks" / "results" / f"bench_ask_{name}_{cpu_kind()}{'_' + args.tag if args.tag else ''}.json"
            out.write_text(json.dumps({**line, "summary": {name: summary[name]}, "results": {name: results[name]}}) + "\n")
            print(f"saved {out}")
    print(json.dumps(line))


def median_run(runs: list[dict]) -> dict:
    """The run with the median whole-process time (its stages stay consistent with each other), plus
    every run's figures under "runs"; peak RSS is the largest seen."""
    ranked = sorted(runs, key=lambda r: r["process_wall_s"])
    mid = dict(ranked[(len(ranked) - 1) // 2])
    mid["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if all(r.get("peak_rss_mb_outside") for r in runs):
        mid["peak_rss_mb_outside"] = max(r["peak_rss_mb_outside"] for r in runs)
    mid["runs"] = [{k: r.get(k) for k in ("process_wall_s", "load_ms", "ttft_ms", "vision_ms", "prefill_ms",
                                           "llm_load_wait_ms", "prefix_tokens_stored", "decode_graph_wait_ms",
                                           "decode_tokens_per_s", "decode_tokens_per_s_after_wait", "peak_rss_mb", "peak_rss_mb_outside",
                                           "load_avg_1min")} for r in runs]
    return mid


def runs_of(side: dict) -> list[dict]:
    return side.get("runs", [side])


def prefill_flops(cfg, tokens: int, cached: int = 0) -> float:
    """FLOPs of prefilling positions [cached, tokens) after `cached` rows already in the KV cache: every
    decoder linear at each of them, causal attention (QK^T and PV over the positions so far), the
    vocabulary projection at the last one."""
    llm = cfg.llm
    hd = llm.hidden_size // llm.num_heads
    linear = linear_macs_per_token(llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.intermediate_size)
    attention = 2 * 2 * llm.num_heads * hd * (tokens * (tokens + 1) - cached * (cached + 1)) / 2
    new = tokens - cached
    return llm.num_layers * (2 * linear * new + attention) + 2 * llm.hidden_size * llm.vocab_size


def against_limits(fast: dict, engine: Path, yard: dict) -> dict:
    """Prefill against the bf16 GEMM rate, decode against the read roofline (both measured this run)."""
    from valley_rt.config import ValleyConfig
    from valley_rt.export.manifest import load_manifest

    manifest = load_manifest(engine, verify=False)
    cfg = ValleyConfig.from_dict(manifest["config"])
    meta = json.loads((engine / manifest.get("files", {}).get("llm", "llm/") / "llm_onnx.json").read_text())
    prefill_s = fast.get("prefill_compute_ms", fast["prefill_ms"]) / 1e3  # not the wait for the background load
    cached = fast.get("tokens_in") - fast.get("tokens_prefilled", fast["tokens_in"])  # stored system-prompt rows
    gflops = prefill_flops(cfg, fast["tokens_in"], cached=cached) / prefill_s / 1e9
    # the steady rate: not the first decode step's wait for the decode graph (reported on its own)
    gbs = meta["weight_bytes_per_token"] * fast.get("decode_tokens_per_s_after_wait", fast["decode_tokens_per_s"]) / 1e9
    return {"prefill_tokens_per_s": (fast["tokens_in"] - cached) / prefill_s, "prefill_tokens": fast["tokens_in"] - cached,
            "prefill_gflops": gflops,
            "prefill_pct_bf16_gemm": 100 * gflops / yard["gemm_gflops"]["bf16"],
            # where bf16 has no matrix unit (AVX-512 without AMX) fp32 may multiply faster: the best of the two
            "prefill_pct_best_gemm": 100 * gflops / max(yard["gemm_gflops"].values()), "decode_gbs": gbs,
            "decode_pct_roofline": 100 * gbs / yard["read_gbs"]}


if __name__ == "__main__":
    main()
