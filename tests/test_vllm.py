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
from valley_rt.runtime import ASSETS, DEMO_CHECKPOINT, DEMO_ENGINE, load

MEMORY = 0.05  # vLLM's share of RAM on its CPU build: weights + KV cache (it refuses to start when less is free)
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


def test_llm_folder_picks_what_vllm_can_load(tmp_path):
    """Checkpoint: its llm/. Engine: its GPTQ folder unless act-order in groups (vLLM refuses it),
    then the source checkpoint's llm/ if the manifest names one, else a clear error."""
    import shutil

    from valley_rt.backends.llm_vllm import llm_folder

    assert llm_folder(DEMO_CHECKPOINT) == DEMO_CHECKPOINT / "llm"
    engine = tmp_path / "engine"
    gptq = engine / "llm" / "gptq"
    gptq.mkdir(parents=True)
    config = json.loads((DEMO_CHECKPOINT / "llm" / "config.json").read_text())
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    manifest = {"files": {"llm": "llm/", "gptq": "llm/gptq/"}, "source": {"name": "demo"}}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    assert llm_folder(engine) == gptq
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": {**qc, "desc_act": True}}))
    with pytest.raises(ValleyError, match="desc_act=True"):
        llm_folder(engine)
    (engine / "manifest.json").write_text(json.dumps({**manifest, "source": {"path": str(DEMO_CHECKPOINT)}}))
    assert llm_folder(engine) == DEMO_CHECKPOINT / "llm"
    shutil.rmtree(gptq)
    with pytest.raises(ValleyError, match="--quant gptq"):
        llm_folder(DEMO_ENGINE)  # rtn4, no GPTQ folder, no source path


def test_vllm_dtype_auto_follows_the_folder(tmp_path):
    """auto: float32 for an fp LLM folder (greedy answers equal the reference's), bfloat16 for a GPTQ
    folder (vLLM's GPTQ kernels refuse float32); an explicit dtype is kept; `vllm serve`'s command too."""
    from valley_rt.backends.llm_vllm import read_llm_config, serve_command, vllm_dtype

    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((DEMO_CHECKPOINT / "llm" / "config.json").read_text())
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    (gptq / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    assert vllm_dtype(read_llm_config(DEMO_CHECKPOINT / "llm")) == "float32"
    assert vllm_dtype(read_llm_config(gptq)) == "bfloat16"
    assert vllm_dtype(read_llm_config(gptq), "float16") == "float16"
    cmd = serve_command(gptq, port=8001)
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"


def test_vllm_cpu_threads_on_every_core_of_a_small_machine(monkeypatch):
    """vLLM's CPU build keeps one core for its scheduler by default: on 2 cores its model would run on one
    thread. A single-rank engine on a CPU-only machine with few cores gets every core; a user's own
    binding, parallel ranks, a GPU or a big machine keep vLLM's choice."""
    import torch

    from valley_rt.backends import llm_vllm
    from valley_rt.backends.llm_vllm import CPU_BIND_ENV, FEW_CORES, cpu_thread_binding, serve_env

    monkeypatch.delenv(CPU_BIND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("valley_rt.cpu.one_cpu_per_core", lambda: [0, 2])
    assert cpu_thread_binding() == "0,2" and serve_env() == {CPU_BIND_ENV: "0,2"}
    assert cpu_thread_binding(ranks=2) is None and serve_env(ranks=2) == {}
    monkeypatch.setattr("valley_rt.cpu.one_cpu_per_core", lambda: list(range(FEW_CORES + 1)))
    assert cpu_thread_binding() is None
    monkeypatch.setattr("valley_rt.cpu.one_cpu_per_core", lambda: [0, 1])
    monkeypatch.setenv(CPU_BIND_ENV, "1")
    assert cpu_thread_binding() is None and serve_env() == {}
    monkeypatch.delenv(CPU_BIND_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_thread_binding() is None
    assert llm_vllm.os.environ.get(CPU_BIND_ENV) is None


def test_cli_llm_url_down_exits_2():
    clip = sorted((ASSETS / "clips").glob("*.mp4"))[0]
    r = subprocess.run([sys.executable, "-m", "valley_rt", "ask", str(clip), "What happens?", "--model",
                        str(DEMO_CHECKPOINT), "--reference", "--llm-url", f"http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "vLLM server" in r.stderr and "Traceback" not in r.stderr


# -- vLLM in process (behind `valley-rt serve --llm vllm`), then `vllm serve` ------------------------
CLIPS = ASSETS / "clips"


def test_serve_llm_url_down_is_503(tmp_path):
    """A `valley-rt serve --llm-url` front end whose vLLM is down starts, stays healthy, and answers each
    request (plain or streaming) with a 503 OpenAI error object, not a 200 or a 400."""
    import httpx
    from openai import APIStatusError

    proc, url = start_front(tmp_path, "front", "--llm-url", f"http://127.0.0.1:{free_port()}")
    try:
        _wait_ready(url, proc)
        clip = sorted(CLIPS.glob("*.mp4"))[0]
        for stream in (False, True):
            with pytest.raises(APIStatusError) as down:
                ask_openai(url, clip, QUESTIONS[0], stream=stream)
            assert down.value.status_code == 503, stream
            assert down.value.body["code"] == "llm_unavailable" and down.value.body["type"] == "server_error"
            assert "vLLM server" in down.value.body["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        stop_proc(proc)


@pytest.fixture(scope="module")
def engine_cases(reference):
    """The server's vision is the demo engine's: the fp32 reference LLM's answers on the engine's
    visual tokens are what `valley-rt serve --llm vllm` must give."""
    ref = reference[0]
    engine = load(None)
    clips = sorted(CLIPS.glob("*.mp4"))[:2]
    contexts = {c: engine.encode_video(c) for c in clips}
    cases = [(c, q) for c in clips for q in QUESTIONS[:3]] + [(clips[0], QUESTIONS[3])]
    return [(c, q, ref.ask(contexts[c], q)) for c, q in cases]


def start_front(tmp_path: Path, name: str, *args: str):
    """A real `valley-rt serve` process on a free port (demo engine, file:// URLs under the clips)."""
    port = free_port()
    log = (tmp_path / f"{name}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "valley_rt", "serve", "--port", str(port), "--allowed-media-path",
                             str(CLIPS), "--log-level", "warning", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop_proc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def messages(clip: Path, q: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{clip}"}},
                                         {"type": "text", "text": q}]}]


def ask_openai(url: str, clip: Path, q: str, **kw):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    return client.chat.completions.create(model="valley-rt-demo", messages=messages(clip, q), **kw)


def assert_served_like_reference(url: str, cases) -> None:
    """All the cases at once (vLLM batches them): each answer is the reference's."""
    got = [None] * len(cases)

    def run(i):
        got[i] = ask_openai(url, cases[i][0], cases[i][1], max_tokens=256).choices[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for (clip, q, want), choice in zip(cases, got):
        assert choice is not None, q
        assert choice.message.content == want.answer, q
        assert choice.finish_reason == ("length" if want.stop_reason == "length" else "stop"), q


@needs_vllm
def test_serve_inprocess_vllm_equals_reference(engine_cases, tmp_path):
    """`valley-rt serve --llm vllm`: a real server on a socket, the openai client, greedy answers equal
    to the fp32 reference's (sent concurrently: batched by vLLM); streaming never shows "###"; seeded
    sampling repeats; max_tokens ends with "length"; a stop string ends the answer."""
    proc, url = start_front(tmp_path, "serve-vllm", "--llm", "vllm", "--vllm-memory", str(MEMORY))
    try:
        _wait_ready(url, proc)
        assert_served_like_reference(url, engine_cases)
        clip, q, want = engine_cases[0]
        pieces = [c.choices[0].delta.content or "" for c in ask_openai(url, clip, q, stream=True) if c.choices]
        assert "".join(pieces) == want.answer and "###" not in "".join(pieces)
        p = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 40, "extra_body": {"top_k": 20}}
        assert ask_openai(url, clip, q, **p).choices[0].message.content == \
            ask_openai(url, clip, q, **p).choices[0].message.content
        short = ask_openai(url, clip, q, max_tokens=3)
        assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
        word = want.answer.split()[2]
        cut = ask_openai(url, clip, q, stop=[word]).choices[0].message.content
        assert word not in cut and want.answer.startswith(cut.rstrip()), (word, cut)
    finally:
        stop_proc(proc)


def _prompt(ref, ctx, q):
    from valley_rt.prompt import VIDEO, Turn, encode, format_conversation

    text, _ = format_conversation([Turn("human", f"{VIDEO}\n{q}")], system=ref.cfg.system_prompt)
    ids, _ = encode(ref.tokenizer, text, cfg=ref.cfg, num_frames=ctx.num_frames)
    return ids, ctx


@needs_vllm
def test_remote_serve_two_front_ends_death_and_recovery(reference, engine_cases, tmp_path):
    """One `vllm serve`, front ends against it: the runtime (`load(..., llm_url=)`), the CLI and two
    `valley-rt serve --llm-url` servers. Started while vLLM is down they answer 503 error objects, then
    the reference's answers once it is up; vLLM killed mid-answer gives 502 (an error object in the
    stream after its 200), then 503 again."""
    import httpx
    from openai import APIStatusError

    from valley_rt.backends.llm_vllm import (RemoteVllmLLM, VllmFailedError, VllmUnavailableError, serve_command,
                                              serve_env)

    ref, cases, answers = reference
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    front = load(DEMO_CHECKPOINT, reference=True, llm_url=url)  # the server is not up yet
    ctx, q = cases[0]
    (a, a_url), (b, b_url) = start_front(tmp_path, "front-a", "--llm-url", url), \
        start_front(tmp_path, "front-b", "--llm-url", url)
    proc = None
    try:
        with pytest.raises(VllmUnavailableError):
            front.ask(ctx, q)
        _wait_ready(a_url, a)
        clip = engine_cases[0][0]
        for stream in (False, True):  # a stream too: the error comes before the 200
            with pytest.raises(APIStatusError) as down:
                ask_openai(a_url, clip, q, stream=stream)
            assert down.value.status_code == 503 and down.value.body["code"] == "llm_unavailable"
        cmd = serve_command(DEMO_CHECKPOINT / "llm", port=port, memory=MEMORY, python=sys.executable)
        proc = subprocess.Popen(cmd, stdout=(tmp_path / "vllm.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **serve_env()})
        _wait_ready(url, proc)
        _wait_ready(b_url, b)
        assert_same_answers(front, cases, answers)  # the same front end recovered once vLLM came up
        # both servers at once against the one vLLM (front end A recovered too)
        errors = []
        both = [threading.Thread(target=_record, args=(errors, assert_served_like_reference, u, engine_cases))
                for u in (a_url, b_url)]
        [t.start() for t in both]
        [t.join() for t in both]
        assert not errors, errors
        # CLI through the server
        r = subprocess.run([sys.executable, "-m", "valley_rt", "ask", str(clip), QUESTIONS[0],
                            "--model", str(DEMO_CHECKPOINT), "--reference", "--llm-url", url, "--json"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["answers"][0]["answer"] == answers[0].answer
        # vLLM dies mid-answer while the runtime client, a streaming and a plain request are generating
        client = RemoteVllmLLM(url, DEMO_CHECKPOINT / "llm", tokenizer=ref.tokenizer)
        embeds = ref._embeds(*_prompt(ref, ctx, q))
        long = client.max_context - len(embeds)

        def kill_mid_answer():
            """The three requests against a throttled vLLM, killed once the stream's first token is out;
            returns the stream's data lines and what the other two ended with."""
            outcome, throttling = {}, threading.Event()

            def direct():
                try:
                    client.generate_from_embeds(embeds, params=SamplingParams(max_new_tokens=long), stop=(),
                                                eos_token_id=-1, on_text=lambda _: None)
                    outcome["direct"] = "finished"  # a fast machine can finish the answer before the kill
                except Exception as e:
                    outcome["direct"] = e

            def plain():
                try:
                    ask_openai(b_url, clip, q, max_tokens=long, extra_body={"ignore_eos": True})
                    outcome["plain"] = "finished"
                except Exception as e:
                    outcome["plain"] = e

            def throttle():  # vLLM at ~10 % of its speed: the tiny demo LLM can finish hundreds of tokens
                try:         # before the first of them crosses the front end
                    while not throttling.is_set():
                        os.killpg(proc.pid, signal.SIGSTOP)
                        time.sleep(0.045)
                        os.killpg(proc.pid, signal.SIGCONT)
                        time.sleep(0.005)
                except ProcessLookupError:  # killed
                    pass

            workers = [threading.Thread(target=direct), threading.Thread(target=plain)]
            slow = threading.Thread(target=throttle)
            slow.start()
            [t.start() for t in workers]
            body = {"model": "valley-rt-demo", "messages": messages(clip, q), "stream": True, "max_tokens": long,
                    "ignore_eos": True}
            lines = []
            try:
                with httpx.stream("POST", f"{a_url}/v1/chat/completions", json=body, timeout=600) as resp:
                    assert resp.status_code == 200
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line[6:])
                        if len(lines) == 1:  # the first token is out, hundreds are to come: kill vLLM now
                            os.killpg(proc.pid, signal.SIGKILL)
                            throttling.set()
            finally:
                throttling.set()
                slow.join(10)
                [t.join(120) for t in workers]
            return lines, outcome

        for attempt in range(3):
            lines, outcome = kill_mid_answer()
            assert lines[-1] == "[DONE]", lines[-3:]
            end = json.loads(lines[-2])
            if "error" in end:
                break
            # vLLM had written the whole answer before the kill landed: the stream is a complete answer;
            # start vLLM again and kill it earlier in the next answer
            assert end["choices"][0]["finish_reason"] == "length" and len(lines) > 3, lines[-3:]
            proc.wait(30)
            proc = subprocess.Popen(cmd, stdout=(tmp_path / f"vllm{attempt + 1}.log").open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **serve_env()})
            _wait_ready(url, proc)
        assert end.get("error", {}).get("code") == "llm_failed", (attempt, lines[-3:])
        # The other two may have finished first on a fast machine (the demo answers in under a second),
        # or not reached vLLM yet; either way each ends cleanly: an answer, or the clean error of a vLLM
        # that died mid-answer (VllmFailedError, 502) or is down (VllmUnavailableError, 503).
        clean = (VllmFailedError, VllmUnavailableError)
        assert outcome.get("direct") == "finished" or isinstance(outcome.get("direct"), clean), outcome
        assert outcome.get("plain") == "finished" or (isinstance(outcome.get("plain"), APIStatusError)
                                                      and outcome["plain"].status_code in (502, 503)), outcome
        proc.wait(30)
        with pytest.raises(VllmUnavailableError):
            front.ask(ctx, q)
        with pytest.raises(APIStatusError) as down:
            ask_openai(a_url, clip, q)
        assert down.value.status_code == 503
        assert httpx.get(f"{a_url}/health").status_code == 200  # the front end itself is fine
    finally:
        for p in (a, b, proc):
            if p is not None:
                stop_proc(p)


def _generating(url: str) -> bool:
    """Whether the server at url has a request in its LLM service (its valley_running gauge)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("valley_running "):
            return float(line.split()[1]) >= 1
    raise AssertionError(f"{url}/metrics has no valley_running gauge")


def _record(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - reported by the test's thread
        errors.append(e)


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
