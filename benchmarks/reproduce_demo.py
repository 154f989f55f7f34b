"""Check the claim "`valley-rt train --recipe demo` reproduces the bundled model bit for bit".

Reruns the recipe into a fresh folder and compares the sha256 of EVERY file of the resulting checkpoint
(`OUT/model/`: LLM, vision tower, projector + temporal module, configs, tokenizer) with the bundled
valley_rt/assets/demo, which the hashes recorded in benchmarks/results/demo_hashes.json describe.

    python benchmarks/reproduce_demo.py --out runs/repro          # the demo recipe: ~45 min on 2 cores
    python benchmarks/reproduce_demo.py --record                  # rewrite demo_hashes.json from the bundle
    python benchmarks/reproduce_demo.py --compare A B             # two checkpoint folders, no training
    python benchmarks/reproduce_demo.py --recipe smoke --against-run OTHER --out runs/smoke2
                                                                  # any recipe, against another run of it

Prints one line per differing file and ends with one JSON line; exits 1 when any file differs, is
missing or is extra. Training is deterministic on one machine (same threads, same torch); another CPU
or torch build may round differently, which this script reports as differing bytes, not as a pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "valley_rt" / "assets" / "demo"
RECORD = REPO / "benchmarks" / "results" / "demo_hashes.json"


def file_hashes(folder: Path) -> dict[str, dict]:
    """relative path -> {"sha256", "bytes"} for every file under `folder`, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: expected a checkpoint folder, not found")
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                     "bytes": p.stat().st_size}
    return out


def compare(want: dict[str, dict], got: dict[str, dict]) -> dict:
    """Per-file verdicts of two `file_hashes` maps: identical, differing, missing (in want only), extra."""
    same = sorted(k for k in want if k in got and got[k]["sha256"] == want[k]["sha256"])
    differing = sorted(k for k in want if k in got and got[k]["sha256"] != want[k]["sha256"])
    return {"identical": same, "differing": differing, "missing": sorted(set(want) - set(got)),
            "extra": sorted(set(got) - set(want)),
            "identical_bytes": sum(want[k]["bytes"] for k in same), "total_bytes": sum(v["bytes"] for v in want.values()),
            "bit_for_bit": not differing and set(want) == set(got)}


def train(recipe: str, out: Path, threads: int) -> float:
    """`valley-rt train --recipe RECIPE --out OUT` in a subprocess; returns its wall seconds."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out}: expected a new or empty folder (a fresh run), found files")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "valley_rt", "train", "--recipe", recipe, "--out", str(out),
                    "--threads", str(threads), "--no-progress"], check=True)
    return time.perf_counter() - t0


def report(result: dict, **extra) -> int:
    for key in ("differing", "missing", "extra"):
        for rel in result[key]:
            print(f"{key:9s} {rel}", file=sys.stderr)
    print(json.dumps({"benchmark": "reproduce_demo", **extra, **result}))
    return 0 if result["bit_for_bit"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="fresh run folder; the checkpoint lands in OUT/model")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the bundled demo was trained with 2)")
    ap.add_argument("--against-run", type=Path, help="compare with OTHER/model instead of the bundled demo")
    ap.add_argument("--record", action="store_true", help=f"write {RECORD.relative_to(REPO)} from the bundle")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("WANT", "GOT"), help="compare two checkpoint folders")
    args = ap.parse_args(argv)

    if args.record:
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps({"folder": "valley_rt/assets/demo",
                                      "command": "valley-rt train --recipe demo --out OUT --threads 2",
                                      "files": file_hashes(BUNDLED)}, indent=1) + "\n")
        print(json.dumps({"benchmark": "reproduce_demo", "recorded": str(RECORD)}))
        return 0
    if args.compare:
        return report(compare(file_hashes(args.compare[0]), file_hashes(args.compare[1])),
                      want=str(args.compare[0]), got=str(args.compare[1]))
    if args.out is None:
        ap.error("--out is required (unless --record or --compare)")
    if args.against_run is None and args.recipe != "demo":
        ap.error("only the demo recipe is bundled: pass --against-run for other recipes")
    if args.against_run is not None:
        want, source = file_hashes(args.against_run / "model"), str(args.against_run / "model")
    else:
        recorded = json.loads(RECORD.read_text())["files"]
        bundled = file_hashes(BUNDLED)
        if bundled != recorded:  # the record describes the bundle; if not, one of them changed
            raise SystemExit(f"error: {BUNDLED} no longer matches {RECORD}; rerun with --record if intended")
        want, source = recorded, "valley_rt/assets/demo"
    seconds = train(args.recipe, args.out, args.threads)
    return report(compare(want, file_hashes(args.out / "model")), recipe=args.recipe, want=source,
                  got=str(args.out / "model"), train_seconds=round(seconds, 1))


if __name__ == "__main__":
    sys.exit(main())
