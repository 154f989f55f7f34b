"""The LLM through vLLM: greedy answers equal the fp32 reference's, in process and through `vllm serve`;
a vLLM server that is down or dies mid-answer gives a clean ValleyError, and the client recovers.

The remote client needs only httpx, so its down-server checks run everywhere; everything that starts
vLLM is skipped where vLLM is not importable (the default environment) and runs in the vLLM
environment (`.ci/vllm.sh`, docs/vllm.md). One vLLM engine at a time: the in-process engine is shut
down before the server starts. Engine start dominates (tens of seconds, minutes on a loaded machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from valley_rt.errors import ValleyError
from valley_rt.generate import SamplingParams
from valley_rt.runtime import ASSETS, DEMO_CHECKPOINT, load

MEMORY = 0.1  # vLLM's KV-cache share of RAM on its CPU build
QUESTIONS = ["What happens in the video?", "Which direction does the blue circle move?",
             "How many objects are there at the start?", "Describe each scene of the video in one sentence."]


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


needs_vllm = pytest.mark.skipif(not vllm_importable(),
                                reason="vllm is not importable in this environment (it runs in its own: .ci/vllm.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    ref = load(DEMO_CHECKPOINT, reference=True)
    clips = sorted((ASSETS / "clips").glob("*.mp4"))[:2]
    contexts = [ref.encode_video(c) for c in clips]
    cases = [(ctx, q) for ctx in contexts for q in QUESTIONS[:3]] + [(contexts[0], QUESTIONS[3])]
    answers = [ref.ask(ctx, q) for ctx, q in cases]
    return ref, cases, answers


def assert_same_answers(valley, cases, answers):
    for (ctx, q), want in zip(cases, answers):
        chunks = []
        got = valley.ask(ctx, q, on_text=chunks.append)
        assert (got.answer, got.tokens_out, got.stop_reason) == (want.answer, want.tokens_out, want.stop_reason), q
        assert "###" not in "".join(chunks)


# -- no vLLM needed -------------------------------------------------------------------------------
def test_remote_server_down_is_a_clean_error():
    from valley_rt.backends.llm_vllm import RemoteVllmLLM, VllmUnavailableError

    client = RemoteVllmLLM(f"http://127.0.0.1:{free_port()}", DEMO_CHECKPOINT / "llm")
    embeds = client.embed([1, 2, 3])
    with pytest.raises(VllmUnavailableError, match="not answering|down"):
        client.generate_from_embeds(embeds, tokenizer=None, params=SamplingParams(max_new_tokens=4))
    with pytest.raises(ValleyError, match="http://"):
        RemoteVllmLLM("127.0.0.1:8000", DEMO_CHECKPOINT / "llm")


def test_cli_llm_url_down_exits_2():
    clip = sorted((ASSETS / "clips").glob("*.mp4"))[0]
    r = subprocess.run([sys.executable, "-m", "valley_rt", "ask", str(clip), "What happens?", "--model",
                        str(DEMO_CHECKPOINT), "--reference", "--llm-url", f"http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "vLLM server" in r.stderr and "Traceback" not in r.stderr


# -- vLLM in process, then `vllm serve` -------------------------------------------------------------
@needs_vllm
def test_inprocess_greedy_equals_reference(reference):
    ref, cases, answers = reference
    valley = load(DEMO_CHECKPOINT, reference=True, llm="vllm", llm_options={"memory": MEMORY})
    try:
        assert valley.backends["llm"].startswith("vllm")
        assert_same_answers(valley, cases, answers)
        # seeded sampling repeats; stop strings and max_new_tokens end answers as the built-in loop does
        ctx, q = cases[0]
        p = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, top_k=20, seed=7)
        assert valley.ask(ctx, q, params=p).answer == valley.ask(ctx, q, params=p).answer
        short = valley.ask(ctx, q, params=SamplingParams(max_new_tokens=3))
        assert (short.tokens_out, short.stop_reason) == (3, "length")
        # concurrent requests (batched by vLLM) give the same greedy tokens
        embeds = [ref._embeds(*_prompt(ref, c, q)) for c, q in cases]
        results = [None] * len(embeds)

        def run(i):
            results[i] = valley.llm.generate_from_embeds(embeds[i], tokenizer=ref.tokenizer,
                                                         params=SamplingParams(max_new_tokens=256))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(embeds))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [r.token_ids for r in results] == [_ids(ref, c, q) for c, q in cases]
    finally:
        valley.llm.close()


def _prompt(ref, ctx, q):
    from valley_rt.prompt import VIDEO, Turn, encode, format_conversation

    text, _ = format_conversation([Turn("human", f"{VIDEO}\n{q}")], system=ref.cfg.system_prompt)
    ids, _ = encode(ref.tokenizer, text, cfg=ref.cfg, num_frames=ctx.num_frames)
    return ids, ctx


def _ids(ref, ctx, q):
    """The reference's answer token ids for one question (batch 1, fresh cache)."""
    from valley_rt.generate import generate

    ref.llm.reset()
    out = generate(ref.llm, ref.tokenizer, ref._embeds(*_prompt(ref, ctx, q)), params=SamplingParams(max_new_tokens=256))
    ref.llm.reset()
    return out.token_ids


@needs_vllm
def test_remote_serve_parity_death_and_recovery(reference, tmp_path):
    from valley_rt.backends.llm_vllm import RemoteVllmLLM, VllmFailedError, VllmUnavailableError, serve_command

    ref, cases, answers = reference
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    front = load(DEMO_CHECKPOINT, reference=True, llm_url=url)  # the server is not up yet
    ctx, q = cases[0]
    with pytest.raises(VllmUnavailableError):
        front.ask(ctx, q)
    cmd = serve_command(DEMO_CHECKPOINT / "llm", port=port, memory=MEMORY, python=sys.executable)
    proc = subprocess.Popen(cmd, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_ready(url, proc)
        assert_same_answers(front, cases, answers)  # the same front end recovered once vLLM came up
        second = load(DEMO_CHECKPOINT, reference=True, llm_url=url)  # two front ends, one vLLM
        assert_same_answers(second, cases[:2], answers[:2])
        # CLI through the server
        clip = sorted((ASSETS / "clips").glob("*.mp4"))[0]
        r = subprocess.run([sys.executable, "-m", "valley_rt", "ask", str(clip), QUESTIONS[0], "--model",
                            str(DEMO_CHECKPOINT), "--reference", "--llm-url", url, "--json"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["answers"][0]["answer"] == answers[0].answer
        # the server dies mid-answer: a clean error, then "down" until it is back
        client = RemoteVllmLLM(url, DEMO_CHECKPOINT / "llm", tokenizer=ref.tokenizer)
        embeds = ref._embeds(*_prompt(ref, ctx, q))
        seen = []

        def on_text(s):
            seen.append(s)
            if len(seen) == 3:
                os.killpg(proc.pid, signal.SIGKILL)

        with pytest.raises(VllmFailedError, match="mid-answer"):
            client.generate_from_embeds(embeds, params=SamplingParams(max_new_tokens=client.max_context - len(embeds)), on_text=on_text,
                                        stop=(), eos_token_id=-1)
        proc.wait(30)
        with pytest.raises(VllmUnavailableError):
            front.ask(ctx, q)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 1200) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        assert proc.poll() is None, f"vllm serve exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"vllm serve not ready after {timeout_s} s")
