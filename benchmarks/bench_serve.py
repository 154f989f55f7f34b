"""`valley-rt serve` under load, against a process per question (`valley-rt ask`).

Starts the real server (`valley-rt serve`, bundled demo engine) on 127.0.0.1 and drives it with an
asyncio + httpx client sending streaming OpenAI chat requests over the bundled clips and their
questions (valley_rt/assets/clips/questions.json):

1. encoder cache: for each never-seen video (the bundled clips and a few held-out videos of
   ../shared/videos), a first question, then a second one about the same bytes: TTFT of each.
2. load: `--requests` requests at each concurrency (1, 4, 16): p50/p95 latency and TTFT,
   requests/s and completion tokens/s, errors (5xx counted apart), encoder-cache hit rate.
3. the server's RSS sampled every 0.1 s: after warm-up, peak, at the end (growth = leak).
4. baseline: the same questions, one `valley-rt ask` process each (wall time per question).

Prints a table and ends with one JSON line (also written to --out: benchmarks/results/bench_serve_<model>.json).

With `--llm builtin,vllm` the same run serves the model twice, one backend after the other (the
built-in interleaving scheduler, then `valley-rt serve --llm vllm`: an in-process vLLM engine that
batches the requests), with the same requests, and reports each backend's start (wall time until
/health answers, and the RSS of the server with its child processes: vLLM's engine core is one),
the levels, and the ratios vLLM / built-in; `--plot` draws throughput against concurrency for both
(matplotlib, in whichever environment has it: `--plot-only RESULT.json`).

    python benchmarks/bench_serve.py                   # 200 requests per concurrency
    python benchmarks/bench_serve.py --requests 50 --baseline 3
    python benchmarks/bench_serve.py --model ENGINE --llm builtin,vllm --concurrency 1,4,16,32 \
        --requests 0 --ignore-eos --baseline 0 --out benchmarks/results/bench_serve_vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import hardware  # benchmarks/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
CLIPS = REPO / "valley_rt" / "assets" / "clips"
HELD_OUT = REPO.parent / "shared" / "videos"
HELD_OUT_NAMES = ("snowmobile.mp4", "vp9.webm", "mpeg4.avi", "odd_98x62.mp4")
CLI = [sys.executable, "-m", "valley_rt"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_tree_mb(pid: int) -> float:
    """RSS of a process and all its descendants (vLLM runs its engine core in a child process)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            total += rss_mb(p)
        except OSError:
            continue
    return total


def anon_tree_mb(pid: int) -> float:
    """Anonymous (non-file) resident memory of a process tree: what a memory cap should watch (RSS
    also counts the mmapped weight files, which the kernel can drop)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def check_memory(pid: int, limit_mb: float) -> None:
    """Stop the benchmark (and its server) when the server's tree holds more than limit_mb."""
    if limit_mb and (used := anon_tree_mb(pid)) > limit_mb:
        for p in [*descendants(pid), pid]:
            try:
                os.kill(p, 9)
            except OSError:
                pass
        raise SystemExit(f"the server's processes hold {used:.0f} MB, over --mem-limit-mb {limit_mb:.0f}: stopped")


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


IGNORE_EOS = False  # --ignore-eos: every answer is exactly max_tokens long (random-weight models)


def body(video: Path, question: str, max_tokens: int) -> dict:
    extra = {"ignore_eos": True} if IGNORE_EOS else {}
    return {"model": "valley-rt-demo", "stream": True, "stream_options": {"include_usage": True}, "seed": 0,
            "max_tokens": max_tokens, **extra,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                                      {"type": "text", "text": question}]}]}


def transport() -> httpx.AsyncHTTPTransport:
    """httpx writes a request's headers and body separately and leaves Nagle's algorithm on, so the
    body can wait for the server's delayed ACK (up to 40 ms on Linux): a client artifact, not server
    time. TCP_NODELAY, as browsers and most HTTP clients set it, removes it."""
    return httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    """One streaming request: latency, TTFT (first SSE chunk: the server sends it with the first
    token), completion tokens, HTTP status."""
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if line == "data: [DONE]":
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    status = obj["error"].get("code") or 500
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
    except httpx.HTTPError:
        status = -1
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "status": status}


async def load_run(url: str, work: list[tuple[Path, str]], concurrency: int, n: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, transport=transport()) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(work[i % len(work)])
        results = []

        async def worker():
            while not queue.empty():
                video, q = queue.get_nowait()
                results.append(await one(client, url, body(video, q, max_tokens)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    return {"concurrency": concurrency, "requests": n, "wall_s": round(wall, 2),
            "errors": len(results) - len(ok),
            "errors_5xx": sum(1 for r in results if isinstance(r["status"], int) and (r["status"] >= 500 or r["status"] < 0)),
            "p50_latency_ms": round(pct([r["latency"] for r in ok], 0.5) * 1e3, 1),
            "p95_latency_ms": round(pct([r["latency"] for r in ok], 0.95) * 1e3, 1),
            "p50_ttft_ms": round(pct([r["ttft"] for r in ok], 0.5) * 1e3, 1),
            "p95_ttft_ms": round(pct([r["ttft"] for r in ok], 0.95) * 1e3, 1),
            "requests_per_s": round(len(ok) / wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1)}


async def cache_run(url: str, videos: list[Path], questions: list[str]) -> dict:
    async with httpx.AsyncClient(timeout=120, transport=transport()) as client:
        first, second = [], []
        for v in videos:
            a = await one(client, url, body(v, questions[0], 32))
            b = await one(client, url, body(v, questions[1], 32))
            if a["status"] == 200 and b["status"] == 200:
                first.append(a["ttft"])
                second.append(b["ttft"])
    return {"videos": [v.name for v in videos], "first_ttft_ms": [round(x * 1e3, 1) for x in first],
            "second_ttft_ms": [round(x * 1e3, 1) for x in second],
            "median_ratio_second_over_first": round(statistics.median(b / a for a, b in zip(first, second)), 3)}


def baseline(work: list[tuple[Path, str]], n: int, max_tokens: int, model: list[str]) -> list[float]:
    """Wall time of one `valley-rt ask` process per question."""
    times = []
    for video, q in work[:n]:
        t0 = time.perf_counter()
        subprocess.run(CLI + ["ask", str(video), q, *model, "--no-stream", "--max-new-tokens", str(max_tokens)],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def serve_run(args, llm: str, work, questions, root: Path) -> dict:
    """Start `valley-rt serve` with one LLM backend, measure it, stop it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    model = [args.model] if args.model else []
    backend = ["--kv-slots", str(args.kv_slots)]
    if llm == "vllm":
        backend = ["--llm", "vllm", "--vllm-dtype", args.vllm_dtype, "--vllm-memory", str(args.vllm_memory),
                   "--kv-slots", str(args.vllm_slots)]
    proc = subprocess.Popen(CLI + ["serve", *model, "--port", str(port), "--allowed-media-path", str(root),
                                   "--threads", str(args.threads), "--max-queue", "64", "--log-level", "warning",
                                   *backend])
    rss: list[tuple[float, float]] = []
    try:
        t_start = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if proc.poll() is not None:
                raise SystemExit(f"the {llm} server exited during start-up")
            check_memory(proc.pid, args.mem_limit_mb)
        startup_s = time.perf_counter() - t_start
        started_rss = rss_tree_mb(proc.pid)
        print(f"{llm}: server up in {startup_s:.1f} s, RSS with children {started_rss:.0f} MB", file=sys.stderr)

        async def run_all():
            stop = asyncio.Event()

            async def sample_rss():
                while not stop.is_set():
                    rss.append((time.perf_counter(), rss_tree_mb(proc.pid)))
                    check_memory(proc.pid, args.mem_limit_mb)
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample_rss())
            held_out = [HELD_OUT / n for n in HELD_OUT_NAMES if (HELD_OUT / n).is_file()]
            clips = list(dict.fromkeys(v for v, _ in work))
            cache = await cache_run(url, clips[:3] + held_out[:args.held_out], questions) if args.cache_run else {}
            warm = [(v, next(q for w, q in work if w == v)) for v in clips]  # one question per clip: each encoded
            await load_run(url, warm + work, 4, args.warmup or len(work), args.max_tokens)
            warm_rss = rss_tree_mb(proc.pid)
            hits0, miss0 = metric(url, "valley_encoder_cache_hits_total"), metric(url, "valley_encoder_cache_misses_total")
            levels = []
            for c in (int(x) for x in args.concurrency.split(",")):
                n = args.requests or max(args.min_requests, args.request_factor * c)
                levels.append(await load_run(url, work, c, n, args.max_tokens))
                levels[-1]["rss_mb"] = round(rss_tree_mb(proc.pid), 1)
                levels[-1]["load_avg_1min"] = round(os.getloadavg()[0], 2)
                print(llm, json.dumps(levels[-1]), file=sys.stderr)
            hits = metric(url, "valley_encoder_cache_hits_total") - hits0
            misses = metric(url, "valley_encoder_cache_misses_total") - miss0
            stop.set()
            await sampler
            return cache, warm_rss, levels, hits / max(1.0, hits + misses)

        cache, warm_rss, levels, hit_rate = asyncio.run(run_all())
        end_rss = rss_tree_mb(proc.pid)
    finally:
        proc.terminate()
        rc = proc.wait(120)
    c1 = next((lv for lv in levels if lv["concurrency"] == 1), levels[0])
    c16 = next((lv for lv in levels if lv["concurrency"] == 16), levels[-1])
    return {"llm": llm, "server_startup_s": round(startup_s, 2), "rss_mb_after_startup": round(started_rss, 1),
            "levels": levels, "encoder_cache": {**cache, "hit_rate_under_load": round(hit_rate, 3)},
            "rss_mb": {"after_warmup": round(warm_rss, 1), "peak": round(max(r for _, r in rss), 1),
                       "end": round(end_rss, 1), "growth_after_warmup": round(end_rss - warm_rss, 1)},
            "throughput_ratio_c16_over_c1": round(c16["requests_per_s"] / c1["requests_per_s"], 2),
            "errors_total": sum(lv["errors"] for lv in levels), "errors_5xx": sum(lv["errors_5xx"] for lv in levels),
            "server_exit_code_after_sigterm": rc}


def vllm_binding() -> str:
    """The CPUs the server's in-process vLLM runs its model threads on (backends/llm_vllm.cpu_thread_binding)."""
    from valley_rt.backends.llm_vllm import CPU_BIND_ENV, cpu_thread_binding

    binding = cpu_thread_binding()
    return binding if binding is not None else os.environ.get(CPU_BIND_ENV, "vLLM's own (auto)")


def print_levels(name: str, levels: list[dict]) -> None:
    print(f"{name}\n{'conc':>4} {'n':>4} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'TTFT p50':>9} "
          f"{'TTFT p95':>9} {'err':>4}")
    for lv in levels:
        print(f"{lv['concurrency']:>4} {lv['requests']:>4} {lv['requests_per_s']:>7} {lv['tokens_per_s']:>7} "
              f"{lv['p50_latency_ms']:>8} {lv['p95_latency_ms']:>8} {lv['p50_ttft_ms']:>9} {lv['p95_ttft_ms']:>9} "
              f"{lv['errors']:>4}")


def compare(runs: dict) -> dict:
    """vLLM / built-in per concurrency: aggregate tokens/s, p50 latency and TTFT."""
    base = {lv["concurrency"]: lv for lv in runs["builtin"]["levels"]}
    out = {}
    for lv in runs["vllm"]["levels"]:
        b = base.get(lv["concurrency"])
        if b and b["tokens_per_s"] and b["p50_latency_ms"]:
            out[str(lv["concurrency"])] = {
                "tokens_per_s_ratio": round(lv["tokens_per_s"] / b["tokens_per_s"], 2),
                "p50_latency_ratio": round(lv["p50_latency_ms"] / b["p50_latency_ms"], 2),
                "p50_ttft_ratio": round(lv["p50_ttft_ms"] / b["p50_ttft_ms"], 2)}
    return out


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in result["backends"].items():
        xs = [lv["concurrency"] for lv in run["levels"]]
        ax.plot(xs, [lv["tokens_per_s"] for lv in run["levels"]], marker="o",
                label={"builtin": "built-in (int4 ONNX, interleaved)", "vllm": "vLLM (in process, batched)"}.get(name, name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({lv["concurrency"] for run in result["backends"].values() for lv in run["levels"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("aggregate output tokens/s")
    hw = result["hardware"]
    ax.set_title(f"valley-rt serve, {Path(str(result['model'])).name}: {hw.get('cores')} cores {hw.get('cpu_kind')}, "
                 f"load ~{result.get('load_avg_1min_max', '?')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    global IGNORE_EOS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency (0: max(8, 2 x concurrency))")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--baseline", type=int, default=5, help="questions run as one process each (0: none)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true", help="answers of exactly --max-tokens tokens")
    ap.add_argument("--kv-slots", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's ONNX Runtime threads per session (1: the LLM thread, the event loop and the "
                         "vision worker share the cores; measured on 2 busy cores, 2 threads lost a third at c=16)")
    ap.add_argument("--model", default=None, help="engine or checkpoint folder (default: the bundled demo engine)")
    ap.add_argument("--llm", default="builtin", help="builtin, vllm, or builtin,vllm (both in one run)")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument("--vllm-memory", type=float, default=0.18,
                    help="vLLM's share of RAM on its CPU build: weights, activations and KV cache")
    ap.add_argument("--vllm-slots", type=int, default=32, help="requests handed to vLLM at once")
    ap.add_argument("--held-out", type=int, default=len(HELD_OUT_NAMES), help="held-out videos in the cache run")
    ap.add_argument("--no-cache-run", dest="cache_run", action="store_false", help="skip the encoder-cache run")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up requests (0: one per question; each clip first)")
    ap.add_argument("--min-requests", type=int, default=8, help="with --requests 0: at least this many per level")
    ap.add_argument("--request-factor", type=int, default=2, help="with --requests 0: this many x concurrency")
    ap.add_argument("--mem-limit-mb", type=float, default=0,
                    help="stop when the server's processes hold more anonymous memory than this (0: no limit)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default: benchmarks/results/bench_serve_<model folder>.json, _demo without --model)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG: throughput against concurrency per backend")
    ap.add_argument("--plot-only", type=Path, default=None, help="draw --plot from this result JSON and exit")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot)
        return
    IGNORE_EOS = args.ignore_eos

    spec = json.loads((CLIPS / "questions.json").read_text())
    work = [(CLIPS / c["video"], q["question"]) for c in spec["clips"] for q in c["questions"]]
    questions = [q for _, q in work]
    # file:// URLs: the bundled clips and the held-out videos beside the repo (../shared may be a link)
    root = Path(os.path.commonpath([CLIPS.resolve(), HELD_OUT.resolve()]))
    llms = args.llm.split(",")
    t0 = time.perf_counter()
    runs = {llm: serve_run(args, llm, work, questions, root) for llm in llms}
    model_args = ["--model", args.model] if args.model else []
    base = baseline(work, args.baseline, args.max_tokens, model_args) if args.baseline else []
    loads = [lv["load_avg_1min"] for r in runs.values() for lv in r["levels"]]
    result = {
        "bench": "serve", "model": args.model or "demo engine", "hardware": hardware(),
        "server": {"kv_slots": args.kv_slots, "threads": args.threads, "max_tokens": args.max_tokens,
                   "warmup_requests": args.warmup or len(work), "cache_run": args.cache_run,
                   "ignore_eos": args.ignore_eos, "vllm": {"dtype": args.vllm_dtype, "memory": args.vllm_memory,
                                                           "slots": args.vllm_slots, "cpu_binding": vllm_binding()}
                   if "vllm" in llms else None},
        "note": ("load_avg_1min (per level, and its max): the 1-minute load average as each level ended; the "
                 "benchmark's own server and clients count in it, anything above that was other work on the machine"),
        "load_avg_1min_max": max(loads), "wall_s": round(time.perf_counter() - t0, 1),
    }
    if len(runs) == 1:
        result.update(runs[llms[0]])
    else:
        result["backends"] = runs
        if {"builtin", "vllm"} <= set(runs):
            result["vllm_over_builtin"] = compare(runs)
    if base:
        per_process_ms = statistics.median(base) * 1e3
        c1 = next((lv for lv in runs[llms[0]]["levels"] if lv["concurrency"] == 1), runs[llms[0]]["levels"][0])
        result["per_process_ask_ms"] = {"median": round(per_process_ms, 1), "all": [round(t * 1e3) for t in base]}
        result["speedup_vs_process_per_question_c1"] = round(per_process_ms / c1["p50_latency_ms"], 1)
    for llm, run in runs.items():
        print_levels(f"{llm}: start {run['server_startup_s']} s, RSS {run['rss_mb_after_startup']} MB", run["levels"])
    if "vllm_over_builtin" in result:
        print("vLLM / built-in:", json.dumps(result["vllm_over_builtin"]))
    if args.out is None:  # never the demo's file for another model's figures
        name = Path(args.model).resolve().name if args.model else "demo"
        args.out = REPO / "benchmarks" / "results" / f"bench_serve_{name}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot and "backends" in result:
        try:
            plot(result, args.plot)
        except ImportError:
            print(f"no matplotlib here: draw it with --plot {args.plot} --plot-only {args.out}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
