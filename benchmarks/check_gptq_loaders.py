"""Which loaders take an engine's standard GPTQ folder (ENGINE/llm/gptq/) as it is.

For each loader: does it load, and are its greedy tokens after a fixed prompt those of valley-rt's own
reader (the folder dequantized into a plain fp32 LLaMA: export.gptq.load_gptq_as_torch)? Run it in
each environment (the default one has transformers + GPTQModel, the vLLM one has vLLM):

    python benchmarks/check_gptq_loaders.py ENGINE/llm/gptq --loaders transformers,gptqmodel
    .venv-vllm/bin/python benchmarks/check_gptq_loaders.py ENGINE/llm/gptq --loaders vllm

Prints one JSON line per loader: {"loader", "loaded", "error", "greedy_equal", "tokens"}.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

PROMPT_TEXT = "What happens in the video? Describe it."
N = 16


def prompt(gdir: Path) -> list[int]:
    """The prompt's token ids, by the folder's own tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gdir)(PROMPT_TEXT).input_ids


def greedy_hf(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, min_new_tokens=N)
    return out[0, len(ids):].tolist()


def ours(gdir: Path) -> list[int]:
    from valley_rt.export.gptq import load_gptq_as_torch

    return greedy_hf(load_gptq_as_torch(gdir).eval(), prompt(gdir))


def transformers_load(gdir: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    return greedy_hf(AutoModelForCausalLM.from_pretrained(gdir, device_map="cpu").eval(), prompt(gdir))


def gptqmodel_load(gdir: Path) -> list[int]:
    from gptqmodel import GPTQModel

    m = GPTQModel.load(str(gdir), device="cpu", dtype=torch.float32)  # the reference reader is fp32
    return greedy_hf(m.model.eval(), prompt(gdir))


def vllm_load(gdir: Path) -> list[int]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(gdir), dtype="bfloat16", gpu_memory_utilization=0.05, max_model_len=512,
              enforce_eager=True)
    out = llm.generate({"prompt_token_ids": prompt(gdir)}, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))
    return list(out[0].outputs[0].token_ids)


LOADERS = {"transformers": transformers_load, "gptqmodel": gptqmodel_load, "vllm": vllm_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--loaders", default="transformers,gptqmodel")
    args = ap.parse_args()
    try:
        want = ours(args.folder)
    except Exception as e:  # the vLLM environment may lack what valley-rt's reader needs
        want, why = None, f"{type(e).__name__}: {e}"
    else:
        why = None
    for name in args.loaders.split(","):
        row = {"loader": name, "folder": str(args.folder), "reference_tokens": want, "reference_error": why}
        try:
            got = LOADERS[name](args.folder)
            row.update(loaded=True, error=None, tokens=got, greedy_equal=None if want is None else got == want)
        except Exception as e:  # a loader that refuses the folder: recorded, not raised
            row.update(loaded=False, error=f"{type(e).__name__}: {str(e)[:500]}", tokens=None, greedy_equal=None,
                       trace=traceback.format_exc(limit=3)[-800:])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
