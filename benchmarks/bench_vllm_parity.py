"""Greedy parity of the LLM through vLLM (in process and remote) with the built-in fp32 reference.

Every question's prompt embeddings [L, H] (Valley prompt, visual tokens spliced in, reference vision)
are built once; the fp32 transformers reference generates from them, then an in-process vLLM engine,
then a `vllm serve --enable-prompt-embeds` started here on 127.0.0.1 (one vLLM engine at a time).
vLLM gets the requests `--concurrency` at a time, so they are batched by its scheduler. An answer
is identical when its token ids are. Every difference is listed with the first diverging position
and the reference's top-2 logit margin there (a near-tie explains a flip by float rounding).

Run it in the vLLM environment (docs/vllm.md):

    valley-rt synth /tmp/vllm-heldout --n 80 --seed 9001
    /work/vllm-env/bin/python benchmarks/bench_vllm_parity.py /tmp/vllm-heldout --questions 200

Ends with one JSON line; --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def cpu_info() -> str:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model} ({' '.join(isa)}), {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def build_prompts(ref, records, heldout: Path):
    from valley_rt.prompt import Turn, encode, format_conversation

    contexts, prompts = {}, []
    for r in records:
        video = r["video"]
        if video not in contexts:
            contexts[video] = ref.encode_video(heldout / "videos" / video if not Path(video).is_absolute() else video)
        ctx = contexts[video]
        text, _ = format_conversation([Turn("human", r["conversations"][0]["value"])], system=ref.cfg.system_prompt)
        ids, _ = encode(ref.tokenizer, text, cfg=ref.cfg, num_frames=ctx.num_frames)
        prompts.append({"id": r["id"], "question": r["conversations"][0]["value"].split("\n", 1)[-1],
                        "embeds": ref._embeds(ids, ctx)})
    return prompts


def reference_answers(ref, prompts, params):
    import torch

    from valley_rt.generate import generate

    out = []
    for p in prompts:
        ref.llm.reset()
        res = generate(ref.llm, ref.tokenizer, p["embeds"], params=params, stop=("###",))
        # top-2 margins of the reference at every answer position (teacher-forced), for explaining flips
        ref.llm.reset()
        ids = res.token_ids
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(p["embeds"], np.float32))  # the runtime's embeddings are NumPy
            if len(ids) > 1:
                x = torch.cat([x, torch.as_tensor(np.asarray(ref.llm.embed(ids[:-1]), np.float32))])
            logits = ref.llm.model(inputs_embeds=x[None]).logits[0, -len(ids):].float()  # [n, V]
        top2 = logits.topk(2, dim=-1).values
        out.append({"ids": ids, "text": res.text, "margins": (top2[:, 0] - top2[:, 1]).tolist()})
    ref.llm.reset()
    return out


def run_backend(backend, tokenizer, prompts, params, concurrency: int):
    def one(p):
        res = backend.generate_from_embeds(p["embeds"], tokenizer=tokenizer, params=params, stop=("###",))
        return {"ids": res.token_ids, "text": res.text}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, prompts))
    return answers, time.perf_counter() - t0


def compare(name, prompts, ref_answers, answers):
    diffs = []
    for p, r, a in zip(prompts, ref_answers, answers):
        if r["ids"] != a["ids"]:
            k = next((i for i, (x, y) in enumerate(zip(r["ids"], a["ids"])) if x != y), min(len(r["ids"]), len(a["ids"])))
            margin = r["margins"][k] if k < len(r["margins"]) else None
            diffs.append({"backend": name, "id": p["id"], "question": p["question"], "first_diff_token": k,
                          "ref_top2_margin": margin, "reference": r["text"], "vllm": a["text"]})
    n = len(prompts)
    return {"questions": n, "identical": n - len(diffs), "identical_pct": 100.0 * (n - len(diffs)) / n}, diffs


def start_server(llm_dir: Path, port: int, memory: float, log: Path) -> subprocess.Popen:
    from valley_rt.backends.llm_vllm import serve_command, serve_env

    cmd = serve_command(llm_dir, port=port, memory=memory, python=sys.executable)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **serve_env()})


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve not ready after {timeout_s} s")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("heldout", type=Path, help="a `valley-rt synth` folder (data.json, videos/)")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--memory", type=float, default=0.1, help="vLLM gpu_memory_utilization (RAM share on CPU)")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--modes", default="inprocess,remote")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--baseline", choices=("reference", "inprocess"), default="reference",
                    help="what remote answers are compared with: the fp32 reference, or (faster) the in-process "
                         "vLLM answers of the same run")
    args = ap.parse_args()

    from valley_rt.backends.llm_vllm import RemoteVllmLLM, VllmLLM, llm_folder
    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import DEMO_CHECKPOINT, load

    records = json.loads((args.heldout / "data.json").read_text())[: args.questions]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    ref = load(DEMO_CHECKPOINT, reference=True)
    llm_dir = llm_folder(DEMO_CHECKPOINT)
    t0 = time.perf_counter()
    prompts = build_prompts(ref, records, args.heldout)
    ref_answers = reference_answers(ref, prompts, params) if args.baseline == "reference" else None
    ref_s = time.perf_counter() - t0
    print(f"hardware: {cpu_info()}")
    if ref_answers is not None:
        print(f"reference fp32 (transformers, batch 1, teacher-forced margins and prompt building included): "
              f"{len(prompts)} answers in {ref_s:.1f} s")
    result = {"bench": "vllm_parity", "baseline": args.baseline, "hardware": cpu_info(), "questions": len(prompts),
              "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency, "reference_s": round(ref_s, 1)}
    all_diffs = []
    modes = args.modes.split(",")
    if "inprocess" in modes:
        t0 = time.perf_counter()
        llm = VllmLLM(llm_dir, tokenizer=ref.tokenizer, memory=args.memory)
        start_s = time.perf_counter() - t0
        try:
            answers, gen_s = run_backend(llm, ref.tokenizer, prompts, params, args.concurrency)
        finally:
            llm.close()
        if ref_answers is None:  # --baseline inprocess: remote answers are compared with these
            ref_answers = [{**a, "margins": []} for a in answers]
            stats, diffs = {"questions": len(prompts), "baseline": True}, []
        else:
            stats, diffs = compare("inprocess", prompts, ref_answers, answers)
        result["inprocess"] = {**stats, "engine_start_s": round(start_s, 1), "generate_s": round(gen_s, 1)}
        all_diffs += diffs
        print(f"in-process vLLM: {stats.get('identical', 'baseline')}/{stats['questions']} identical; start "
              f"{start_s:.1f} s, answers {gen_s:.1f} s at concurrency {args.concurrency}")
    if "remote" in modes:
        url = f"http://127.0.0.1:{args.port}"
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-serve-{args.port}.log"
        proc = start_server(llm_dir, args.port, args.memory, log)
        try:
            start_s = wait_ready(url, proc, 1200)
            client = RemoteVllmLLM(url, llm_dir, tokenizer=ref.tokenizer)
            answers, gen_s = run_backend(client, ref.tokenizer, prompts, params, args.concurrency)
        finally:
            stop_server(proc)
        stats, diffs = compare("remote", prompts, ref_answers, answers)
        result["remote"] = {**stats, "server_start_s": round(start_s, 1), "generate_s": round(gen_s, 1)}
        all_diffs += diffs
        print(f"remote vLLM (vllm serve): {stats['identical']}/{stats['questions']} identical; server start "
              f"{start_s:.1f} s, answers {gen_s:.1f} s at concurrency {args.concurrency}")
    for d in all_diffs:
        print(f"DIFF {d['backend']} {d['id']}: token {d['first_diff_token']}, reference top-2 margin "
              f"{d['ref_top2_margin']}: {d['reference']!r} vs {d['vllm']!r}")
    result["differences"] = all_diffs
    line = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
