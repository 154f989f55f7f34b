"""Property-based tests of the CLI's numeric and path options: whatever the values, a command ends in an
answer (exit 0) or exactly one `error:` line with exit code 2, never a traceback.

The typer app runs in-process (typer.testing.CliRunner): a subprocess per example would spend seconds
importing torch. tests/test_hostile_inputs.py holds real-subprocess checks of the same contract."""

import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from valley_rt.cli import app
from valley_rt.runtime import ASSETS

CLIP = ASSETS / "clips" / "s4_00000.mp4"
DEMO_CKPT = ASSETS / "demo"
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_answer_or_one_error(res):
    """exit 0, or exit 2 with exactly one `error:` line; an escaped exception is a failure."""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"uncaught {type(res.exception).__name__}: {res.exception}") from res.exception
    assert res.exit_code in (0, 2), (res.exit_code, res.stderr[-1500:])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in res.stderr
    if res.exit_code == 2:
        assert len(errors) == 1, res.stderr[-1500:]
    else:
        assert not errors, res.stderr[-1500:]


def _float_text(x: float) -> str:
    return repr(x) if math.isfinite(x) else str(x)  # "nan", "inf", "-inf" parse as floats


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
                   st.sampled_from([0.0, -0.0, 1e-310, 5e-324, 1e300, 0.5, 1.0, 2.0])).map(_float_text)
ints = st.one_of(st.integers(-3, 80), st.sampled_from([2**31, 2**63, 2**64, 2**64 - 1, -(2**63), -(2**63) - 1, 10**30]))


@settings(SETTINGS, max_examples=20)
@given(opts=st.fixed_dictionaries({}, optional={
    "--temperature": floats, "--top-p": floats, "--top-k": ints, "--seed": ints, "--frames": ints,
    "--fps": floats, "--max-new-tokens": st.integers(-2, 6)}))
@pytest.mark.parametrize("_", [None])  # a plain fixture-free property; parametrize keeps pytest's ids tidy
def test_ask_numeric_options(_, opts):
    opts.setdefault("--max-new-tokens", 4)  # the default (256) costs seconds per answer
    res = run("ask", CLIP, "which way does it move?", *[x for kv in opts.items() for x in kv])
    assert_answer_or_one_error(res)


@settings(SETTINGS, max_examples=60)
@given(frames=st.one_of(st.none(), ints), fps=st.one_of(st.none(), floats), max_frames=st.one_of(st.none(), ints))
def test_probe_numeric_options(frames, fps, max_frames):
    args = ["probe", CLIP]
    for flag, value in (("--frames", frames), ("--fps", fps), ("--max-frames", max_frames)):
        if value is not None:
            args += [flag, value]
    assert_answer_or_one_error(run(*args))


@settings(SETTINGS, max_examples=6)
@given(max_new=st.integers(-2, 4), frames=st.one_of(st.none(), ints), fps=st.one_of(st.none(), floats),
       lines=st.lists(st.text(max_size=20).filter(lambda t: "\n" not in t and "\r" not in t), max_size=3))
def test_chat_options(max_new, frames, fps, lines):
    args = ["chat", CLIP, "--max-new-tokens", max_new]
    if frames is not None:
        args += ["--frames", frames]
    if fps is not None:
        args += ["--fps", fps]
    assert_answer_or_one_error(run(*args, input="".join(f"{line}\n" for line in lines)))


# Group sizes that split the demo's LLM widths (192 and 384) into whole groups would start a real export.
DIVIDES_192 = {g for g in range(1, 193) if 192 % g == 0}


@settings(SETTINGS, max_examples=8)
@given(quant=st.one_of(st.sampled_from(["rtn4", "gptq", "none", ""]), st.text(max_size=8)),
       group_size=st.one_of(st.integers(-10, 10**6), st.sampled_from([0, -1, 2**64])).filter(
           lambda g: g not in DIVIDES_192),
       bits=st.one_of(st.integers(-2, 40), st.sampled_from([2**64])))
def test_export_option_validation(tmp_path_factory, quant, group_size, bits):
    out = tmp_path_factory.mktemp("export") / "engine"
    args = ["export", DEMO_CKPT, "--out", out, "--quant", quant, "--group-size", group_size, "--bits", bits]
    if quant == "none":
        args[5] = "rtn4"  # quant none ignores the group size and would run a whole export
    res = run(*args)
    assert_answer_or_one_error(res)
    assert res.exit_code == 2 and not out.exists()


def _interesting_paths(root: Path) -> list[str]:
    fifo = root / "fifo.mp4"
    if not fifo.exists():
        os.mkfifo(fifo)
    (root / "text.mp4").write_text("not a video\n")
    (root / "zero.mp4").write_bytes(b"")
    (root / "file").write_bytes(b"x")
    videos = sorted(str(p) for p in SHARED_VIDEOS.glob("*")) if SHARED_VIDEOS.is_dir() else []
    return [str(root), str(fifo), str(root / "text.mp4"), str(root / "zero.mp4"), str(root / "file" / "below.mp4"),
            "/dev/null", "/dev/zero", "/", "", ".", "a" * 300, "a" * 5000, "missing/clip.mp4", "-", *videos]


@settings(SETTINGS, max_examples=20)
@given(data=st.data())
def test_video_path_argument(tmp_path_factory, data):
    root = tmp_path_factory.getbasetemp() / "paths"
    root.mkdir(exist_ok=True)
    # What an argv can hold: any text but NUL and lone surrogates, except U+DC80..U+DCFF, the bytes of a
    # file name that is not UTF-8 as Python decodes them (surrogateescape); other lone surrogates can
    # only be passed in process, and there click refuses them before valley-rt sees them.
    argv_chars = st.one_of(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                           st.integers(0xDC80, 0xDCFF).map(chr))
    path = data.draw(st.one_of(st.sampled_from(_interesting_paths(root)), st.text(argv_chars, max_size=40)))
    command = data.draw(st.sampled_from(["probe", "ask"]))
    args = [command, path] + (["what?", "--max-new-tokens", 2] if command == "ask" else [])
    assert_answer_or_one_error(run(*args))


@settings(SETTINGS, max_examples=20)
# Text a command line can carry: no lone surrogates but the \udc80-\udcff that stand for undecodable
# bytes (Python's surrogateescape: `--out $'\x80'` arrives as "\udc80").
@given(out=st.one_of(st.sampled_from(["DIR", "DIR/missing/x.json", "DIR/file/x.json", "/dev/null/x", "DIR/" + "n" * 300,
                                      "DIR/missing/\udc80.json"]),
                     st.text(st.characters(blacklist_characters="\x00/", blacklist_categories=("Cs",)), min_size=1,
                             max_size=30).map(lambda t: "DIR/missing/" + t)))
def test_eval_out_option(tmp_path_factory, out):
    root = tmp_path_factory.getbasetemp() / "eval_out"
    root.mkdir(exist_ok=True)
    (root / "file").write_text("x")
    res = run("eval", DEMO_CKPT, ASSETS / "demo_eval.json", "--out", out.replace("DIR", str(root)), "--limit", 1)
    assert_answer_or_one_error(res)
    assert res.exit_code == 2
