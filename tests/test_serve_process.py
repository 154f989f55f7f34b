"""`valley-rt serve` as a process: its answers equal `valley-rt ask`'s (same video, question, greedy),
and SIGTERM drains the requests in flight, then exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from valley_rt.runtime import ASSETS

CLIPS = ASSETS / "clips"
CLI = [sys.executable, "-m", "valley_rt"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIP = json.loads((CLIPS / "questions.json").read_text())["clips"][2]
QUESTIONS = [q["question"] for q in CLIP["questions"][:3]]


@pytest.fixture(scope="module")
def ask_answers():
    """`valley-rt ask --json` on one clip and three questions, started at once (it runs while the server
    process starts up)."""
    args = CLI + ["ask", str(CLIPS / CLIP["video"]), "--json", "--seed", "0"] + [a for q in QUESTIONS for a in ("-q", q)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return json.loads(out)["answers"]

    return result


@pytest.fixture(scope="module")
def server(ask_answers):
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", "--port", str(port), "--allowed-media-path", str(CLIPS),
                                   "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_answers_equal_valley_rt_ask(server, ask_answers):
    import openai

    _, url = server
    video = CLIPS / CLIP["video"]
    want = ask_answers()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    for q, w in zip(QUESTIONS, want):
        msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                             {"type": "text", "text": q}]}]
        r = client.chat.completions.create(model="valley-rt-demo", messages=msgs, seed=0, temperature=0)
        assert r.choices[0].message.content == w["answer"], q
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (w["tokens_in"], w["tokens_out"])


def test_sigterm_drains_then_exits_0(server):
    proc, url = server
    video = CLIPS / "s4_00002.mp4"
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                                      {"type": "text", "text": "What happens?"}]}],
            "max_tokens": 300, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    results, started = [], threading.Barrier(3)

    def run_and_signal_start():
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            it = r.iter_lines()
            first = next(it)
            started.wait(60)
            results.append([first] + [line for line in it if line])

    threads = [threading.Thread(target=run_and_signal_start) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(60)  # both requests are generating
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert proc.wait(60) == 0, proc.stderr.read().decode()
    assert len(results) == 2
    for lines in results:  # each answer ran to its end: all 300 tokens, then [DONE]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 300
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
