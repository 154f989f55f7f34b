"""A real-size Valley through the whole pipeline, each stage a whole process under `/usr/bin/time -v`.

    python benchmarks/bench_real_size.py --preset valley2-7b              # make, convert, export, ask
    python benchmarks/bench_real_size.py --preset valley2-7b --layers 2   # the same shapes, 2 LLM layers
    python benchmarks/bench_real_size.py --steps export,ask               # reuse what WORK already holds
    python benchmarks/bench_real_size.py --steps export,ask --quant gptq --calib data.json --calib-samples 16

Stages (each a fresh process; peak RSS is that process's maximum resident set, as `time -v` reports):
    make     benchmarks/make_real_checkpoint.py: random fp16 weights in the original layout, 10 GiB shards
    convert  valley-rt convert WORK/ckpt/original WORK/converted --vision-tower WORK/ckpt/clip
    export   valley-rt export WORK/converted -o WORK/engine --quant rtn4 --gpu no; with --quant gptq --calib
             DATA, streamed GPTQ on DATA's clips instead (stage export-gptq)
    ask      the runtime on the engine (benchmarks/bench_ask.py's fast child): load time, TTFT at the real
             token layout (256 + T visual tokens, 8 frames), decode tokens/s over a fixed answer length
             (stage ask-gptq when WORK/engine holds a GPTQ LLM)

--drop-original deletes WORK/ckpt (which this script wrote) once convert has finished, for disks that
cannot hold the original and the converted checkpoint at once. Results: benchmarks/results/
real_size_<preset>.json (merged with earlier stages' results) and one JSON line. There is no baseline
process here: the goals are absolute (peak RSS against the machine's memory), stated next to each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import hardware  # benchmarks/common.py (this script's folder is on sys.path)
from valley_rt.engine_format import folder_bytes
from valley_rt.errors import ValleyError
from valley_rt.outdir import MARKER, claim_folder, is_checkpoint, is_engine

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO.parent / "shared" / "videos" / "snowmobile.mp4"
GOALS_GB = {"convert": 16, "export": 16, "ask": 6}


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run cmd under /usr/bin/time -v; its wall time, peak RSS and exit status (stderr kept in log)."""
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    log.write_text(p.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    out = {"cmd": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), "rc": p.returncode,
           "wall_s": round(time.time() - t0, 1), "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None}
    if p.returncode != 0:
        out["stderr_tail"] = p.stderr[-1500:]
    out["stdout_tail"] = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    return out


def disk_gb(path: Path) -> float:
    return round(folder_bytes(path) / 2**30, 2) if path.exists() else 0.0


MADE = {"original", "base", "clip", "valley-rt"}  # what make_real_checkpoint.py writes under its OUT
LOGS = ("make.log", "convert.log", "export.log", "ask.log")  # the stages' logs, in WORK


def made_checkpoint(folder: Path) -> bool:
    """A folder make_real_checkpoint.py wrote (complete or cut short): only the entries it makes."""
    return folder.is_dir() and not folder.is_symlink() and {p.name for p in folder.iterdir()} <= MADE


def remove_own(folder: Path, ours, what: str) -> None:
    """Remove WORK/<stage> before its stage writes it again, or at --cleanup: only when it is what that
    stage writes (`ours`); anything else in its place is refused, never deleted."""
    if not os.path.lexists(folder):
        return
    if not ours(folder):
        raise ValleyError(f"{folder}: not {what} this benchmark wrote (other files are in it); move it away "
                          f"or pass another --work")
    shutil.rmtree(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="valley2-7b")
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the preset's)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/valley-rt-real"))
    ap.add_argument("--steps", default="make,convert,export,ask")
    ap.add_argument("--tokens", type=int, default=32, help="answer length for ask (eos and stop strings off)")
    ap.add_argument("--prefill", choices=("auto", "int8", "int4"), default=None,
                    help="VALLEY_RT_PREFILL for ask (the W8A8 prompt graph: auto, int8 always, int4 never); "
                         "recorded as stage ask-prefill-<choice>")
    ap.add_argument("--quant", choices=("rtn4", "gptq"), default="rtn4",
                    help="export's LLM quantization; gptq (streamed, layer by layer) needs --calib and is recorded "
                         "as stage export-gptq")
    ap.add_argument("--calib", type=Path, default=None, help="Valley instruction JSON for --quant gptq")
    ap.add_argument("--calib-samples", type=int, default=16, help="records drawn from --calib (3/4 calibrate)")
    ap.add_argument("--keep-failed-gate", action="store_true",
                    help="export --keep-failed-gate: random weights give near-flat logits, whose next-token "
                         "agreement misses the GPTQ gate; the figures are recorded either way")
    ap.add_argument("--drop-original", action="store_true", help="delete WORK/ckpt after convert")
    ap.add_argument("--cleanup", action="store_true", help="delete WORK at the end")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quant == "gptq" and args.calib is None:
        ap.error("--quant gptq needs --calib DATA")
    name = args.preset + (f"-{args.layers}layers" if args.layers else "")
    out_file = args.out or REPO / "benchmarks" / "results" / f"real_size_{name}.json"
    result = json.loads(out_file.read_text()) if out_file.is_file() else {}
    result.update({"preset": args.preset, "llm_layers": args.layers, "hardware": hardware(), "goals_peak_rss_gb": GOALS_GB})
    stages = result.setdefault("stages", {})
    # WORK must be new, empty or this benchmark's own earlier folder (its marker file): the stages below
    # replace WORK/ckpt, WORK/converted and WORK/engine, so a folder of the user's files is refused.
    work = claim_folder(args.work, kind="bench-real-size")
    ckpt, conv, eng = work / "ckpt", work / "converted", work / "engine"
    py, cli = sys.executable, [sys.executable, "-m", "valley_rt"]
    steps = args.steps.split(",")

    def record(stage: str, r: dict) -> None:
        stages[stage] = r
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2) + "\n")  # after every stage: a stop keeps the rest
        print(f"{stage:8s} rc={r['rc']} wall {r['wall_s']} s, peak RSS {r['peak_rss_gb']} GB", flush=True)
        if r["rc"] != 0:
            print(r.get("stderr_tail", ""), file=sys.stderr)

    if "make" in steps:
        remove_own(ckpt, made_checkpoint, "a random checkpoint")
        cmd = [py, str(REPO / "benchmarks" / "make_real_checkpoint.py"), str(ckpt), "--preset", args.preset]
        r = timed(cmd + (["--layers", str(args.layers)] if args.layers else []), work / "make.log")
        r["disk_gb"] = disk_gb(ckpt)
        record("make", r)
    if "convert" in steps:
        remove_own(conv, is_checkpoint, "a converted checkpoint")
        r = timed(cli + ["convert", str(ckpt / "original"), str(conv), "--vision-tower", str(ckpt / "clip")],
                  work / "convert.log")
        r["disk_gb"] = disk_gb(conv)
        record("convert", r)
        if args.drop_original and r["rc"] == 0:
            remove_own(ckpt, made_checkpoint, "a random checkpoint")
    if "export" in steps:
        remove_own(eng, is_engine, "an engine")
        quant = ["--quant", "rtn4"] if args.quant == "rtn4" else \
            ["--quant", "gptq", "--calib", str(args.calib), "--calib-samples", str(args.calib_samples),
             *(["--keep-failed-gate"] if args.keep_failed_gate else [])]
        r = timed(cli + ["export", str(conv), "-o", str(eng), *quant, "--gpu", "no"], work / "export.log")
        r["disk_gb"] = disk_gb(eng)
        if (eng / "manifest.json").is_file():
            m = json.loads((eng / "manifest.json").read_text())
            r["precision"] = m.get("precision")
            if args.quant == "gptq":  # the gate's figures, the calibration's size, the per-layer times
                r["gptq"] = m["parity"]["llm"]
        record("export" if args.quant == "rtn4" else "export-gptq", r)
    if "ask" in steps:
        cmd = [py, str(REPO / "benchmarks" / "bench_ask.py"), "--child", "fast", "--model", str(eng),
               "--video", str(VIDEO), "--question", "What happens in this video?", "--tokens", str(args.tokens),
               "--t0", repr(time.time())]
        env = None
        if args.prefill:
            env = {**os.environ, "VALLEY_RT_PREFILL": args.prefill}
        r = timed(cmd, work / "ask.log", env=env)
        if r["rc"] == 0:
            child = json.loads(r["stdout_tail"])
            r.update({k: child[k] for k in ("load_ms", "ttft_ms", "prefill_ms", "vision_ms", "decode_tokens_per_s",
                                            "tokens_in", "tokens_out", "backends") if k in child})
        r["prefill_policy"] = args.prefill or os.environ.get("VALLEY_RT_PREFILL", "auto")
        manifest = eng / "manifest.json"
        llm = json.loads(manifest.read_text())["precision"]["llm"] if manifest.is_file() else ""
        stage = "ask" + ("-gptq" if llm.startswith("gptq") else "")  # the rtn4 engine's figures stay under "ask"
        record(stage if not args.prefill else f"{stage}-prefill-{args.prefill}", r)
    if args.cleanup:  # only what this benchmark wrote; WORK itself goes when nothing else is left in it
        remove_own(ckpt, made_checkpoint, "a random checkpoint")
        remove_own(conv, is_checkpoint, "a converted checkpoint")
        remove_own(eng, is_engine, "an engine")
        for p in (*(work / name for name in LOGS), work / MARKER):
            p.unlink(missing_ok=True)
        if not any(work.iterdir()):
            work.rmdir()
    print(json.dumps({"bench": "real_size", "preset": name,
                      **{f"{s}_{k}": v.get(k) for s, v in stages.items() for k in ("wall_s", "peak_rss_gb")}}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValleyError as e:  # e.g. a --work folder of the user's files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
