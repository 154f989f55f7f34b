"""`valley-rt serve` on real sockets: uvicorn in a thread over the bundled demo engine, talked to with
the official `openai` client and raw httpx (malformed requests). The subprocess tests (answers equal
`valley-rt ask`'s, SIGTERM drain) are in test_serve_process.py."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from valley_rt.runtime import ASSETS

CLIPS = ASSETS / "clips"
CLIP = CLIPS / "s4_00000.mp4"
QUESTIONS = json.loads((CLIPS / "questions.json").read_text())


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def video_msg(url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


class ThreadServer:
    """The real app on uvicorn, in a thread, on a free 127.0.0.1 port."""

    def __init__(self, **settings):
        import uvicorn

        from valley_rt.runtime import load
        from valley_rt.serve.app import build_app
        from valley_rt.serve.engine import ServeEngine, Settings

        self.engine = ServeEngine(load(), Settings(**settings))
        app = build_app(self.engine)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def post(self, body, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=60, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        return 0.0

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def srv(shared_dir):
    s = ThreadServer(allowed_media_path=shared_dir / "videos", kv_slots=2)
    yield s
    s.stop()


def assert_error(r: httpx.Response, status: int, *, mentions: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if mentions:
        assert mentions in err["message"] or mentions == err["param"], err
    return err


# -- chat ------------------------------------------------------------------------------------------
def test_chat_stream_and_usage(srv):
    client = srv.client()
    q = QUESTIONS["clips"][0]["questions"][1]["question"]
    r = client.chat.completions.create(model="valley-rt-demo", messages=video_msg(data_url(CLIP), q), seed=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 40 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="valley-rt-demo", messages=video_msg(data_url(CLIP), q),
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the second question about the same bytes hit the encoder cache and reused the KV prefix
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert srv.metric("valley_encoder_cache_hits_total") >= 1
    raw = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                     json={"messages": video_msg(data_url(CLIP), q), "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_answers_equal_the_runtime(srv):
    """Server answers (greedy) equal the runtime's `ask` on each bundled clip; multi-turn equals Chat."""
    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import load

    valley = load()
    client = srv.client()
    for clip in QUESTIONS["clips"]:
        path = CLIPS / clip["video"]
        ctx = valley.encode_video(path)
        for item in clip["questions"][:2]:
            want = valley.ask(ctx, item["question"], params=SamplingParams(max_new_tokens=256)).answer
            got = client.chat.completions.create(model="valley-rt-demo", seed=0,
                                                 messages=video_msg(data_url(path), item["question"]))
            assert got.choices[0].message.content == want, (clip["video"], item["question"])
    # multi-turn: the history is resent; the KV prefix of turn one (video included) is reused
    qs = [q["question"] for q in QUESTIONS["clips"][1]["questions"][:2]]
    conv = valley.chat(CLIPS / QUESTIONS["clips"][1]["video"])
    want = [conv.send(q).answer for q in qs]
    messages = video_msg(data_url(CLIPS / QUESTIONS["clips"][1]["video"]), qs[0])
    first = client.chat.completions.create(model="valley-rt-demo", messages=messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": qs[1]}]
    second = client.chat.completions.create(model="valley-rt-demo", messages=messages)
    assert [first.choices[0].message.content, second.choices[0].message.content] == want
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_frames_as_images_and_sampling(srv, shared_dir):
    from PIL import Image

    frames = []
    for shade in (0, 80, 160, 240):
        buf = io.BytesIO()
        Image.fromarray(np.full((48, 64, 3), shade, np.uint8)).save(buf, format="PNG")
        frames.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    body = {"messages": [{"role": "user", "content": frames + [{"type": "text", "text": "What happens?"}]}]}
    r = srv.post(body)
    assert r.status_code == 200, r.text
    jpg = {"type": "image_url", "image_url": {"url": f"file://{shared_dir / 'videos' / 'still.jpg'}"}}
    assert srv.post({"messages": [{"role": "user", "content": [jpg, jpg, {"type": "text", "text": "hi"}]}]}).status_code == 200
    # per-request frame sampling, vLLM's media_io_kwargs and the top-level extra
    url = data_url(CLIP)
    r4 = srv.post({"messages": video_msg(url, "What happens?"), "media_io_kwargs": {"video": {"num_frames": 4}}})
    r4b = srv.post({"messages": video_msg(url, "What happens?"), "num_frames": 4})
    r8 = srv.post({"messages": video_msg(url, "What happens?")})
    p4, p8 = r4.json()["usage"]["prompt_tokens"], r8.json()["usage"]["prompt_tokens"]
    assert p8 - p4 == 4 and r4b.json()["usage"]["prompt_tokens"] == p4  # one <vi_frame> per frame
    assert srv.post({"messages": video_msg(url, "What happens?"), "fps": 2.0}).status_code == 200
    assert_error(srv.post({"messages": video_msg(url, "x"), "num_frames": 999}), 400, mentions="--max-frames")


def test_every_shared_video_answers_or_4xx(srv, shared_dir):
    for f in sorted((shared_dir / "videos").iterdir()):
        r = srv.post({"messages": video_msg(f"file://{f}", "What happens in the video?"), "max_tokens": 8})
        assert r.status_code == 200 or 400 <= r.status_code < 500, (f.name, r.status_code, r.text)
        if r.status_code != 200:
            assert_error(r, r.status_code)
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


# -- errors ----------------------------------------------------------------------------------------
def test_openai_client_errors(srv, shared_dir):
    import openai

    client = srv.client()
    msgs = video_msg(data_url(CLIP), "What happens?")
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model="valley-rt-demo", messages=msgs, n=2)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="needs a video"):
        client.chat.completions.create(model="valley-rt-demo", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="valley-rt-demo", messages=msgs, logprobs=True)
    with pytest.raises(openai.PermissionDeniedError, match="outside --allowed-media-path"):
        client.chat.completions.create(model="valley-rt-demo", messages=video_msg(f"file://{CLIP}", "x"))
    with pytest.raises(openai.PermissionDeniedError, match="outside"):
        client.chat.completions.create(model="valley-rt-demo",
                                       messages=video_msg(f"file://{shared_dir}/videos/../fixtures", "x"))
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="valley-rt-demo", messages=msgs, max_tokens=100000)
    r = client.chat.completions.create(model="valley-rt-demo", messages=msgs, max_completion_tokens=2,
                                       temperature=0.7, top_p=0.9, seed=3, stop=["zzz"])
    assert r.usage.completion_tokens <= 2 and r.choices[0].finish_reason in ("length", "stop")


def test_malformed_requests(srv):
    url = srv.url + "/v1/chat/completions"
    assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400,
                 mentions="malformed JSON")
    assert_error(httpx.post(url, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url, content=b'{"messages": [], "top_p": NaN}', headers={"content-type": "application/json"}),
                 400, mentions="NaN")
    assert_error(httpx.post(url, content=b"{}", headers={"content-type": "text/plain"}), 415)
    assert_error(httpx.post(url, data={"a": "b"}), 415)
    assert_error(srv.post({"messages": []}), 400, mentions="messages")
    assert_error(srv.post({"messages": video_msg("data:video/mp4;base64,AAAA", "x"), "bogus": 1}), 400,
                 mentions="bogus")
    assert_error(srv.post({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}), 400)
    assert_error(srv.post({"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(srv.post({"messages": video_msg("data:video/mp4;base64,@@@", "x")}), 400, mentions="base64")
    assert_error(srv.post({"messages": video_msg("ftp://x/y.mp4", "x")}), 400, mentions="scheme")
    err = assert_error(srv.post({"messages": video_msg("data:video/mp4;base64," + base64.b64encode(b"junk" * 99).decode(), "x")}), 400)
    assert err["message"].startswith("video_url: not a recognised video"), err  # not the server's spool path
    assert_error(srv.post({"messages": video_msg(data_url(CLIP), "x"), "temperature": -1}), 400, mentions="temperature")
    assert_error(srv.post({"messages": video_msg(data_url(CLIP), "x"), "max_tokens": 0}), 400, mentions="max_tokens")
    assert_error(srv.post({"messages": video_msg(data_url(CLIP), "x") + [{"role": "assistant", "content": "y"}]}), 400,
                 mentions="last message")
    assert_error(httpx.get(url), 405)
    assert_error(httpx.get(srv.url + "/nope"), 404)
    assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "valley-rt-demo"


@pytest.mark.parametrize("text", ["<im_patch>", "<vi_frame> <vi_frame>", "### Human: hi ###", "<video>", "<im_start>"])
def test_special_token_strings(srv, text):
    """Special-token strings in user text never break the server. `###` is plain text (200); the
    placeholder tokens currently get a 400 (their tokens would be taken as placeholders; the tokenizer
    fix that makes them plain text lives in prompt.py)."""
    r = srv.post({"messages": video_msg(data_url(CLIP), f"What is {text}?"), "max_tokens": 8})
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    if "<" not in text:
        assert r.status_code == 200
    assert srv.post({"messages": video_msg(data_url(CLIP), "What happens?"), "max_tokens": 4}).status_code == 200


def test_http_media(srv):
    """http(s) video URLs are fetched (here from a local static server), within the byte cap."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(CLIPS))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert srv.post({"messages": video_msg(f"{base}/{CLIP.name}", "What happens?")}).status_code == 200
        assert_error(srv.post({"messages": video_msg(f"{base}/missing.mp4", "x")}), 400, mentions="404")
    finally:
        httpd.shutdown()


# -- limits, overload, disconnects, interleaving ----------------------------------------------------
@pytest.fixture(scope="module")
def tight(shared_dir):
    s = ThreadServer(allowed_media_path=shared_dir / "videos", kv_slots=1, max_queue=0, max_body_mb=0.5,
                     max_video_mb=1.0, max_duration_s=5.0, max_prompt_tokens=80, max_frames=16)
    yield s
    s.stop()


def test_limits(tight, shared_dir):
    v = shared_dir / "videos"
    big = "data:video/mp4;base64," + "A" * (600 << 10)
    assert_error(tight.post({"messages": video_msg(big, "x")}), 413, mentions="--max-body-mb")
    assert_error(tight.post({"messages": video_msg(f"file://{v / 'snowmobile.mp4'}", "x")}), 413, mentions="--max-video-mb")
    long_q = "why " * 60
    assert_error(tight.post({"messages": video_msg(data_url(CLIP), long_q)}), 400, mentions="--max-prompt-tokens")
    assert_error(tight.post({"messages": video_msg(data_url(CLIP), "x"), "num_frames": 32}), 400, mentions="--max-frames")
    assert_error(tight.post({"messages": video_msg(f"file://{v / 'vfr.mp4'}", "x")}), 400,  # 7.96 s, 0.9 MiB
                 mentions="--max-duration-s")
    assert tight.post({"messages": video_msg(data_url(CLIP), "What happens?")}).status_code == 200


def test_overload_429_and_disconnect_cancels(tight):
    long = {"messages": video_msg(data_url(CLIP), "What happens?"), "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    done_before = tight.metric("valley_completion_tokens_total")
    with httpx.stream("POST", tight.url + "/v1/chat/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # generating now: the one slot and the queue (0) are full
        over = tight.post({"messages": video_msg(data_url(CLIP), "x")})
        err = assert_error(over, 429, mentions="--max-queue")
        assert over.headers["retry-after"] == "1" and err["type"] == "rate_limit_error"
    # the client hung up mid-stream: its generation stops and frees the slot
    deadline = time.monotonic() + 20
    while tight.metric('valley_requests_total{outcome="cancelled"}') < 1:
        assert time.monotonic() < deadline, "the disconnected stream was not cancelled"
        time.sleep(0.05)
    assert tight.metric("valley_completion_tokens_total") - done_before < 900
    # a non-streaming request whose client gives up is cancelled too (the client waits 0.1 s: well
    # under the 900 tokens' generation time, ~0.5 s on an idle 2-core CPU)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tight.url + "/v1/chat/completions", json={**long, "stream": False}, timeout=0.1)
    while tight.metric('valley_requests_total{outcome="cancelled"}') < 2:
        assert time.monotonic() < deadline + 20, "the abandoned request was not cancelled"
        time.sleep(0.05)
    assert tight.post({"messages": video_msg(data_url(CLIP), "What happens?")}).status_code == 200


def test_requests_interleave(srv):
    """A short request admitted while a long one generates finishes first (token interleaving over
    two KV slots), instead of waiting for the long one's whole generation."""
    url = data_url(CLIP)
    srv.post({"messages": video_msg(url, "What happens?"), "max_tokens": 2})  # encoder cache warm
    order = []
    long = {"messages": video_msg(url, "What happens?"), "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        short = threading.Thread(target=lambda: order.append(("short", srv.post(
            {"messages": video_msg(url, "What color?"), "max_tokens": 3}).status_code)))
        short.start()
        for line in lines:
            if line == "data: [DONE]":
                order.append(("long", r.status_code))
        short.join()
    assert order == [("short", 200), ("long", 200)], order


# -- units and fuzz --------------------------------------------------------------------------------
def test_encoder_cache_lru_bytes():
    from valley_rt.runtime import VideoContext
    from valley_rt.serve.engine import EncoderCache

    def ctx(n):
        return VideoContext("x", np.zeros((0, 1, 1, 3), np.uint8), [0], [0.0], (np.zeros(n, np.float32), np.zeros(0, np.float32)), {})

    c = EncoderCache(max_bytes=1000)
    c.put(("a",), ctx(100))  # 400 bytes
    c.put(("b",), ctx(100))
    assert c.get(("a",)) is not None  # a is now the most recent
    c.put(("c",), ctx(100))  # 1200 > 1000: evicts b, the least recent
    assert c.get(("b",)) is None and c.get(("a",)) is not None and c.bytes == 800
    c.put(("huge",), ctx(1000))  # larger than the whole cache: not kept
    assert c.get(("huge",)) is None and c.bytes == 800


def test_fuzz_request_parser(srv):
    """Random JSON bodies and media bytes: never a 5xx, and the server keeps serving."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=20))
    json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                               max_leaves=8)
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}),
        st.fixed_dictionaries({"type": st.just("video_url"), "video_url": st.fixed_dictionaries(
            {"url": st.one_of(st.binary(max_size=200).map(lambda b: "data:video/mp4;base64," + base64.b64encode(b).decode()),
                              st.text(max_size=30))})}),
        st.fixed_dictionaries({"type": st.sampled_from(["image_url", "video_url", "audio"]), "image_url": json_values}),
    )
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                                     "content": st.one_of(st.text(max_size=20), st.lists(part, max_size=3), json_values)})
    body = st.fixed_dictionaries({"messages": st.lists(message, max_size=3)},
                                 optional={"max_tokens": json_values, "temperature": json_values, "n": json_values,
                                           "stream": st.booleans(), "stop": json_values, "num_frames": json_values,
                                           "media_io_kwargs": json_values, "seed": json_values, "extra": json_values})

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(body, json_values))
    def check(b):
        r = srv.post(b)
        assert r.status_code < 500, (b, r.text)

    check()
    assert srv.post({"messages": video_msg(data_url(CLIP), "What happens?"), "max_tokens": 4}).status_code == 200


def test_concurrent_requests_share_one_encode(srv):
    """Four requests for a video nobody asked about yet: one decode + encode, three waits on it."""
    url = data_url(CLIPS / "s4_00006.mp4")
    misses = srv.metric("valley_encoder_cache_misses_total")
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(srv.post(
        {"messages": video_msg(url, "What happens?"), "num_frames": 5, "max_tokens": 4}).status_code)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4
    assert srv.metric("valley_encoder_cache_misses_total") - misses == 1


def test_serve_opens_every_llm_graph_before_it_listens(monkeypatch):
    """The runtime's load leaves an engine's decode graph to open when a decode step first needs it
    (the CLI's first token comes sooner); a server finishes that before it takes requests."""
    import valley_rt.runtime as rt
    import valley_rt.serve.engine as serve_engine
    from valley_rt.serve import serve

    calls = []

    class LLM:
        def wait_loaded(self):
            calls.append("wait_loaded")

    class Loaded:
        llm, tokenizer = LLM(), None

    class Stop(Exception):
        pass

    def engine(*args, **kwargs):
        calls.append("engine")
        raise Stop

    monkeypatch.setattr(rt, "load", lambda *args, **kwargs: Loaded())
    monkeypatch.setattr(serve_engine, "ServeEngine", engine)
    with pytest.raises(Stop):
        serve(None)
    assert calls == ["wait_loaded", "engine"]
