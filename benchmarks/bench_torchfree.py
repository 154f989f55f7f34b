"""The torch-free edge runtime against today's path, whole processes, in one run.

Sides:
* torch-free: a virtual environment with the core install only (`pip install REPO`: onnxruntime, av,
  numpy, pillow, tokenizers, typer, rich), created here (its install is timed) or reused (--core-venv).
* today: the runtime as of --baseline-ref (git; default the commit before the torch-free runtime),
  staged as installed (export/ and kernels/ inside valley_rt/) and run by this interpreter (the full
  development environment, torch included), PYTHONPATH first.

Figures: environment size on disk (the core venv; today's core dependency closure summed from the
installed files of each distribution), install time of the core venv; `valley-rt ask` on the demo
engine: whole-process wall time, cold start (a process that imports and loads, then exits), peak RSS
(/usr/bin/time -v), best of --repeats; greedy answers to every bundled question, both sides. Ends
with one JSON line (also saved under benchmarks/results/).

    python benchmarks/bench_torchfree.py [--core-venv DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP = str(REPO / "valley_rt/assets/clips/s4_00002.mp4")
QUESTION = "How many shots are there?"
TODAY_CORE = ["torch", "transformers", "safetensors", "numpy", "av", "pillow", "onnx", "onnxruntime", "typer",
              "rich", "tokenizers"]  # today's core dependencies (pyproject.toml before the split)

ANSWERS = r"""
import json, sys
import valley_rt
from valley_rt.generate import SamplingParams
from valley_rt.runtime import ASSETS
v = valley_rt.load()
out = []
for clip in json.loads((ASSETS / "clips" / "questions.json").read_text())["clips"]:
    ctx = v.encode_video(ASSETS / "clips" / clip["video"])
    for q in clip["questions"]:
        out.append(v.ask(ctx, q["question"], params=SamplingParams(max_new_tokens=256)).answer)
print(json.dumps({"answers": out, "torch_imported": "torch" in sys.modules}))
"""


def hardware() -> dict:
    cpu, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "unknown":
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    isa = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def du_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 2**20


def closure_mb(python: str, names: list[str]) -> dict:
    """Installed size of `names` and everything they require (files listed in each RECORD)."""
    code = r"""
import json, re, sys
from importlib import metadata
todo, seen, total = list(sys.argv[1:]), set(), 0
while todo:
    name = re.split(r"[ ;<>=!\[~]", todo.pop())[0].lower().replace("_", "-")
    if not name or name in seen:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    seen.add(name)
    for f in dist.files or []:
        p = f.locate()
        try:
            total += p.stat().st_size
        except OSError:
            pass
    todo += [r for r in (dist.requires or []) if "extra ==" not in r]
print(json.dumps({"mb": total / 2**20, "packages": sorted(seen)}))
"""
    out = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def make_core_venv(path: Path) -> float:
    """A fresh venv at `path` (a new folder in this run's temporary directory) with `pip install REPO`;
    returns the install's wall seconds (venv creation excluded)."""
    if path.exists():
        raise SystemExit(f"error: {path}: expected a new folder for the core venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    t0 = time.perf_counter()
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO)], check=True)
    return time.perf_counter() - t0


def stage_baseline(ref: str, root: Path) -> Path:
    """valley_rt as of `ref`, laid out as installed (export/, kernels/ inside)."""
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "valley_rt", "export", "kernels"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    for sub in ("export", "kernels"):
        os.rename(root / sub, root / "valley_rt" / sub)
    return root


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Whole-process wall seconds and peak RSS (MB) of cmd, through /usr/bin/time -v."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-v", "-o", tf.name, *cmd], capture_output=True, text=True,
                             env=env, cwd=cwd)
        wall = time.perf_counter() - t0
        if out.returncode:
            raise RuntimeError(f"{cmd}: exit {out.returncode}: {out.stderr[-2000:]}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", tf.read()).group(1))
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "stdout": out.stdout}


def side(python: str, env: dict, repeats: int, cwd: Path) -> dict:
    """cwd: a folder without a valley_rt/ in it (`python -c` puts the working folder first on sys.path)."""
    ask = [python, "-c", "from valley_rt.cli import app; app()", "ask", CLIP, QUESTION, "--no-stream"]
    cold = [python, "-c", "import valley_rt; valley_rt.load()"]
    asks = [timed(ask, env, cwd) for _ in range(repeats)]
    colds = [timed(cold, env, cwd) for _ in range(repeats)]
    answers = json.loads(subprocess.run([python, "-c", ANSWERS], capture_output=True, text=True, env=env,
                                        cwd=cwd, check=True).stdout.strip().splitlines()[-1])
    best = min(asks, key=lambda r: r["wall_s"])
    return {"ask_wall_s": best["wall_s"], "ask_wall_s_all": [round(r["wall_s"], 3) for r in asks],
            "ask_peak_rss_mb": min(r["peak_rss_mb"] for r in asks), "ask_answer": best["stdout"].strip(),
            "cold_start_s": min(r["wall_s"] for r in colds), "cold_peak_rss_mb": min(r["peak_rss_mb"] for r in colds),
            "answers": answers["answers"], "torch_imported": answers["torch_imported"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--core-venv", type=Path, help="reuse this core-only venv instead of creating one")
    ap.add_argument("--baseline-ref", default="d88e596", help="git ref of today's (torch-importing) runtime")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_torchfree.json")
    args = ap.parse_args()

    result: dict = {"bench": "torchfree", "hardware": hardware()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = stage_baseline(args.baseline_ref, tmp / "baseline")
        core = args.core_venv or tmp / "core-venv"
        if args.core_venv is None:
            result["core_install_s"] = make_core_venv(core)
        core_py = str(core / "bin" / "python")
        result["core_env_mb"] = du_mb(core)
        result["core_env_closure"] = closure_mb(core_py, ["valley-rt"])
        result["today_core_closure"] = closure_mb(sys.executable, TODAY_CORE)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["TOKENIZERS_PARALLELISM"] = "false"
        neutral = tmp / "cwd"
        neutral.mkdir()
        # today's side: the staged tree comes first on sys.path, before the editable install's finder
        torchfree = side(core_py, dict(env), args.repeats, neutral)
        today = side(sys.executable, dict(env, PYTHONPATH=str(base)), args.repeats, neutral)
        result["today_source"] = subprocess.run(
            [sys.executable, "-c", "import valley_rt.runtime as r; print(r.__file__)"], capture_output=True,
            text=True, env=dict(env, PYTHONPATH=str(base)), cwd=neutral).stdout.strip()
    result["torchfree"], result["today"] = torchfree, today
    result["answers_identical"] = torchfree["answers"] == today["answers"] and torchfree["ask_answer"] == today["ask_answer"]
    result["questions"] = len(today["answers"])
    result["speedup_ask"] = today["ask_wall_s"] / torchfree["ask_wall_s"]
    result["speedup_cold_start"] = today["cold_start_s"] / torchfree["cold_start_s"]
    result["env_size_ratio"] = result["today_core_closure"]["mb"] / result["core_env_closure"]["mb"]
    for s in (torchfree, today):
        del s["answers"]
    print(f"core env {result['core_env_mb']:.0f} MB on disk (valley-rt's closure "
          f"{result['core_env_closure']['mb']:.0f} MB) vs today's core closure {result['today_core_closure']['mb']:.0f} MB")
    print(f"ask whole process: torch-free {torchfree['ask_wall_s']:.2f} s, today {today['ask_wall_s']:.2f} s "
          f"({result['speedup_ask']:.2f}x); peak RSS {torchfree['ask_peak_rss_mb']:.0f} vs {today['ask_peak_rss_mb']:.0f} MB")
    print(f"cold start: {torchfree['cold_start_s']:.2f} s vs {today['cold_start_s']:.2f} s; "
          f"answers identical on {result['questions']} questions: {result['answers_identical']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
