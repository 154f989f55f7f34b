"""Regression tests for inputs a careless or hostile user gives: each must end in an answer or exactly one
`error:` line with exit code 2, never a traceback, a hang or a silent exit 0 with nothing said."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from valley_rt.cli import app
from valley_rt.runtime import ASSETS

CLIP = ASSETS / "clips" / "s4_00000.mp4"
DEMO_CKPT = ASSETS / "demo"


def cli(*args, input=None):
    """The typer app in-process (a subprocess per call costs ~4 s of imports)."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_error(res, *needles):
    """Exactly one `error:` line on stderr, exit code 2, no traceback."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 2, (res.exit_code, res.stdout[-500:], res.stderr[-1000:])
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-1000:]
    for n in needles:
        assert n in lines[0], lines[0]


def assert_answer(res):
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 0, (res.exit_code, res.stderr[-1000:])
    assert "Traceback" not in res.stderr  # (a few-token answer may be empty once its role marker is cut)


def make_audio_first_video(path: Path) -> Path:
    """An MP4 whose stream 0 is audio and stream 1 video (10 frames, 64x48)."""
    import av

    with av.open(str(path), "w") as c:
        audio = c.add_stream("aac", rate=8000)
        audio.layout = "mono"
        video = c.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            for p in video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")):
                c.mux(p)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        for p in [*audio.encode(frame), *audio.encode()]:
            c.mux(p)
        for p in video.encode():
            c.mux(p)
    return path


def test_video_whose_first_stream_is_audio_decodes(tmp_path):
    import av

    from valley_rt.video import read_video

    path = make_audio_first_video(tmp_path / "audio_first.mp4")
    with av.open(str(path)) as c:
        assert [s.type for s in c.streams] == ["audio", "video"]
    clip = read_video(path, num_frames=4)
    assert clip.frames.shape == (4, 48, 64, 3) and clip.num_source_frames == 10
    assert clip.frames[-1].mean() > clip.frames[0].mean() + 100  # the last frame is the brightest
    assert_answer(cli("ask", path, "what happens?", "--max-new-tokens", 4))


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "nan"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--fps", "nan"], "--fps"),
    (["--fps", "inf"], "--fps"),
    (["--seed", str(2**64)], "seed"),
    (["--seed", str(-(2**63) - 1)], "seed"),
    (["--top-p", "nan"], "top_p"),
    (["--frames", "0"], "--frames"),
])
def test_ask_numeric_options(args, needle):
    assert_error(cli("ask", CLIP, "what?", *args), needle)


def test_ask_tiny_and_huge_fps_answer():
    for fps in ("1e-310", "1e300"):
        assert_answer(cli("ask", CLIP, "what?", "--fps", fps, "--max-new-tokens", 2))


@pytest.mark.parametrize("args, needle", [
    (["--frames", "0"], "--frames"), (["--fps", "0"], "--fps"), (["--fps", "-1"], "--fps"),
    (["--fps", "nan"], "--fps"), (["--fps", "1", "--max-frames", "0"], "--max-frames"),
    (["--frames", str(10**9)], "--frames"),
])
def test_probe_numeric_options(args, needle):
    assert_error(cli("probe", CLIP, *args), needle)


def test_probe_extreme_fps_is_bounded():
    for fps in ("1e-310", "1e300"):
        res = cli("probe", CLIP, "--fps", fps)
        assert res.exit_code == 0, res.stderr
        assert 1 <= json.loads(res.stdout)["num_frames"] <= 64


def test_chat_max_new_tokens_zero():
    assert_error(cli("chat", CLIP, "--max-new-tokens", 0, input="hi\n"), "max_new_tokens")


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question_is_an_error(question):
    assert_error(cli("ask", CLIP, question), "empty")
    assert_error(cli("ask", CLIP, "fine", "-q", question), "empty")


def test_invalid_utf8_question_is_an_error_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "valley_rt", "ask", str(CLIP), b"bad \xff\xfe text"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert [line for line in p.stderr.splitlines() if line.startswith("error:")] == [
        "error: the question is not valid UTF-8 text"]
    assert_error(cli("ask", CLIP, "fine", "--system", "bad \udcff"), "system prompt")
    assert_error(cli("chat", CLIP, input=b"bad \xff\xfe text\n"), "not valid UTF-8")


@pytest.mark.parametrize("question", ["<im_patch>", "<vi_frame> <video> <video>", "<im_start>?", "</s>", "<vi_end>"])
def test_special_strings_in_questions_answer(question):
    assert_answer(cli("ask", CLIP, question, "--max-new-tokens", 4))
    assert_answer(cli("ask", CLIP, "what?", "--system", f"{question} <video>", "--max-new-tokens", 4))
    assert cli("chat", CLIP, "--max-new-tokens", 4, input=f"{question}\n{question}\n").exit_code == 0


def test_special_string_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "valley_rt", "ask", str(CLIP), "<im_patch> <video> </s>",
                        "--max-new-tokens", "4", "--system", "<video>"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() and not p.stderr.strip(), p.stderr[-2000:]


def test_images_past_the_size_caps_are_refused_before_decoding(tmp_path):
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("L", (60000, 1)).save(wide)  # ~140 bytes
    assert wide.stat().st_size < 1000
    big = tmp_path / "big.png"
    Image.new("L", (14000, 14000)).save(big)  # PIL's own DecompressionBombError size
    for path, needle in ((wide, "aspect ratio"), (big, "Mpixel")):
        t = time.perf_counter()
        assert_error(cli("probe", path), needle)
        assert_error(cli("ask", path, "what?"), needle)
        assert time.perf_counter() - t < 30  # refused from the header (the uncapped path took ~19 s and 1.7 GB)


def test_video_with_absurd_dimensions_is_refused(tmp_path):
    import av

    from valley_rt.video import TooLarge, read_video

    path = tmp_path / "thin.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=5)
        s.width, s.height, s.pix_fmt = 4000, 2, "yuv420p"
        for _ in range(2):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((2, 4000, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(TooLarge, match="aspect ratio"):
        read_video(path)


def test_fifo_and_devices_are_not_regular_files(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null"), Path("/dev/zero")):
        assert_error(cli("probe", path), "not a regular file")
    assert_error(cli("ask", fifo, "what?"), "not a regular file")


def test_very_long_file_name():
    name = "a" * 5000 + ".mp4"
    assert_error(cli("probe", name), "too long")
    assert_error(cli("ask", name, "what?"), "too long")
    for args in (["ask", "-m", name, CLIP, "what?"], ["info", name], ["eval", name, name],
                 ["eval", DEMO_CKPT, name], ["export", name, "--out", name, "--quant", "rtn4"], ["chat", name],
                 ["synth", name, "--n", 1, "--seed", 1]):
        assert_error(cli(*args), "too long")


def test_eval_out_that_cannot_be_a_file(tmp_path):
    data = ASSETS / "demo_eval.json"
    assert_error(cli("eval", DEMO_CKPT, data, "--out", tmp_path), "is a folder")
    assert_error(cli("eval", DEMO_CKPT, data, "--out", tmp_path / "missing" / "x.json"), "does not exist")
    assert_error(cli("eval", DEMO_CKPT, data, "--out", tmp_path / ("n" * 5000)), "--out")


def test_cache_path_that_is_a_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("VALLEY_RT_CACHE", str(cache))
    assert_error(cli("ask", "-m", DEMO_CKPT, CLIP, "what?"), "not a folder")
    monkeypatch.setenv("VALLEY_RT_CACHE", str(cache / "sub"))
    from valley_rt.errors import EngineError
    from valley_rt.export.cache import cache_dir

    with pytest.raises(EngineError, match="not a folder"):
        cache_dir()


def test_export_rtn4_default_group_size_on_demo(tmp_path):
    assert_error(cli("export", DEMO_CKPT, "--out", tmp_path / "e", "--quant", "rtn4"), "--group-size 64")
    assert_error(cli("export", DEMO_CKPT, "--out", tmp_path / "e", "--quant", "rtn4", "--group-size", 0), "group-size")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("config, needle", [
    ([], "config must be a JSON object"),
    ({"llm": []}, "llm must be a JSON object"),
    ({"llm": {"hidden_size": "192"}}, "llm.hidden_size"),
    ({"vision": {"patch_size": 1.5}}, "vision.patch_size"),
    ({"preprocess": {"mean": [0.5, 0.5]}}, "preprocess.mean"),
    ({"name": None}, "config.name"),
    ({"temporal": {"mode": "sideways"}}, "temporal mode"),
])
def test_malformed_configs_name_the_field(tmp_path, config, needle):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO_CKPT, ckpt)
    meta = json.loads((ckpt / "valley.json").read_text())
    if isinstance(config, dict) and isinstance(meta["config"], dict):
        config = {**meta["config"], **config}
    meta["config"] = config
    (ckpt / "valley.json").write_text(json.dumps(meta))
    assert_error(cli("info", ckpt), needle, "valley.json")
    assert_error(cli("ask", "--reference", "-m", ckpt, CLIP, "what?"), needle)
    engine = tmp_path / "engine"
    shutil.copytree(ASSETS / "demo_engine", engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["config"] = meta["config"]
    (engine / "manifest.json").write_text(json.dumps(manifest))
    res = cli("ask", "-m", engine, CLIP, "what?")
    assert_error(res)


def test_chat_outgrows_the_context_and_goes_on():
    """Turn after turn until the prompt + 256 reserved tokens pass the context: the oldest pairs leave the
    prompt (said once on stderr), the video stays, the session goes on."""
    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import load

    valley = load()
    params = SamplingParams(max_new_tokens=256)
    chat = valley.chat(CLIP)
    question = "Describe the video in detail, every object and every event. " * 3
    dropped = []
    for _ in range(60):
        ans = chat.send(question, params=params)
        assert ans.tokens_in + params.max_new_tokens <= valley.llm.max_context
        dropped.append(ans.dropped_turns)
        if ans.dropped_turns >= 2:
            break
    assert dropped[0] == 0 and dropped[-1] >= 2, dropped
    assert dropped == sorted(dropped)
    assert ans.answer  # it still answers about the video
    res = cli("chat", CLIP, input=f"{question}\n" * (dropped.index(1) + 2))
    assert res.exit_code == 0, res.stderr[-1000:]
    assert res.stderr.count("oldest turns are left out") == 1
