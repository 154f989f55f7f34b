"""The serving engine: admission, media, the encoder cache, prompts, and the bridge to the LLM thread.

One request goes: admit (bounded: at most `slots + max_queue` requests in flight, else 429) -> fetch
its media -> encoder cache lookup by content key (+ frame sampling), else decode + vision encode on a
worker thread (a second request for a video being encoded waits for that encode instead of repeating
it) -> the Valley prompt from the message history -> a `GenJob` for the LLM service, whose text comes
back to the event loop through an asyncio queue. Everything runs on the runtime's public pieces (the
`Valley` object `ask` uses: its tokenizer, config, vision encode and LLM backend); the answers equal
`valley-rt ask`'s for the same video, question and seed.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from valley_rt.errors import ValleyError
from valley_rt.generate import SamplingParams
from valley_rt.prompt import VIDEO, Turn, encode, format_conversation, splice_rows
from valley_rt.runtime import Valley, VideoContext, _StreamCleaner
from valley_rt.serve import media
from valley_rt.serve.llm import GenJob, GenOutcome, InterleavedLLM, LLMService
from valley_rt.serve.media import APIError, MediaLimits, limit_error
from valley_rt.serve.protocol import ChatCompletionRequest, SystemMessage, TextPart, UserMessage


@dataclass
class Settings:
    """Server settings; each field is a `valley-rt serve` option of the same name."""

    model_name: str = "valley-rt-demo"  # the id /v1/models reports and requests may name
    allowed_media_path: Path | None = None  # file:// URLs must lie under it (None: file:// refused)
    max_queue: int = 64  # requests waiting for an LLM slot beyond those generating; more get 429
    kv_slots: int = 4  # requests generating at once (KV caches), interleaved token by token
    encoder_cache_mb: float = 256.0  # LRU of encoded videos, bounded in bytes of visual tokens
    max_body_mb: float = 96.0  # request body (base64 video included)
    max_video_mb: float = 64.0  # one video's bytes (or a frame list's total)
    max_duration_s: float = 3600.0  # a video's stated duration
    max_frames: int = 64  # frames sampled or sent as images
    max_prompt_tokens: int = 4096  # prompt tokens after the video's placeholders are expanded
    default_max_tokens: int = 256  # answer cap when a request gives none (as `valley-rt ask`)
    media_timeout_s: float = 10.0  # http(s) media download
    retry_after_s: int = 1  # the Retry-After header of a 429

    def media_limits(self) -> MediaLimits:
        root = Path(self.allowed_media_path).resolve() if self.allowed_media_path is not None else None
        return MediaLimits(allowed_media_path=root,
                           max_video_bytes=int(self.max_video_mb * (1 << 20)), max_duration_s=self.max_duration_s,
                           max_frames=self.max_frames, http_timeout_s=self.media_timeout_s)


class Metrics:
    """Prometheus metrics on a private registry (several apps may live in one process, e.g. tests)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("valley_requests", "Chat completion requests by outcome", ["outcome"], registry=r)
        self.errors = Counter("valley_errors", "Errors by kind (the OpenAI error code or type)", ["kind"], registry=r)
        self.queue_depth = Gauge("valley_queue_depth", "Requests admitted and not yet generating", registry=r)
        self.running = Gauge("valley_running", "Requests generating", registry=r)
        self.cache_hits = Counter("valley_encoder_cache_hits", "Encoder cache hits", registry=r)
        self.cache_misses = Counter("valley_encoder_cache_misses", "Encoder cache misses", registry=r)
        self.cache_bytes = Gauge("valley_encoder_cache_bytes", "Bytes held by the encoder cache", registry=r)
        self.prompt_tokens = Counter("valley_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("valley_cached_prompt_tokens", "Prompt tokens reused from a KV cache", registry=r)
        self.completion_tokens = Counter("valley_completion_tokens", "Completion tokens", registry=r)
        buckets = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.stage = Histogram("valley_stage_seconds", "Latency per stage", ["stage"], buckets=buckets, registry=r)
        self.tokens_per_s = Histogram("valley_decode_tokens_per_second", "Decode tokens/s per request",
                                      buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)


class EncoderCache:
    """LRU of encoded videos keyed by content key + frame sampling, bounded in bytes of visual tokens.
    Only touched from the event loop thread."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, tuple[VideoContext, int]] = OrderedDict()
        self.pending: dict[tuple, asyncio.Task] = {}  # encodes in progress

    def get(self, key: tuple) -> VideoContext | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: tuple, ctx: VideoContext) -> None:
        size = sum(t.nbytes for t in ctx.visual)
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = (ctx, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s) = self._items.popitem(last=False)
            self.bytes -= s


class Ticket:
    def __init__(self, engine: "ServeEngine"):
        self.engine, self.held = engine, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.engine.in_flight -= 1


@dataclass
class Completion:
    """One admitted request's generation, as seen from the event loop."""

    job: GenJob
    events: asyncio.Queue  # ("text", str) ..., then ("done", GenOutcome) or ("error", Exception)
    started: float
    ttft_s: float | None = None
    timings: dict = field(default_factory=dict)

    def cancel(self) -> None:
        self.job.cancel()


class ServeEngine:
    """Video QA over a loaded `Valley`: encoder cache + prompt building + an `LLMService`."""

    def __init__(self, valley: Valley, settings: Settings | None = None, llm: LLMService | None = None):
        self.valley = valley
        self.settings = settings or Settings()
        self.llm = llm or InterleavedLLM(valley.llm, valley.tokenizer, slots=self.settings.kv_slots)
        self.metrics = Metrics()
        self.cache = EncoderCache(int(self.settings.encoder_cache_mb * (1 << 20)))
        self.limits = self.settings.media_limits()
        self._vision = ThreadPoolExecutor(1, thread_name_prefix="valley-vision")
        self._spool = Path(tempfile.mkdtemp(prefix="valley-rt-serve-"))
        self.in_flight = 0
        self.capacity = self.llm.slots + self.settings.max_queue
        self.closed = False
        self.metrics.running.set_function(lambda: self.llm.stats()["active"])
        self.metrics.queue_depth.set_function(lambda: max(0, self.in_flight - self.llm.stats()["active"]))

    # -- lifecycle ----------------------------------------------------------------------------------
    async def close(self) -> None:
        """After the server stopped taking requests and drained them: stop the threads."""
        self.closed = True
        await asyncio.get_running_loop().run_in_executor(None, self.llm.close)
        self._vision.shutdown(wait=True)
        shutil.rmtree(self._spool, ignore_errors=True)

    def health(self) -> dict:
        return {"status": "ok" if not self.closed else "closing", "in_flight": self.in_flight,
                "capacity": self.capacity, **self.llm.stats()}

    # -- admission ----------------------------------------------------------------------------------
    def admit(self) -> "Ticket":
        """A place among the requests in flight, or a 429 when `slots + max_queue` are taken. The
        ticket is released when the request's generation ends (or when it fails before starting)."""
        if self.closed:
            raise APIError("the server is shutting down", status=503, type="server_error", code="shutting_down")
        if self.in_flight >= self.capacity:
            self.metrics.requests.labels("rejected").inc()
            raise APIError(f"server overloaded: {self.in_flight} requests in flight (server limit --max-queue "
                           f"{self.settings.max_queue} + {self.llm.slots} generating); retry later", status=429,
                           type="rate_limit_error", code="overloaded", param="--max-queue",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.in_flight += 1
        return Ticket(self)

    # -- media --------------------------------------------------------------------------------------
    async def video(self, req: ChatCompletionRequest) -> tuple[VideoContext, str]:
        """The request's encoded video (from the encoder cache when it holds it) and its content key."""
        urls = []
        for m in req.messages:
            if isinstance(m, UserMessage) and not isinstance(m.content, str):
                for p in m.content:
                    if p.type == "video_url":
                        urls.append(("video", p.video_url.url))
                    elif p.type == "image_url":
                        urls.append(("image", p.image_url.url))
        if not urls:
            raise APIError("a request needs a video: a video_url part (or image_url frames) in a user message",
                           param="messages", code="missing_video")
        num_frames, fps = req.sampling_frames
        s = self.settings
        if num_frames is not None and num_frames > s.max_frames:
            raise limit_error(f"num_frames {num_frames} is over {s.max_frames}", "--max-frames")
        got = await media.load(urls, self.limits, self._spool)
        key = (got.key, num_frames, fps)
        owned = False  # whether an encode task took over the spooled file
        try:
            ctx = self.cache.get(key)
            if ctx is None:
                task = self.cache.pending.get(key)
                if task is None:  # not cached, not being encoded: encode it
                    self.metrics.cache_misses.inc()
                    task = asyncio.ensure_future(self._encode_into_cache(key, got, num_frames, fps))
                    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # always retrieved
                    self.cache.pending[key] = task
                    owned = True
                else:  # being encoded for another request right now: wait for that encode
                    self.metrics.cache_hits.inc()
                # shielded: a client that goes away does not cancel an encode other requests may wait on
                ctx = await asyncio.shield(task)
            else:
                self.metrics.cache_hits.inc()
            return ctx, f"{got.key}/{num_frames}/{fps}"
        finally:
            if not owned:
                self._unspool(got)

    def _unspool(self, got: media.Media) -> None:
        if got.path is not None and self._spool in got.path.parents:
            got.path.unlink(missing_ok=True)

    async def _encode_into_cache(self, key: tuple, got: media.Media, num_frames: int | None,
                                 fps: float | None) -> VideoContext:
        try:
            ctx = await self._encode(got, num_frames, fps)
            self.cache.put(key, ctx)
            self.metrics.cache_bytes.set(self.cache.bytes)
            return ctx
        finally:
            self.cache.pending.pop(key, None)
            self._unspool(got)

    async def _encode(self, got: media.Media, num_frames: int | None, fps: float | None) -> VideoContext:
        s, v = self.settings, self.valley
        if got.path is not None:
            duration = media.video_duration(got.path)
            if duration is not None and duration > s.max_duration_s:
                raise limit_error(f"video is {duration:.1f} s long, over {s.max_duration_s:g} s", "--max-duration-s")
            run = lambda: v.encode_video(got.path, frames=num_frames, fps=fps)  # noqa: E731
        else:
            run = lambda: v.encode_frames(got.frames, source="image_url frames")  # noqa: E731
        try:
            ctx = await asyncio.get_running_loop().run_in_executor(self._vision, run)
        except ValleyError as e:
            if got.path is not None and self._spool in got.path.parents:  # name the part, not the spool file
                raise type(e)(str(e).replace(str(got.path), "video_url")) from None
            raise
        if ctx.num_frames > s.max_frames:
            raise limit_error(f"{ctx.num_frames} frames sampled, over {s.max_frames}", "--max-frames")
        for stage in ("video_decode", "vision"):
            self.metrics.stage.labels(stage).observe(ctx.timings.get(f"{stage}_ms", 0.0) / 1e3)
        # The cache keeps the visual tokens only; the decoded frames are not needed after encoding.
        return VideoContext(path=ctx.path, frames=np.zeros((0, 1, 1, 3), np.uint8), indices=ctx.indices,
                            timestamps=ctx.timestamps, visual=ctx.visual, timings=ctx.timings, notes=ctx.notes)

    # -- prompt -------------------------------------------------------------------------------------
    def conversation(self, req: ChatCompletionRequest) -> tuple[list[Turn], str | None]:
        """OpenAI messages -> Valley turns (the video's message gets `<video>\\n` before its text, as
        `valley-rt ask` puts it) and the system prompt (None: the model's)."""
        system, turns, seen_video = [], [], False
        for m in req.messages:
            if isinstance(m, SystemMessage):
                system.append(m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content))
                continue
            if m.content is None or isinstance(m.content, str):
                text, has_video = m.content or "", False
            else:
                text = "\n".join(p.text for p in m.content if isinstance(p, TextPart))
                has_video = any(not isinstance(p, TextPart) for p in m.content)
            if has_video and not seen_video:
                text, seen_video = f"{VIDEO}\n{text}", True
            turns.append(Turn("human" if isinstance(m, UserMessage) else "gpt", text))
        if not turns or turns[-1].role != "human":
            raise APIError("the last message must be a user message", param="messages")
        return turns, "\n".join(system) if system else None

    def prepare(self, req: ChatCompletionRequest, ctx: VideoContext, key: str,
                ticket: Ticket, t0: float) -> tuple[GenJob, asyncio.Queue]:
        v, s = self.valley, self.settings
        turns, system = self.conversation(req)
        text, _ = format_conversation(turns, system=v.cfg.system_prompt if system is None else system)
        try:
            ids, _ = encode(v.tokenizer, text, cfg=v.cfg, num_frames=ctx.num_frames)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        if len(ids) > s.max_prompt_tokens:
            raise limit_error(f"prompt is {len(ids)} tokens, over {s.max_prompt_tokens}", "--max-prompt-tokens")
        room = self.llm.max_context - len(ids)
        asked = req.max_completion_tokens or req.max_tokens
        max_tokens = asked if asked is not None else min(s.default_max_tokens, room)
        if max_tokens > room or room < 1:
            raise APIError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the model's context of "
                           f"{self.llm.max_context}", param="max_tokens", code="context_length_exceeded")
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature or 0.0,
                                    top_p=req.top_p if req.top_p is not None else 1.0, top_k=req.top_k or 0,
                                    seed=req.seed)
        except ValueError as e:
            raise APIError(str(e)) from None
        try:
            embeds = splice_rows(v.llm.embed(ids), ids, ctx.visual, v.cfg)  # [L, H]
        except ValueError as e:  # placeholder counts disagree, e.g. special-token strings in the text
            raise APIError(f"prompt: {e}", param="messages") from None
        im_start = v.cfg.tokens.im_start
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(events.put_nowait, item)  # noqa: E731
        cleaner = _StreamCleaner(lambda t: put(("text", t)))

        def first_token():  # on the LLM thread (prometheus metrics are thread-safe)
            self.metrics.stage.labels("ttft").observe(time.perf_counter() - t0)
            put(("first", time.perf_counter()))

        def done(result):  # on the LLM thread, once; recorded here, whether or not a client still listens
            if isinstance(result, GenOutcome):
                cleaner.flush()
                self._record(result, t0)
                put(("done", result))
            else:
                self.metrics.requests.labels("error").inc()
                self.metrics.errors.labels(type(result).__name__).inc()
                put(("error", result))
            loop.call_soon_threadsafe(ticket.release)

        stop = tuple(req.stop_strings) if req.ignore_eos else ("###", *req.stop_strings)
        job = GenJob(ids=ids, embeds=embeds, prefix_key=key,
                     visual_start=ids.index(im_start) if im_start in ids else len(ids), params=params,
                     stop=stop, eos_token_id=None if req.ignore_eos else getattr(v.tokenizer, "eos_token_id", None), on_text=cleaner,
                     on_first_token=first_token, on_done=done)
        return job, events

    # -- a request ----------------------------------------------------------------------------------
    async def generate(self, req: ChatCompletionRequest, ticket: Ticket) -> Completion:
        """Media, encoder cache and prompt for an admitted request; its job is running on return."""
        t0 = time.perf_counter()
        try:
            ctx, key = await self.video(req)
            job, events = self.prepare(req, ctx, key, ticket, t0)
            self.llm.submit(job)
        except BaseException:
            ticket.release()
            raise
        return Completion(job=job, events=events, started=t0)

    def _record(self, out: GenOutcome, t0: float) -> None:
        m = self.metrics
        m.prompt_tokens.inc(out.prompt_tokens)
        m.cached_tokens.inc(out.cached_tokens)
        m.completion_tokens.inc(len(out.token_ids))
        m.stage.labels("prefill").observe(out.prefill_ms / 1e3)
        if out.decode_tokens_per_s:
            m.tokens_per_s.observe(out.decode_tokens_per_s)
        m.stage.labels("request").observe(time.perf_counter() - t0)
        m.requests.labels("cancelled" if out.finish_reason == "cancelled" else "ok").inc()

    async def events(self, c: Completion) -> AsyncIterator[tuple[str, object]]:
        """("first", time) when the first token is sampled, ("text", delta) ..., then ("done", GenOutcome);
        raises the job's error. Leaving early (the
        client went away) cancels the generation."""
        try:
            while True:
                kind, item = await c.events.get()
                if kind == "first":
                    c.ttft_s = item - c.started
                if kind == "error":
                    raise item if isinstance(item, ValleyError) else APIError(
                        f"generation failed: {type(item).__name__}: {item}", status=500, type="server_error")
                yield kind, item
                if kind == "done":
                    return
        finally:
            c.cancel()  # no-op once done
