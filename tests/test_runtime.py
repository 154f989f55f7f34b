"""The serving path against the PyTorch reference, KV-prefix reuse, chat, streaming, batch and errors.

Runs on a tiny converted original-layout checkpoint (fixtures) exported to an fp32 engine, so the fast
path and the reference must agree token for token.
"""

import json
import shutil
from pathlib import Path

import pytest

from valley_rt.errors import ContextLengthError, EngineError, VideoError
from valley_rt.generate import SamplingParams

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "original_valley"
CLIP = SHARED / "videos" / "snowmobile.mp4"
GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    if not FIXTURES.is_dir():
        pytest.skip("shared fixtures are not present")
    from valley_rt.checkpoint import convert_original

    return convert_original(original_dir=FIXTURES / "model_importance", out_dir=tmp_path_factory.mktemp("rt") / "ckpt")


@pytest.fixture(scope="module")
def engine(ckpt):
    from valley_rt.export.engine import export_engine

    out = ckpt.parent / "engine"
    export_engine(ckpt, out, precision="fp32", quant="none", gpu="no")
    return out


@pytest.fixture(scope="module")
def fast(engine):
    from valley_rt.runtime import load

    return load(engine)


@pytest.fixture(scope="module")
def ref(ckpt):
    from valley_rt.runtime import load

    return load(ckpt, reference=True)


def test_fast_path_answers_equal_reference(fast, ref):
    a = fast.ask(CLIP, "what happens in the video ?", params=GREEDY)
    b = ref.ask(CLIP, "what happens in the video ?", params=GREEDY)
    assert a.tokens_out == b.tokens_out and a.stop_reason == b.stop_reason
    assert a.answer == b.answer
    assert a.backends["kind"] == "engine" and b.backends["kind"] == "reference"


def test_visual_tokens_match_reference(fast, ref):
    import numpy as np

    a, b = fast.encode_video(CLIP), ref.encode_video(CLIP)
    assert a.indices == b.indices == [0, 72, 145, 217, 290, 362, 435, 508]
    for x, y in zip(a.visual, b.visual):
        assert x.dtype == y.dtype == np.float32  # every backend hands the runtime NumPy float32
        scale = np.abs(y).max()
        assert np.abs(x - y).max() <= 1e-4 * scale
    assert np.isfinite(a.visual[0]).all()


def test_questions_share_the_video_prefix(fast):
    ctx = fast.encode_video(CLIP)
    fast.reset()
    first = fast.ask(ctx, "what happens ?", params=GREEDY)
    second = fast.ask(ctx, "who is there ?", params=GREEDY)
    assert first.tokens_prefilled == first.tokens_in
    assert second.tokens_prefilled < 10  # only the new question's tokens
    # same answer as without any cache reuse
    fast.reset()
    fresh = fast.ask(ctx, "who is there ?", params=GREEDY)
    assert fresh.tokens_prefilled == fresh.tokens_in
    assert fresh.answer == second.answer


def test_chat_reuses_cache_and_matches_fresh_run(fast):
    ctx = fast.encode_video(CLIP)
    conv = fast.chat(ctx)
    one = conv.send("what happens ?", params=GREEDY)
    two = conv.send("and then ?", params=GREEDY)
    assert two.tokens_in > one.tokens_in + one.tokens_out
    assert two.tokens_prefilled < two.tokens_in - 256  # the visual tokens were not prefilled again
    fast.reset()
    again = fast.chat(ctx)
    again.turns = list(conv.turns[:2])
    assert again.send("and then ?", params=GREEDY).answer == two.answer


def test_stream_yields_the_answer(fast):
    pieces = list(fast.stream(CLIP, "what happens ?", params=GREEDY))
    ans = fast.ask(CLIP, "what happens ?", params=GREEDY)
    from valley_rt.prompt import clean_answer

    assert clean_answer("".join(pieces)) == ans.answer


def test_fast_tokenizer_equals_transformers(engine):
    from transformers import AutoTokenizer

    from valley_rt.runtime import FastTokenizer

    hf = AutoTokenizer.from_pretrained(engine / "tokenizer")
    fast = FastTokenizer(engine / "tokenizer")
    text = "sys\n\n### Human: <im_start><im_patch><im_patch><im_end> what is 5 ? \n###"
    assert fast(text)["input_ids"] == hf(text)["input_ids"]
    ids = hf(text)["input_ids"]
    assert fast.decode(ids) == hf.decode(ids)
    assert fast.eos_token_id == hf.eos_token_id


def test_batch_records_errors_and_resumes(fast, tmp_path):
    from valley_rt.runtime import ask_batch

    shutil.copy(CLIP, tmp_path / "clip.mp4")
    records = [{"id": "a", "video": "clip.mp4", "question": "what happens ?"},
               {"id": "b", "video": "missing.mp4", "question": "what happens ?"},
               {"id": "c", "video": "clip.mp4", "question": "who ?"}]
    batch = tmp_path / "q.jsonl"
    batch.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "a.jsonl"
    stats = ask_batch(fast, batch, out, params=GREEDY, progress=False)
    assert stats == {"records": 3, "skipped": 0, "answered": 2, "failed": 1}
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert "missing.mp4" in rows[1]["error"] and "answer" not in rows[1]
    # an interruption cut the last line in half: that record is redone, the answered ones are skipped
    text = out.read_text().splitlines()
    out.write_text("\n".join(text[:2]) + "\n" + text[2][:10])
    stats = ask_batch(fast, batch, out, params=GREEDY, progress=False)
    assert stats == {"records": 3, "skipped": 1, "answered": 1, "failed": 1}


def test_errors_are_one_line(fast, engine, tmp_path):
    from valley_rt.runtime import load

    with pytest.raises(EngineError, match="no such model folder"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="neither an engine folder"):
        load(tmp_path / "empty")
    with pytest.raises(EngineError, match="--reference needs a checkpoint"):
        load(engine, reference=True)
    with pytest.raises(EngineError, match="outside this model's range"):
        fast.encode_video(CLIP, frames=0)
    with pytest.raises(VideoError):
        fast.encode_video(SHARED / "videos" / "garbage.mp4")
    with pytest.raises(ContextLengthError, match="exceeds the context"):
        fast.ask(CLIP, "word " * 2000, params=GREEDY)


def test_tampered_engine_is_refused(engine, tmp_path):
    from valley_rt.runtime import load

    bad = tmp_path / "engine"
    shutil.copytree(engine, bad)
    f = bad / "vision.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="modified after export"):
        load(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = 999
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="version 999"):
        load(bad)


def test_stream_cleaner_drops_role_marker_and_trailing_space():
    from valley_rt.runtime import _StreamCleaner

    out = []
    clean = _StreamCleaner(out.append)
    for piece in [" Ass", "istent", ":", " the", " red", " square", " moves", " left", " \n"]:
        clean(piece)
    clean.flush()
    assert "".join(out) == "the red square moves left"
    out.clear()
    clean = _StreamCleaner(out.append)
    clean(" Assistent: up \n")
    clean.flush()
    assert out == ["up"]


def test_first_use_export_is_shared_by_concurrent_processes(ckpt, tmp_path):
    """Two processes asking for the same checkpoint's engine at once: one exports, both get it."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, VALLEY_RT_CACHE=str(tmp_path / "cache"))
    code = ("import sys; from valley_rt.export.cache import ensure_engine; from valley_rt.runtime import load; "
            "p = ensure_engine(__import__('pathlib').Path(sys.argv[1])); load(p); print(p)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ckpt)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    engines = [p for p in (tmp_path / "cache" / "engines").iterdir() if p.is_dir()]
    assert [p.name for p in engines] == [Path(paths.pop()).name]  # no half-written sibling left behind


def test_torch_path_matches_reference(ckpt, ref):
    """The GPU path's composition (TorchVision with temporal_pool + TorchLLM), run here on CPU in fp32."""
    import torch

    from valley_rt.runtime import _load_torch

    torch_path = _load_torch(ckpt, device="cpu", dtype=torch.float32)
    a = torch_path.ask(CLIP, "what happens ?", params=GREEDY)
    b = ref.ask(CLIP, "what happens ?", params=GREEDY)
    assert a.answer == b.answer and a.backends["kind"] == "torch"


@pytest.mark.gpu
def test_torch_gpu_path_runs_the_triton_kernel(ckpt, ref):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the torch fp16 path with the Triton pooling kernel)")
    from valley_rt.kernels.temporal_pool import pick_backend
    from valley_rt.runtime import load

    gpu = load(ckpt, device="cuda")
    ctx, ctx_ref = gpu.encode_video(CLIP), ref.encode_video(CLIP)
    assert pick_backend(torch.zeros(1, device="cuda")) == "triton"
    for x, y in zip(ctx.visual, ctx_ref.visual):
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y), dim=-1)
        assert cos.min() > 0.999
    # the whole ask on the GPU: greedy, then seeded sampling (the same answer twice)
    assert gpu.ask(ctx, "what happens ?", params=GREEDY).tokens_out > 0
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    gpu.reset()
    first = gpu.ask(ctx, "what happens ?", params=sampled)
    gpu.reset()
    assert gpu.ask(ctx, "what happens ?", params=sampled).answer == first.answer


def test_a_new_video_never_reuses_the_old_videos_cache(fast):
    """Same question, another video: the placeholders' token ids are equal but their embeddings are not,
    so only the text before the video may come from the cache, and the answer equals a fresh run's."""
    other = SHARED / "videos" / "gray.mp4"
    fast.reset()
    fast.ask(CLIP, "what happens ?", params=GREEDY)
    second = fast.ask(other, "what happens ?", params=GREEDY)
    assert second.tokens_prefilled > 256  # the new video's visual tokens were prefilled
    fast.reset()
    fresh = fast.ask(other, "what happens ?", params=GREEDY)
    assert second.answer == fresh.answer
    ctx = fast.encode_video(other)
    fast.ask(ctx, "what happens ?", params=GREEDY)
    assert fast.ask(ctx, "what happens ?", params=GREEDY).tokens_prefilled == 1  # same video object: reused


def test_package_level_load_is_the_runtime(engine):
    import valley_rt

    assert valley_rt.load(engine).backends["kind"] == "engine"
