"""Data loading, label masking, collation, the frame cache and the demo tokenizer."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from valley_rt.errors import DataError
from valley_rt.prompt import IGNORE_INDEX, VIDEO, Turn, encode, format_conversation
from valley_rt.train import data as D
from valley_rt.demo.recipes import smoke_config
from valley_rt.demo.tokenizer import corpus_texts, token_layout, train_tokenizer


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from valley_rt.demo.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n=4, seed=321)
    return out


@pytest.fixture(scope="module")
def tok_cfg(synth_dir):
    records, _ = D.load_records(synth_dir / "data.json")
    cfg = smoke_config()
    tok = train_tokenizer(corpus_texts(records, system=cfg.system_prompt), vocab_size=300)
    cfg.tokens = token_layout(tok)
    cfg.llm.vocab_size = len(tok)
    return tok, cfg


def _write(tmp_path, records, videos_from=None):
    if videos_from is not None:
        shutil.copytree(videos_from / "videos", tmp_path / "videos", dirs_exist_ok=True)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_load_records_resolves_videos_and_keeps_task(synth_dir):
    records, problems = D.load_records(synth_dir / "data.json")
    raw = json.loads((synth_dir / "data.json").read_text())
    assert problems == [] and len(records) == len(raw)
    assert all(r.video.is_file() and r.video.parent == (synth_dir / "videos").resolve() for r in records)
    assert [r.task for r in records] == [r["task"] for r in raw]
    assert [r.short for r in records] == [r["short"] for r in raw]
    assert all(VIDEO in r.turns[0].text and [t.role for t in r.turns] == ["human", "gpt"] for r in records)


def test_missing_video_names_the_record_and_can_be_skipped(tmp_path, synth_dir):
    raw = json.loads((synth_dir / "data.json").read_text())[:3]
    raw[1] = {**raw[1], "id": "the-broken-one", "video": "nope.mp4"}
    path = _write(tmp_path, raw, synth_dir)
    with pytest.raises(DataError, match="the-broken-one.*nope.mp4.*does not exist"):
        D.load_records(path)
    records, problems = D.load_records(path, skip_bad=True)
    assert len(records) == 2 and len(problems) == 1 and "the-broken-one" in problems[0]


@pytest.mark.parametrize("conv, why", [
    ([{"from": "human", "value": "hi"}], "at least 2 turns"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "turn 0 is from 'gpt'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], "turn 1 must be an object with a string"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}], "ends with a human"),
    ([{"from": "human", "value": "a <video>"}, {"from": "gpt", "value": "<video>"}], "one <video>"),
])
def test_malformed_conversation_names_the_record(tmp_path, synth_dir, conv, why):
    raw = json.loads((synth_dir / "data.json").read_text())[:2]
    raw[0] = {**raw[0], "id": "bad-conv", "conversations": conv}
    path = _write(tmp_path, raw, synth_dir)
    with pytest.raises(DataError, match=f"'bad-conv'.*{why}"):
        D.load_records(path)
    records, problems = D.load_records(path, skip_bad=True)
    assert len(records) == 1 and "bad-conv" in problems[0]


def test_not_a_list_and_bad_json_are_data_errors(tmp_path):
    (tmp_path / "a.json").write_text('{"id": 1}')
    (tmp_path / "b.json").write_text("[{")
    with pytest.raises(DataError, match="expected a JSON list"):
        D.load_records(tmp_path / "a.json")
    with pytest.raises(DataError, match="not valid JSON"):
        D.load_records(tmp_path / "b.json")
    with pytest.raises(DataError, match="does not exist"):
        D.load_records(tmp_path / "c.json")


def test_labels_cover_exactly_the_assistant_turns(synth_dir, tok_cfg):
    tok, cfg = tok_cfg
    records, _ = D.load_records(synth_dir / "data.json")
    grouped = D.group_by_video(records)
    ds = D.InstructionDataset(grouped, tok, cfg, shuffle_turns=False)
    s = ds.sample(0)
    rec = grouped[0]
    # the labelled tokens, decoded, are the assistant turns with their role marker and separator
    runs, cur = [], []
    for i, l in zip(s.input_ids, s.labels):
        if l == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert l == i
            cur.append(i)
    runs.append(cur) if cur else None
    answers = [t.text for t in rec.turns if t.role == "gpt"]
    assert len(runs) == len(answers)
    for run, ans in zip(runs, answers):
        assert tok.decode(run).strip() == f"Assistent: {ans} \n###"
    # the video placeholders are there, once, with the configured counts
    assert s.input_ids.count(cfg.tokens.im_patch) == cfg.num_patches
    assert s.input_ids.count(cfg.tokens.vi_frame) == cfg.sampling.num_frames
    assert s.pixel_values.shape == (8, 3, 64, 64)


def test_generation_prompt_is_a_token_prefix_of_the_training_text(tok_cfg):
    tok, cfg = tok_cfg
    q = Turn("human", f"{VIDEO}\nWhich way does the red square move?")
    prompt, _ = format_conversation([q], system=cfg.system_prompt)
    full, spans = format_conversation([q, Turn("gpt", "left")], system=cfg.system_prompt)
    p_ids, _ = encode(tok, prompt, cfg=cfg, num_frames=8)
    f_ids, labels = encode(tok, full, cfg=cfg, num_frames=8, spans=spans)
    assert f_ids[: len(p_ids)] == p_ids
    assert all(l == IGNORE_INDEX for l in labels[: len(p_ids)]) and labels[-1] != IGNORE_INDEX


def test_grouping_and_turn_shuffles_keep_every_pair_and_one_video(synth_dir, tok_cfg):
    import random

    records, _ = D.load_records(synth_dir / "data.json")
    grouped = D.group_by_video(records)
    assert len(grouped) == 4 and sum(g.extra["parts"] for g in grouped) == len(records)
    g = grouped[0]
    pairs = {(g.turns[i].text.replace(VIDEO + "\n", ""), g.turns[i + 1].text) for i in range(0, len(g.turns), 2)}
    orders = set()
    for seed in range(6):
        turns = D.shuffle_turns(g, random.Random(seed))
        assert turns[0].text.startswith(VIDEO) and sum(VIDEO in t.text for t in turns) == 1
        got = {(turns[i].text.replace(VIDEO + "\n", ""), turns[i + 1].text) for i in range(0, len(turns), 2)}
        assert got == pairs
        orders.add(turns[1].text)
    assert len(orders) > 1  # the first question changes between epochs
    # samples are deterministic in (seed, epoch, index)
    tok, cfg = tok_cfg
    ds = D.InstructionDataset(grouped, tok, cfg, seed=5)
    assert ds.sample(1, epoch=3).input_ids == ds.sample(1, epoch=3).input_ids
    assert D.epoch_order(10, 1, 2) == D.epoch_order(10, 1, 2) != D.epoch_order(10, 1, 3)


def test_collate_right_pads(synth_dir, tok_cfg):
    tok, cfg = tok_cfg
    records, _ = D.load_records(synth_dir / "data.json")
    ds = D.InstructionDataset(records, tok, cfg)
    samples = [ds.sample(0), ds.sample(1)]  # a caption and a long description: different lengths
    b = D.collate(samples, tok.pad_token_id)
    n0, n1 = (len(s.input_ids) for s in samples)
    assert n0 != n1 and b["input_ids"].shape == (2, max(n0, n1))
    assert b["attention_mask"].sum(1).tolist() == [n0, n1]
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert (b["input_ids"][short, n:] == tok.pad_token_id).all()
    assert (b["labels"][short, n:] == IGNORE_INDEX).all()
    assert b["pixel_values"].shape == (2, 8, 3, 64, 64)


def test_frame_cache_decodes_once_and_matches_preprocess(tmp_path, synth_dir, tok_cfg):
    from valley_rt.video import preprocess, read_video

    _, cfg = tok_cfg
    video = synth_dir / "videos" / "s321_00000.mp4"
    cache = D.FrameCache(cfg, disk_dir=tmp_path / "cache")
    a = cache.pixels(video)
    b = cache.pixels(video)
    assert cache.decoded == 1
    ref = preprocess(read_video(video, num_frames=8).frames, cfg.preprocess)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    again = D.FrameCache(cfg, disk_dir=tmp_path / "cache")  # a new process: served from disk
    assert torch.equal(again.pixels(video), ref) and again.decoded == 0
    copy = tmp_path / "v.mp4"
    shutil.copy(video, copy)
    k = again.key(copy)
    os.utime(copy, ns=(0, 10**9))  # a changed file gets a new key
    assert again.key(copy) != k
    with pytest.raises(DataError, match="does not exist"):
        cache.pixels(tmp_path / "missing.mp4")


def test_tokenizer_layout_and_roundtrip(tmp_path, tok_cfg):
    from transformers import AutoTokenizer

    from valley_rt.config import SPECIAL_TOKENS

    tok, cfg = tok_cfg
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 6)) and ids[-1] == len(tok) - 1
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "<s>?" if False else "Hello <im_start><im_patch><im_patch><im_end> Valley! ünïcode 42"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back(text)["input_ids"][0] == 1
    assert back.decode(back(text)["input_ids"], skip_special_tokens=True) == "Hello  Valley! ünïcode 42"
