"""The native decode step (valley_rt/backends/native_decode.{c,py}) against ONNX Runtime's int4 graph.

It must compute what the graph computes for one appended token: the same logits up to the int8
activation rounding both make (each against the dequantized fp32 reference as close as the graph is),
the same KV rows, the same greedy tokens; it must replace the int4 graph only where it can run, and
say why not elsewhere."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import LlamaConfig, LlamaForCausalLM

from valley_rt.backends import native_decode
from valley_rt.backends.llm_onnx import PREFILL_MIN_TOKENS, OnnxLLM
from valley_rt.backends.llm_torch import TorchLLM
from valley_rt.errors import EngineError
from valley_rt.export.llm_onnx import export_llm_onnx
from valley_rt.generate import SamplingParams, generate

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llama import save_tiny_llamas, tiny_llama as _tiny_llama  # noqa: E402  (tests/tiny_llama.py)

why_not = native_decode.cpu_reason() or (None if native_decode.library()[0] is not None else native_decode.library()[1])
needs_native = pytest.mark.skipif(why_not is not None, reason=f"native decode cannot run here: {why_not}")
AMX = why_not is None and native_decode.amx_usable(native_decode.library()[0])
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX-INT8 tiles for this process (CPU, kernel or compiler)")

# (hidden, heads, kv heads): head sizes 32 / 64 / 48; hidden 256 takes the GEMV's block-128 path; the
# others the general one (192 in blocks of 64: a partial last 64-byte load).
SHAPES = {"h128": (128, 4, 2), "h256": (256, 4, 2), "h192": (192, 4, 4)}


def tiny_llama(kind: str, seed: int = 0) -> LlamaForCausalLM:
    return _tiny_llama(*SHAPES[kind], seed=seed)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return save_tiny_llamas(tmp_path_factory, SHAPES)


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_graph_reader_equals_onnx(hf_dirs, tmp_path):
    """read_graph (the protobuf read without the onnx package) gives onnx.load's nodes, attributes and
    initializer values, external and inline."""
    path = export_llm_onnx(hf_dirs["h256"], tmp_path, quant="rtn4", group_size=128)
    nodes, tensors = native_decode.read_graph(path)
    model = onnx.load(str(path))
    assert [n["op_type"] for n in nodes] == [n.op_type for n in model.graph.node]
    for mine, theirs in zip(nodes, model.graph.node):
        assert mine["inputs"] == list(theirs.input)
        want = {a.name: onnx.helper.get_attribute_value(a) for a in theirs.attribute}
        assert mine["attrs"].keys() == want.keys()
        for k, v in want.items():
            assert mine["attrs"][k] == (list(v) if isinstance(v, (list, tuple)) else v) or np.isclose(mine["attrs"][k], v)
    inits = native_decode.Initializers(tensors, path.parent)
    assert set(tensors) == {t.name for t in model.graph.initializer}
    external = 0
    for t in model.graph.initializer:
        external += bool(tensors[t.name]["external"])
        np.testing.assert_array_equal(inits[t.name], numpy_helper.to_array(t))
    assert external > 0


def _pair(path, monkeypatch):
    """The same engine on ORT's int4 graph, and a native decoder over its weights."""
    monkeypatch.setenv("VALLEY_RT_DECODE", "onnxruntime")
    monkeypatch.setenv("VALLEY_RT_PREFILL", "int4")
    ort_llm = OnnxLLM(path.parent)
    native, why = native_decode.NativeDecoder.open(ort_llm._model_file, ort_llm.meta, None)
    assert native is not None, why
    return ort_llm, native


@needs_native
@pytest.mark.parametrize("kind,group_size,lm_head", [("h256", 128, "int8"), ("h192", 64, "int8"),
                                                     ("h128", 32, "int4"), ("h256", 64, "int4")])
def test_a_native_step_computes_what_the_int4_graph_computes(hf_dirs, tmp_path, monkeypatch, kind, group_size, lm_head):
    path = export_llm_onnx(hf_dirs[kind], tmp_path, quant="rtn4", group_size=group_size, lm_head=lm_head)
    ort_llm, native = _pair(path, monkeypatch)
    ref = TorchLLM(LlamaForCausalLM.from_pretrained(str(hf_dirs[kind]), dtype=torch.float32))
    ids = [3 + (7 * i) % 990 for i in range(40)]
    ort_llm.prefill(ort_llm.embed(ids))
    ref.prefill(ref.embed(ids))
    cache = [c.copy() for c in ort_llm._cache]
    pos = ort_llm.position
    logits = np.zeros(ort_llm.vocab_size, np.float32)
    for i, tok in enumerate((5, 17, 400, 999)):
        want, exact = ort_llm.decode(tok), ref.decode(tok)
        native.step(ort_llm.embed([tok])[0], cache, pos + i, logits)
        assert _cos(logits, want) > 0.999
        assert _cos(logits, exact) > _cos(want, exact) - 0.002  # as close to fp32 as the graph is
        assert logits.argmax() == want.argmax()
    for mine, theirs in zip(cache, ort_llm._cache):  # K/V rows: rotary and the appended positions alike
        rows = slice(pos, pos + 4)
        np.testing.assert_allclose(mine[0, :, rows], theirs[0, :, rows], atol=0.05 * np.abs(theirs[0, :, rows]).max())
        np.testing.assert_array_equal(mine[0, :, :pos], theirs[0, :, :pos])  # rows before are left alone


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


@needs_native
@pytest.mark.parametrize("kind,group_size,kernel", [("h256", 128, "amx"), ("h256", 128, "vnni"), ("h128", 32, "vnni"),
                                                     ("h192", 64, "vnni")])
def test_a_native_prompt_computes_what_the_int4_graph_computes(hf_dirs, tmp_path, monkeypatch, kind, group_size, kernel):
    """An append of many tokens (int8 GEMMs over all of them; blocks of 128: on the AMX tiles or the
    tiled VNNI kernel, with a token count that leaves partial tiles; else row by row; head sizes 64, 32
    and 48, a partial vector in the attention) gives the int4 graph's logits and KV rows, and decoding
    goes on from them alike."""
    if kernel == "amx" and not AMX:
        pytest.skip("no AMX-INT8 tiles for this process")
    path = export_llm_onnx(hf_dirs[kind], tmp_path, quant="rtn4", group_size=group_size)
    ort_llm, native = _pair(path, monkeypatch)
    native._model.amx = int(kernel == "amx")
    ref = TorchLLM(LlamaForCausalLM.from_pretrained(str(hf_dirs[kind]), dtype=torch.float32))
    ids = [3 + (13 * i) % 990 for i in range(47)]
    want, exact = ort_llm.prefill(ort_llm.embed(ids)), ref.prefill(ref.embed(ids))
    cache = ort_llm._new_cache(ort_llm.cache_slots)
    logits = np.zeros(ort_llm.vocab_size, np.float32)
    native.append(ort_llm.embed(ids[:30]), cache, 0, logits)  # two appends: positions carry on
    native.append(ort_llm.embed(ids[30:]), cache, 30, logits)
    assert _cos(logits, want) > 0.999 and logits.argmax() == want.argmax()
    assert _cos(logits, exact) > _cos(want, exact) - 0.002
    for mine, theirs in zip(cache, ort_llm._cache):
        rows = theirs[0, :, :len(ids)]
        np.testing.assert_allclose(mine[0, :, :len(ids)], rows, atol=0.05 * np.abs(rows).max())
    native.step(ort_llm.embed([9])[0], cache, len(ids), logits)
    assert _cos(logits, ort_llm.decode(9)) > 0.999


@needs_native
def test_native_decode_replaces_the_int4_graph_beside_a_prompt_graph(hf_dirs, tmp_path, monkeypatch):
    """With a prompt graph, "auto" decodes natively and never opens the int4 graph: single steps and
    appends of up to NATIVE_MAX_APPEND tokens run natively, longer ones on the prompt graph; the greedy
    answer equals the int4 graph's, through a fork and a KV cache that grows under native steps."""
    import valley_rt.backends.llm_onnx as llm_onnx

    path = export_llm_onnx(hf_dirs["h256"], tmp_path, quant="rtn4", group_size=128)
    monkeypatch.setenv("VALLEY_RT_PREFILL", "int8")
    monkeypatch.setenv("VALLEY_RT_DECODE", "onnxruntime")
    plain = OnnxLLM(path.parent)
    monkeypatch.setenv("VALLEY_RT_DECODE", "auto")
    monkeypatch.setattr(llm_onnx, "KV_START_SLOTS", 80)  # the answer below grows the cache mid-decode
    llm = OnnxLLM(path.parent, defer_load=True)
    llm.load_rest_in_background()
    ids = [3 + (11 * i) % 990 for i in range(PREFILL_MIN_TOKENS + 8)]
    params = SamplingParams(max_new_tokens=24)
    a = generate(llm, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    b = generate(plain, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    assert a.token_ids == b.token_ids
    assert llm.decode_backend == "native" and llm.session is None and "native-decode" in llm.tags
    assert plain.decode_backend == "onnxruntime" and llm.cache_slots > 80

    runs = []
    real = llm._native.append
    monkeypatch.setattr(llm._native, "append", lambda *a: (runs.append(len(a[0])), real(*a)))
    for n, native_tokens in ((2, [2]), (llm_onnx.NATIVE_MAX_APPEND, [llm_onnx.NATIVE_MAX_APPEND]), (12, [])):
        runs.clear()
        at = llm.position
        plain.truncate(at)
        got, want = llm.prefill(llm.embed(ids[:n])), plain.prefill(plain.embed(ids[:n]))
        assert runs == native_tokens and llm.position == at + n
        assert _cos(got, want) > 0.998
    assert llm.session is None

    other = llm.fork()
    c = generate(other, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    assert c.token_ids == a.token_ids and other._native is llm._native


@needs_native
def test_without_a_prompt_graph_the_native_decoder_serves_prompts_too(hf_dirs, tmp_path, monkeypatch):
    """No prompt graph (VALLEY_RT_PREFILL=int4, or a large model on a small machine): the int4 graph is
    not opened; a prompt of any length (past NATIVE_APPEND_CHUNK: several runs) and the answer run
    natively, with the int4 graph's greedy answer."""
    import valley_rt.backends.llm_onnx as llm_onnx

    path = export_llm_onnx(hf_dirs["h256"], tmp_path, quant="rtn4", group_size=128)
    monkeypatch.setenv("VALLEY_RT_PREFILL", "int4")
    monkeypatch.setenv("VALLEY_RT_DECODE", "onnxruntime")
    plain = OnnxLLM(path.parent)
    monkeypatch.setenv("VALLEY_RT_DECODE", "auto")
    monkeypatch.setattr(llm_onnx, "NATIVE_APPEND_CHUNK", 32)
    llm = OnnxLLM(path.parent)
    ids = [3 + (17 * i) % 990 for i in range(70)]
    params = SamplingParams(max_new_tokens=16)
    a = generate(llm, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    b = generate(plain, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    assert a.token_ids == b.token_ids
    assert llm.decode_backend == "native" and llm.session is None and llm.prefill_session is None


def test_where_native_decode_does_not_run_the_graph_does(hf_dirs, tmp_path, monkeypatch):
    """auto keeps the int4 graph (and says why) on a graph the kernel does not compute (heads padded to
    16), without a C compiler, or on a CPU without AVX512-VNNI; "native" makes each of these an error;
    "onnxruntime" keeps the graph anyway; an unknown choice is an error."""
    import valley_rt.cpu

    monkeypatch.setenv("VALLEY_RT_PREFILL", "int4")
    monkeypatch.setenv("VALLEY_RT_DECODE", "onnxruntime")
    plain = export_llm_onnx(hf_dirs["h256"], tmp_path / "plain", quant="rtn4", group_size=128)
    llm = OnnxLLM(plain.parent)
    assert llm.decode_backend == "onnxruntime" and llm.native_reason == "VALLEY_RT_DECODE=onnxruntime"
    monkeypatch.setenv("VALLEY_RT_DECODE", "auto")

    monkeypatch.setenv("VALLEY_RT_PREFILL", "int8")
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf8")
    padded = export_llm_onnx(tmp_path / "hf8", tmp_path / "padded", quant="rtn4", group_size=32)
    if native_decode.cpu_reason() is None:
        llm = OnnxLLM(padded.parent)
        assert llm.decode_backend == "onnxruntime" and "pads its attention heads" in llm.native_reason
        monkeypatch.setenv("VALLEY_RT_DECODE", "native")
        with pytest.raises(EngineError, match="pads its attention heads"):
            OnnxLLM(padded.parent)
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        with pytest.raises(EngineError, match="VALLEY_RT_DECODE=native, but .*no-such-cc"):
            OnnxLLM(path := export_llm_onnx(hf_dirs["h256"], tmp_path / "pg", quant="rtn4")).parent
        monkeypatch.setenv("VALLEY_RT_DECODE", "auto")
        llm = OnnxLLM(path.parent)
        assert llm.decode_backend == "onnxruntime" and "no-such-cc" in llm.native_reason
        monkeypatch.delenv("CC")

    monkeypatch.setattr(valley_rt.cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setenv("VALLEY_RT_DECODE", "native")
    with pytest.raises(EngineError, match="the CPU lacks avx512f"):
        OnnxLLM(padded.parent)
    monkeypatch.setenv("VALLEY_RT_DECODE", "fast")
    with pytest.raises(EngineError, match="expected auto, native or onnxruntime"):
        OnnxLLM(padded.parent)


@needs_native
def test_a_process_with_native_decode_exits(hf_dirs, tmp_path):
    """OpenMP's worker threads (the kernel's) and ORT's do not keep a finished process alive."""
    path = export_llm_onnx(hf_dirs["h128"], tmp_path, quant="rtn4", group_size=32)
    code = textwrap.dedent(f"""
        import os
        os.environ["VALLEY_RT_PREFILL"] = "int8"
        from valley_rt.backends.llm_onnx import OnnxLLM
        llm = OnnxLLM({str(path.parent)!r}, defer_load=True)
        llm.load_rest_in_background()
        llm.prefill(llm.embed(list(range(3, 80))))
        llm.decode(5)
        print(llm.decode_backend)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "native"


@needs_native
def test_the_kernel_is_built_once_and_loaded_only_when_it_is_the_users_own(tmp_path, monkeypatch):
    """The build lands in $VALLEY_RT_CACHE/native/<key>/ (0755, renamed into place); a library there
    that others may write is not loaded into the process."""
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path))
    monkeypatch.setattr(native_decode, "_LOADED", {})
    lib, why = native_decode.library()
    assert lib is not None, why
    built = list((tmp_path / "native").glob("*/libvrt_decode.so"))
    assert len(built) == 1 and built[0].stat().st_mode & 0o777 == 0o755
    assert native_decode.library()[0] is lib  # once per process
    monkeypatch.setattr(native_decode, "_LOADED", {})
    built[0].chmod(0o777)
    lib, why = native_decode.library()
    assert lib is None and "writable by others" in why


def _quantized_reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """What MatMulNBits at accuracy level 4 computes for 4-bit blocks of 128, in float64 from the same
    int8 activation codes the kernels make (float32 absmax / 127 scales, rounded half to even)."""
    m, k = x.shape
    xb = x.reshape(m, k // 128, 128)
    amax = np.abs(xb).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint((xb * inv[:, :, None]).astype(np.float32)), -127, 127)
    sx = (amax / np.float32(127)).astype(np.float64)
    w = codes.astype(np.float64) - zeros.astype(np.float64)[:, :, None]  # [n, blocks, 128]
    return np.einsum("mb,nb,mbk,nbk->mn", sx, scales.astype(np.float64), q, w)


@needs_native
@pytest.mark.parametrize("m", [1, 5, 17, 33, 70])
def test_the_prompt_kernels_compute_matmulnbits_on_any_token_count(m):
    """One linear of 4-bit codes in blocks of 128 over m tokens, with a row count that is not a multiple
    of the tiles (40) and zero points, on the AMX tiles and on AVX512-VNNI: both equal the quantized
    product computed in float64 (the int32 sums are exact; only the fp32 summation order differs)."""
    rng = np.random.default_rng(m)
    n, k = 40, 384
    codes = rng.integers(0, 16, (n, k // 128, 128), dtype=np.uint8)
    zeros = rng.integers(0, 16, (n, k // 128), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (n, k // 128)).astype(np.float32)
    packed = np.ascontiguousarray(codes[:, :, 0::2] | (codes[:, :, 1::2] << 4))  # low nibble = even k
    zp = np.zeros((n, (k // 128 + 1) // 2), np.uint8)
    for b in range(k // 128):
        zp[:, b // 2] |= zeros[:, b] << (4 * (b % 2))
    lin = native_decode._Linear(packed.ctypes.data, scales.ctypes.data, zp.ctypes.data, n, k, 4, 128)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :128] = 0.0  # an all-zero block: scale 0, no division by zero
    want = _quantized_reference(x, codes, scales, zeros)
    lib = native_decode.library()[0]
    for amx in ([0, 1] if AMX else [0]):
        y = np.full((m, n), np.nan, np.float32)
        assert lib.vrt_linear_rows(ctypes.byref(lin), x.ctypes.data, m, y.ctypes.data, amx, 2) == 0
        np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(), err_msg=f"amx={amx}")
    bad = native_decode._Linear(packed.ctypes.data, scales.ctypes.data, zp.ctypes.data, n, k, 4, 64)
    assert lib.vrt_linear_rows(ctypes.byref(bad), x.ctypes.data, m, y.ctypes.data, 0, 2) == -2


@needs_amx
def test_with_amx_tiles_prompts_run_natively_and_the_prompt_graph_stays_closed(hf_dirs, tmp_path, monkeypatch):
    """"auto" on a CPU whose tiles this process may use: the engine's W8A8 prompt graph is never opened,
    prompts (past NATIVE_APPEND_CHUNK: several runs) run on the native AMX kernel, and the greedy
    answer equals the int4 graph's. Without the tiles (flags without amx), or with VALLEY_RT_PREFILL=int8,
    the prompt graph is used as before."""
    import valley_rt.backends.llm_onnx as llm_onnx
    import valley_rt.cpu

    path = export_llm_onnx(hf_dirs["h256"], tmp_path, quant="rtn4", group_size=128)
    assert (path.parent / "llm_prefill.onnx").is_file()
    monkeypatch.setenv("VALLEY_RT_PREFILL", "int4")
    monkeypatch.setenv("VALLEY_RT_DECODE", "onnxruntime")
    plain = OnnxLLM(path.parent)
    monkeypatch.setenv("VALLEY_RT_PREFILL", "auto")
    monkeypatch.setenv("VALLEY_RT_DECODE", "auto")
    monkeypatch.setattr(llm_onnx, "NATIVE_APPEND_CHUNK", 32)
    llm = OnnxLLM(path.parent, defer_load=True)
    assert not llm.has_prefill_graph and llm.decode_backend == "native" and llm._native.prompt_kernel == "amx"
    assert llm.tags == ["native-decode", "amx-prompt"]
    llm.load_rest_in_background()
    llm.wait_loaded()  # its warm-up step done
    runs = []
    real = llm._native.append
    monkeypatch.setattr(llm._native, "append", lambda *a: (runs.append(len(a[0])), real(*a)))
    ids = [3 + (19 * i) % 990 for i in range(PREFILL_MIN_TOKENS + 30)]
    params = SamplingParams(max_new_tokens=16)
    a = generate(llm, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    b = generate(plain, _Tok(), input_ids=ids, params=params, stop=(), eos_token_id=-1)
    assert a.token_ids == b.token_ids
    assert runs[:3] == [32, 31, 31] and llm.prefill_session is None and llm.session is None

    monkeypatch.setenv("VALLEY_RT_PREFILL", "int8")
    assert OnnxLLM(path.parent, defer_load=True).has_prefill_graph
    monkeypatch.setenv("VALLEY_RT_PREFILL", "auto")
    flags = valley_rt.cpu.cpu_flags()
    monkeypatch.setattr(valley_rt.cpu, "cpu_flags", lambda: frozenset(f for f in flags if not f.startswith("amx")))
    other = OnnxLLM(path.parent, defer_load=True)
    assert other.has_prefill_graph and "w8a8-prefill" in other.tags


@needs_native
def test_a_process_refused_the_tiles_runs_prompts_on_vnni(hf_dirs, tmp_path):
    """Under benchmarks/no_amx.py (the tiles' permission refused, as on a CPU or kernel without AMX)
    the native prompt kernel is the VNNI one and runs (the tiles' instructions would kill the process)."""
    path = export_llm_onnx(hf_dirs["h256"], tmp_path, quant="rtn4", group_size=128)
    wrapper = Path(__file__).resolve().parents[1] / "benchmarks" / "no_amx.py"
    code = textwrap.dedent(f"""
        import os
        os.environ["VALLEY_RT_PREFILL"] = "int4"
        from valley_rt.backends.llm_onnx import OnnxLLM
        llm = OnnxLLM({str(path.parent)!r})
        llm.prefill(llm.embed(list(range(3, 80))))
        print(llm._native.prompt_kernel, int(llm.decode(5).argmax()))
    """)
    run = subprocess.run([sys.executable, str(wrapper), "--", sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "vnni"


@needs_native
def test_the_kernel_never_writes_outside_the_cache(hf_dirs, tmp_path, monkeypatch):
    """Positions past the cache's rows (or negative), a cache of the wrong shape or dtype, or a wrong
    logits buffer are refused before the kernel runs: it writes K/V rows through these pointers."""
    path = export_llm_onnx(hf_dirs["h128"], tmp_path, quant="rtn4", group_size=32)
    ort_llm, native = _pair(path, monkeypatch)
    cache = ort_llm._new_cache(16)
    logits = np.zeros(ort_llm.vocab_size, np.float32)
    x = ort_llm.embed(list(range(3, 13)))
    for pos in (7, -1, 16):
        with pytest.raises(ValueError, match="outside the cache"):
            native.append(x, cache, pos, logits)
    with pytest.raises(ValueError, match="outside the cache"):
        native.step(x[0], cache, 16, logits)
    with pytest.raises(ValueError, match="KV buffers"):
        native.append(x, [c.astype(np.float64) for c in cache], 0, logits)
    with pytest.raises(ValueError, match="logits buffer"):
        native.append(x, cache, 0, logits[:-1])
    native.append(x, cache, 6, logits)  # the last rows the cache has: runs
    assert np.abs(cache[0][0, :, 6:16]).sum() > 0
