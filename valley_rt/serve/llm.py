"""The server's LLM side: prompt embeddings in, streamed tokens out, many requests at once.

`LLMService` is what the server needs from an LLM, and what a second backend implements: it takes a
`GenJob` (the prompt's token ids, its spliced input embeddings [L, H] and the sampling parameters:
the same hand-off as vLLM's prompt-embeddings input) and reports text and completion through the
job's callbacks, from whatever thread it runs on.

`InterleavedLLM` is the built-in one over the runtime's batch-1 KV-cached backend. It keeps several
KV-cache slots (`OnnxLLM.fork`: one session and one copy of the weights, a cache per slot) and one
thread that advances every active request by one token per round, round-robin, admitting one
waiting request's prefill between rounds. Requests are interleaved, not batched: a decode step
still costs what it costs at batch 1, but a long answer no longer holds later requests behind its
whole generation, and a multi-turn request goes to the slot whose cache holds the longest prefix of
its history (the video's tokens and the turns so far are not prefilled again). A backend without
`fork` (the torch path) gets one slot.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from valley_rt.generate import SamplingParams, _TextTracker, sample


@dataclass
class GenOutcome:
    text: str  # raw generated text, stop string excluded
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from an earlier request (not prefilled again)
    prefill_ms: float
    decode_tokens_per_s: float


@dataclass
class GenJob:
    ids: list[int]  # the whole prompt's token ids
    embeds: np.ndarray  # [L, H] float32 input embeddings of the whole prompt, visual tokens spliced in
    prefix_key: str  # what the visual placeholders in `ids` hold (the video's content key)
    visual_start: int  # index of the first visual placeholder (ids before it mean the same for any video)
    params: SamplingParams
    stop: tuple[str, ...]
    eos_token_id: int | None
    on_text: Callable[[str], None]  # raw text as it becomes final (a possible stop string held back)
    on_first_token: Callable[[], None]
    on_done: Callable[[GenOutcome | BaseException], None]  # exactly once
    cancelled: bool = False  # set by the server (client gone); the job ends at its next step

    def cancel(self) -> None:
        self.cancelled = True


class LLMService(Protocol):
    """An LLM that serves many GenJobs at once (built-in: InterleavedLLM; a vLLM engine fits too)."""

    max_context: int
    slots: int  # requests generating at once; more wait inside the service

    def submit(self, job: GenJob) -> None:  # thread-safe, returns at once
        ...

    def close(self) -> None:  # finish every submitted job, then stop
        ...

    def stats(self) -> dict:  # {"active": n, "waiting": n}
        ...


@dataclass
class _Slot:
    backend: object  # a generate.LLMBackend
    cached_ids: list[int] = field(default_factory=list)  # token ids whose KV the cache holds
    prefix_key: str | None = None
    last_used: float = 0.0
    job: GenJob | None = None
    # per-job decode state
    tokens: list[int] = field(default_factory=list)
    tracker: _TextTracker | None = None
    generator: np.random.Generator | None = None
    cached: int = 0
    prefill_ms: float = 0.0
    t_first: float = 0.0

    def reuse(self, job: GenJob) -> int:
        """How many of the job's prompt tokens this slot's cache already holds."""
        common = 0
        for a, b in zip(self.cached_ids, job.ids):
            if a != b:
                break
            common += 1
        if self.prefix_key != job.prefix_key:  # placeholders hold another video's tokens
            common = min(common, job.visual_start)
        return min(common, len(job.ids) - 1, self.backend.position)  # at least one token to prefill


class InterleavedLLM:
    """Round-robin token interleaving of many requests over KV-cache slots of one batch-1 backend."""

    def __init__(self, backend, tokenizer, *, slots: int = 4):
        self.tokenizer = tokenizer
        backends = [backend]
        if hasattr(backend, "fork"):
            backends += [backend.fork() for _ in range(slots - 1)]
        self._slots = [_Slot(b) for b in backends]
        self.slots = len(self._slots)
        self.max_context = int(backend.max_context)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[GenJob] = deque()
        self._closing = False
        self.backend_s = 0.0  # seconds spent inside the backend's prefill / decode calls
        self.steps = 0  # backend calls
        self._thread = threading.Thread(target=self._loop, name="valley-llm", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------------
    def submit(self, job: GenJob) -> None:
        if self._closing:
            raise RuntimeError("the LLM service is closed")
        self._inbox.put(job)

    def close(self) -> None:
        self._closing = True
        self._inbox.put(None)  # wakes the loop
        self._thread.join()

    def stats(self) -> dict:
        return {"active": sum(s.job is not None for s in self._slots),
                "waiting": len(self._waiting) + self._inbox.qsize(), "backend_s": round(self.backend_s, 3),
                "backend_calls": self.steps}

    # -- the loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            busy = any(s.job is not None for s in self._slots) or self._waiting
            try:
                item = self._inbox.get(block=not busy, timeout=None)
                while True:
                    if item is not None:
                        self._waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self._closing and not self._waiting and all(s.job is None for s in self._slots) \
                    and self._inbox.empty():
                return
            self._admit_one()
            for slot in self._slots:
                if slot.job is not None:
                    self._guard(slot, self._step)

    def _admit_one(self) -> None:
        while self._waiting and self._waiting[0].cancelled:
            job = self._waiting.popleft()
            job.on_done(GenOutcome("", [], "cancelled", len(job.ids), 0, 0.0, 0.0))
        idle = [s for s in self._slots if s.job is None]
        if not self._waiting or not idle:
            return
        job = self._waiting.popleft()
        slot = max(idle, key=lambda s: (s.reuse(job), -s.last_used))
        slot.job = job
        self._guard(slot, self._prefill)

    def _guard(self, slot: _Slot, fn) -> None:
        try:
            fn(slot)
        except Exception as e:  # the request fails (reported to its client), the service keeps going
            job = slot.job
            slot.backend.reset()
            slot.cached_ids, slot.prefix_key, slot.job = [], None, None
            job.on_done(e)

    def _prefill(self, slot: _Slot) -> None:
        job, b = slot.job, slot.backend
        common = slot.reuse(job)
        if common < b.position:
            b.truncate(common)
        p = job.params
        slot.tokens = []
        slot.generator = np.random.default_rng(p.seed)  # as generate.generate seeds it (None: fresh entropy)
        slot.tracker = _TextTracker(self.tokenizer, job.stop, job.on_text)
        slot.cached = common
        slot.prefix_key = job.prefix_key
        slot.cached_ids = job.ids[:common]
        t0 = time.perf_counter()
        logits = b.prefill(job.embeds[common:])  # [V]
        slot.prefill_ms = (time.perf_counter() - t0) * 1e3
        self.backend_s += slot.prefill_ms / 1e3
        self.steps += 1
        slot.cached_ids = list(job.ids)
        self._take(slot, sample(logits, p, slot.generator))
        slot.t_first = time.perf_counter()
        job.on_first_token()

    def _step(self, slot: _Slot) -> None:
        if slot.job.cancelled:
            self._finish(slot, "cancelled")
            return
        tok = slot.tokens[-1]
        t0 = time.perf_counter()
        logits = slot.backend.decode(tok)
        self.backend_s += time.perf_counter() - t0
        self.steps += 1
        slot.cached_ids.append(tok)
        self._take(slot, sample(logits, slot.job.params, slot.generator))

    def _take(self, slot: _Slot, tok: int) -> None:
        job = slot.job
        slot.tokens.append(tok)
        if job.eos_token_id is not None and tok == job.eos_token_id:
            self._finish(slot, "stop")
        elif slot.tracker.add(tok):
            self._finish(slot, "stop")
        elif len(slot.tokens) >= job.params.max_new_tokens:
            slot.tracker.emit(len(slot.tracker.text))  # a held-back partial stop string is plain text
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, reason: str) -> None:
        job, n = slot.job, len(slot.tokens)
        dt = time.perf_counter() - slot.t_first if slot.t_first else 0.0
        out = GenOutcome(text=slot.tracker.final_text(), token_ids=list(slot.tokens), finish_reason=reason,
                         prompt_tokens=len(job.ids), cached_tokens=slot.cached, prefill_ms=slot.prefill_ms,
                         decode_tokens_per_s=(n - 1) / dt if n > 1 and dt > 0 else 0.0)
        slot.job, slot.tracker, slot.t_first = None, None, 0.0
        slot.last_used = time.monotonic()
        job.on_done(out)


class VllmService:
    """The server's LLM on vLLM (backends/llm_vllm.py: an in-process engine or a remote `vllm serve`).

    vLLM batches the requests it holds (continuous batching, paged KV cache, its own prefix cache), so
    this service only hands jobs over: up to `slots` at once, each on a worker thread blocked in the
    backend's `generate_from_embeds` (thread-safe for both backends); more wait in the pool's queue.
    Stop strings, eos and the streamed text go through the built-in text tracker, as with
    InterleavedLLM. A vLLM that is down becomes a 503 for the client, one that fails mid-answer a 502
    (OpenAI error objects); a remote front end recovers as soon as its vLLM server answers again.
    `cached_tokens` is reported as 0: vLLM's prefix-cache hits are not visible through either API."""

    def __init__(self, backend, tokenizer, *, slots: int = 32):
        from concurrent.futures import ThreadPoolExecutor

        self.backend = backend
        self.tokenizer = tokenizer
        self.slots = int(slots)
        self.max_context = int(backend.max_context)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="valley-vllm")
        self._lock = threading.Lock()
        self._active = 0
        self._waiting = 0
        self._closing = False

    def submit(self, job: GenJob) -> None:
        if self._closing:
            raise RuntimeError("the LLM service is closed")
        with self._lock:
            self._waiting += 1
        self._pool.submit(self._run, job)

    def close(self) -> None:
        """Finish the submitted jobs, then stop the workers (the backend is closed by its owner)."""
        self._closing = True
        self._pool.shutdown(wait=True)

    def stats(self) -> dict:
        with self._lock:
            return {"active": self._active, "waiting": self._waiting}

    def _run(self, job: GenJob) -> None:
        with self._lock:
            self._waiting -= 1
            self._active += 1
        try:
            if job.cancelled:
                outcome = GenOutcome("", [], "cancelled", len(job.ids), 0, 0.0, 0.0)
            else:
                outcome = self._generate(job)
        except BaseException as e:  # reported to the request's client; the service keeps going
            outcome = vllm_api_error(e)
        finally:
            with self._lock:
                self._active -= 1
        job.on_done(outcome)

    def _generate(self, job: GenJob) -> GenOutcome:
        r = self.backend.generate_from_embeds(
            job.embeds, tokenizer=self.tokenizer, params=job.params, stop=job.stop, on_text=job.on_text,
            eos_token_id=-1 if job.eos_token_id is None else job.eos_token_id,
            on_first_token=job.on_first_token, cancelled=lambda: job.cancelled)
        reason = {"eos": "stop", "stop_string": "stop"}.get(r.stop_reason, r.stop_reason)
        return GenOutcome(text=r.text, token_ids=list(r.token_ids), finish_reason=reason,
                          prompt_tokens=len(job.ids), cached_tokens=0, prefill_ms=r.first_token_ms,
                          decode_tokens_per_s=r.decode_tokens_per_s)


def vllm_api_error(e: BaseException) -> BaseException:
    """vLLM down -> 503, vLLM failed mid-answer -> 502 (OpenAI "server_error" objects); anything else
    as it is (a ValleyError about the request stays a 4xx)."""
    from valley_rt.backends.llm_vllm import VllmFailedError, VllmUnavailableError
    from valley_rt.serve.media import APIError

    if isinstance(e, VllmUnavailableError):
        return APIError(str(e), status=503, type="server_error", code="llm_unavailable")
    if isinstance(e, VllmFailedError):
        return APIError(str(e), status=502, type="server_error", code="llm_failed")
    return e
