"""Exact-match evaluation on short answers, per task family, with a blind control.

Each short-answer record's first question is asked alone (one turn, as a user would), the model
answers greedily through `generate` with the reference `TorchLLM` backend, and the cleaned answer is
compared with the reference after `prompt.normalize_answer` (case, punctuation, articles, number
words). The blind control replaces every video by a black video of the same size and frame count
(`render_blank_video`), so whatever accuracy remains comes from the question alone; it should
sit near the question-only chance level that `chance_accuracy` reports.

Synth records flag a question with `"distractor": true` when another object in the clip would answer
it differently (another mover going elsewhere, another object already there first, another object
turning back). Those questions need the object the question names picked out of the video, not just
"the thing that moves"; each family with such questions also reports its accuracy with and without.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from valley_rt.errors import VideoError
from valley_rt.prompt import Turn, VIDEO, clean_answer, encode, format_conversation, normalize_answer
from valley_rt.train.data import FrameCache, Record, load_records
from valley_rt.video import write_mp4


def ask(model, tokenizer, question: str, visual: tuple[torch.Tensor, torch.Tensor], *, num_frames: int,
        max_new_tokens: int = 32) -> str:
    """One greedy answer to `question` about an already encoded video (pooled [1,N,D], frames [1,T,D])."""
    from valley_rt.backends.llm_torch import TorchLLM
    from valley_rt.generate import SamplingParams, generate

    cfg = model.cfg
    q = question if VIDEO in question else f"{VIDEO}\n{question}"
    text, _ = format_conversation([Turn("human", q)], system=cfg.system_prompt)
    ids, _ = encode(tokenizer, text, cfg=cfg, num_frames=num_frames)
    with torch.inference_mode():
        ids_t = torch.tensor([ids], device=model.mm_projector.weight.device)
        embeds = model.embed_inputs(ids_t, visual=visual)[0].float()  # [S, D]
    backend = TorchLLM(model.llm)
    out = generate(backend, tokenizer, embeds, params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                   stop=("###",))
    return clean_answer(out.text)


def predict(model, tokenizer, records: list[Record], *, cache: FrameCache, blind: bool = False,
            blank_dir: str | os.PathLike | None = None) -> list[str]:
    """Greedy answers to each record's first question (videos encoded once per clip)."""
    was_training = model.training
    model.eval()
    by_video: dict[Path, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_video[r.video].append(i)
    answers = [""] * len(records)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(dir=blank_dir) as tmp:
        for k, (video, idx) in enumerate(by_video.items()):
            source = video
            if blind:
                source = Path(tmp) / f"blank_{k}.mp4"
                render_blank_video(source, like=video)
            pixels = cache.pixels(source)  # [T, 3, H, W]
            with torch.inference_mode():
                visual = model.encode_video(pixels[None].to(device=device, dtype=dtype))
            for i in idx:
                answers[i] = ask(model, tokenizer, records[i].turns[0].text, visual, num_frames=pixels.shape[0])
    model.train(was_training)
    return answers


def score(records: list[Record], answers: list[str], *, max_mistakes: int = 3) -> dict[str, Any]:
    """Exact-match accuracy per task family and overall (normalize_answer on both sides), and a few
    wrong answers per family."""
    hits: dict[str, list[int]] = defaultdict(list)
    split: dict[str, dict[bool, list[int]]] = defaultdict(lambda: {True: [], False: []})
    mistakes: dict[str, list[dict]] = defaultdict(list)
    for r, a in zip(records, answers):
        ok = int(normalize_answer(a) == normalize_answer(r.turns[1].text))
        family = r.task or "unknown"
        hits[family].append(ok)
        if isinstance(r.extra.get("distractor"), bool):
            split[family][r.extra["distractor"]].append(ok)
        if not ok and len(mistakes[family]) < max_mistakes:
            mistakes[family].append({"id": r.id, "question": r.turns[0].text.replace(VIDEO, "").strip(),
                                     "expected": r.turns[1].text, "got": a})
    everything = [h for v in hits.values() for h in v]
    per_family = {f: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for f, v in sorted(hits.items())}
    for f, parts in split.items():
        if parts[True]:  # synth's "distractor" flag: does the answer need the named object picked out?
            for flag, key in ((True, "with_distractor"), (False, "without_distractor")):
                v = parts[flag]
                per_family[f][key] = {"accuracy": round(sum(v) / len(v), 4) if v else None, "n": len(v)}
    return {"overall": round(sum(everything) / max(len(everything), 1), 4), "n": len(everything),
            "per_family": per_family, "mistakes": dict(mistakes)}


def render_blank_video(path: str | os.PathLike, *, like: str | os.PathLike) -> None:
    """A video with the size, frame count and frame rate of `like`, every frame black (the eval's blind control)."""
    import av

    try:
        with av.open(str(like)) as c:
            st = c.streams.video[0]
            W, H = st.codec_context.width, st.codec_context.height
            fps = st.average_rate or st.base_rate or 10
            n = sum(1 for _ in c.decode(st))
    except (av.error.FFmpegError, IndexError) as e:
        raise VideoError(f"{like}: cannot read as a video to copy its shape ({e})") from None
    write_mp4(path, np.zeros((max(n, 1), H, W, 3), np.uint8), int(round(float(fps))))


def chance_accuracy(records: list[dict[str, Any]]) -> dict[str, float]:
    """Per short-answer family: the best a question-only guesser can expect, i.e. the larger of the mean
    1/len(choices) (guessing among the choices the question allows) and the most frequent answer's share."""
    out = {}
    for fam in sorted({r["task"] for r in records if r.get("short") and r.get("choices")}):
        recs = [r for r in records if r["task"] == fam and r.get("choices")]
        uniform = float(np.mean([1.0 / len(r["choices"]) for r in recs]))
        answers = [normalize_answer(r["conversations"][-1]["value"]) for r in recs]
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        out[fam] = round(max(uniform, majority), 4)
    return out


def short_records(records: list[Record], limit: int | None = None) -> list[Record]:
    out = [r for r in records if r.short]
    return out[:limit] if limit else out


def _is_eval_file(path) -> bool:
    """An evaluation JSON that `evaluate` wrote (so --out may replace it)."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and {"model", "data", "records", "seconds"} <= set(result)


def evaluate(*, model: str | os.PathLike, data: str | os.PathLike, blind: bool = False, both: bool = False,
             limit: int | None = None, out: str | os.PathLike | None = None, threads: int | None = None) -> dict:
    """Exact-match accuracy of checkpoint `model` on the short-answer records of `data`.

    blind=True scores only the blind control; both=True scores the real videos and the blind control.
    Writes the JSON to `out` when given and returns it.
    """
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer
    from valley_rt.errors import DataError

    if out is not None:
        from valley_rt.outdir import check_output_file

        check_output_file(out, what="evaluation", ours=_is_eval_file, inputs=(data, model))
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    net = load_checkpoint(model)
    tok = load_tokenizer(model)
    records, _ = load_records(data)
    short = short_records(records, limit)
    if not short:
        raise DataError(f"{data}: no short-answer records (\"short\": true) to score")
    cache = FrameCache(net.cfg)
    result: dict[str, Any] = {"model": str(model), "data": str(data), "records": len(short)}
    if not blind or both:
        result["video"] = score(short, predict(net, tok, short, cache=cache))
    if blind or both:
        result["blind"] = score(short, predict(net, tok, short, cache=cache, blind=True))
    raw = json.loads(Path(data).read_text())
    keep = {r.id for r in short}
    result["chance"] = chance_accuracy([r for r in raw if str(r.get("id")) in keep])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
