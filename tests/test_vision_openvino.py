"""The OpenVINO CPU vision backend (the `[openvino]` extra): its graphs against the ONNX fp32 graph on a
tiny tower, the ISA-driven choice, and the fallback to ONNX Runtime when openvino is missing.

fp32 IR: max abs error <= 1e-4 of the value range vs ONNX Runtime's fp32 graph; bf16 / int8 variants:
cosine >= 0.999 per token (the bar the export keeps a variant at). The end-to-end test exports the
bundled demo checkpoint into a temporary engine (the shipped engine is not touched) with
--cpu-vision openvino, answers on it without torch, then answers again with openvino blocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from valley_rt.backends.openvino_vision import CANDIDATES, VARIANTS, variant_suits
from valley_rt.cpu import ISA_CLASSES, isa_class

ASSETS = Path(__file__).resolve().parents[1] / "valley_rt" / "assets"
needs_openvino = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("openvino", "nncf")),
    reason="openvino / nncf not installed (pip install 'valley-rt[openvino]')")

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}
ICE_LAKE = {"avx2", "avx512f", "avx512_vnni"}
ALDER_LAKE = {"avx2", "avx_vnni"}
HASWELL = {"avx2", "fma"}


@pytest.mark.parametrize("flags, want", [(SAPPHIRE_RAPIDS, "amx"), (ZEN4, "avx512_bf16"), (ICE_LAKE, "vnni"),
                                         (ALDER_LAKE, "vnni"), (HASWELL, "avx2"), (set(), "other")])
def test_isa_class_from_cpu_flags(flags, want):
    assert isa_class(frozenset(flags)) == want


def test_candidates_need_the_matrix_units_they_are_measured_for():
    """Every ISA class has candidates, each of which suits it; bf16 is never tried without bf16 dot
    products, int8 never without int8 dot products."""
    assert set(CANDIDATES) == set(ISA_CLASSES)
    for isa, variants in CANDIDATES.items():
        assert variants and all(variant_suits(v, isa) for v in variants), isa
    assert not variant_suits("bf16", "vnni") and not variant_suits("int8-bf16", "vnni")
    assert not variant_suits("int8", "avx2") and not variant_suits("bf16", "avx2")
    assert variant_suits("int8", "vnni") and variant_suits("fp32", "other")
    assert not variant_suits("fp16", "amx")  # an unknown variant never suits


def test_pick_vision_follows_the_manifest_choice_and_falls_back(monkeypatch):
    from valley_rt.backends import openvino_vision, vision
    from valley_rt.backends.vision import VISION_ENV, engine_cpu_backend, pick_vision

    monkeypatch.delenv(VISION_ENV, raising=False)
    entry = {"backend": "openvino", "variant": "int8", "isa": "amx", "file": "openvino/vision.xml"}
    monkeypatch.setattr(openvino_vision, "openvino_available", lambda: True)
    monkeypatch.setattr("valley_rt.cpu.isa_class", lambda flags=None: "amx")
    assert pick_vision("engine", device="cpu", cpu=entry) == "openvino-cpu"
    assert pick_vision("engine", device="auto", cpu=entry) == "openvino-cpu"  # no GPU graph here
    assert pick_vision("engine", device="cpu", cpu={"backend": "onnxruntime", "variant": "int8"}) == "onnx-cpu"
    assert pick_vision("engine", device="cpu", cpu=None) == "onnx-cpu"  # engines from before: ORT
    monkeypatch.setenv(VISION_ENV, "onnx-cpu")  # the override wins over the manifest
    assert pick_vision("engine", device="cpu", cpu=entry) == "onnx-cpu"
    monkeypatch.setenv(VISION_ENV, "openvino-cpu")
    assert pick_vision("engine", device="cpu") == "openvino-cpu"
    monkeypatch.delenv(VISION_ENV)

    notices = []
    monkeypatch.setattr("valley_rt.cpu.isa_class", lambda flags=None: "avx2")  # int8 chosen on AMX, run on AVX2
    assert engine_cpu_backend(entry, notice=notices.append) == "onnx-cpu"
    monkeypatch.setattr("valley_rt.cpu.isa_class", lambda flags=None: "amx")
    monkeypatch.setattr(openvino_vision, "openvino_available", lambda: False)
    assert engine_cpu_backend(entry, notice=notices.append) == "onnx-cpu"
    assert len(notices) == 2 and "avx2" in notices[0] and "valley-rt[openvino]" in notices[1]
    assert all("\n" not in n for n in notices)
    assert vision.engine_cpu_backend({"backend": "onnxruntime"}, notice=notices.append) == "onnx-cpu"
    assert len(notices) == 2  # nothing to say when ORT was the choice


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    """(model, ORT fp32 session, {weights: IR path}) for a tiny tower in importance mode."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from valley_rt.export import onnx_vision as ov
    from valley_rt.export import openvino_vision as ovv
    from valley_rt.config import preset
    from valley_rt.model import build_model

    cfg = preset("tiny")
    cfg.temporal.mode = "importance"
    model = build_model(cfg, seed=3)
    d = tmp_path_factory.mktemp("openvino")
    ov.export_raw(model, d / "raw.onnx")
    ov.optimize(d / "raw.onnx", d / "fp32.onnx", model)
    calibration = [ov.sample_crops(model.cfg, 4, seed=100 + i) for i in range(3)]
    irs = {"fp32": ovv.convert_fp32(d / "raw.onnx", d / "fp32.xml"),
           "int8": ovv.quantize_int8(d / "raw.onnx", d / "int8.xml", calibration)}
    return model, ov.session(d / "fp32.onnx"), irs


# int8 at 8 frames only: on this 96-wide random tower, static int8 gives per-patch-token cosines of
# ~0.98 on one frame, 0.9997 once 8 frames are averaged; the export's gate checks both frame counts.
@needs_openvino
@pytest.mark.parametrize("variant, frames", [("fp32", 1), ("fp32", 8), ("bf16", 1), ("bf16", 8), ("int8", 8),
                                             ("int8-bf16", 8)])
def test_openvino_matches_the_onnx_fp32_graph(tiny_graphs, variant, frames):
    from valley_rt.backends.openvino_vision import OpenVinoVision
    from valley_rt.export import onnx_vision as ov

    model, sess, irs = tiny_graphs
    vision = OpenVinoVision(irs[VARIANTS[variant][0]], model.cfg, variant=variant, threads=2)
    crops = ov.sample_crops(model.cfg, frames, seed=frames)
    want = sess.run(list(ov.OUTPUTS), {ov.INPUT: crops})
    got = vision.encode(crops)
    assert vision.name == f"openvino-{variant}"
    for w, g in zip(want, got):
        assert g.dtype == np.float32 and g.shape == w.shape
        figures = ov.compare(w, g)
        if variant == "fp32":
            assert figures["rel_err"] <= 1e-4, figures
        else:
            assert figures["min_cosine"] >= 0.999, figures
            assert figures["rel_err"] > 1e-6, figures  # really reduced precision, not the fp32 path


@needs_openvino
def test_nncf_int8_graph_holds_int8_weights(tiny_graphs):
    import openvino as ovr

    _, _, irs = tiny_graphs
    ops = [op.get_type_name() for op in ovr.Core().read_model(str(irs["int8"])).get_ops()]
    assert ops.count("FakeQuantize") >= 4
    int8_consts = [op for op in ovr.Core().read_model(str(irs["int8"])).get_ops()
                   if op.get_type_name() == "Constant" and op.get_element_type() == ovr.Type.i8]
    assert len(int8_consts) >= 4


@needs_openvino
def test_nncf_int8_keeps_patch_embedding_and_projector_in_float(tiny_graphs):
    """float_scope: the patch-embedding convolution and the projector's MatMuls read unquantized
    inputs in the int8 graph, while the encoder's MatMuls read FakeQuantize outputs; an unknown
    setting is refused before any work."""
    import openvino as ovr

    from valley_rt.export import openvino_vision as ovv

    _, _, irs = tiny_graphs
    model = ovr.Core().read_model(str(irs["int8"]))
    kept = set(ovv.float_scope(model))
    assert any("mm_projector" in n for n in kept) and any(
        op.get_type_name() == "Convolution" and op.get_friendly_name() in kept for op in model.get_ops())

    def quantized_input(op) -> bool:
        node = op.input_value(0).get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "FakeQuantize"

    linears = [op for op in model.get_ops() if op.get_type_name() in ("MatMul", "Convolution")]
    for op in linears:
        if op.get_friendly_name() in kept:
            assert not quantized_input(op), op.get_friendly_name()
    assert sum(quantized_input(op) for op in linears if op.get_friendly_name() not in kept) >= 4
    with pytest.raises(ValueError, match="int8 setting 'fast'"):
        ovv.quantize_int8("unused.onnx", "unused.xml", [], setting="fast")


@needs_openvino
def test_compiled_graph_cache_is_per_machine_and_can_be_off(tiny_graphs, tmp_path, monkeypatch):
    """cache=True (the engine's load) compiles through OpenVINO's model cache under $VALLEY_RT_CACHE/
    openvino: the first load writes a compiled blob, the next reads it and gives the same outputs
    bit for bit; VALLEY_RT_OV_CACHE=off and an unusable cache folder compile from the IR, writing
    nothing; cache=False (the export's timing runs) never writes."""
    from valley_rt.backends import openvino_vision as bov
    from valley_rt.export import onnx_vision as ov

    model, _, irs = tiny_graphs
    crops = ov.sample_crops(model.cfg, 4, seed=5)
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(bov.CACHE_ENV, raising=False)
    plain = bov.OpenVinoVision(irs["int8"], model.cfg, variant="int8", threads=2).encode(crops)
    assert not (tmp_path / "cache").exists()
    first = bov.OpenVinoVision(irs["int8"], model.cfg, variant="int8", threads=2, cache=True).encode(crops)
    root = tmp_path / "cache" / "openvino"
    blobs = sorted(root.glob("*/*.blob"))
    assert len(blobs) == 1 and blobs[0].stat().st_size > 0
    assert json.loads((blobs[0].parent / bov.CACHE_MARKER).read_text())["source"]["path"] == str(Path(irs["int8"]).resolve())
    stamp = blobs[0].stat().st_mtime_ns
    again = bov.OpenVinoVision(irs["int8"], model.cfg, variant="int8", threads=2, cache=True).encode(crops)
    assert sorted(root.glob("*/*.blob")) == blobs and blobs[0].stat().st_mtime_ns == stamp
    for a, b, c in zip(plain, first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)

    # an IR rewritten in place (a re-export): a new entry, and the old one, which can never match again, goes
    ir = tmp_path / "ir"
    ir.mkdir()
    for suffix in (".xml", ".bin"):
        (ir / f"vision{suffix}").write_bytes(Path(irs["int8"]).with_suffix(suffix).read_bytes())
    bov.OpenVinoVision(ir / "vision.xml", model.cfg, variant="int8", threads=2, cache=True)
    assert len(list(root.glob("*/*.blob"))) == 2
    (ir / "vision.xml").write_bytes((ir / "vision.xml").read_bytes())
    bov.OpenVinoVision(ir / "vision.xml", model.cfg, variant="int8", threads=2, cache=True)
    entries = sorted(root.glob("*/*.blob"))
    assert len(entries) == 2 and blobs[0] in entries  # the first IR's entry stays: its file is unchanged

    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "off"))
    monkeypatch.setenv(bov.CACHE_ENV, "off")
    assert bov.compiled_cache_dir(irs["int8"]) is None
    bov.OpenVinoVision(irs["int8"], model.cfg, variant="int8", threads=2, cache=True)
    assert not (tmp_path / "off").exists()
    monkeypatch.delenv(bov.CACHE_ENV)
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "a-file"))
    assert bov.compiled_cache_dir(irs["int8"]) is None
    out = bov.OpenVinoVision(irs["int8"], model.cfg, variant="int8", threads=2, cache=True).encode(crops)
    np.testing.assert_array_equal(out[0], plain[0])


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_without_openvino_the_engine_path_falls_back_in_one_line(tmp_path):
    """A fresh interpreter where `import openvino` fails: an engine whose manifest chose OpenVINO is
    dispatched to ONNX Runtime with one notice line; asking for OpenVINO explicitly is an EngineError
    naming the extra; nothing imports torch."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['openvino'] = None  # import raises\n")
    xml = tmp_path / "vision.xml"
    xml.write_text("<net/>")
    code = (
        "import json, sys\n"
        "from valley_rt.backends.vision import pick_vision\n"
        "from valley_rt.backends.openvino_vision import OpenVinoVision\n"
        "from valley_rt.config import preset\n"
        "from valley_rt.errors import EngineError\n"
        "entry = {'backend': 'openvino', 'variant': 'bf16', 'isa': 'amx', 'file': 'openvino/vision.xml'}\n"
        "choice = pick_vision('engine', device='cpu', cpu=entry)\n"
        "try:\n"
        f"    OpenVinoVision({str(xml)!r}, preset('tiny'), variant='bf16')\n"
        "    error = None\n"
        "except EngineError as e:\n"
        "    error = str(e)\n"
        "print(json.dumps({'choice': choice, 'error': error, 'torch': 'torch' in sys.modules}))\n")
    out = run_python(code, env={"PYTHONPATH": str(block)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got == {"choice": "onnx-cpu", "error": got["error"], "torch": False}
    assert "openvino is not installed" in got["error"] and "valley-rt[openvino]" in got["error"]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "bf16" in lines[0] and "ONNX Runtime" in lines[0], out.stderr


@pytest.mark.slow
@needs_openvino
def test_engine_with_openvino_vision_answers_without_torch_and_falls_back(tmp_path):
    """Export the demo checkpoint with --cpu-vision openvino: the manifest records the variant and the
    ISA, the engine answers through OpenVINO with no torch imported; with openvino blocked the same
    engine answers through ONNX Runtime after one notice line, with the same visual tokens to 0.999."""
    from valley_rt.export import openvino_vision as ovv
    from valley_rt.export.engine import export_engine

    out = tmp_path / "engine"
    m = export_engine(ASSETS / "demo", out, precision="fp32", quant="none", gpu="no", cpu_vision="openvino")
    cpu = m["vision_cpu"]
    assert cpu["backend"] == "openvino" and cpu["variant"] in CANDIDATES[isa_class()] and cpu["isa"] == isa_class()
    assert (out / "openvino" / "vision.xml").is_file() and "openvino/vision.bin" in m["artifacts"]
    assert cpu["min_cosine"][f"openvino-{cpu['variant']}"] >= 0.999
    tried = cpu["int8_settings"]  # NNCF settings in order until one passes the bar
    assert list(tried) == list(ovv.INT8_SETTINGS[:len(tried)]) and tried
    assert all(c < 0.999 for c in list(tried.values())[:-1])

    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from valley_rt.generate import SamplingParams\n"
        "from valley_rt.runtime import ASSETS, load\n"
        f"v = load({str(out)!r}, device='cpu')\n"
        "a = v.ask(ASSETS / 'clips' / 's4_00000.mp4', 'What happens in the video?', params=SamplingParams(max_new_tokens=8))\n"
        "crops = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)\n"
        "pooled, frames = v.vision.visual_tokens(v.vision.preprocess(crops))\n"
        "print(json.dumps({'vision': v.vision.name, 'answer': a.answer, 'pooled': pooled.tolist(),\n"
        "                  'heavy': [m for m in ('torch', 'transformers', 'nncf') if m in sys.modules]}))\n")
    fast = run_python(code)
    assert fast.returncode == 0, fast.stderr[-3000:]
    got = json.loads(fast.stdout.strip().splitlines()[-1])
    assert got["vision"] == f"openvino-{cpu['variant']}" and got["answer"] and got["heavy"] == []

    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['openvino'] = None  # import raises\n")
    plain = run_python(code, env={"PYTHONPATH": str(block)})
    assert plain.returncode == 0, plain.stderr[-3000:]
    fell = json.loads(plain.stdout.strip().splitlines()[-1])
    assert fell["vision"] == "onnxruntime-fp32" and fell["answer"]
    notice = [line for line in plain.stderr.splitlines() if "openvino" in line]
    assert len(notice) == 1 and "pip install 'valley-rt[openvino]'" in notice[0], plain.stderr
    p, q = np.asarray(got["pooled"]), np.asarray(fell["pooled"])
    cos = (p * q).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(q, axis=-1)
    assert cos.min() >= 0.999
