"""The reference trainer: Valley's two stages on one CPU or GPU, resumable after a kill -9.

Stage 1 (alignment) trains the projector and the temporal module with the vision tower and the LLM
frozen; stage 2 (instruction tuning) also trains the LLM. `train_vision` adds the CLIP tower to
either stage: the original starts from a pretrained CLIP and never trains it; the demo recipe
(valley_rt/demo/recipes.py), which has no pretrained tower to start from, pretrains one instead.

Optimisation follows the original recipe: AdamW without weight decay, linear warm-up over
`warmup_ratio` of the steps then cosine decay to zero, gradient clipping, gradient accumulation,
bf16 autocast where the hardware has native bf16 (see resolve_precision).

Determinism and resume: the sample stream is the concatenation of per-epoch permutations that
depend only on (seed, epoch), and optimizer step k consumes stream positions [k*B*A, (k+1)*B*A), so
the data position is the step number. `OUT/state.pt` (written to a temp file, fsynced, then renamed
over the old one) holds the model, optimizer, scheduler and RNG states and the step; `resume=True`
loads it and continues exactly where the run stood, so a killed run's loss curve continues the
uninterrupted one bit for bit (on the same machine and thread count).

Layout of OUT: run.json (options + model config), tokenizer/ (the run's tokenizer), state.pt,
metrics.jsonl (one JSON object per logged step, and per validation), model/ (the final valley-rt
checkpoint, written by save_checkpoint with the tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from valley_rt.config import ValleyConfig
from valley_rt.errors import DataError
from valley_rt.train.data import (FrameCache, InstructionDataset, collate, epoch_order, group_by_video,
                                  load_records)
from valley_rt.train.options import TrainOptions

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"


def trainable_parameters(model, *, stage: int, train_vision: bool, train_temporal: bool = True,
                         train_projector: bool = True) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the parts the stage trains; returns the trainable parameters."""
    if stage not in (1, 2):
        raise DataError(f"stage must be 1 or 2, got {stage}")
    if stage == 1 and not (train_projector or train_temporal or train_vision):
        raise DataError("stage 1 with the projector and the temporal module frozen trains nothing")
    model.requires_grad_(False)
    parts = ([model.mm_projector] if train_projector else []) + ([model.temporal] if train_temporal else [])
    if stage == 2:
        parts.append(model.llm)
    if train_vision:
        parts.append(model.vision_tower)
    for p in parts:
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model, params: list[torch.nn.Parameter], weight_decay: float, lr: float,
                 vision_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: the LLM never decays (the original recipe); the visual side's matrices decay by
    `weight_decay`; the vision tower learns at `lr * vision_lr_scale`.

    Why: the visual tokens enter the LLM through RMSNorm, which ignores their scale, and a randomly
    initialised LLM first learns the text alone; trained jointly from scratch at the full rate, the
    tower then collapses to a near-constant output (relative variation across clips falling from
    0.15 to 0.002 in 500 steps, its gradients x1000 smaller) before the LLM learns to look.
    """
    visual = {id(p) for m in (model.vision_tower, model.mm_projector, model.temporal) for p in m.parameters()}
    tower = {id(p) for p in model.vision_tower.parameters()}
    groups: dict[tuple[float, float], list] = {}
    for p in params:
        wd = weight_decay if id(p) in visual and p.dim() >= 2 else 0.0
        scale = vision_lr_scale if id(p) in tower else 1.0
        groups.setdefault((wd, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * scale} for (wd, scale), ps in groups.items()]


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    "auto" = bf16 on a CUDA GPU that supports it, and on a CPU with native bf16 instructions: on
    an AMD EPYC core (Zen 4, AVX512-BF16) bf16 autocast cut the demo model's CPU time
    per step by ~20 % (0.24 -> 0.19 s, batch 4, one thread); elsewhere fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise DataError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and tuples only, so state.pt loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> dict[str, Any]:
    """Read state.pt without running code: torch's weights-only unpickler rebuilds tensors and plain
    containers only. numpy's array rebuilders are allowed too, for state files that stored numpy's RNG
    state as an array. Anything else (a pickle that would call a function) is a DataError."""
    import pickle

    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        # torch's message opens with advice to load with weights_only=False; the reason is further down
        why = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0] if lines else type(e).__name__)
        raise DataError(f"{path}: refused or unreadable as a weights-only training state ({why})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "step"} <= set(state):
        raise DataError(f"{path}: not a valley-rt training state")
    return state


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename over `path` (never a torn file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after `step` (written after the last saved state of a killed run)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------------------- setup
def _prepare_run(opts: TrainOptions, model_config: ValleyConfig | None, tokenizer, resume: bool):
    """Model config + tokenizer of the run: from run.json/tokenizer on resume, else from init or arguments."""
    from transformers import AutoTokenizer

    out = Path(opts.out)
    run_file, tok_dir = out / "run.json", out / "tokenizer"
    if resume and run_file.is_file():
        cfg = ValleyConfig.from_dict(json.loads(run_file.read_text())["model"])
        return cfg, AutoTokenizer.from_pretrained(str(tok_dir)), None
    init_model = None
    if opts.init:
        from valley_rt.checkpoint import load_checkpoint, load_tokenizer

        init_model = load_checkpoint(opts.init)
        cfg, tokenizer = init_model.cfg, load_tokenizer(opts.init)
    elif model_config is None or tokenizer is None:
        raise DataError("train: give an --init checkpoint, or a model config and tokenizer (a --recipe)")
    else:
        cfg = model_config
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(tok_dir))
    run = {"options": dataclasses.asdict(opts), "model": cfg.to_dict()}
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n")
    os.replace(tmp, run_file)
    return cfg, tokenizer, init_model


def train(opts: TrainOptions, *, model_config: ValleyConfig | None = None, tokenizer=None, resume: bool = False,
          on_step: Callable[[dict], None] | None = None, frame_cache: FrameCache | None = None) -> dict[str, Any]:
    """Train, checkpointing to opts.out; returns a summary (steps, final loss, seconds, validation).

    resume=True continues from OUT/state.pt when it exists (else starts fresh in OUT). frame_cache: decoded
    clips shared with an earlier phase of the same process (its keys include the preprocessing).
    """
    from valley_rt.checkpoint import save_checkpoint
    from valley_rt.model import build_model

    from valley_rt.outdir import claim_folder

    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = claim_folder(opts.out, kind="train-run", legacy=is_run_folder)
    state_file, metrics_file = out / STATE_FILE, out / METRICS_FILE
    resuming = resume and state_file.is_file()
    cfg, tok, init_model = _prepare_run(opts, model_config, tokenizer, resuming)
    if tok.pad_token_id is None:
        raise DataError("train: the tokenizer has no pad (or unk) token to pad batches with")

    records, problems = load_records(opts.data, skip_bad=opts.skip_bad)
    samples = group_by_video(records) if opts.group_by_video else records
    cache = frame_cache or FrameCache(cfg)
    decoded_before = cache.decoded
    dataset = InstructionDataset(samples, tok, cfg, cache=cache, shuffle_turns=opts.group_by_video, seed=opts.seed,
                                 skip_bad=opts.skip_bad)
    val = None
    if opts.val_data:
        from valley_rt.train.evaluate import short_records

        val = short_records(load_records(opts.val_data)[0], opts.val_samples or None)

    per_step = opts.batch_size * opts.grad_accum
    total_steps = opts.max_steps or max(1, math.ceil(opts.epochs * len(dataset) / per_step))

    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    device = torch.device(opts.device)
    model = init_model if init_model is not None else build_model(cfg, seed=opts.seed)
    model.to(device).train()
    params = trainable_parameters(model, stage=opts.stage, train_vision=opts.train_vision,
                                  train_temporal=opts.train_temporal, train_projector=opts.train_projector)
    optimizer = torch.optim.AdamW(param_groups(model, params, opts.weight_decay, opts.lr, opts.vision_lr_scale),
                                  lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, opts.warmup_ratio))
    autocast = resolve_precision(opts.precision, opts.device)

    step, elapsed = 0, 0.0
    if resuming:
        # onto the CPU: the RNG states must stay CPU byte tensors; load_state_dict moves the weights and the
        # optimizer's moments to the parameters' device
        state = load_state(state_file)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, elapsed = state["step"], state["elapsed_s"]
        _truncate_metrics(metrics_file, step)
    elif metrics_file.exists():
        metrics_file.unlink()

    def save_state() -> None:
        atomic_save({"step": step, "elapsed_s": elapsed, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": _rng_state(), "total_steps": total_steps}, state_file)

    orders: dict[int, list[int]] = {}

    def batch_at(position: int, size: int) -> list:
        items = []
        for pos in range(position, position + size):
            epoch, k = divmod(pos, len(dataset))
            if epoch not in orders:
                orders.clear()
                orders[epoch] = epoch_order(len(dataset), opts.seed, epoch)
            items.append(dataset.sample(orders[epoch][k], epoch))
        return items

    def validate() -> dict | None:
        if not val:
            return None
        from valley_rt.train.evaluate import predict, score

        return score(val, predict(model, tok, val, cache=cache))

    progress = _progress(opts.progress, total_steps, step)
    last: dict[str, Any] = {}
    t_start = time.perf_counter() - elapsed
    with progress:
        while step < total_steps:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, tokens = 0.0, 0
            for micro in range(opts.grad_accum):
                batch = collate(batch_at(step * per_step + micro * opts.batch_size, opts.batch_size),
                                tok.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    loss = model(**batch).loss
                (loss / opts.grad_accum).backward()
                loss_sum += float(loss.detach())
                tokens += int((batch["labels"] != -100).sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = time.perf_counter() - t_start
            last = {"step": step, "epoch": round(step * per_step / len(dataset), 4),
                    "loss": loss_sum / opts.grad_accum, "lr": lr, "grad_norm": grad_norm, "label_tokens": tokens,
                    "step_s": round(time.perf_counter() - t0, 3), "elapsed_s": round(elapsed, 1)}
            if step % opts.log_every == 0 or step == total_steps:
                append_jsonl(metrics_file, last)
            if on_step:
                on_step(last)
            progress.advance(last)
            if opts.eval_every and step % opts.eval_every == 0 and step < total_steps and val:
                append_jsonl(metrics_file, {"step": step, "val": validate()})
            if opts.save_every and step % opts.save_every == 0:
                save_state()
    save_state()
    summary: dict[str, Any] = {"steps": step, "final_loss": last.get("loss"), "seconds": round(elapsed, 1),
                               "samples": len(dataset), "skipped": len(problems) + len(dataset.skipped),
                               "decoded_clips": cache.decoded - decoded_before}
    if val:
        summary["val"] = validate()
        append_jsonl(metrics_file, {"step": step, "val": summary["val"]})
    model.eval()
    save_checkpoint(model, out / "model", tokenizer=tok)
    summary["model"] = str(out / "model")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _progress:
    """A rich progress bar (loss, lr, s/step), or nothing when disabled."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"))
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, info="")
        return self

    def advance(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1,
                            info=f"loss {m['loss']:.4f} lr {m['lr']:.2e} {m['step_s']:.2f}s/step")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def is_run_folder(folder: Path) -> bool:
    """A run folder written before run folders carried valley-rt's marker file: its run.json, or a
    recipe's synthesized data."""
    try:
        run = json.loads((folder / "run.json").read_text())
        return isinstance(run, dict) and {"options", "model"} <= set(run)
    except (OSError, ValueError):
        return (folder / "data" / "train" / "meta.json").is_file()


def train_main(opts: TrainOptions, *, resume: bool = False) -> dict[str, Any]:
    """`valley-rt train DATA`: train with `opts`; on resume the run's saved options (OUT/run.json) win,
    except the thread count and the progress bar. OUT must be new, empty or an earlier run's folder
    (valley_rt.outdir.claim_folder): a folder of other files is refused, never written into."""
    from valley_rt.outdir import claim_folder

    claim_folder(opts.out, kind="train-run", legacy=is_run_folder)
    run_file = Path(opts.out) / "run.json"
    if resume and run_file.is_file():
        saved = json.loads(run_file.read_text())["options"]
        opts = TrainOptions(**{**saved, "threads": opts.threads or saved.get("threads"), "progress": opts.progress})
        return train(opts, resume=True)
    if not opts.data:
        raise DataError("train: give DATA (a Valley instruction JSON) with --init CHECKPOINT, or a --recipe")
    return train(opts, resume=resume)
