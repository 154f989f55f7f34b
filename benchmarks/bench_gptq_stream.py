"""Streamed GPTQ (export/gptq_stream.py) on a real-size LLM: seconds per decoder layer, projected total, peak RSS.

    python benchmarks/bench_gptq_stream.py CKPT/llm --prompts 8 --tokens 512 --layers 2 --out /tmp/gq
    /usr/bin/time -v python benchmarks/bench_gptq_stream.py ...      # the whole process's peak RSS

CKPT/llm is an HF LLaMA folder (fp16 shards, e.g. `make_real_checkpoint.py --layout valley-rt` or what
`valley-rt convert` writes). Calibration: --prompts prompts of --tokens tokens each, embedded with the
LLM's own table (random token ids: the cost of GPTQ does not depend on the text); two more held-out
prompts give the accuracy figures. --layers N quantizes the first N decoder layers only (a measurement:
the folder written is an N-layer model) and projects the full model's time from the per-layer times.
There is no baseline process: GPTQModel on the same machine is reported separately (docs/real_size.md).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from common import hardware  # benchmarks/common.py (this script's folder is on sys.path)
from valley_rt.export.gptq import GPTQSettings
from valley_rt.export.gptq_stream import project_total, quantize_llm_streamed
from valley_rt.progress import Progress
from valley_rt.shards import TensorIndex, weight_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("llm", type=Path, help="HF LLaMA folder (fp weights)")
    ap.add_argument("--out", type=Path, required=True, help="GPTQ folder to write (new, or an earlier output)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=None, help="first N decoder layers only (default: all)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads((args.llm / "config.json").read_text())
    files, _ = weight_files(args.llm)
    index = TensorIndex(args.llm, files=files)
    table = index.get("model.embed_tokens.weight")  # [V, H] as stored
    g = torch.Generator().manual_seed(0)

    def prompt(labelled: bool) -> dict:
        ids = torch.randint(3, int(cfg["vocab_size"]), (args.tokens,), generator=g)
        ex = {"inputs_embeds": table[ids].float()}
        if labelled:
            ex["labels"] = torch.cat([torch.full((args.tokens // 2,), -100), ids[args.tokens // 2:]])
        return ex

    calibration = [prompt(False) for _ in range(args.prompts)]
    held_out = [prompt(True) for _ in range(2)]
    del table
    index.close()
    t0 = time.perf_counter()
    report = quantize_llm_streamed(args.llm, args.out, calibration=calibration, held_out=held_out,
                                   settings=GPTQSettings(group_size=args.group_size), layers=args.layers,
                                   progress=Progress("gptq-stream", every_s=0))
    wall = time.perf_counter() - t0
    total_layers = int(cfg["num_hidden_layers"])
    result = {
        "bench": "gptq_stream", "llm_layers": total_layers, "layers_quantized": report.layers,
        "prompts": args.prompts, "tokens_per_prompt": args.tokens, "calibration_tokens": report.tokens,
        "held_out_prompts": len(held_out), "group_size": args.group_size,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_layer": [round(s, 1) for s in report.seconds_per_layer], "quantize_s": round(wall, 1),
        "projected_all_layers_s": round(project_total(report.seconds_per_layer, total_layers), 0),
        "peak_rss_gb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "figures": {k: report.figures.get(k) for k in ("ppl_delta_pct", "cosine", "agreement", "sqnr_db")},
        "hardware": hardware(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
