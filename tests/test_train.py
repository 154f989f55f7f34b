"""The reference trainer: the loss falls, stages freeze the right parts, the schedule, kill -9 + resume
continues exactly, evaluation, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from valley_rt.errors import DataError
from valley_rt.train.trainer import TrainOptions, cosine_with_warmup, train, trainable_parameters


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Six synthetic clips and a random smoke-sized checkpoint with a trained tokenizer (transformer
    temporal mode, so dropout's RNG is part of what resume must restore)."""
    from valley_rt.checkpoint import save_checkpoint
    from valley_rt.model import build_model
    from valley_rt.train.data import load_records
    from valley_rt.demo.recipes import smoke_config
    from valley_rt.demo.synth import generate
    from valley_rt.demo.tokenizer import corpus_texts, token_layout, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_run")
    generate(root / "data", n=6, seed=77)
    records, _ = load_records(root / "data" / "data.json")
    cfg = smoke_config()
    cfg.temporal = dataclasses.replace(cfg.temporal, mode="transformer", num_heads=2, ff_size=64)
    tok = train_tokenizer(corpus_texts(records, system=cfg.system_prompt), vocab_size=300)
    cfg.tokens = token_layout(tok)
    cfg.llm.vocab_size = len(tok)
    save_checkpoint(build_model(cfg, seed=3), root / "init", tokenizer=tok)
    return root


def _opts(root: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=str(root / "data" / "data.json"), out=str(out), init=str(root / "init"), train_vision=True,
                batch_size=2, lr=3e-3, seed=1, threads=1, progress=False)
    return TrainOptions(**{**base, **kw})


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["loss"]) for m in lines if "loss" in m]


def test_a_few_steps_make_the_loss_fall(tiny_run, tmp_path):
    summary = train(_opts(tiny_run, tmp_path / "run", max_steps=16, lr=5e-3, warmup_ratio=0.0))
    losses = [l for _, l in _losses(tmp_path / "run")]
    assert summary["steps"] == 16 and len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # nats
    # the result is a loadable valley-rt checkpoint with the run's tokenizer
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer

    model = load_checkpoint(tmp_path / "run" / "model")
    assert load_tokenizer(tmp_path / "run" / "model").convert_tokens_to_ids("<vi_end>") == model.cfg.tokens.vi_end


def test_stages_freeze_the_right_parts(tiny_run):
    from valley_rt.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_run / "init")

    def trained(stage, vision, **frozen):
        params = {id(p) for p in trainable_parameters(model, stage=stage, train_vision=vision, **frozen)}
        return {name for name, mod in [("vision", model.vision_tower), ("projector", model.mm_projector),
                                       ("temporal", model.temporal), ("llm", model.llm)]
                if any(id(p) in params for p in mod.parameters())}

    assert trained(1, False) == {"projector", "temporal"}
    assert trained(2, False) == {"projector", "temporal", "llm"}
    assert trained(2, True) == {"vision", "projector", "temporal", "llm"}
    assert trained(2, False, train_temporal=False) == {"projector", "llm"}
    assert trained(2, False, train_temporal=False, train_projector=False) == {"llm"}
    assert trained(1, False, train_projector=False) == {"temporal"}
    with pytest.raises(DataError, match="stage must be 1 or 2"):
        trainable_parameters(model, stage=3, train_vision=False)
    with pytest.raises(DataError, match="trains nothing"):
        trainable_parameters(model, stage=1, train_vision=False, train_temporal=False, train_projector=False)


def test_a_frozen_projector_stays_bit_identical(tiny_run, tmp_path):
    from valley_rt.checkpoint import load_checkpoint

    train(_opts(tiny_run, tmp_path / "llm_only", train_vision=False, train_temporal=False, train_projector=False,
                max_steps=2))
    before, after = load_checkpoint(tiny_run / "init"), load_checkpoint(tmp_path / "llm_only" / "model")
    assert torch.equal(before.mm_projector.weight, after.mm_projector.weight)
    for a, b in zip(before.temporal.parameters(), after.temporal.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(before.llm.lm_head.weight, after.llm.lm_head.weight)


def test_stage1_leaves_the_llm_and_tower_untouched(tiny_run, tmp_path):
    from valley_rt.checkpoint import load_checkpoint

    train(_opts(tiny_run, tmp_path / "s1", stage=1, train_vision=False, max_steps=2))
    before, after = load_checkpoint(tiny_run / "init"), load_checkpoint(tmp_path / "s1" / "model")
    assert torch.equal(before.llm.lm_head.weight, after.llm.lm_head.weight)
    assert torch.equal(before.vision_tower.embeddings.patch_embedding.weight,
                       after.vision_tower.embeddings.patch_embedding.weight)
    assert not torch.equal(before.mm_projector.weight, after.mm_projector.weight)


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(100, 0.03)  # 3 warm-up steps
    assert [round(f(s), 4) for s in range(4)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 1.0]
    assert f(51) == pytest.approx(0.5, abs=0.02)
    assert f(99) < 0.01 and f(99) >= 0
    assert all(f(s) >= f(s + 1) for s in range(3, 99))


KILLED_RUN = """
import json, os, signal, sys
from valley_rt.train.trainer import TrainOptions, train
args = json.loads(sys.argv[1])
def on_step(m):
    if m["step"] == args["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
train(TrainOptions(**args["opts"]), resume=args["resume"], on_step=on_step)
"""


def test_kill_9_then_resume_continues_the_same_loss_curve(tiny_run, tmp_path):
    from valley_rt.checkpoint import load_checkpoint

    steps = 10
    whole = _opts(tiny_run, tmp_path / "whole", max_steps=steps, save_every=2)
    train(whole)
    broken = _opts(tiny_run, tmp_path / "broken", max_steps=steps, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = {"opts": dataclasses.asdict(broken), "kill_at": 5, "resume": False}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(args)], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = torch.load(tmp_path / "broken" / "state.pt", weights_only=True)  # no pickled code needed
    assert state["step"] == 4  # the last state written before the kill
    assert [s for s, _ in _losses(tmp_path / "broken")] == [1, 2, 3, 4, 5]  # step 5 logged, not saved
    train(broken, resume=True)  # a fresh start of the same command with --resume
    assert _losses(tmp_path / "broken") == _losses(tmp_path / "whole")
    a, b = load_checkpoint(tmp_path / "whole" / "model"), load_checkpoint(tmp_path / "broken" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


class _RunsCode:
    """Pickles to a call of os.system: what a state.pt from an untrusted source may hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_state_file_that_would_run_code(tiny_run, tmp_path):
    run = _opts(tiny_run, tmp_path / "run", max_steps=2, save_every=1)
    train(run)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)  # our own file
    state["scheduler"] = _RunsCode(tmp_path / "pwned")
    torch.save(state, tmp_path / "run" / "state.pt")
    with pytest.raises(DataError, match=r"state\.pt: refused .*weights-only.*GLOBAL posix\.system"):
        train(run, resume=True)
    assert not (tmp_path / "pwned").exists()


def test_same_seed_same_run(tiny_run, tmp_path):
    train(_opts(tiny_run, tmp_path / "a", max_steps=3))
    train(_opts(tiny_run, tmp_path / "b", max_steps=3))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_evaluate_scores_per_family_with_blind_control(tiny_run, tmp_path):
    from valley_rt.train.evaluate import evaluate, score
    from valley_rt.train.data import load_records

    records, _ = load_records(tiny_run / "data" / "data.json")
    short = [r for r in records if r.short]
    perfect = score(short, [f"The {r.turns[1].text.upper()}!" for r in short])  # normalize_answer on both sides
    assert perfect["overall"] == 1.0 and perfect["n"] == len(short)
    assert score(short, ["" for _ in short])["overall"] == 0.0
    # families with flagged questions also report accuracy with and without a distractor
    hard = [r for r in short if r.extra.get("distractor")]
    assert hard, "the tiny split has no question with a distractor"
    half = score(short, [r.turns[1].text if not r.extra.get("distractor") else "" for r in short])
    for family, acc in half["per_family"].items():
        if "with_distractor" in acc:
            assert acc["with_distractor"]["accuracy"] == 0.0 and acc["without_distractor"]["accuracy"] in (1.0, None)
            assert acc["with_distractor"]["n"] + acc["without_distractor"]["n"] == acc["n"]
    assert sum(a.get("with_distractor", {}).get("n", 0) for a in half["per_family"].values()) == len(hard)
    out = tmp_path / "eval.json"
    result = evaluate(model=tiny_run / "init", data=tiny_run / "data" / "data.json", both=True, limit=4, out=out)
    assert json.loads(out.read_text()) == result
    for part in ("video", "blind"):
        assert result[part]["n"] == 4
        assert set(result[part]["per_family"]) <= {"action", "causal", "counting", "order"}
        assert 0.0 <= result[part]["overall"] <= 1.0
    assert set(result["chance"]) <= {"action", "causal", "counting", "order"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from valley_rt.cli import app; app()", *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_reports_data_errors_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from valley_rt.cli import app

    (tmp_path / "d.json").write_text("[]")
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(tmp_path / "d.json"), "--out", str(tmp_path / "o"), "--init",
                              str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("error: ")
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "o"), "--recipe", "nope"])
    assert res.exit_code == 2 and "unknown recipe 'nope'" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "nope"), str(tmp_path / "d.json")])
    assert res.exit_code == 2 and "error: " in res.output


@pytest.mark.slow  # ~9 s on an idle 2-core box, ~45 s while other jobs run
def test_smoke_recipe_loss_falls_within_two_minutes(tmp_path):
    t0 = time.perf_counter()
    proc = _cli("train", "--recipe", "smoke", "--out", str(tmp_path / "smoke"), "--threads", "1", "--no-progress")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    losses = [l for _, l in _losses(tmp_path / "smoke")]
    assert seconds < 120 and summary["steps"] == len(losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_param_groups_never_decay_the_llm_and_scale_the_tower(tiny_run):
    from valley_rt.checkpoint import load_checkpoint
    from valley_rt.train.trainer import param_groups

    model = load_checkpoint(tiny_run / "init")
    params = trainable_parameters(model, stage=2, train_vision=True)
    groups = param_groups(model, params, 0.1, 1e-3, vision_lr_scale=0.1)
    assert sum(len(g["params"]) for g in groups) == len(params)
    llm = {id(p) for p in model.llm.parameters()}
    tower = {id(p) for p in model.vision_tower.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if ids & llm:
            assert g["weight_decay"] == 0.0 and g["lr"] == 1e-3
        if ids & tower:
            assert g["lr"] == pytest.approx(1e-4) and not ids & llm


def test_precision_choice():
    from valley_rt.train.trainer import cpu_has_bf16, resolve_precision

    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if cpu_has_bf16() else None)
    with pytest.raises(DataError, match="precision must be"):
        resolve_precision("fp8", "cpu")


def test_recipe_reuses_synth_data_only_when_it_matches():
    from valley_rt.demo.recipes import _same_synth

    meta = {"n": 10, "width": 128, "extra_questions": False}
    assert _same_synth(meta, 10, {})
    assert _same_synth(meta, 10, {"width": 128, "extra_questions": False})
    assert not _same_synth(meta, 12, {})
    assert not _same_synth(meta, 10, {"extra_questions": True})  # training data asked with extra questions
    assert not _same_synth({"n": 10}, 10, {"extra_questions": True})  # written before the option existed
    assert _same_synth({"n": 10}, 10, {"extra_questions": False})


def test_text_pretraining_lowers_the_lm_loss_and_touches_only_the_llm(tiny_run):
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer
    from valley_rt.prompt import VIDEO
    from valley_rt.demo.text_pretrain import conversation_texts, pretrain_text

    model, tok = load_checkpoint(tiny_run / "init"), load_tokenizer(tiny_run / "init")
    sample = conversation_texts(tiny_run / "data" / "data.json", system=model.cfg.system_prompt)
    text = sample(random.Random(0))
    assert VIDEO not in text and text.startswith(model.cfg.system_prompt) and "Assistent:" in text
    visual = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    logged = []
    out = pretrain_text(model, tok, tiny_run / "data" / "data.json", steps=60, batch_size=4, lr=3e-3, warmup=5,
                        log=logged.append)
    assert out["steps"] == 60 and out["final_loss"] < 0.7 * out["first_loss"]
    assert logged and logged[-1]["step"] == 60
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in visual.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the trainer's CUDA path)")
def test_training_on_cuda_lowers_the_loss_resumes_and_runs_the_smoke_recipe(tiny_run, tmp_path):
    """DATA training on CUDA (bf16 autocast where the GPU has it): the loss falls; kill -9 + --resume continues
    the curve (to bf16 / atomic-add noise: CUDA kernels are not bit-deterministic); and the smoke recipe runs
    every phase (tower, temporal and text pretraining, instruction tuning) on the GPU via --device cuda."""
    from valley_rt.checkpoint import load_checkpoint

    train(_opts(tiny_run, tmp_path / "run", max_steps=16, lr=5e-3, warmup_ratio=0.0, device="cuda"))
    losses = [l for _, l in _losses(tmp_path / "run")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    assert load_checkpoint(tmp_path / "run" / "model").mm_projector.weight.device.type == "cpu"

    whole = _opts(tiny_run, tmp_path / "whole", max_steps=8, save_every=2, device="cuda")
    train(whole)
    broken = _opts(tiny_run, tmp_path / "broken", max_steps=8, save_every=2, device="cuda")
    args = {"opts": dataclasses.asdict(broken), "kill_at": 5, "resume": False}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(args)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train(broken, resume=True)
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "broken")
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(abs(x - y) <= 0.02 * max(1.0, abs(x)) for (_, x), (_, y) in zip(a, b)), (a, b)

    proc = _cli("train", "--recipe", "smoke", "--out", str(tmp_path / "smoke"), "--device", "cuda", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [l for _, l in _losses(tmp_path / "smoke")]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
