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

Prints a table and ends with one JSON line (also written to benchmarks/results/bench_serve_demo.json).

    python benchmarks/bench_serve.py                   # 200 requests per concurrency
    python benchmarks/bench_serve.py --requests 50 --baseline 3
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


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def body(video: Path, question: str, max_tokens: int) -> dict:
    return {"model": "valley-rt-demo", "stream": True, "stream_options": {"include_usage": True}, "seed": 0,
            "max_tokens": max_tokens,
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
    async with httpx.AsyncClient(timeout=120, limits=limits, transport=transport()) as client:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--baseline", type=int, default=5, help="questions run as one process each")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-slots", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's ONNX Runtime threads per session (1: the LLM thread, the event loop and the "
                         "vision worker share the cores; measured on 2 busy cores, 2 threads lost a third at c=16)")
    ap.add_argument("--model", default=None, help="engine or checkpoint folder (default: the bundled demo engine)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_serve_demo.json")
    args = ap.parse_args()

    spec = json.loads((CLIPS / "questions.json").read_text())
    work = [(CLIPS / c["video"], q["question"]) for c in spec["clips"] for q in c["questions"]]
    questions = [q for _, q in work]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # file:// URLs: the bundled clips and the held-out videos beside the repo (../shared may be a link)
    root = Path(os.path.commonpath([CLIPS.resolve(), HELD_OUT.resolve()]))
    model = [args.model] if args.model else []
    proc = subprocess.Popen(CLI + ["serve", *model, "--port", str(port), "--allowed-media-path", str(root),
                                   "--kv-slots", str(args.kv_slots), "--threads", str(args.threads),
                                   "--max-queue", "64", "--log-level", "warning"])
    rss: list[tuple[float, float]] = []
    try:
        t_start = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            if proc.poll() is not None:
                raise SystemExit("the server exited during start-up")
        startup_s = time.perf_counter() - t_start

        async def run_all():
            stop = asyncio.Event()

            async def sample_rss():
                while not stop.is_set():
                    rss.append((time.perf_counter(), rss_mb(proc.pid)))
                    await asyncio.sleep(0.1)

            sampler = asyncio.create_task(sample_rss())
            held_out = [HELD_OUT / n for n in HELD_OUT_NAMES if (HELD_OUT / n).is_file()]
            cache = await cache_run(url, [v for v, _ in work[::6]][:3] + held_out, questions)
            await load_run(url, work, 4, 24, args.max_tokens)  # warm-up (every clip encoded, slots touched)
            warm_rss = rss_mb(proc.pid)
            hits0, miss0 = metric(url, "valley_encoder_cache_hits_total"), metric(url, "valley_encoder_cache_misses_total")
            levels = []
            for c in (int(x) for x in args.concurrency.split(",")):
                levels.append(await load_run(url, work, c, args.requests, args.max_tokens))
                levels[-1]["rss_mb"] = round(rss_mb(proc.pid), 1)
                print(json.dumps(levels[-1]), file=sys.stderr)
            hits = metric(url, "valley_encoder_cache_hits_total") - hits0
            misses = metric(url, "valley_encoder_cache_misses_total") - miss0
            stop.set()
            await sampler
            return cache, warm_rss, levels, hits / max(1.0, hits + misses)

        cache, warm_rss, levels, hit_rate = asyncio.run(run_all())
        end_rss = rss_mb(proc.pid)
    finally:
        proc.terminate()
        rc = proc.wait(60)
    base = baseline(work, args.baseline, args.max_tokens, ["--model", args.model] if args.model else [])
    c1 = next((lv for lv in levels if lv["concurrency"] == 1), levels[0])
    c16 = next((lv for lv in levels if lv["concurrency"] == 16), levels[-1])
    per_process_ms = statistics.median(base) * 1e3
    result = {
        "bench": "serve", "model": args.model or "demo engine", "hardware": hardware(),
        "server": {"kv_slots": args.kv_slots, "threads": args.threads, "max_tokens": args.max_tokens},
        "note": "shared machine: other agents' jobs ran at the same time (see load_avg_1min)",
        "server_startup_s": round(startup_s, 2), "levels": levels,
        "encoder_cache": {**cache, "hit_rate_under_load": round(hit_rate, 3)},
        "rss_mb": {"after_warmup": round(warm_rss, 1), "peak": round(max(r for _, r in rss), 1),
                   "end": round(end_rss, 1), "growth_after_warmup": round(end_rss - warm_rss, 1)},
        "per_process_ask_ms": {"median": round(per_process_ms, 1), "all": [round(t * 1e3) for t in base]},
        "speedup_vs_process_per_question_c1": round(per_process_ms / c1["p50_latency_ms"], 1),
        "throughput_ratio_c16_over_c1": round(c16["requests_per_s"] / c1["requests_per_s"], 2),
        "errors_total": sum(lv["errors"] for lv in levels), "errors_5xx": sum(lv["errors_5xx"] for lv in levels),
        "server_exit_code_after_sigterm": rc,
    }
    print(f"{'conc':>4} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'err':>4}")
    for lv in levels:
        print(f"{lv['concurrency']:>4} {lv['requests_per_s']:>7} {lv['tokens_per_s']:>7} {lv['p50_latency_ms']:>8} "
              f"{lv['p95_latency_ms']:>8} {lv['p50_ttft_ms']:>9} {lv['p95_ttft_ms']:>9} {lv['errors']:>4}")
    print(f"per-process ask: {per_process_ms:.0f} ms/question -> server at c=1 is "
          f"{result['speedup_vs_process_per_question_c1']}x faster; c16/c1 throughput "
          f"{result['throughput_ratio_c16_over_c1']}; second-question TTFT / first: "
          f"{cache['median_ratio_second_over_first']}; RSS {result['rss_mb']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
