"""Phase 0 of the demo recipe: pretrain the visual side on the synthetic world (the demo's stand-in for CLIP).

Valley starts from a pretrained CLIP ViT whose tokens already say what is where. None is available
offline, and a random tower trained only through the LLM's loss either collapses (trained jointly from the
start) or stays a random projection of pixels (frozen): that keeps colours and counts but hardly where an
object is, and the first demo model stayed at chance on direction, order and cause (59.8 % overall).

This phase gives the tower that knowledge from the renderer's ground truth, as CLIP's pretraining gives it
from captions. At the tower's select layer (the features Valley uses):
- the CLS token (Valley's per-frame token) predicts, for every colour, whether an object of that colour is
  visible, where its centre is and its shape, plus the background, and what the object meets first
  looking left, right, up and down along its lane (the wall or which other object) and how far away
  (ray casts: what a bounce's cause is told by, since the object a bouncer will hit is ahead of it in its
  lane while it approaches, and a wall bounce has only the wall ahead);
- every patch token predicts the share of its pixels each colour covers and where in the patch they are
  (so that a patch's tokens over the frames show which way an object moves through it, for the
  temporal module to read).
Then, with the tower frozen, the projector + temporal module learn to put into every pooled patch token
which colours passed through that patch and which way each moved (`pretrain_temporal`).
The linear read-out heads are thrown away; only Valley's own weights go on to instruction tuning.

Labels are computed, not stored: a synthetic clip is a deterministic function of (seed, index) (synth), so
its plan is drawn again and its frames re-rendered at exactly the indices the model samples, then resized
and cropped like the model's input. The *pixels* fed to the tower are the decoded mp4 frames (the training
data's FrameCache), so the tower learns on what it will see.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from valley_rt.config import ValleyConfig
from valley_rt.errors import DataError

_NAME = re.compile(r"^s(\d+)_(\d+)\.mp4$")  # synth's file names: s{seed}_{index:05d}.mp4


@dataclass
class FrameLabels:
    """Targets of one clip's sampled frames (T frames, K colours, N patches)."""

    present: np.ndarray  # float32 [T, K]: an object of colour k is visible
    center: np.ndarray  # float32 [T, K, 2]: its centre (x, y) in [-1, 1] of the crop (0 where absent)
    shape: np.ndarray  # int64 [T, K]: its shape index in synth.SHAPES (-100 where absent)
    background: np.ndarray  # int64 [T]: index in synth.BACKGROUNDS
    cover: np.ndarray  # float32 [T, N, K]: share of each patch's pixels in colour k
    offset: np.ndarray  # float32 [T, N, K, 2]: where in the patch those pixels are: their centroid (x, y)
    #                     relative to the patch centre, in [-1, 1] of the patch (0 where none)
    ray: np.ndarray  # int64 [T, K, 4]: what colour k's object meets first looking left/right/up/down along
    #                  its own rows or columns: 0 the wall, 1 + j an object of colour j (-100 where absent)
    gap: np.ndarray  # float32 [T, K, 4]: how far that is, in crop pixels / RAY_FAR, at most 1


RAY_DIRECTIONS = ("left", "right", "up", "down")
RAY_FAR = 16.0  # gaps beyond this many crop pixels all read "far" (1.0)
# cross-entropy weight of a ray that meets an object (1 for the wall); held out on the demo: 3 -> 90.7 %, 6 -> 93.5 %
RAY_OBJECT_WEIGHT = 6.0


def _rays(arena, tracks: list, frame: int, colors: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ray casts in one frame of the plan, per visible object (by its colour at `frame`): for each direction
    of RAY_DIRECTIONS, the nearest wall or other object in its lane (the rows it covers for left/right,
    its columns for up/down), as (class: 0 wall / 1 + colour index, gap in frame pixels). The geometry is
    the plan's, not the pixels': resizing blends edges into colours of their own. This is what a bounce's
    cause is told by: the object a bouncer will hit is ahead of it in its lane from the moment it is
    there, while a wall bounce has only the wall ahead."""
    from valley_rt.demo.synth import axis_sign

    size = arena.size
    inner = (arena.x0 + arena.wall, arena.y0 + arena.wall, arena.x0 + arena.side - arena.wall,
             arena.y0 + arena.side - arena.wall)  # the arena's inside: left, top, right, bottom
    seen = [(tr.color_at(frame), tr.xs[frame - tr.start], tr.ys[frame - tr.start]) for tr in tracks
            if tr.start <= frame < tr.end]
    out = {}
    for color, x, y in seen:
        cls, gap = np.zeros(len(RAY_DIRECTIONS), np.int64), np.zeros(len(RAY_DIRECTIONS), np.float32)
        walls = (x - size / 2 - inner[0], inner[2] - x - size / 2, y - size / 2 - inner[1], inner[3] - y - size / 2)
        for d, direction in enumerate(RAY_DIRECTIONS):
            axis, sign = axis_sign(direction)
            best, what = walls[d], 0
            for other, ox, oy in seen:
                if other == color:
                    continue
                along, across = (ox - x, oy - y) if axis == 0 else (oy - y, ox - x)
                if abs(across) < size and sign * along > 0 and sign * along - size < best:
                    best, what = sign * along - size, 1 + colors.index(other)
            cls[d], gap[d] = what, max(best, 0.0)
        out[color] = (cls, gap)
    return out


def clip_labels(video: str | Path, cfg: ValleyConfig, meta: dict[str, Any]) -> FrameLabels:
    """Re-draw and re-render synthetic clip `video` (a synth file name) at the frames the model samples."""
    from valley_rt.demo import synth
    from valley_rt.video import resize_crop

    m = _NAME.match(Path(video).name)
    if m is None:
        raise DataError(f"vision pretraining: {video} is not a synth clip (expected s<seed>_<index>.mp4)")
    seed, index = int(m.group(1)), int(m.group(2))
    p = cfg.preprocess
    W, H, T = int(meta["width"]), int(meta["height"]), int(meta["num_frames"])
    arena = synth.make_arena(W, H, resize_short=p.resize_short, crop=p.crop_size)
    plan = synth.plan_clip(seed, index, arena=arena, num_frames=T, frames_hint=int(meta["frames_hint"]))
    idx = np.linspace(0, T - 1, cfg.sampling.num_frames).astype(int)  # read_video's "fixed" sampling
    crops = resize_crop(synth.render_frames(plan, arena, W, H, only=set(idx.tolist()))[idx], p)  # [t, c, c, 3]

    colors = list(synth.COLORS)
    palette = np.array([synth.COLORS[c] for c in colors] + list(synth.BACKGROUNDS.values()) + [synth.WALL_RGB],
                       dtype=np.float32)
    dist = ((crops[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)  # [t, c, c, P]
    label = dist.argmin(-1)  # nearest palette entry per pixel; >= K: background or wall
    K, t, c, ps = len(colors), len(idx), p.crop_size, cfg.vision.patch_size
    g = c // ps
    onehot = (label[..., None] == np.arange(K)).astype(np.float32)  # [t, c, c, K]
    tiles = onehot.reshape(t, g, ps, g, ps, K)
    n_px = tiles.sum((2, 4))  # [t, g, g, K] pixels of each colour per patch
    cover = (n_px / (ps * ps)).reshape(t, g * g, K)
    count = n_px.sum((1, 2))  # [t, K]
    u = (np.arange(ps, dtype=np.float32) + 0.5) / ps * 2 - 1  # pixel centre within its patch, in [-1, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ox = (tiles * u[None, None, None, None, :, None]).sum((2, 4)) / n_px
        oy = (tiles * u[None, None, :, None, None, None]).sum((2, 4)) / n_px
    offset = np.where(n_px[..., None] > 0, np.stack([ox, oy], -1), 0.0).reshape(t, g * g, K, 2).astype(np.float32)
    present = (count >= 3).astype(np.float32)
    yy, xx = np.mgrid[0:c, 0:c].astype(np.float32) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (onehot * xx[None, :, :, None]).sum((1, 2)) / count
        cy = (onehot * yy[None, :, :, None]).sum((1, 2)) / count
    center = np.where(present[..., None] > 0, np.stack([cx, cy], -1) / c * 2 - 1, 0.0).astype(np.float32)
    shape = np.full((t, K), -100, np.int64)
    ray = np.full((t, K, len(RAY_DIRECTIONS)), -100, np.int64)
    gap = np.zeros((t, K, len(RAY_DIRECTIONS)), np.float32)
    background = np.zeros(t, np.int64)
    for i, frame in enumerate(idx):
        scene = next(s for s in plan.scenes if s.start <= frame < s.end)
        background[i] = list(synth.BACKGROUNDS).index(scene.background)
        for tr in scene.tracks:
            k = colors.index(tr.color_at(int(frame)))
            if tr.start <= frame < tr.end and present[i, k]:
                shape[i, k] = synth.SHAPES.index(tr.shape)
        for color, (cls, dist_px) in _rays(arena, scene.tracks, int(frame), colors).items():
            k = colors.index(color)
            if present[i, k]:
                ray[i, k], gap[i, k] = cls, dist_px
    scale = p.resize_short / min(W, H)  # frame pixels -> crop pixels
    gap = np.minimum(gap * scale / RAY_FAR, 1.0).astype(np.float32)
    return FrameLabels(present, center, shape, background, cover, offset, ray, gap)


class PretrainHeads(nn.Module):
    """Linear read-outs of the tower's select-layer tokens (discarded after pretraining)."""

    def __init__(self, hidden: int, num_colors: int, num_shapes: int, num_backgrounds: int):
        super().__init__()
        self.k, self.s = num_colors, num_shapes
        self.cls = nn.Linear(hidden, num_colors * (3 + num_shapes) + num_backgrounds)
        self.patch = nn.Linear(hidden, num_colors * 3)  # per colour: cover logit, offset (x, y)
        # per colour and ray direction: what it meets first (wall or a colour) and how far
        self.ray = nn.Linear(hidden, num_colors * len(RAY_DIRECTIONS) * (2 + num_colors))

    def loss(self, feats: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """feats [F, 1+N, C] (F frames); y: the stacked FrameLabels fields, one row per frame."""
        k, s = self.k, self.s
        out = self.cls(feats[:, 0])
        per = out[:, : k * (3 + s)].view(-1, k, 3 + s)
        present_logit, center, shape_logit = per[..., 0], per[..., 1:3], per[..., 3:]
        bg_logit = out[:, k * (3 + s):]
        mask = y["present"]
        parts = {
            "present": nn.functional.binary_cross_entropy_with_logits(present_logit, mask),
            "center": (((center - y["center"]) ** 2).sum(-1) * mask).sum() / mask.sum().clamp(min=1) * 10,
            "shape": nn.functional.cross_entropy(shape_logit.reshape(-1, s), y["shape"].reshape(-1),
                                                 ignore_index=-100),
            "background": nn.functional.cross_entropy(bg_logit, y["background"]),
        }
        ray = self.ray(feats[:, 0]).view(-1, k, len(RAY_DIRECTIONS), 2 + k)
        weight = torch.full((1 + k,), RAY_OBJECT_WEIGHT, device=feats.device)
        weight[0] = 1.0  # most rays meet the wall; the rarer objects in a lane are what a cause needs
        parts["ray"] = nn.functional.cross_entropy(ray[..., 1:].reshape(-1, 1 + k), y["ray"].reshape(-1),
                                                   weight=weight, ignore_index=-100)
        seen = (y["ray"] >= 0).float()
        parts["gap"] = (((ray[..., 0] - y["gap"]) ** 2) * seen).sum() / seen.sum().clamp(min=1) * 10
        patch = self.patch(feats[:, 1:]).view(*y["cover"].shape, 3)  # [F, N, K, 3]
        covered = (y["cover"] > 0).float()
        parts["cover"] = nn.functional.binary_cross_entropy_with_logits(patch[..., 0], y["cover"])
        parts["offset"] = (((patch[..., 1:] - y["offset"]) ** 2).sum(-1) * covered).sum() / covered.sum().clamp(min=1)
        total = sum(parts.values())
        return total, {name: round(float(v.detach()), 4) for name, v in parts.items()}


@torch.no_grad()
def probe_metrics(heads: PretrainHeads, feats: torch.Tensor, y: dict[str, torch.Tensor], *, crop: int,
                  patch: int) -> dict[str, float]:
    """Read-out quality on held-out frames: presence and shape accuracy, centre error and in-patch offset
    error in crop pixels."""
    k, s = heads.k, heads.s
    per = heads.cls(feats[:, 0])[:, : k * (3 + s)].view(-1, k, 3 + s)
    mask = y["present"] > 0
    pred = heads.patch(feats[:, 1:]).view(*y["cover"].shape, 3)
    covered = y["cover"] > 0.1  # at least a tenth of the patch
    ray = heads.ray(feats[:, 0]).view(-1, k, len(RAY_DIRECTIONS), 2 + k)
    seen = y["ray"] >= 0
    return {
        "ray_acc": round(float((ray[..., 1:].argmax(-1) == y["ray"])[seen].float().mean()), 4),
        "ray_object_acc": round(float((ray[..., 1:].argmax(-1) == y["ray"])[y["ray"] > 0].float().mean()), 4),
        "gap_err_px": round(float((ray[..., 0] - y["gap"]).abs()[seen].mean() * RAY_FAR), 2),
        "present_acc": round(float(((per[..., 0] > 0) == mask).float().mean()), 4),
        "center_err_px": round(float((per[..., 1:3] - y["center"]).norm(dim=-1)[mask].mean() * crop / 2), 2),
        "shape_acc": round(float((per[..., 3:].argmax(-1) == y["shape"])[mask].float().mean()), 4),
        "offset_err_px": round(float((pred[..., 1:] - y["offset"]).norm(dim=-1)[covered].mean() * patch / 2), 2),
    }


def _stack(labels: list[FrameLabels], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {f: torch.from_numpy(np.concatenate([getattr(l, f) for l in labels])).to(device)
            for f in FrameLabels.__dataclass_fields__}


def load_synth(data_dir: str | Path, cfg: ValleyConfig, max_clips: int | None = None, cache=None,
               workers: int = 1) -> tuple[list[str], np.ndarray, list[FrameLabels], float]:
    """A synth folder's clips (the first `max_clips`): names, decoded model-input crops uint8 [V, T, c, c, 3],
    labels, seconds taken. `cache`: a train.data.FrameCache to decode through (and fill), e.g. the one
    the instruction phase then reads from. `workers` > 1 decodes and labels the clips in that many
    processes (the result does not depend on it)."""
    from valley_rt.demo import synth
    from valley_rt.train.data import FrameCache

    data_dir = Path(data_dir)
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
        videos = sorted({r["video"] for r in json.loads((data_dir / "data.json").read_text())})[:max_clips]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"vision pretraining: {data_dir} is not a synth folder ({e})") from None
    t0 = time.perf_counter()
    cache = cache or FrameCache(cfg)
    paths = [data_dir / "videos" / v for v in videos]
    cached = [cache.lookup(p) for p in paths]
    job = (cfg, meta, cache.num_frames, str(data_dir / "videos"), videos, [c is None for c in cached])
    done = synth.map_ranges(_load_range, job, len(videos), workers)
    crops = [c if c is not None else cache.store(p, arr) for c, p, (arr, _) in zip(cached, paths, done)]
    return videos, np.stack(crops), [labels for _, labels in done], time.perf_counter() - t0


def _load_range(args) -> list[tuple[np.ndarray | None, FrameLabels]]:
    """(crops, labels) of clips a..b-1: crops decoded only where the cache had none (a load_synth worker's share)."""
    from valley_rt.train.data import decode_crops

    (cfg, meta, num_frames, video_dir, videos, decode), a, b = args
    return [(decode_crops(Path(video_dir) / videos[i], cfg, num_frames) if decode[i] else None,
             clip_labels(videos[i], cfg, meta)) for i in range(a, b)]


def _cosine(opt, steps: int):
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warmup if i < warmup else
        0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup)))))


def _fit(loss_of: Callable, params: list, opt, sched, *, steps: int, n: int, batch: int, gen: torch.Generator,
         name: str, log: Callable[[dict], None] | None, offset: int = 0) -> dict[str, float]:
    """`steps` clipped optimizer steps on shuffled batches of the indices offset..offset+n-1 (reshuffled
    after each pass); returns the last step's loss parts."""
    order, pos, parts = torch.randperm(n, generator=gen) + offset, 0, {}
    for step in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen) + offset, 0
        loss, parts = loss_of(order[pos:pos + batch])
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log({"phase": name, "step": step + 1, "loss": round(float(loss.detach()), 4), **parts})
    return parts


def pretrain_tower(model, data_dir: str | Path, *, steps: int, batch_frames: int = 64, lr: float = 1e-3,
                   seed: int = 0, val_clips: int = 100, log: Callable[[dict], None] | None = None,
                   loaded=None) -> dict[str, Any]:
    """Train `model.vision_tower` (in place) on the frames of a synth folder (data.json + meta.json + videos/).

    Returns a summary: steps, seconds, final loss parts and the probe metrics on `val_clips` held-out clips.
    """
    from valley_rt.demo import synth
    from valley_rt.video import normalize

    cfg: ValleyConfig = model.cfg
    device = model.mm_projector.weight.device  # batches go where the model is (CPU or CUDA)
    videos, crops, labels, prep_s = loaded or load_synth(data_dir, cfg)
    n_val = min(val_clips, len(videos) // 5)
    val_x = normalize(crops[:n_val].reshape(-1, *crops.shape[2:]), cfg.preprocess).to(device)
    val_y = _stack(labels[:n_val], device)
    train_crops = crops[n_val:].reshape(-1, *crops.shape[2:])  # [F, c, c, 3]
    train_y = _stack(labels[n_val:], device)
    frames = len(train_crops)
    if frames == 0:
        raise DataError(f"vision pretraining: {data_dir} has too few clips ({len(videos)})")

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the heads' initialisation: the same run whatever ran before in this process
    heads = PretrainHeads(cfg.vision.hidden_size, len(synth.COLORS), len(synth.SHAPES),
                          len(synth.BACKGROUNDS)).to(device)
    tower_params = list(model.vision_tower.parameters())
    was_training, had_grad = model.training, [p.requires_grad for p in tower_params]
    model.train()
    for p in tower_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": tower_params, "weight_decay": 0.01},
                             {"params": heads.parameters(), "weight_decay": 0.0}], lr=lr)
    sched = _cosine(opt, steps)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.vision_features(x[:, None])[:, 0]  # [F, 1+N, C]

    def loss_of(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x = normalize(train_crops[idx.numpy()], cfg.preprocess).to(device)
        return heads.loss(features(x), {f: v[idx.to(device)] for f, v in train_y.items()})

    t1 = time.perf_counter()
    parts = _fit(loss_of, tower_params + list(heads.parameters()), opt, sched, steps=steps, n=frames,
                 batch=batch_frames, gen=gen, name="vision_pretrain", log=log)
    model.eval()
    with torch.no_grad():
        held_out = probe_metrics(heads, features(val_x), val_y, crop=cfg.preprocess.crop_size,
                                 patch=cfg.vision.patch_size)
    for p, flag in zip(tower_params, had_grad):
        p.requires_grad_(flag)
    model.train(was_training)
    return {"steps": steps, "frames": frames, "clips": len(videos), "prep_s": round(prep_s, 1),
            "seconds": round(time.perf_counter() - t1, 1), "final": parts, "held_out": held_out}


def motion_targets(labels: FrameLabels, min_shift: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per clip: which patches each colour passes through (float32 [N, K]) and the unit direction of each
    colour's displacement from its first to its last visible sampled frame (float32 [K, 2]; 0 when it moves
    less than `min_shift` of the half-crop, or is seen once)."""
    visited = (labels.cover > 0.05).any(0).astype(np.float32)
    motion = np.zeros((labels.present.shape[1], 2), np.float32)
    for k in range(labels.present.shape[1]):
        seen = np.flatnonzero(labels.present[:, k])
        if len(seen) >= 2:
            d = labels.center[seen[-1], k] - labels.center[seen[0], k]
            if np.linalg.norm(d) >= min_shift:
                motion[k] = d / np.linalg.norm(d)
    return visited, motion


def pretrain_temporal(model, loaded, *, steps: int, batch_clips: int = 32, lr: float = 1e-3, seed: int = 0,
                      val_clips: int = 100, log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train the projector + temporal module (tower frozen) so that every pooled patch token says which
    colours passed through it and which way each of them moved over the clip (a linear read-out, discarded).
    (A third target, whether and off what each colour bounced, was tried and dropped: it halved the
    held-out direction accuracy of this one-layer module, 0.83 -> 0.38.)

    It stands in for Valley's stage 1 (align the projector and temporal module to a pretrained LLM),
    which needs an LLM that already speaks: here the LLM is trained from scratch in the next phases."""
    from valley_rt.video import normalize

    cfg: ValleyConfig = model.cfg
    device = model.mm_projector.weight.device
    videos, crops, labels, _ = loaded
    n_val = min(val_clips, len(videos) // 5)
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():  # the tower is frozen: its features once, [V, T, 1+N, C]
        feats = torch.cat([model.vision_features(normalize(crops[i:i + 64].reshape(-1, *crops.shape[2:]),
                                                           cfg.preprocess).to(device)
                                                 .view(-1, *crops.shape[1:2], 3, *crops.shape[2:4]))
                           for i in range(0, len(crops), 64)])
    targets = [motion_targets(l) for l in labels]
    visited = torch.from_numpy(np.stack([t[0] for t in targets])).to(device)  # [V, N, K]
    motion = torch.from_numpy(np.stack([t[1] for t in targets])).to(device)  # [V, K, 2]
    feat_s = time.perf_counter() - t0

    k = visited.shape[-1]
    torch.manual_seed(seed)  # the head's initialisation and the temporal module's dropout
    head = nn.Linear(cfg.llm.hidden_size, k * 3).to(device)  # per colour: visited logit, direction (x, y)
    parts_ = [model.mm_projector, model.temporal]
    params = [p for m in parts_ for p in m.parameters()]
    had_grad = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.01}, {"params": head.parameters()}], lr=lr)
    sched = _cosine(opt, steps)

    def loss_of(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        idx = idx.to(device)
        projected = model.mm_projector(feats[idx])  # [B, T, 1+N, D]
        out = head(model.temporal(projected[:, :, 1:])).view(len(idx), -1, k, 3)  # [B, N, K, 3]
        vis = visited[idx]
        move = motion[idx][:, None].expand(-1, out.shape[1], -1, -1)
        err = ((out[..., 1:] - move) ** 2).sum(-1)
        parts = {"visited": nn.functional.binary_cross_entropy_with_logits(out[..., 0], vis),
                 "motion": (err * vis).sum() / vis.sum().clamp(min=1)}
        return sum(parts.values()), {n: round(float(v.detach()), 4) for n, v in parts.items()}

    gen = torch.Generator().manual_seed(seed)
    for m in parts_:
        m.train()
    t1 = time.perf_counter()
    parts = _fit(loss_of, params + list(head.parameters()), opt, sched, steps=steps, n=len(videos) - n_val,
                 offset=n_val, batch=batch_clips, gen=gen, name="temporal_pretrain", log=log)
    for m in parts_:
        m.eval()
    with torch.no_grad():  # held out: is the direction of each mover's largest displacement right?
        idx = torch.arange(n_val, device=device)
        out = head(model.temporal(model.mm_projector(feats[idx])[:, :, 1:])).view(n_val, -1, k, 3)
        vis = visited[idx] > 0
        pred = (out[..., 1:] * vis[..., None]).sum(1) / vis.sum(1).clamp(min=1)[..., None]  # [B, K, 2] mean over visited patches
        true = motion[idx]
        moving = true.abs().amax(-1) > 0.5
        axis_ok = (pred.abs().argmax(-1) == true.abs().argmax(-1))
        sign_ok = torch.sign(pred.gather(-1, true.abs().argmax(-1, keepdim=True))) == \
            torch.sign(true.gather(-1, true.abs().argmax(-1, keepdim=True)))
        direction_acc = float((axis_ok & sign_ok[..., 0])[moving].float().mean()) if moving.any() else float("nan")
    for p, flag in zip(params, had_grad):
        p.requires_grad_(flag)
    return {"steps": steps, "clips": len(videos), "features_s": round(feat_s, 1),
            "seconds": round(time.perf_counter() - t1, 1), "final": parts,
            "held_out": {"direction_acc": round(direction_acc, 4), "movers": int(moving.sum())}}


def pretrain_visual(model, data_dir: str | Path, *, tower_steps: int, temporal_steps: int = 0, lr: float = 1e-3,
                    temporal_lr: float = 3e-3, max_clips: int | None = None, seed: int = 0,
                    log: Callable[[dict], None] | None = None, cache=None, workers: int = 1) -> dict[str, Any]:
    """Phase 0 of a recipe: the tower (pretrain_tower), then the projector + temporal module
    (pretrain_temporal) on one decoding of the synth folder's first `max_clips` clips (in `workers` processes)."""
    loaded = load_synth(data_dir, model.cfg, max_clips, cache, workers)
    out: dict[str, Any] = {"prep_s": round(loaded[3], 1), "clips": len(loaded[0])}
    tower = pretrain_tower(model, data_dir, steps=tower_steps, lr=lr, seed=seed, log=log, loaded=loaded)
    out["tower"] = {k: tower[k] for k in ("steps", "seconds", "final", "held_out")}
    seconds = tower["seconds"]
    if temporal_steps:
        temporal = pretrain_temporal(model, loaded, steps=temporal_steps, lr=temporal_lr, seed=seed, log=log)
        out["temporal"] = {k: temporal[k] for k in ("steps", "seconds", "final", "held_out")}
        seconds += temporal["seconds"] + temporal["features_s"]
    out["seconds"] = round(seconds, 1)
    out["steps"] = tower_steps + temporal_steps
    out["held_out"] = {**tower["held_out"], **out.get("temporal", {}).get("held_out", {})}
    return out
