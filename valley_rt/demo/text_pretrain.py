"""Text pretraining of the LLM: the demo's stand-in for a pretrained LLaMA.

Valley starts from a pretrained LLaMA / Vicuna, which already copies names from its context (induction
heads). The demo's LLM starts from random weights, and with only the assistant tokens as targets it never
learns to: asked "what appeared first, the A or the B?" it names whichever object was there first, A, B
or neither (see the `distractor` split in demo_eval.json). This phase trains the LLM alone as a language
model on the text of the training conversations (system prompt, questions and answers of one clip in a
shuffled multi-turn order; the video placeholder dropped, every token a target), before instruction
tuning. It sees no pixels, so it can learn which answers a question allows but not which one is right.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from valley_rt.prompt import IGNORE_INDEX, VIDEO, Turn, format_conversation
from valley_rt.train.data import group_by_video, load_records, shuffle_turns


def conversation_texts(data_json: str | Path, *, system: str) -> Callable[[random.Random], str]:
    """A sampler of training texts: one clip's turns, reshuffled, without the video placeholder."""
    records, _ = load_records(data_json, check_videos=False)
    groups = group_by_video(records)

    def sample(rng: random.Random) -> str:
        turns = shuffle_turns(groups[rng.randrange(len(groups))], rng)  # <video> only opens turn 0
        turns[0] = Turn("human", turns[0].text.removeprefix(VIDEO + "\n"))
        return format_conversation(turns, system=system)[0]

    return sample


def pretrain_text(model, tokenizer, data_json: str | Path, *, steps: int, batch_size: int = 16, lr: float = 1e-3,
                  warmup: int = 50, max_tokens: int = 384, seed: int = 0,
                  log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train `model.llm` in place as a causal LM for `steps` AdamW steps (cosine schedule after a linear
    warm-up, gradient clipping at 1); returns steps, seconds and the last 50 steps' mean loss."""
    sample = conversation_texts(data_json, system=model.cfg.system_prompt)
    rng = random.Random(f"text:{seed}")
    torch.manual_seed(seed)
    llm = model.llm
    llm.train()
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    pad = tokenizer.pad_token_id
    device = next(llm.parameters()).device
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        seqs = [tokenizer.encode(sample(rng))[:max_tokens] for _ in range(batch_size)]
        width = max(map(len, seqs))
        ids = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(s)] = torch.tensor(s)
        mask = (labels != IGNORE_INDEX).long()
        loss = llm(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log({"phase": "text_pretrain", "step": step + 1, "loss": round(losses[-1], 4)})
    llm.eval()
    tail = losses[-50:]
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(sum(tail) / max(len(tail), 1), 4),
            "first_loss": round(losses[0], 4) if losses else None}
