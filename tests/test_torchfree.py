"""The engine path without torch: importing the runtime and answering on an engine never imports torch
(or transformers, or the exporters), the vision dispatch honours --device for engine folders, a
checkpoint needs the exporter hook, and a command whose extra is missing says which one in one line.

The same engine-path tests run in an environment with no torch installed at all: .ci/torchfree.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from valley_rt.errors import EngineError, ValleyError

HEAVY = ("torch", "transformers", "safetensors", "gptqmodel", "onnx", "valley_rt.export", "valley_rt.train")


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_answering_on_the_demo_engine_never_imports_torch():
    code = (
        "import json, sys\n"
        "import valley_rt\n"
        "from valley_rt.generate import SamplingParams\n"
        "from valley_rt.runtime import ASSETS\n"
        "v = valley_rt.load()\n"
        "a = v.ask(ASSETS / 'clips' / 's4_00000.mp4', 'What happens in the video?',\n"
        "          params=SamplingParams(max_new_tokens=8))\n"
        "s = v.ask(ASSETS / 'clips' / 's4_00000.mp4', 'What happens in the video?',\n"
        "          params=SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20, seed=1))\n"
        f"print(json.dumps({{'kind': v.kind, 'answer': a.answer, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["kind"] == "engine" and got["answer"]
    assert got["heavy"] == []


def test_cli_ask_on_the_engine_never_imports_torch(tmp_path):
    """The whole `valley-rt ask` command, with an import hook that fails any torch import."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'transformers'):\n    sys.modules[name] = None  # import raises\n")
    code = "from valley_rt.cli import app; app()"
    out = run_python(code, "ask", str(Path(__file__).parents[1] / "valley_rt/assets/clips/s4_00002.mp4"),
                     "How many shots are there?", "--json", "--max-new-tokens", "8",
                     env={"PYTHONPATH": str(block)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["answers"][0]["backends"]["kind"] == "engine"


def test_a_missing_extra_is_one_line_naming_the_install(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    out = run_python("from valley_rt.cli import app; app()", "info", "valley2-7b", env={"PYTHONPATH": str(block)})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and 'pip install "valley-rt[torch]"' in lines[0], out.stderr


def test_vision_dispatch(monkeypatch):
    from valley_rt.backends.vision import VISION_ENV, pick_vision

    monkeypatch.delenv(VISION_ENV, raising=False)
    assert pick_vision("engine", device="cpu") == "onnx-cpu"
    assert pick_vision("engine", device="auto", gpu=None) == "onnx-cpu"  # no GPU graph in the engine
    with pytest.raises(EngineError, match="--device cuda"):
        pick_vision("engine", device="cuda", gpu=None)
    with pytest.raises(EngineError, match="--reference needs a checkpoint"):
        pick_vision("engine", reference=True)
    assert pick_vision("checkpoint", reference=True) == "reference"
    assert pick_vision("checkpoint", device="cpu") == "onnx-cpu"  # a checkpoint on a CPU runs as an engine
    with pytest.raises(ValleyError, match="--device must be"):
        pick_vision("engine", device="tpu")
    monkeypatch.setenv(VISION_ENV, "torch")
    assert pick_vision("checkpoint", device="cpu") == "torch"  # the override, for tests
    with pytest.raises(EngineError, match="needs a checkpoint"):
        pick_vision("engine", device="cpu")
    monkeypatch.setenv(VISION_ENV, "nonsense")
    with pytest.raises(ValleyError, match="VALLEY_RT_VISION"):
        pick_vision("engine")


def test_device_reaches_the_engine_vision_backend():
    """--device is honoured for engine folders: cpu runs the CPU provider; cuda without a CUDA GPU is an error."""
    from valley_rt.runtime import DEMO_ENGINE, load

    valley = load(DEMO_ENGINE, device="cpu")
    assert valley.vision.providers == ["CPUExecutionProvider"]
    with pytest.raises(EngineError, match="--device cuda"):
        load(DEMO_ENGINE, device="cuda")


def test_a_checkpoint_needs_the_exporter_hook(tmp_path, monkeypatch):
    from valley_rt.backends.vision import VISION_ENV
    from valley_rt.runtime import DEMO_CHECKPOINT, DEMO_ENGINE, load

    monkeypatch.delenv(VISION_ENV, raising=False)
    with pytest.raises(EngineError, match="valley-rt export"):
        load(DEMO_CHECKPOINT, device="cpu")
    seen = []
    valley = load(DEMO_CHECKPOINT, device="cpu", exporter=lambda ckpt: seen.append(ckpt) or DEMO_ENGINE)
    assert seen == [DEMO_CHECKPOINT] and valley.kind == "engine"
