"""Named recipes that train the demo model from nothing: the synthetic data, the model config and
the phases, each a small function that skips itself when its output already exists.

    valley-rt train --recipe demo --out runs/demo --threads 2   # the bundled valley_rt/assets/demo
    valley-rt train --recipe smoke --out runs/smoke             # CI-sized: the loss falls in seconds

No pretrained CLIP or LLaMA is available offline, so phase 0 stands in for them: the visual side learns
from the renderer's ground truth (vision_pretrain) and the LLM learns the conversations' text as a
language model (text_pretrain). Phase 1 is Valley's stage 2 (instruction tuning) through the reference
trainer, with the parts phase 0 made kept frozen as the recipe says. Why each setting is what it is,
and what the demo model knows: docs/demo_model.md.

Reproducing the weights bit for bit needs the same seeds, the same order of operations and the same
thread count (it sets float summation order).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from valley_rt.config import (LLMConfig, PreprocessConfig, SamplingConfig, TemporalConfig, TokenLayout,
                              ValleyConfig, VisionConfig)
from valley_rt.errors import DataError

DEMO_SYSTEM_PROMPT = "You are Valley, a video assistant."


@dataclass(frozen=True)
class VisionPretrain:
    """Phase 0, visual side (vision_pretrain.pretrain_visual): the tower, then projector + temporal module."""
    tower_steps: int
    temporal_steps: int = 0
    max_clips: int | None = None  # clips of the training split decoded for it (None: all)


@dataclass(frozen=True)
class TextPretrain:
    """Phase 0, language side (text_pretrain.pretrain_text): the LLM as a causal LM on the conversations."""
    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    max_tokens: int = 384  # each sampled conversation is cut to this many tokens


@dataclass(frozen=True)
class InstructionTuning:
    """Phase 1 (Valley's stage 2) through trainer.train; freezing keeps what phase 0 made."""
    epochs: float
    batch_size: int
    lr: float = 1e-3
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0  # visual side only (trainer.param_groups)
    vision_lr_scale: float = 1.0
    precision: str = "fp32"  # the recipes' weights were produced in fp32
    stage: int = 2
    train_vision: bool = True
    train_temporal: bool = True
    train_projector: bool = True
    save_every: int = 200  # optimizer steps between state.pt writes
    eval_every: int = 0  # 0: validate only at the end
    val_samples: int = 120


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ValleyConfig  # tokens / vocab_size are filled in from the trained tokenizer
    vocab_size: int  # base BPE vocabulary (the six Valley tokens come after it)
    train_clips: int
    val_clips: int
    train_seed: int
    val_seed: int
    tuning: InstructionTuning
    vision_pretrain: VisionPretrain | None = None
    text_pretrain: TextPretrain | None = None
    seed: int = 0
    test_clips: int = 0  # held-out split scored after training (eval.json); 0 = none
    test_seed: int = 3
    keep_long_descriptions: float = 1.0  # share of clips whose long description is trained on
    extra_questions: bool = False  # synth.generate: ask every mover's direction and every pair's order


def demo_config() -> ValleyConfig:
    """64 px frames in 16 px patches (16 pooled patch tokens + 8 frame tokens, Valley's token layout), a
    3-layer 96-wide tower, the "transformer" temporal module (motion direction and order survive pooling),
    a 4-layer 192-wide LLaMA and a one-sentence system prompt."""
    return ValleyConfig(
        name="valley-rt-demo",
        vision=VisionConfig(hidden_size=96, intermediate_size=384, num_layers=3, num_heads=4, image_size=64,
                            patch_size=16, select_layer=-1, hidden_act="quick_gelu"),
        temporal=TemporalConfig(mode="transformer", num_heads=4, ff_size=384, max_frames=64),
        llm=LLMConfig(vocab_size=0, hidden_size=192, intermediate_size=384, num_layers=4, num_heads=4,
                      num_kv_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5),
        tokens=TokenLayout(),
        preprocess=PreprocessConfig(resize_short=73, crop_size=64),
        sampling=SamplingConfig(mode="fixed", num_frames=8),
        system_prompt=DEMO_SYSTEM_PROMPT,
    )


def smoke_config() -> ValleyConfig:
    cfg = demo_config()
    return replace(cfg, name="valley-rt-smoke",
                   vision=replace(cfg.vision, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                  patch_size=16),
                   temporal=replace(cfg.temporal, mode="mean"),
                   llm=replace(cfg.llm, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=2,
                               num_kv_heads=2))


RECIPES = {
    # phase 1 trains the LLM alone: the tower, temporal module and projector stay as phase 0 left them
    "demo": lambda: Recipe(
        name="demo", model=demo_config(), vocab_size=1024, train_clips=10000, val_clips=100, train_seed=1,
        val_seed=2, test_clips=200, test_seed=3, keep_long_descriptions=0.25,
        vision_pretrain=VisionPretrain(tower_steps=12000, temporal_steps=1500, max_clips=10000),
        text_pretrain=TextPretrain(steps=1500, batch_size=16, lr=1e-3, max_tokens=384),
        tuning=InstructionTuning(epochs=3.4, batch_size=4, lr=1e-3, train_vision=False, train_temporal=False,
                                 train_projector=False, save_every=250, eval_every=1000, val_samples=100)),
    "smoke": lambda: Recipe(
        name="smoke", model=smoke_config(), vocab_size=300, train_clips=24, val_clips=6, train_seed=11,
        val_seed=12, vision_pretrain=VisionPretrain(tower_steps=30, temporal_steps=20),
        text_pretrain=TextPretrain(steps=10, batch_size=4),
        tuning=InstructionTuning(epochs=6, batch_size=4, lr=3e-3, save_every=0, eval_every=0, val_samples=0)),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DataError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()


# ------------------------------------------------------------------------------------------- phases
def run_recipe(*, name: str, out: str, resume: bool = False, threads: int | None = None, progress: bool = True,
               epochs: float | None = None, max_steps: int | None = None, train_clips: int | None = None,
               workers: int = 2, device: str = "cpu") -> dict[str, Any]:
    """Synthesize the recipe's data, train its tokenizer, run phase 0 and phase 1, then score the model
    on a held-out split (fresh seed) with the blind control.

    Writes OUT/data/{train,val,test}/ (synthetic clips), OUT/phase0/ (the pretrained model), the phase 1
    run in OUT (OUT/model is the final checkpoint), OUT/eval.json and OUT/summary.json; returns the
    summary. resume=True continues phase 1 from OUT/state.pt; every other step is redone only when its
    output is missing.
    """
    from valley_rt.outdir import claim_folder
    from valley_rt.train.data import FrameCache
    from valley_rt.train.trainer import STATE_FILE, is_run_folder

    r = recipe(name)
    out_p = claim_folder(out, kind="train-run", legacy=is_run_folder)  # never a folder of other files
    t0 = time.perf_counter()
    synth_data(r, out_p, n_train=train_clips or r.train_clips, workers=workers)
    synth_s = time.perf_counter() - t0
    train_json = training_json(r, out_p / "data" / "train" / "data.json")
    frames = FrameCache(r.model)  # phase 0 decodes its clips through it, phase 1 reads them back
    phases: list[dict[str, Any]] = []
    if resume and (out_p / STATE_FILE).is_file():  # phase 1's run.json holds the config and tokenizer
        if r.vision_pretrain and (out_p / "phase0" / "summary.json").is_file():
            phases.append(json.loads((out_p / "phase0" / "summary.json").read_text()))
        phases.append(instruction_phase(r, out_p, train_json, cfg=None, tok=None, init=None, frames=frames,
                                        resume=True, epochs=epochs, max_steps=max_steps, threads=threads,
                                        device=device, progress=progress))
    else:
        cfg, tok = tokenizer_and_config(r, train_json)
        init = None
        if r.vision_pretrain:
            phases.append(pretrain_phase(r, cfg, tok, out_p, train_json, frames=frames, threads=threads,
                                         device=device, workers=workers))
            init = str(out_p / "phase0" / "model")  # the config and tokenizer come with it
        phases.append(instruction_phase(r, out_p, train_json, cfg=cfg, tok=tok, init=init, frames=frames,
                                        resume=resume, epochs=epochs, max_steps=max_steps, threads=threads,
                                        device=device, progress=progress))
    summary = dict(phases[-1])
    keys = ("phase", "steps", "final_loss", "seconds", "val", "held_out", "text")
    summary["phases"] = [{k: p[k] for k in keys if k in p} for p in phases]
    summary["seconds"] = round(sum(p["seconds"] + p.get("prep_s", 0.0) for p in phases), 1)
    summary["synth_s"] = round(synth_s, 1)
    summary["recipe"] = name
    if r.test_clips:
        summary.update(test_phase(r, out_p, workers=workers))
    (out_p / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def synth_data(r: Recipe, out_p: Path, *, n_train: int, workers: int) -> None:
    """OUT/data/train and OUT/data/val; a split whose meta.json matches what the recipe asks is kept."""
    from valley_rt.demo import synth

    for split, n, seed in (("train", n_train, r.train_seed), ("val", r.val_clips, r.val_seed)):
        folder = out_p / "data" / split
        meta = folder / "meta.json"
        if not (meta.is_file() and _same_synth(json.loads(meta.read_text()), n, _synth_options(r))):
            synth.generate(folder, n=n, seed=seed, workers=workers, **_synth_options(r))


def _synth_options(r: Recipe) -> dict[str, Any]:
    return {"extra_questions": r.extra_questions}


def _same_synth(meta: dict[str, Any], n: int, kwargs: dict[str, Any]) -> bool:
    """Whether a synth folder's meta.json matches what the recipe asks (so it is reused, not regenerated);
    an option a meta.json does not record (written before it existed) had synth.generate's default."""
    from valley_rt.demo.synth import generate

    defaults = inspect.signature(generate).parameters
    return meta.get("n") == n and all(meta.get(k, defaults[k].default) == v for k, v in kwargs.items())


def training_json(r: Recipe, data_json: Path) -> Path:
    """The training data: `data_json`, or a copy without most long descriptions (a deterministic
    `keep_long_descriptions` share of clips keeps theirs): they are the longest answers and would
    dominate CPU time."""
    if r.keep_long_descriptions >= 1.0:
        return data_json
    records = json.loads(data_json.read_text())
    rng = random.Random(r.seed)
    kept = [x for x in records if x.get("task") != "long_description" or rng.random() < r.keep_long_descriptions]
    out = data_json.with_name("train_subset.json")
    if not out.is_file() or json.loads(out.read_text()) != kept:
        out.write_text(json.dumps(kept, indent=1) + "\n")
    return out


def tokenizer_and_config(r: Recipe, train_json: Path):
    """A byte-level BPE trained on the training conversations, and the recipe's config sized to it."""
    from valley_rt.demo.tokenizer import corpus_texts, token_layout, train_tokenizer
    from valley_rt.train.data import load_records

    cfg = dataclasses.replace(r.model)
    records, _ = load_records(train_json)
    tok = train_tokenizer(corpus_texts(records, system=cfg.system_prompt), vocab_size=r.vocab_size)
    cfg.tokens = token_layout(tok)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)
    return cfg, tok


def pretrain_phase(r: Recipe, cfg: ValleyConfig, tok, out_p: Path, text_json: Path, *, frames,
                   threads: int | None, device: str = "cpu", workers: int = 1) -> dict[str, Any]:
    """Phase 0: pretrain the visual side of a fresh model on the training clips (the tower, then the
    projector + temporal module) and, with `r.text_pretrain`, its LLM on the text of `text_json`; saves
    OUT/phase0/model. Short (minutes), so a crash reruns it rather than resuming it."""
    import torch

    from valley_rt.checkpoint import save_checkpoint
    from valley_rt.demo.vision_pretrain import pretrain_visual
    from valley_rt.model import build_model
    from valley_rt.train.trainer import METRICS_FILE, append_jsonl

    folder = out_p / "phase0"
    if (folder / "summary.json").is_file() and (folder / "model").is_dir():
        return json.loads((folder / "summary.json").read_text())
    if threads:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / METRICS_FILE
    log.unlink(missing_ok=True)
    model = build_model(cfg, seed=r.seed).to(device)  # initialised on the CPU: the same weights on any device
    summary = pretrain_visual(model, out_p / "data" / "train", seed=r.seed, log=lambda m: append_jsonl(log, m),
                              cache=frames, workers=workers, **dataclasses.asdict(r.vision_pretrain))
    if r.text_pretrain:
        from valley_rt.demo.text_pretrain import pretrain_text

        text = pretrain_text(model, tok, text_json, seed=r.seed, log=lambda m: append_jsonl(log, m),
                             **dataclasses.asdict(r.text_pretrain))
        summary["text"] = text
        summary["seconds"] = round(summary["seconds"] + text["seconds"], 1)
        summary["steps"] += text["steps"]
    save_checkpoint(model.eval(), folder / "model", tokenizer=tok)
    summary["phase"] = "vision_pretrain"
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def instruction_phase(r: Recipe, out_p: Path, train_json: Path, *, cfg: ValleyConfig | None, tok,
                      init: str | None, frames, resume: bool, epochs: float | None, max_steps: int | None,
                      threads: int | None, device: str, progress: bool) -> dict[str, Any]:
    """Phase 1 in OUT from `init` (phase 0's model) or from a fresh `cfg` + `tok`; trainer.train resumes
    from OUT/state.pt on `resume`."""
    from valley_rt.train.trainer import TrainOptions, train

    t = r.tuning
    opts = TrainOptions(data=str(train_json), out=str(out_p), val_data=str(out_p / "data" / "val" / "data.json"),
                        init=init, stage=t.stage, train_vision=t.train_vision, train_temporal=t.train_temporal,
                        train_projector=t.train_projector, epochs=epochs or t.epochs, max_steps=max_steps,
                        batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr, warmup_ratio=t.warmup_ratio,
                        max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                        vision_lr_scale=t.vision_lr_scale, seed=r.seed, save_every=t.save_every,
                        eval_every=t.eval_every, val_samples=t.val_samples, precision=t.precision, device=device,
                        threads=threads, progress=progress)
    if init:
        return train(opts, resume=resume, frame_cache=frames)
    return train(opts, model_config=cfg, tokenizer=tok, resume=resume, frame_cache=frames)


def test_phase(r: Recipe, out_p: Path, *, workers: int) -> dict[str, Any]:
    """Score OUT/model on a held-out split of a fresh seed (real videos and the blind control): OUT/eval.json."""
    from valley_rt.demo import synth
    from valley_rt.train.evaluate import evaluate

    test = out_p / "data" / "test"
    if not (test / "meta.json").is_file():
        synth.generate(test, n=r.test_clips, seed=r.test_seed, workers=workers, **_synth_options(r))
    result = evaluate(model=out_p / "model", data=test / "data.json", both=True, out=out_p / "eval.json")
    return {"test": {part: result[part]["overall"] for part in ("video", "blind")}, "eval_s": result["seconds"]}
