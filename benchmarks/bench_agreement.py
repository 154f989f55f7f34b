"""Answer agreement: the valley-rt runtime (engine) vs the PyTorch reference on a held-out synthetic set.

Both sides answer every short-answer question greedily through the same `Valley.ask` path (the engine:
keyframe-seeking reader, ONNX vision engine, int4 ONNX LLM; the reference: decode-everything reader,
PIL preprocessing, the fp32 reference model + transformers LLaMA). Reports the share of identical
answers and exact-match accuracy per task family for both; ends with one JSON line.

    python benchmarks/bench_agreement.py [--engine ENGINE] [--ckpt CKPT] [--n 60] [--seed 9001]

Defaults: the bundled demo engine and checkpoint, 60 fresh clips from seed 9001 (a seed no recipe
trains or validates on).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, default=None)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--n", type=int, default=60, help="clips to synthesize")
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "valley-rt-agreement")
    args = ap.parse_args()

    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import DEMO_CHECKPOINT, demo_engine, load
    from valley_rt.train.data import load_records
    from valley_rt.demo.synth import generate
    from valley_rt.prompt import normalize_answer

    data_dir = args.data / f"seed{args.seed}-n{args.n}"
    if not (data_dir / "data.json").is_file():
        generate(data_dir, n=args.n, seed=args.seed)
    records, _ = load_records(data_dir / "data.json")
    records = [r for r in records if r.short]
    sides = {"engine": load(args.engine or demo_engine()), "reference": load(args.ckpt or DEMO_CHECKPOINT, reference=True)}
    params = SamplingParams(max_new_tokens=24)
    answers: dict[str, list[str]] = {k: [] for k in sides}
    seconds = {}
    for name, valley in sides.items():
        t0 = time.perf_counter()
        ctx = None
        for r in records:
            if ctx is None or ctx.path != str(r.video):
                ctx = valley.encode_video(r.video)
            answers[name].append(valley.ask(ctx, r.turns[0].text, params=params).answer)
        seconds[name] = time.perf_counter() - t0

    per_family = defaultdict(lambda: {"n": 0, "agree": 0, "em_engine": 0, "em_reference": 0})
    for r, a, b in zip(records, answers["engine"], answers["reference"]):
        f = per_family[r.task]
        gold = normalize_answer(r.answer)
        f["n"] += 1
        f["agree"] += normalize_answer(a) == normalize_answer(b)
        f["em_engine"] += normalize_answer(a) == gold
        f["em_reference"] += normalize_answer(b) == gold
    n = len(records)
    total = {k: sum(f[k] for f in per_family.values()) for k in ("agree", "em_engine", "em_reference")}
    print(f"{'family':12}{'n':>5}{'agree':>9}{'EM engine':>11}{'EM ref':>9}")
    for fam, f in sorted(per_family.items()):
        print(f"{fam:12}{f['n']:5d}{f['agree'] / f['n']:9.1%}{f['em_engine'] / f['n']:11.1%}{f['em_reference'] / f['n']:9.1%}")
    result = {"bench": "agreement", "records": n, "seed": args.seed, "agreement": total["agree"] / n,
              "em_engine": total["em_engine"] / n, "em_reference": total["em_reference"] / n,
              "em_delta_points": 100 * (total["em_engine"] - total["em_reference"]) / n,
              "per_family": {k: dict(v) for k, v in per_family.items()}, "seconds": seconds,
              "backends": {k: v.backends for k, v in sides.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
