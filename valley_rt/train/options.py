"""The trainer's options: one dataclass, which the `valley-rt train` command builds directly.

Kept free of torch so the CLI can read the defaults without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainOptions:
    data: str  # Valley instruction JSON
    out: str  # run folder
    val_data: str | None = None  # JSON with short-answer records for periodic validation accuracy
    init: str | None = None  # valley-rt checkpoint to start from (else a model config + tokenizer)
    stage: int = 2  # 1: projector + temporal; 2: + LLM
    train_vision: bool = False  # also train the CLIP tower (the original keeps its pretrained tower frozen)
    train_temporal: bool = True  # False: keep a (pretrained) temporal module frozen
    train_projector: bool = True  # False: keep a (pretrained) projector frozen too (stage 2: the LLM alone)
    epochs: float = 1.0
    max_steps: int | None = None  # cap on optimizer steps (else from epochs)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0  # AdamW decay of the vision tower, projector and temporal module (trainer.param_groups)
    vision_lr_scale: float = 1.0  # the vision tower's learning rate relative to lr (train_vision)
    seed: int = 0
    save_every: int = 0  # optimizer steps between state.pt writes (0: only at the end)
    eval_every: int = 0  # optimizer steps between validations (0: only at the end, if val_data)
    val_samples: int = 100
    log_every: int = 1
    precision: str = "auto"  # "auto" | "fp32" | "bf16"
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (CPU); None: torch's default
    group_by_video: bool = True  # one multi-turn sample per clip
    skip_bad: bool = False
    progress: bool = True
