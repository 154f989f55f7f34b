"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors, no tracebacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "valley_rt", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_help_and_version():
    from valley_rt import __version__

    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"valley-rt {__version__}"
    p = run("--help")
    assert p.returncode == 0
    for cmd in ("ask", "chat", "info", "convert", "export", "probe", "synth", "train", "eval"):
        assert cmd in p.stdout


def test_info_on_7b_preset_never_builds_the_weights():
    # A 7B model in fp32 is 27 GB: `info` must count parameters without allocating them. Checked by the
    # child's own peak RSS (os.wait4 gives that child's rusage alone), not by a wall-clock time.
    proc = subprocess.Popen([sys.executable, "-m", "valley_rt", "info", "valley2-7b"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err[-2000:]
    info = json.loads(out)
    assert 6.6e9 < info["parameters"]["llm"] < 6.9e9
    assert 0.29e9 < info["parameters"]["vision_tower"] < 0.31e9
    assert "<im_patch>x256" in info["token_layout"]["video"]
    peak_mb = usage.ru_maxrss / 1024  # kB on Linux
    assert peak_mb < 3000, f"info valley2-7b peaked at {peak_mb:.0f} MB: it allocated weights"


def test_convert_and_info_on_checkpoint(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("shared fixtures are not present")
    p = run("convert", SHARED / "fixtures/original_valley/model_transformer", tmp_path / "ck")
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(run("info", tmp_path / "ck").stdout)
    assert info["config"]["temporal"]["mode"] == "transformer"
    # progress on stderr: the stage, then the bytes written (the last line at 100 %)
    err = p.stderr.splitlines()
    assert err[0].startswith("convert: writing ") and " tensors" in err[0], p.stderr
    assert err[-1].startswith("convert: writing ") and "GB (100 %)" in err[-1], p.stderr
    quiet = run("convert", SHARED / "fixtures/original_valley/model_transformer", tmp_path / "ck2", "--no-progress")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_user_errors_exit_2_with_one_line(tmp_path):
    assert_one_line_error(run("info", tmp_path), "valley.json: missing")
    assert_one_line_error(run("convert", tmp_path / "nope", tmp_path / "out"), "not a folder")
    assert_one_line_error(run("ask", SHARED / "videos" / "snowmobile.mp4", "hi", "--model", tmp_path / "nope"),
                          "no such model folder")
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "manifest.json").write_text("{not json")
    assert_one_line_error(run("ask", SHARED / "videos" / "snowmobile.mp4", "hi", "--model", tmp_path / "engine"),
                          "manifest.json", "not valid JSON")


@pytest.mark.parametrize("args, needle", [
    (["ask", "--bogus"], "No such option: --bogus"),
    (["ask", "a.mp4", "q", "extra"], "unexpected extra argument"),
    (["ask", "--frames", "x", "a.mp4", "q"], "Invalid value for '--frames'"),
    (["export"], "Missing argument 'ckpt'"),
    (["serve", "--port", "abc"], "Invalid value for '--port'"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_a_command_line_usage_error_is_one_error_line(args, needle):
    """What click reports as a usage error (unknown option, extra or missing argument, a value of the wrong
    type, an unknown command) is one `error:` line naming the command's --help, exit 2, no usage panel."""
    p = run(*args)
    assert_one_line_error(p, needle, "--help")


def test_help_and_version_still_exit_zero():
    assert run("ask", "--help").returncode == 0
    assert run("--version").stdout.startswith("valley-rt ")


def test_gptq_folder_needs_int4_weights(tmp_path):
    from valley_rt.runtime import DEMO_CHECKPOINT

    p = run("export", DEMO_CHECKPOINT, "--out", tmp_path / "engine", "--quant", "none", "--gptq-folder")
    assert_one_line_error(p, "--gptq-folder", "--quant rtn4")
    assert not (tmp_path / "engine").exists()
