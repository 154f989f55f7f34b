"""Phase 0 (vision pretraining on the synthetic world): the labels say what the clip shows, training
lowers the loss and changes only the tower, and a recipe with it chains phase 0 into phase 1."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from valley_rt.errors import DataError
from valley_rt.demo import synth
from valley_rt.demo.recipes import demo_config, smoke_config
from valley_rt.demo.vision_pretrain import clip_labels, pretrain_tower


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp") / "data"
    synth.generate(root, n=12, seed=41)
    return root


def test_labels_follow_the_planned_motion(clips):
    cfg = demo_config()
    meta = json.loads((clips / "meta.json").read_text())
    records = json.loads((clips / "data.json").read_text())
    colors = list(synth.COLORS)
    checked = 0
    for rec in records:
        if rec["task"] != "action":
            continue
        labels = clip_labels(rec["video"], cfg, meta)
        assert labels.present.shape == (8, len(colors)) and labels.cover.shape == (8, cfg.num_patches, len(colors))
        assert set(labels.background.tolist()) <= set(range(len(synth.BACKGROUNDS)))
        name = rec["conversations"][0]["value"].split("the ", 1)[1].split(" move")[0].split(" travel")[0]
        name = name.split(" go")[0]
        k = colors.index(name.split()[0])
        seen = np.flatnonzero(labels.present[:, k])
        assert len(seen) >= 2, rec["id"]
        dx, dy = labels.center[seen[-1], k] - labels.center[seen[0], k]
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[rec["conversations"][1]["value"]]
        assert moved > 0.15, (rec["id"], dx, dy)  # the named object's centre moves the answered way
        assert labels.shape[seen[0], k] == synth.SHAPES.index(name.split()[1])
        # patch cover agrees with presence: a visible colour covers some patch, an absent one none
        assert np.all((labels.cover[..., k].sum(-1) > 0) == (labels.present[:, k] > 0))
        checked += 1
    assert checked >= 6


def test_rays_see_what_a_bouncer_will_hit():
    """Before its bounce, a bouncer's ray in its direction of travel meets the wall for a wall bounce and its
    partner (once visible) for an object bounce; every ray of a visible object is labelled, none of an
    absent one; gaps are in [0, 1]."""
    from valley_rt.demo.vision_pretrain import RAY_DIRECTIONS

    cfg = demo_config()
    meta = {"width": 128, "height": 96, "num_frames": 32, "frames_hint": 8}
    arena = synth.make_arena(128, 96, resize_short=73, crop=64)
    colors = list(synth.COLORS)
    idx = np.linspace(0, 31, 8).astype(int)
    seen = {"wall": 0, "object": 0}
    for i in range(48):
        plan = synth.plan_clip(41, i, arena=arena)
        labels = clip_labels(f"s41_{i:05d}.mp4", cfg, meta)
        assert labels.ray.shape == (8, len(colors), 4) and labels.gap.shape == (8, len(colors), 4)
        assert np.all((labels.ray >= 0).all(-1) == (labels.present > 0))
        assert labels.gap.min() >= 0 and labels.gap.max() <= 1
        for tr in plan.tracks:
            if tr.role != "bouncer":
                continue
            k, d = colors.index(tr.color), RAY_DIRECTIONS.index(tr.direction)
            hit = next((o for o in plan.tracks if o.name == tr.cause), None)
            for f, frame in enumerate(idx):
                if tr.start <= frame < tr.bounce_at - 1 and (hit is None or hit.start <= frame):
                    want = 0 if hit is None else 1 + colors.index(hit.color)
                    assert labels.ray[f, k, d] == want, (i, tr.name, frame)
                    seen["wall" if hit is None else "object"] += 1
    assert min(seen.values()) >= 20, seen


def test_non_synth_names_are_refused():
    with pytest.raises(DataError, match="not a synth clip"):
        clip_labels("holiday.mp4", demo_config(), {"width": 128, "height": 96, "num_frames": 32, "frames_hint": 8})


def test_pretraining_lowers_the_loss_and_trains_only_the_tower(clips):
    from valley_rt.model import build_model

    cfg = smoke_config()
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=64)
    model = build_model(cfg, seed=0)
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs: list[dict] = []
    torch.manual_seed(0)
    summary = pretrain_tower(model, clips, steps=60, batch_frames=32, lr=3e-3, val_clips=2, log=logs.append)
    assert summary["steps"] == 60 and summary["clips"] == 12
    assert logs[-1]["loss"] < 0.6 * logs[0]["loss"], (logs[0], logs[-1])
    assert 0.0 <= summary["held_out"]["present_acc"] <= 1.0
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("vision_tower.") for k in changed), sorted(changed)[:5]
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_folder_is_one_line_error(tmp_path):
    from valley_rt.model import build_model

    cfg = smoke_config()
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=64)
    with pytest.raises(DataError, match="not a synth folder"):
        pretrain_tower(build_model(cfg, seed=0), tmp_path, steps=1)


def test_temporal_pretraining_trains_only_projector_and_temporal(clips):
    from valley_rt.model import build_model
    from valley_rt.demo.vision_pretrain import load_synth, motion_targets, pretrain_temporal

    cfg = smoke_config()
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=64)
    cfg.temporal = dataclasses.replace(cfg.temporal, mode="transformer", num_heads=2, ff_size=64)
    model = build_model(cfg, seed=0)
    model.requires_grad_(False)
    loaded = load_synth(clips, cfg)
    visited, motion = motion_targets(loaded[2][0])
    assert visited.shape == (cfg.num_patches, len(synth.COLORS)) and motion.shape == (len(synth.COLORS), 2)
    assert np.allclose(np.linalg.norm(motion, axis=-1)[np.abs(motion).sum(-1) > 0], 1.0)  # unit directions
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs: list[dict] = []
    summary = pretrain_temporal(model, loaded, steps=40, batch_clips=8, lr=3e-3, val_clips=2, log=logs.append)
    assert logs[-1]["loss"] < logs[0]["loss"], (logs[0], logs[-1])
    assert set(summary["held_out"]) == {"direction_acc", "movers"}
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"mm_projector", "temporal"}, changed


def test_phase0_is_the_same_run_whatever_ran_before_it(clips):
    """The read-out heads and the temporal module's dropout draw from torch's global RNG: phase 0 seeds it,
    so two runs with one seed give the same weights even when other work consumed random numbers between."""
    from valley_rt.model import build_model
    from valley_rt.demo.vision_pretrain import pretrain_visual

    cfg = smoke_config()
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=64)
    cfg.temporal = dataclasses.replace(cfg.temporal, mode="transformer", num_heads=2, ff_size=64)
    runs = []
    for _ in range(2):
        torch.rand(17)  # something else used the global RNG first
        model = build_model(cfg, seed=0)
        pretrain_visual(model, clips, tower_steps=6, temporal_steps=6, seed=5)
        runs.append(model.state_dict())
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


def test_load_synth_in_worker_processes_gives_the_same_clips_and_labels(clips):
    """Phase 0 decodes and labels its clips in `workers` processes (two halve its prep time on the demo):
    the crops, the labels and what lands in the frame cache are those of a one-process load."""
    from valley_rt.train.data import FrameCache
    from valley_rt.demo.vision_pretrain import FrameLabels, load_synth

    cfg = demo_config()
    one_cache, two_cache = FrameCache(cfg), FrameCache(cfg)
    two_cache.crops(clips / "videos" / "s41_00003.mp4")  # one clip already decoded: not decoded again
    one = load_synth(clips, cfg, cache=one_cache)
    two = load_synth(clips, cfg, cache=two_cache, workers=2)
    assert one[0] == two[0] and len(one[0]) == 12
    assert np.array_equal(one[1], two[1])
    for a, b in zip(one[2], two[2]):
        for f in FrameLabels.__dataclass_fields__:
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert one_cache.decoded == two_cache.decoded == 12 and one_cache.mem.keys() == two_cache.mem.keys()
