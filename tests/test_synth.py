"""The synthetic video-instruction generator: files decode, records are well formed, output is
deterministic per seed and disjoint across seeds, and every short answer agrees with the decoded pixels."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from valley_rt.demo import synth
from valley_rt.prompt import normalize_answer
from valley_rt.train.evaluate import render_blank_video

N_CLIPS = 16
SEED = 3


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@functools.lru_cache(maxsize=64)
def decode_cached(path: Path) -> np.ndarray:
    return decode(path)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = synth.generate(out, n=N_CLIPS, seed=SEED)
    return out, meta, json.loads((out / "data.json").read_text())


@pytest.fixture(scope="module")
def arena():
    return synth.make_arena(128, 96)


def object_of(question: str) -> str:
    """The one "<color> <shape>" a question names."""
    names = [f"{c} {s}" for c in synth.COLORS for s in synth.SHAPES if f"{c} {s}" in question]
    assert len(names) == 1, question
    return names[0]


def color_track(frames: np.ndarray, color: str, arena) -> list[tuple[int, float, float]]:
    """(frame, centroid x, centroid y) of the pixels near `color` inside the arena, per frame it is visible in."""
    x0, y0, s = arena.x0, arena.y0, arena.side
    crop = frames[:, y0:y0 + s, x0:x0 + s].astype(np.int16)
    near = (np.abs(crop - np.array(synth.COLORS[color], np.int16)).sum(-1, dtype=np.int16) < 90).astype(np.float32)
    count = near.sum((1, 2))  # near: [T, s, s]
    cx = near.sum(1) @ np.arange(s, dtype=np.float32) / np.maximum(count, 1)
    cy = near.sum(2) @ np.arange(s, dtype=np.float32) / np.maximum(count, 1)
    # a 16 px object covers >= ~120 px; stray edge pixels never reach 30
    return [(t, x0 + cx[t], y0 + cy[t]) for t in range(len(frames)) if count[t] >= 30]


def answer(rec) -> str:
    return rec["conversations"][-1]["value"]


def test_files_decode_and_records_well_formed(gen):
    out, meta, records = gen
    videos = sorted((out / "videos").glob("*.mp4"))
    assert len(videos) == N_CLIPS == meta["n"]
    frames = decode(videos[0])
    assert frames.shape == (32, 96, 128, 3)
    with av.open(str(videos[0])) as c:
        st = c.streams.video[0]
        assert st.codec_context.name == "h264" and st.codec_context.pix_fmt == "yuv420p"
    for v in videos[1:]:
        assert len(decode(v)) == 32
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert (out / "videos" / r["video"]).is_file()
        assert r["task"] in synth.TASK_FAMILIES
        conv = r["conversations"]
        assert len(conv) >= 2 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<video>\n") and conv[0]["value"].count("<video>") == 1
        assert all(t["value"].strip() for t in conv)
        assert r["short"] == (r["task"] in synth.SHORT_FAMILIES)
        if r["short"]:
            norm = [normalize_answer(c) for c in r["choices"]]
            assert normalize_answer(answer(r)) in norm and len(set(norm)) == len(norm)
    assert meta["families"] == {f: sum(r["task"] == f for r in records) for f in synth.TASK_FAMILIES}
    assert json.loads((out / "meta.json").read_text())["families"] == meta["families"]
    assert set(meta["chance"]) == set(synth.SHORT_FAMILIES)
    assert meta["chance"]["action"] < 0.5 and meta["chance"]["order"] == 0.5


def test_every_family_produced(gen):
    _, meta, _ = gen
    assert all(meta["families"][f] > 0 for f in synth.TASK_FAMILIES), meta["families"]
    assert set(synth.TEMPORAL_FAMILIES) <= set(synth.SHORT_FAMILIES)


def test_deterministic_for_a_seed(gen, tmp_path):
    out, _, records = gen
    synth.generate(tmp_path, n=8, seed=SEED, workers=2)  # a prefix of the same split, by a pool of two processes
    again = json.loads((tmp_path / "data.json").read_text())
    assert again == [r for r in records if int(r["video"].split("_")[1][:5]) < 8]
    for v in sorted((tmp_path / "videos").glob("*.mp4")):
        assert (out / "videos" / v.name).read_bytes() == v.read_bytes()
        assert np.array_equal(decode(v), decode(out / "videos" / v.name))


def test_seeds_give_disjoint_splits(gen, tmp_path):
    _, meta, records = gen
    other = synth.generate(tmp_path, n=N_CLIPS, seed=SEED + 1)
    other_records = json.loads((tmp_path / "data.json").read_text())
    assert not {r["id"] for r in records} & {r["id"] for r in other_records}
    assert not {r["video"] for r in records} & {r["video"] for r in other_records}
    assert not set(meta["clip_hashes"]) & set(other["clip_hashes"])
    assert len(set(meta["clip_hashes"])) == N_CLIPS


def test_direction_answers_match_pixels(gen, arena):
    out, _, records = gen
    checked = 0
    for r in (r for r in records if r["task"] == "action"):
        color = object_of(r["conversations"][0]["value"]).split()[0]
        track = color_track(decode_cached(out / "videos" / r["video"]), color, arena)
        (_, xa, ya), (_, xb, yb) = track[0], track[-1]
        dx, dy = xb - xa, yb - ya
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        assert max(moved, key=moved.get) == answer(r), (r["id"], moved)
        assert moved[answer(r)] >= 10
        checked += 1
    assert checked >= 5


def test_causal_answers_match_pixels(gen, arena):
    """At its turning point the bouncer touches the wall, or the object the answer names."""
    out, _, records = gen
    checked = 0
    for r in (r for r in records if r["task"] == "causal"):
        frames = decode_cached(out / "videos" / r["video"])
        color = object_of(r["conversations"][0]["value"]).split()[0]
        track = color_track(frames, color, arena)
        xs, ys = np.array([p[1] for p in track]), np.array([p[2] for p in track])
        axis = xs if np.ptp(xs) > np.ptp(ys) else ys
        k = int(np.argmax(np.abs(axis - axis[0])))  # the turn: farthest from where it started
        assert 0 < k < len(track) - 1, r["id"]
        t, cx, cy = track[k]
        if answer(r) == "it hit the wall":
            lo, hi = arena.lo, arena.hi
            box = [cx - lo[0], hi[0] - cx, cy - lo[1], hi[1] - cy]
            assert min(box) < 5, (r["id"], box)  # centroid of a triangle is off-centre by < 3 px
        else:
            other = answer(r).removeprefix("it hit the ").split()[0]
            o = [p for p in color_track(frames, other, arena) if p[0] == t]
            assert o, r["id"]
            assert abs(o[0][1] - cx) + abs(o[0][2] - cy) < arena.size + 6, r["id"]
        checked += 1
    assert checked >= 2


def test_order_and_count_answers_match_pixels(gen, arena):
    out, _, records = gen
    descriptions = {r["video"]: r for r in records if r["task"] == "long_description"}
    seen: dict[str, dict[str, int]] = {}  # video -> colour -> first frame it shows
    for r in (r for r in records if r["task"] in ("order", "counting")):
        if r["video"] not in seen:
            frames = decode_cached(out / "videos" / r["video"])
            seen[r["video"]] = {c: track[0][0] for c in synth.COLORS if (track := color_track(frames, c, arena))}
        first_seen = seen[r["video"]]
        if r["task"] == "counting":  # a colour change shows one object in two colours
            changes = answer(descriptions[r["video"]]).count(" turns ")
            assert normalize_answer(answer(r)) == str(len(first_seen) - changes), r["id"]
        else:
            a, b = (object_of(c).split()[0] for c in r["choices"])
            first = a if first_seen[a] < first_seen[b] else b
            assert object_of(answer(r)).split()[0] == first, r["id"]


def test_normalize_answer():
    assert normalize_answer("The Red square.") == "red square"
    assert normalize_answer(" It hit the wall! ") == "it hit wall"
    assert normalize_answer("Three") == normalize_answer("3") == "3"
    assert normalize_answer("Left") == "left"


def test_render_blank_video(gen, tmp_path):
    out, _, records = gen
    src = out / "videos" / records[0]["video"]
    render_blank_video(tmp_path / "blank.mp4", like=src)
    blank = decode(tmp_path / "blank.mp4")
    assert blank.shape == decode(src).shape
    assert blank.max() <= 20


def test_cli_synth(tmp_path):
    from typer.testing import CliRunner

    from valley_rt.cli import app

    res = CliRunner().invoke(app, ["synth", str(tmp_path / "d"), "--n", "2", "--seed", "9"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["n"] == 2
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--n", "2", "--seed", "9", "--extra-questions"])
    assert res.exit_code == 0 and json.loads((tmp_path / "x" / "meta.json").read_text())["extra_questions"] is True
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "e"), "--n", "0", "--seed", "9"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_color_changes_match_pixels(gen, arena):
    """"The X turns Y": the X colour vanishes where the Y colour shows up, in the very next frame."""
    out, _, records = gen
    changes = 0
    for r in (r for r in records if r["task"] == "long_description"):
        for old, _shape, new in re.findall(r"The (\w+) (\w+) turns (\w+)\.", answer(r)):
            frames = decode_cached(out / "videos" / r["video"])
            a, b = color_track(frames, old, arena), color_track(frames, new, arena)
            assert a[-1][0] + 1 == b[0][0], r["id"]
            assert abs(a[-1][1] - b[0][1]) + abs(a[-1][2] - b[0][2]) < 2, r["id"]
            changes += 1
    assert changes >= 1


def test_answers_are_balanced():
    """Every short answer is (about) equally frequent in a split, so chance is known."""
    arena = synth.make_arena(128, 96)
    answers: dict[str, list[str]] = {f: [] for f in synth.SHORT_FAMILIES}
    for i in range(400):
        for r in synth.clip_records(synth.plan_clip(21, i, arena=arena), f"s21_{i:05d}.mp4"):
            if r["short"]:
                a = normalize_answer(answer(r))
                if r["task"] == "causal":
                    a = "wall" if a == "it hit wall" else "object"
                if r["task"] == "order":
                    a = "named first" if a == normalize_answer(r["choices"][0]) else "named second"
                answers[r["task"]].append(a)
    for fam, got in answers.items():
        values = sorted(set(got))
        assert len(values) == {"action": 4, "causal": 2, "counting": 3, "order": 2}[fam], (fam, values)
        shares = [got.count(v) / len(got) for v in values]
        tolerance = 0.12 if fam == "order" else 0.04  # order only in expectation; the rest by 48-clip blocks
        assert max(shares) - min(shares) < tolerance, (fam, dict(zip(values, shares)))
    assert len(answers["causal"]) > 100 and len(answers["order"]) > 100


def test_arena_is_inside_the_model_crop():
    """Everything drawn lies inside what survives Valley's resize-short-side + centre crop (spec)."""
    for w, h in [(128, 96), (96, 72), (160, 120)]:
        a = synth.make_arena(w, h)
        scale = 73 / min(w, h)
        rw, rh = int(73 * w / min(w, h)), int(73 * h / min(w, h))
        left, top = int(round((rw - 64) / 2)), int(round((rh - 64) / 2))
        assert a.x0 * scale >= left and (a.x0 + a.side) * scale <= left + 64
        assert a.y0 * scale >= top and (a.y0 + a.side) * scale <= top + 64
        assert a.size * scale >= 10  # objects at least 10 model pixels wide


def test_extra_questions_add_checkable_ones(tmp_path, arena):
    """extra_questions (training data) keeps the drawn records and adds the direction of every other mover and
    the order of every other pair; each added answer agrees with the decoded pixels."""
    meta = synth.generate(tmp_path / "x", n=N_CLIPS, seed=SEED, extra_questions=True)
    records = json.loads((tmp_path / "x" / "data.json").read_text())
    plain = json.loads(json.dumps([r for i in range(N_CLIPS) for r in synth.clip_records(
        synth.plan_clip(SEED, i, arena=arena), f"s{SEED}_{i:05d}.mp4")]))
    drawn = {r["id"] for r in plain}
    assert meta["extra_questions"] is True
    assert [r for r in records if r["id"] in drawn] == plain
    assert len({r["id"] for r in records}) == len(records)  # ids stay unique
    added = [r for r in records if r["id"] not in drawn]
    assert {r["task"] for r in added} == {"action", "order"}, [r["id"] for r in added]
    for r in added:
        assert answer(r) in r["choices"], r["id"]
        frames = decode_cached(tmp_path / "x" / "videos" / r["video"])
        if r["task"] == "action":
            track = color_track(frames, object_of(r["conversations"][0]["value"]).split()[0], arena)
            dx, dy = track[-1][1] - track[0][1], track[-1][2] - track[0][2]
            assert {"left": -dx, "right": dx, "up": -dy, "down": dy}[answer(r)] > arena.size / 2, r["id"]
        else:
            first = {c: track[0][0] for c in synth.COLORS if (track := color_track(frames, c, arena))}
            a, b = (object_of(c).split()[0] for c in r["choices"])
            assert object_of(answer(r)).split()[0] == (a if first[a] < first[b] else b), r["id"]


def test_distractor_flag(gen, arena):
    """`distractor` marks the questions another object would answer differently: for order, checked on
    the pixels (an object outside the pair shows no later than the earlier of the pair); for action and
    causal, on the clip's plan (another object moves another way / turns back too)."""
    out, meta, records = gen
    flags: dict[str, list[bool]] = {}
    first_seen: dict[str, dict[str, int]] = {}
    for r in records:
        if not r["short"]:
            assert "distractor" not in r
            continue
        flags.setdefault(r["task"], []).append(r["distractor"])
        if r["task"] == "counting":
            assert r["distractor"] is False
        elif r["task"] == "order":
            if r["video"] not in first_seen:
                frames = decode_cached(out / "videos" / r["video"])
                first_seen[r["video"]] = {c: t[0][0] for c in synth.COLORS if (t := color_track(frames, c, arena))}
            seen = first_seen[r["video"]]
            pair = [object_of(c).split()[0] for c in r["choices"]]
            first = min(seen[c] for c in pair)
            assert r["distractor"] == any(f <= first for c, f in seen.items() if c not in pair), r["id"]
        else:
            plan = synth.plan_clip(SEED, int(r["video"].split("_")[1].split(".")[0]), arena=arena)
            name = object_of(r["conversations"][0]["value"])
            others = [t for t in plan.tracks if t.name != name]
            if r["task"] == "action":
                want = any(t.direction not in (None, answer(r)) for t in others)
            else:
                want = any(t.bounce_at is not None for t in others)
            assert r["distractor"] == want, r["id"]
    assert True in flags["order"] and False in flags["order"]
    assert True in flags["action"] and False in flags["action"]


def test_workers_from_a_script_read_on_stdin(tmp_path):
    """Spawned workers re-import the main script; one read from stdin has no file, so generate runs in its own
    process there instead of hanging on workers that cannot start."""
    import subprocess
    import sys

    code = (f"from valley_rt.demo import synth\n"
            f"print(synth.generate({str(tmp_path)!r}, n=8, seed={SEED}, workers=2)['records'])\n")
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == len(json.loads((tmp_path / "data.json").read_text())) > 0
