"""The serving path: video -> frames -> vision engine -> visual tokens -> LLM -> streamed answer.

`load(path)` returns a `Valley` for an engine folder (the fast path: ONNX Runtime vision graph + int4
ONNX LLM), a checkpoint folder (the torch path on a GPU, the PyTorch reference with `reference=True`,
or, on a CPU, an engine made by the `exporter` hook: `valley_rt.load` and the CLI pass the one that
exports once into the user cache), or, with no path, the bundled demo model. A video is decoded, preprocessed and encoded
once (`encode_video`); every question about it reuses those visual tokens, and the KV cache of the prompt
prefix they share (system prompt + video) is reused too: a second question or chat turn only prefills
its own text. The engine path imports neither torch nor transformers (the tokenizer is the
`tokenizers` library reading tokenizer.json; sampling, splice and KV bookkeeping are NumPy), so it runs
on a core install; the checkpoint paths import torch when they are asked for. This module never
imports the exporters (valley_rt.export): the engine format it reads is valley_rt.engine_format.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from valley_rt.backends.native_vision import native_policy
from valley_rt.backends.prefix_kv import PREFIX_MIN_FLOPS, PrefixStore, prefix_store_enabled
from valley_rt.backends.vision import open_engine_vision, pick_vision, torch_cuda_available
from valley_rt.config import ValleyConfig
from valley_rt.engine_format import MANIFEST, artifact_path, load_manifest
from valley_rt.errors import EngineError, ValleyError
from valley_rt.generate import SamplingParams, generate
from valley_rt.prompt import (Turn, VIDEO, clean_answer, encode, first_turn_video_at, format_conversation,
                              plain_tokens, splice_rows)

ASSETS = Path(__file__).resolve().parent / "assets"
WARM_VISION_MAX_FLOPS = 1e9  # warm the vision session at load when one frame costs less than this
WARM_PROMPT_MAX_FLOPS = 5e10  # warm with a whole blank question when its prompt costs less than this
DEMO_CHECKPOINT = ASSETS / "demo"
DEMO_ENGINE = ASSETS / "demo_engine"


Exporter = Callable[[Path], Path]  # checkpoint folder -> engine folder (e.g. valley_rt.export.cache.ensure_engine)


def __getattr__(name: str):
    # ReferenceVision moved to valley_rt.backends.vision, with the other vision backends.
    if name == "ReferenceVision":
        from valley_rt.backends.vision import ReferenceVision

        return ReferenceVision
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- tokenizer -------------------------------------------------------------------------------------
class FastTokenizer:
    """The few tokenizer calls the runtime makes, on the `tokenizers` library alone (no transformers
    import: ~1 s less per CLI call). Reads the same tokenizer.json a transformers tokenizer saves, so
    it tokenizes identically (tests/test_runtime.py checks against AutoTokenizer)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_file = folder / "tokenizer_config.json"
        conf = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

        def token(name):
            v = conf.get(name)
            return v.get("content") if isinstance(v, dict) else v

        self.eos_token_id = self._tok.token_to_id(token("eos_token") or "</s>")
        self._cleanup = bool(conf.get("clean_up_tokenization_spaces", False))
        self._plain = None  # copies that never match special tokens (prompt.plain_copies), made on first use

    def plain_tokens(self, text: str, *, first: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and offsets of `text` with no special token recognised in it (see prompt.plain_tokens)."""
        from valley_rt.prompt import plain_copies

        if self._plain is None:
            self._plain = plain_copies(self._tok)
        enc = self._plain[0 if first else 1].encode(text, add_special_tokens=first)
        return enc.ids, enc.offsets

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False):
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": enc.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._cleanup:  # transformers' clean_up_tokenization, for tokenizers saved with it on
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def convert_tokens_to_ids(self, token: str):
        return self._tok.token_to_id(token)


def open_tokenizer(folder: Path):
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return FastTokenizer(folder)
    from transformers import AutoTokenizer  # sentencepiece-only tokenizers (tokenizer.model)

    return AutoTokenizer.from_pretrained(str(folder))


class _StreamCleaner:
    """Streams what `clean_answer` would keep: holds text back until the leading role marker the model
    writes first (" Assistent:", "###", ...) is complete, drops it, then passes text straight through."""

    HOLD = 16  # longer than any leading marker, e.g. "### Assistant: "

    def __init__(self, sink: Callable[[str], None]):
        self.sink, self.buf, self.started, self.space = sink, "", False, ""

    def _emit(self, text: str) -> None:
        """Pass text on, holding back trailing whitespace (the answer's " \n" before "###")."""
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body):]
        if body:
            self.sink(body)

    def __call__(self, text: str) -> None:
        if self.started:
            self._emit(text)
            return
        self.buf += text
        if len(self.buf.lstrip()) >= self.HOLD:
            self._start()

    def _start(self) -> None:
        from valley_rt.prompt import strip_leading

        self.started = True
        self._emit(strip_leading(self.buf))

    def flush(self) -> None:
        """End of the answer: release a short held-back answer; trailing whitespace is dropped."""
        if not self.started:
            self._start()


# -- results ---------------------------------------------------------------------------------------
@dataclass
class VideoContext:
    """A video decoded and encoded once; every question about it reuses the visual tokens."""

    path: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    indices: list[int]
    timestamps: list[float]
    visual: tuple[np.ndarray, np.ndarray]  # pooled [N, D], frame tokens [T, D], float32
    timings: dict[str, float]  # video_decode_ms, preprocess_ms, vision_ms (pooling included)
    notes: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return len(self.indices)


@dataclass
class Answer:
    question: str
    answer: str
    tokens_in: int  # prompt tokens (the whole conversation so far)
    tokens_prefilled: int  # of which prefilled now (the rest came from the reused KV cache)
    tokens_out: int
    stop_reason: str
    timings: dict[str, float]  # ms per stage + decode tokens/s
    backends: dict[str, str]
    dropped_turns: int = 0  # chat: oldest question+answer pairs left out of the prompt to fit the context

    def to_dict(self) -> dict:
        return asdict(self)


# -- the runtime -----------------------------------------------------------------------------------
class Valley:
    """A loaded model: vision backend + LLM backend + tokenizer + config. Not thread-safe (one KV cache)."""

    def __init__(self, *, cfg: ValleyConfig, tokenizer, vision, llm, source: str, kind: str, read_video=None):
        from valley_rt import video

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.vision = vision
        self.llm = llm
        self.source = source
        self.kind = kind  # "engine", "torch" (GPU path) or "reference"
        self._read = read_video or video.read_video
        self._cached_ids: list[int] = []  # token ids whose keys/values are in the LLM's cache
        self._cached_video: VideoContext | None = None  # the video whose tokens those placeholders hold
        self.load_ms = 0.0
        self.prefix_store = None  # a backends.prefix_kv.PrefixStore: the system prompt's KV rows, per machine
        self._prefix_prefilled = 0  # tokens the last _system_prefix prefilled (not copied)
        self.max_frames = cfg.temporal.max_frames if cfg.temporal.mode == "transformer" else 64

    def reset(self) -> None:
        """Forget the LLM's KV cache (the next prompt is prefilled from its first token)."""
        self.llm.reset()
        self._cached_ids = []
        self._cached_video = None

    @property
    def backends(self) -> dict[str, str]:
        return {"vision": getattr(self.vision, "name", type(self.vision).__name__),
                "llm": getattr(self.llm, "name", type(self.llm).__name__), "kind": self.kind}

    def _first_token_work(self):
        """The LLM backend's mark for work a first token waits for (OnnxLLM.first_token_work: its background
        load holds back what the first token does not need meanwhile), or nothing."""
        mark = getattr(self.llm, "first_token_work", None)
        return mark() if mark is not None else contextlib.nullcontext()

    # -- video ------------------------------------------------------------------------------------
    def encode_video(self, path, *, frames: int | None = None, fps: float | None = None) -> VideoContext:
        """Decode, preprocess and encode a video once. frames: fixed-mode count; fps: fps mode."""
        with self._first_token_work():
            return self._encode_video(path, frames=frames, fps=fps)

    def _encode_video(self, path, *, frames: int | None, fps: float | None) -> VideoContext:
        s = self.cfg.sampling
        n = frames if frames is not None else s.num_frames
        if fps is None and not 1 <= n <= self.max_frames:
            raise EngineError(f"--frames {n} is outside this model's range 1..{self.max_frames}")
        if fps is not None and fps <= 0:
            raise ValleyError(f"--fps must be > 0, got {fps}")
        t0 = time.perf_counter()
        if fps is not None:
            clip = self._read(path, num_frames=n, mode="fps", fps=fps, max_frames=min(s.max_frames, self.max_frames))
        else:
            clip = self._read(path, num_frames=n)
        t1 = time.perf_counter()
        x = self.vision.preprocess(clip.frames)  # each backend's own input (crops, or pixels for torch)
        t2 = time.perf_counter()
        pooled, frame_tokens = self.vision.visual_tokens(x)
        t3 = time.perf_counter()
        return VideoContext(path=str(path), frames=clip.frames, indices=list(clip.indices),
                            timestamps=list(clip.timestamps),
                            visual=(np.asarray(pooled, np.float32), np.asarray(frame_tokens, np.float32)),
                            timings={"video_decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3,
                                     # pooling runs inside the vision engine's graph (or kernel)
                                     "vision_ms": (t3 - t2) * 1e3},
                            notes=list(getattr(clip, "notes", [])))

    def encode_frames(self, frames: np.ndarray, *, source: str = "<frames>") -> VideoContext:
        """Encode frames decoded elsewhere (uint8 [T, H, W, 3], e.g. a client's list of images) the way
        encode_video encodes a video's sampled frames."""
        with self._first_token_work():
            return self._encode_frames(frames, source=source)

    def _encode_frames(self, frames: np.ndarray, *, source: str) -> VideoContext:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValleyError(f"{source}: expected uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if not 1 <= len(frames) <= self.max_frames:
            raise EngineError(f"{source}: {len(frames)} frames is outside this model's range 1..{self.max_frames}")
        t0 = time.perf_counter()
        x = self.vision.preprocess(frames)
        t1 = time.perf_counter()
        pooled, frame_tokens = self.vision.visual_tokens(x)
        t2 = time.perf_counter()
        n = len(frames)
        return VideoContext(path=source, frames=frames, indices=list(range(n)), timestamps=[float(i) for i in range(n)],
                            visual=(np.asarray(pooled, np.float32), np.asarray(frame_tokens, np.float32)),
                            timings={"video_decode_ms": 0.0, "preprocess_ms": (t1 - t0) * 1e3,
                                     "vision_ms": (t2 - t1) * 1e3})

    # -- prompts ----------------------------------------------------------------------------------
    def _embeds(self, ids: list[int], ctx: VideoContext) -> np.ndarray:
        """Token embeddings with the visual tokens spliced in: [S, H] float32."""
        return splice_rows(self.llm.embed(ids), ids, ctx.visual, self.cfg)

    def _answer(self, ctx: VideoContext, turns: list[Turn], question: str, *, params: SamplingParams,
                system: str | None, on_text: Callable[[str], None] | None,
                stop: tuple[str, ...] = ("###",), ignore_eos: bool = False) -> tuple[Answer, list[int]]:
        with self._first_token_work():
            return self._answer_now(ctx, turns, question, params=params, system=system, on_text=on_text,
                                    stop=stop, ignore_eos=ignore_eos)

    def _answer_now(self, ctx: VideoContext, turns: list[Turn], question: str, *, params: SamplingParams,
                    system: str | None, on_text: Callable[[str], None] | None,
                    stop: tuple[str, ...], ignore_eos: bool) -> tuple[Answer, list[int]]:
        system = self.cfg.system_prompt if system is None else system
        check_question(system, "system prompt", empty_ok=True)
        text, _ = format_conversation(turns, system=system)
        t0 = time.perf_counter()
        # The runtime's <video> opens the first turn; every other character is plain text (prompt.encode).
        ids, _ = encode(self.tokenizer, text, cfg=self.cfg, num_frames=ctx.num_frames,
                        video_at=first_turn_video_at(system))
        # Reuse the KV cache of the longest prefix shared with what the cache already holds. Token ids
        # alone don't identify a prefix: the placeholders carry another video's tokens when the video
        # changed, so then only the text before the first visual token is reused (the system prompt).
        common = 0
        for a, b in zip(self._cached_ids, ids):
            if a != b:
                break
            common += 1
        if self._cached_video is not ctx:
            common = min(common, ids.index(self.cfg.tokens.im_start) if self.cfg.tokens.im_start in ids else len(ids))
        common = min(common, len(ids) - 1, self.llm.position)  # at least one token to prefill
        stored = 0  # prompt tokens whose KV rows came from the prefix store
        if self.prefix_store is not None:
            common, stored = self._system_prefix(ids, common)
        if common < self.llm.position:
            self.llm.truncate(common)
        embeds = self._embeds(ids, ctx)[common:]
        t1 = time.perf_counter()
        cleaner = _StreamCleaner(on_text) if on_text is not None else None
        if hasattr(self.llm, "generate_from_embeds"):  # request-level (vLLM): it keeps its own KV cache
            result = self.llm.generate_from_embeds(embeds, tokenizer=self.tokenizer, params=params, stop=stop,
                                                   on_text=cleaner, eos_token_id=-1 if ignore_eos else None)
        else:
            result = generate(self.llm, self.tokenizer, embeds, params=params, on_text=cleaner, stop=stop,
                              eos_token_id=-1 if ignore_eos else None)
        if cleaner is not None:
            cleaner.flush()
        answer_ids = result.token_ids
        self._cached_ids = ids + answer_ids[:-1]  # the last sampled token is never fed back
        self._cached_video = ctx
        timings = dict(ctx.timings)
        timings.update({"prompt_ms": (t1 - t0) * 1e3, "prefill_ms": result.prefill_ms,
                        "first_token_ms": result.first_token_ms,
                        "generate_ms": result.timings.get("total_ms", 0.0),
                        "decode_tokens_per_s": result.decode_tokens_per_s})
        timings["prefix_tokens_stored"] = stored
        ans = Answer(question=question, answer=clean_answer(result.text), tokens_in=len(ids),
                     tokens_prefilled=len(ids) - common + self._prefix_prefilled, tokens_out=len(answer_ids),
                     stop_reason=result.stop_reason, timings=timings, backends=self.backends)
        return ans, answer_ids

    def _system_prefix(self, ids: list[int], common: int) -> tuple[int, int]:
        """Make the KV cache hold the prompt's text before its first visual token (the system prompt and
        the first turn's opening), from the prefix store or by prefilling that prefix on its own, and
        store it when it was not there (backends/prefix_kv.py). Returns (common, stored): the tokens the
        cache now holds of `ids`, and how many of them were copied from the store."""
        self._prefix_prefilled = 0
        im_start = self.cfg.tokens.im_start
        n = ids.index(im_start) if im_start in ids else 0
        if common >= n or prompt_flops(self.cfg, n) < PREFIX_MIN_FLOPS:
            return common, 0
        prefix, shape = ids[:n], self.llm.prefix_shape(n)
        rows = self.prefix_store.get(prefix, shape)
        if rows is not None:
            self.llm.write_prefix(rows)
        else:  # prefilled alone, so that these rows and a stored copy are the same rows
            self.llm.truncate(0)
            self.llm.prefill(self.llm.embed(prefix))
            self._prefix_prefilled = n
            self.prefix_store.put(prefix, self.llm.read_prefix(n))
        self._cached_ids, self._cached_video = list(prefix), None
        return n, 0 if rows is None else n

    def ask(self, video, question: str, *, params: SamplingParams | None = None, system: str | None = None,
            on_text: Callable[[str], None] | None = None, frames: int | None = None,
            fps: float | None = None, stop: tuple[str, ...] = ("###",), ignore_eos: bool = False) -> Answer:
        """Answer one question about `video` (a path, or a VideoContext from encode_video).

        stop / ignore_eos: benchmarks generate a fixed number of tokens with stop=() and ignore_eos=True.
        """
        check_question(question)
        with self._first_token_work():  # one stretch: the video's encode, then the answer
            ctx = video if isinstance(video, VideoContext) else self.encode_video(video, frames=frames, fps=fps)
            q = f"{VIDEO}\n{question}"  # a "<video>" inside the question is the user's text, not a second video
            ans, _ = self._answer(ctx, [Turn("human", q)], question,
                                  params=params or SamplingParams(max_new_tokens=256), system=system,
                                  on_text=on_text, stop=stop, ignore_eos=ignore_eos)
        return ans

    def stream(self, video, question: str, **kwargs) -> Iterator[str]:
        """Yield the answer's text as it is generated (a generator over `ask`'s streaming callback)."""
        q: queue.Queue = queue.Queue()
        done = object()
        box: dict = {}

        def run():
            try:
                box["answer"] = self.ask(video, question, on_text=q.put, **kwargs)
            except BaseException as e:  # handed to the consumer's thread below
                box["error"] = e
            finally:
                q.put(done)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while (item := q.get()) is not done:
            yield item
        worker.join()
        if "error" in box:
            raise box["error"]

    def chat(self, video, *, system: str | None = None, frames: int | None = None,
             fps: float | None = None) -> "Chat":
        ctx = video if isinstance(video, VideoContext) else self.encode_video(video, frames=frames, fps=fps)
        return Chat(self, ctx, system)


class Chat:
    """A multi-turn conversation about one video. The KV cache of everything said so far is kept, so
    each turn prefills only its new text (never the visual tokens again).

    When the conversation no longer fits the LLM's context (prompt + max_new_tokens), the oldest
    question+answer pairs are left out of the prompt, never the system prompt or the video: the
    conversation goes on with the recent turns (`Answer.dropped_turns` says how many pairs are out)."""

    def __init__(self, valley: Valley, ctx: VideoContext, system: str | None):
        self.valley, self.ctx, self.system = valley, ctx, system
        self.turns: list[Turn] = []  # human / gpt alternating, the user's text as typed (no <video>)
        self.dropped = 0  # leading question+answer pairs of `turns` no longer in the prompt

    def _prompt_turns(self, question: str, dropped: int) -> list[Turn]:
        turns = self.turns[2 * dropped:] + [Turn("human", question)]
        turns[0] = Turn("human", f"{VIDEO}\n{turns[0].text}")  # the video opens the first turn kept
        return turns

    def _fit(self, question: str, max_new_tokens: int) -> int:
        """Fewest leading pairs to leave out so that prompt + answer fit the context (all, if none fit)."""
        v = self.valley
        system = v.cfg.system_prompt if self.system is None else self.system
        dropped = self.dropped
        while 2 * dropped < len(self.turns):
            text, _ = format_conversation(self._prompt_turns(question, dropped), system=system)
            ids, _ = encode(v.tokenizer, text, cfg=v.cfg, num_frames=self.ctx.num_frames,
                            video_at=first_turn_video_at(system))
            if len(ids) + max_new_tokens <= v.llm.max_context:
                break
            dropped += 1
        return dropped

    def send(self, question: str, *, params: SamplingParams | None = None,
             on_text: Callable[[str], None] | None = None) -> Answer:
        check_question(question)
        params = params or SamplingParams(max_new_tokens=256)
        dropped = self._fit(question, params.max_new_tokens)
        ans, _ = self.valley._answer(self.ctx, self._prompt_turns(question, dropped), question, params=params,
                                     system=self.system, on_text=on_text)
        self.dropped = ans.dropped_turns = dropped
        self.turns = self.turns + [Turn("human", question), Turn("gpt", ans.answer)]
        return ans


def check_question(text: str, what: str = "question", *, empty_ok: bool = False) -> None:
    """Refuse a question no answer can come from: empty, or not encodable text (a command-line argument
    with invalid UTF-8 reaches Python as lone surrogates)."""
    if not isinstance(text, str):
        raise ValleyError(f"the {what} must be text, got {type(text).__name__}")
    if not empty_ok and not text.strip():
        raise ValleyError(f"the {what} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValleyError(f"the {what} is not valid UTF-8 text") from None


# -- loading ---------------------------------------------------------------------------------------
def load(path: str | Path | None = None, *, reference: bool = False, device: str = "auto",
         threads: int | None = None, exporter: Exporter | None = None, llm: str = "builtin",
         llm_url: str | None = None, llm_options: dict | None = None) -> Valley:
    """Load an engine folder, a checkpoint folder, or (path None) the bundled demo model.

    device: "auto" / "cpu" / "cuda", for the vision stage as `backends.vision.pick_vision` decides:
    an engine runs its GPU vision graph when it has one, a checkpoint on CUDA runs the torch GPU path
    (fp16 vision tower with the fused Triton temporal-pooling kernel, fp16 LLM). An engine with device
    "cuda" runs its int4 LLM in CUDA graphs (backends/llm_cuda.py, docs/gpu.md).
    A checkpoint on a CPU runs as an engine: `exporter(checkpoint) -> engine folder` makes it (the
    runtime does not import the exporters; `valley_rt.load` and the CLI pass
    `valley_rt.export.cache.ensure_engine`, which exports once into the user cache); without an
    exporter that is an EngineError telling how to export.
    threads: ONNX Runtime's CPU threads per session (None: one per physical core, `cpu.default_threads`).
    llm: "builtin" (the engine's / checkpoint's own LLM backend) or "vllm": an in-process vLLM engine on
    the checkpoint's LLM folder, or with llm_url a remote `vllm serve` (backends/llm_vllm.py);
    llm_options go to the vLLM backend (e.g. memory=0.15). The vision side stays as loaded.
    """
    if llm not in ("builtin", "vllm"):
        raise ValleyError(f"--llm must be builtin or vllm, got {llm!r}")
    if llm_url is not None:
        llm = "vllm"
    t0 = time.perf_counter()
    llm_source = DEMO_CHECKPOINT if path is None else Path(path)  # where vLLM finds the HF LLM folder
    if path is None:
        demo_on_gpu = reference or (device != "cpu" and torch_cuda_available())
        path = DEMO_CHECKPOINT if demo_on_gpu else demo_engine(exporter)
    path = Path(path)
    if (path / MANIFEST).is_file():
        if reference:
            raise EngineError(f"{path}: --reference needs a checkpoint folder, this is an engine folder")
        manifest = load_manifest(path, verify=True)
        choice = pick_vision("engine", device=device, gpu=manifest.get("gpu"), cpu=manifest.get("vision_cpu"),
                             native=native_policy(manifest))
    elif (path / "valley.json").is_file():
        manifest = None
        choice = pick_vision("checkpoint", device=device, reference=reference)
    elif not path.exists():
        raise EngineError(f"{path}: no such model folder")
    else:
        raise EngineError(f"{path}: neither an engine folder (manifest.json) nor a valley-rt checkpoint (valley.json)")
    if choice == "reference":
        valley = _load_reference(path)
    elif choice == "torch":
        import torch

        cuda = torch.cuda.is_available()
        valley = _load_torch(path, device="cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.float32)
    else:
        if manifest is None:
            if exporter is None:
                raise EngineError(f"{path}: a checkpoint folder, which runs on this machine as an engine: export it "
                                  f"with `valley-rt export {path} --out ENGINE`, or pass "
                                  f"exporter=valley_rt.export.cache.ensure_engine (valley_rt.load does)")
            path = Path(exporter(path))
            manifest = load_manifest(path, verify=True)
        valley = _load_engine(path, manifest, vision=choice, threads=threads, cuda=device == "cuda",
                              with_llm=llm != "vllm")  # vLLM replaces it: its int4 graph is not loaded
    if llm == "vllm":
        _use_vllm(valley, llm_source, url=llm_url, **(llm_options or {}))
    if valley.kind in ("engine", "engine-cuda") and llm_url is None:  # a remote vLLM may not be up yet
        _warm_up(valley)
        with valley._first_token_work():  # a question usually follows the load at once: the idle clock starts here
            pass
    valley.load_ms = (time.perf_counter() - t0) * 1e3
    return valley


def _use_vllm(valley: Valley, source: Path, *, url: str | None = None, **options) -> None:
    """Replace the loaded LLM backend with vLLM (in process, or the server at `url`) on the LLM folder of
    `source`, the checkpoint the user named (vLLM loads a Hugging Face folder, not an engine graph)."""
    from valley_rt.backends.llm_vllm import RemoteVllmLLM, VllmLLM, llm_folder

    folder = llm_folder(source)
    if url is not None:
        backend = RemoteVllmLLM(url, folder, tokenizer=valley.tokenizer, **options)
    else:
        backend = VllmLLM(folder, tokenizer=valley.tokenizer, **options)
    close = getattr(valley.llm, "close", None)
    if close is not None:
        close()
    valley.llm = backend
    valley._cached_ids, valley._cached_video = [], None


def prompt_flops(cfg: ValleyConfig, tokens: int) -> float:
    """Roughly what prefilling `tokens` positions costs the LLM: 2 FLOP per weight, 12 H^2 weights a layer."""
    return 2 * tokens * cfg.llm.num_layers * 12 * cfg.llm.hidden_size**2


def _warms_with_short_prompt(cfg: ValleyConfig, llm) -> bool:
    """Whether `_warm_up` warms the LLM with a short prompt (OnnxLLM.warm_up, or its background load)
    rather than a whole blank question: when that question's prompt is expensive."""
    tokens = cfg.sampling.num_frames + cfg.num_patches
    return prompt_flops(cfg, tokens) >= WARM_PROMPT_MAX_FLOPS and hasattr(llm, "warm_up")


def _warm_up(valley: Valley) -> None:
    """Pay one-time costs during load instead of in the first answer's latency: PyAV/FFmpeg's decoder
    and pixel-format converter set-up (~50 ms on the first frame a process decodes), PIL's resampling
    set-up, the tokenizer's and ONNX Runtime's first runs (one question about a blank video for small
    models, a short prompt through each LLM session for large ones).

    The whole encode path (decode, resize, vision session) runs on a bundled 7 KB clip only for small
    towers: for the demo on a 2-core CPU, a process's first decode + resize of the demo clip took 10.4 ms vs 4.8 ms
    warm, and the demo's time to first token after load went from 19.9 to 16.2 ms. At real sizes
    (ViT-L/14: ~155 GFLOP a frame) one warm-up frame costs more than it saves."""
    from valley_rt.video import read_video

    clips = sorted((ASSETS / "clips").glob("*.mp4"))
    if clips and valley.cfg.vision.frame_flops < WARM_VISION_MAX_FLOPS:
        valley.encode_video(clips[0])
    elif clips:
        read_video(clips[0], num_frames=1)
    # One real question (tokenizer, splice, prefill at a real prompt length, one decode step) about a
    # video whose visual tokens are all zero, when that prompt is cheap. At real sizes it is not (bench-1b:
    # ~1.2 TFLOP, seconds), and a full prefill warms nothing a short one does not: ORT's first-run costs
    # (kernel and thread-pool set-up) are per session, not per prompt length. Then a short prompt and a
    # decode step (OnnxLLM.warm_up), and the tokenizer on the question, are enough.
    t, n, d = valley.cfg.sampling.num_frames, valley.cfg.num_patches, valley.llm.hidden_size
    if not _warms_with_short_prompt(valley.cfg, valley.llm):
        blank = VideoContext(path="<warm-up>", frames=np.zeros((t, 1, 1, 3), np.uint8), indices=list(range(t)),
                             timestamps=[0.0] * t, visual=(np.zeros((n, d), np.float32), np.zeros((t, d), np.float32)),
                             timings={})
        valley.ask(blank, "What happens in the video?", params=SamplingParams(max_new_tokens=2))
    else:
        # the plain-text tokenizer copies (prompt.plain_copies) are made on first use: here, not in the answer
        for first in (True, False):
            plain_tokens(valley.tokenizer, "What happens in the video?", first=first)
        if getattr(valley.llm, "defer_load", False):
            valley.llm.load_rest_in_background()  # the LLM graphs, off the load path (the decode graph once needed)
        else:
            valley.llm.warm_up()
    valley.reset()


def _load_engine(path: Path, manifest: dict, *, vision: str = "onnx-cpu", threads: int | None,
                 cuda: bool = False, with_llm: bool = True) -> Valley:
    """cuda=True: the LLM's int4 weights are read back from llm.onnx into the CUDA-graphs backend
    (backends/llm_cuda.py); the vision graph stays on ONNX Runtime (an engine holds no torch vision
    weights), on the GPU when the engine has a GPU graph and onnxruntime-gpu is there.
    with_llm=False: no LLM backend (llm None), for a caller that puts vLLM in its place."""
    from valley_rt.backends.llm_onnx import OnnxLLM, background_load_policy

    try:
        cfg = ValleyConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{path / MANIFEST}: bad config ({e})") from None
    files = manifest.get("files", {})
    llm_dir = artifact_path(path, files.get("llm", "llm/"), where="files.llm")
    if not with_llm:
        llm = None
    elif cuda:
        from valley_rt.backends.llm_cuda import CudaLLM

        llm = CudaLLM.from_engine(llm_dir, device="cuda")
        llm.warm_up()  # capture the first decode graph now, not in the first answer
    else:
        deferred = background_load_policy()
        llm = OnnxLLM(llm_dir, threads=threads, defer_load=deferred)
        llm.label = f"onnxruntime-{manifest.get('precision', {}).get('llm', '?')}"  # its name: label + tags
        if deferred and _warms_with_short_prompt(cfg, llm):
            # Opening the LLM graphs (ONNX Runtime repacks every weight) is one worker thread's work; started
            # here, it runs on the core the rest of the load (vision graph, tokenizer, PyAV), one thread,
            # leaves idle. `_warm_up` would start it otherwise.
            llm.load_rest_in_background()
    vision_backend = open_engine_vision(path, manifest, vision, threads=threads)
    tok = open_tokenizer(artifact_path(path, files.get("tokenizer", "tokenizer/"), where="files.tokenizer"))
    valley = Valley(cfg=cfg, tokenizer=tok, vision=vision_backend, llm=llm, source=str(path),
                    kind="engine-cuda" if cuda else "engine")
    if isinstance(llm, OnnxLLM) and prefix_store_enabled():
        valley.prefix_store = PrefixStore(llm.prefix_identity())
    return valley


def _load_reference(path: Path) -> Valley:
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer

    return torch_valley(load_checkpoint(path), load_tokenizer(path), source=str(path), reference=True)


def _load_torch(path: Path, *, device: str, dtype) -> Valley:
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer

    return torch_valley(load_checkpoint(path, dtype=dtype, device=device), load_tokenizer(path), source=str(path))


def torch_valley(model, tokenizer, *, source: str, reference: bool = False) -> Valley:
    """A Valley over an in-memory ValleyModel, on the model's device and in its dtype.

    reference=False: the torch path for GPUs: on CUDA, CudaVision (the tower in CUDA graphs, the fused
    Triton pooling kernel writing the visual span's rows); elsewhere TorchVision with the kernel's torch
    twin. reference=True: what the original
    does (every frame decoded, PIL preprocessing, the reference pooling)."""
    import torch

    from valley_rt.backends.llm_torch import TorchLLM
    from valley_rt.backends.vision import ReferenceVision, TorchVision
    from valley_rt.video import read_video_naive

    weight = model.mm_projector.weight
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight.dtype, str(weight.dtype))
    device = weight.device.type
    llm = TorchLLM(model.llm)
    if reference:
        llm.name = f"transformers-{dtype}" if device == "cpu" else f"transformers-{device}-{dtype}"
        return Valley(cfg=model.cfg, tokenizer=tokenizer, vision=ReferenceVision(model), llm=llm, source=source,
                      kind="reference", read_video=read_video_naive)
    if device == "cuda":  # the tower in CUDA graphs, the pooling kernel writing the visual span's rows
        from valley_rt.backends.vision_cuda import CudaVision

        vision = CudaVision(model)
    else:
        vision = TorchVision(model)
        vision.name = f"torch-{device}-{dtype}+temporal_pool"
    llm.name = f"transformers-{device}-{dtype}"
    return Valley(cfg=model.cfg, tokenizer=tokenizer, vision=vision, llm=llm, source=source, kind="torch")


def demo_engine(exporter: Exporter | None = None) -> Path:
    """The bundled demo engine; if it is missing or no longer loads (e.g. exported by another format
    version), `exporter(bundled demo checkpoint)`, or an EngineError without an exporter."""
    problem = "missing"
    if (DEMO_ENGINE / MANIFEST).is_file():
        try:
            load_manifest(DEMO_ENGINE, verify=False)
            return DEMO_ENGINE
        except EngineError as e:
            problem = str(e)
    if not (DEMO_CHECKPOINT / "valley.json").is_file():
        raise EngineError(f"{DEMO_CHECKPOINT}: the bundled demo model is missing from this install")
    if exporter is None:
        raise EngineError(f"{DEMO_ENGINE}: the bundled demo engine does not load ({problem}); export it with "
                          f"`valley-rt export {DEMO_CHECKPOINT} --out ENGINE --quant rtn4`")
    return Path(exporter(DEMO_CHECKPOINT))


# -- batch ---------------------------------------------------------------------------------------
def ask_batch(valley: Valley, batch_file: str | Path, out_file: str | Path, *, params: SamplingParams,
              system: str | None = None, frames: int | None = None, fps: float | None = None,
              progress: bool = True) -> dict:
    """Answer every record of a JSONL file ({"id", "video", "question"}) into `out_file` (JSONL).

    Each answer (or the record's one-line error, {"id", ..., "error"}) is appended and flushed as soon as
    it exists, so an interrupted run loses at most the record in flight; a rerun skips ids already
    answered and retries the ones that failed. Ids are compared as JSON values (1 and "1" differ) and
    must be unique in the batch. The answers file is locked while a batch writes it (a second batch on
    it stops with an error), and it must be an answers file: a line cut by a killed run is dropped
    before appending, anything else is refused, and so is the batch file itself. Videos are resolved
    relative to the batch file; consecutive records about the same video share one decode + encode.
    """
    batch_file, out_file = Path(batch_file), Path(out_file)
    records = _read_batch(batch_file)
    _check_answers_path(batch_file, out_file)
    try:
        out = open(out_file, "a+b")
    except OSError as e:
        raise ValleyError(f"{out_file}: cannot open the answers file ({e.strerror})") from None
    with out:
        try:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValleyError(f"another batch is writing {out_file}; wait for it or give another --out") from None
        if os.path.samestat(os.fstat(out.fileno()), os.stat(batch_file)):
            raise ValleyError(f"--out {out_file} is the batch file {batch_file}; give another answers file")
        done = _answered_ids(out, out_file)
        todo = [(key, r) for key, r in records if key not in done]
        stats = {"records": len(records), "skipped": len(records) - len(todo), "answered": 0, "failed": 0}
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("answering", total=len(todo))
            ctx = None
            for _, rec in todo:
                result = {"id": rec["id"], "video": rec.get("video"), "question": rec.get("question")}
                try:
                    ctx = _batch_record(valley, rec, result, ctx, batch_file, params=params, system=system,
                                        frames=frames, fps=fps)
                    stats["answered"] += 1
                except (ValleyError, ValueError, OSError) as e:  # this record's input is the problem
                    result["error"] = " ".join(str(e).split()) or type(e).__name__
                    stats["failed"] += 1
                out.write((json.dumps(result) + "\n").encode())
                out.flush()
                bar.advance(task)
    return stats


def check_batch(batch_file: str | Path, out_file: str | Path) -> None:
    """ask_batch's checks of its two paths and of the batch file's lines, without a model (so the CLI
    refuses a bad --batch / --out before spending seconds loading one)."""
    _read_batch(Path(batch_file))
    _check_answers_path(Path(batch_file), Path(out_file))


def _batch_record(valley: Valley, rec: dict, result: dict, ctx: VideoContext | None, batch_file: Path, *,
                  params: SamplingParams, system: str | None, frames: int | None, fps: float | None) -> VideoContext:
    """Answer one batch record into `result`; returns the (possibly reused) encoded video."""
    video, question = rec.get("video"), rec.get("question")
    if not isinstance(video, str) or not isinstance(question, str):
        raise ValleyError("record needs string fields 'video' and 'question'")
    for name, text in (("video", video), ("question", question)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValleyError(f"'{name}' is not valid Unicode text (a lone surrogate escape)") from None
    path = Path(video)
    path = path if path.is_absolute() else batch_file.parent / path
    if ctx is None or ctx.path != str(path):
        ctx = valley.encode_video(path, frames=frames, fps=fps)
    ans = valley.ask(ctx, question, params=params, system=system)
    result.update({"answer": ans.answer, "tokens_in": ans.tokens_in, "tokens_out": ans.tokens_out,
                   "timings": ans.timings})
    return ctx


def _id_key(value) -> str:
    """An id as its JSON text: 1, 1.5, "1" and true are four different ids."""
    return json.dumps(value, sort_keys=True)


def _read_batch(batch_file: Path) -> list[tuple[str, dict]]:
    """[(id key, record)] of a JSONL batch file; ValleyError naming file:line for any bad line."""
    try:
        data = batch_file.read_bytes()
    except IsADirectoryError:
        raise ValleyError(f"{batch_file}: is a folder, not a batch file") from None
    except FileNotFoundError:
        raise ValleyError(f"{batch_file}: no such batch file") from None
    except OSError as e:
        raise ValleyError(f"{batch_file}: cannot read ({e.strerror})") from None
    records, seen = [], {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValleyError(f"{batch_file}:{n}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ValleyError(f"{batch_file}:{n}: not a JSON object ({e})") from None
        rec.setdefault("id", f"line-{n}")
        key = _id_key(rec["id"])
        if key in seen:
            raise ValleyError(f"{batch_file}:{n}: id {key} was already used on line {seen[key]}; ids must be unique")
        seen[key] = n
        records.append((key, rec))
    return records


def _check_answers_path(batch_file: Path, out_file: Path) -> None:
    """Refuse an answers file that is the batch file (any link to it), a folder, or in a missing folder."""
    if out_file.is_dir():
        raise ValleyError(f"--out {out_file}: is a folder; give the answers file's name")
    if not out_file.parent.is_dir():
        raise ValleyError(f"--out {out_file}: folder {out_file.parent} does not exist")
    if out_file.exists() and os.path.samefile(out_file, batch_file):
        raise ValleyError(f"--out {out_file} is the batch file {batch_file}; give another answers file")


def _answered_ids(out, out_file: Path) -> set[str]:
    """Id keys answered in the (locked, opened a+b) answers file. A last line without its newline, cut by a
    killed run, is truncated away so appending keeps the file valid JSONL; a file holding anything but
    answer lines is refused rather than appended to."""
    out.seek(0)
    data = out.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    done = set()
    for n, raw in enumerate(complete, 1):
        try:
            row = json.loads(raw.decode("utf-8")) if raw.strip() else {"id": None}
        except ValueError:
            row = None
        if not isinstance(row, dict) or "id" not in row:
            raise ValleyError(f"--out {out_file}:{n}: not a valley-rt answers line; refusing to append to "
                              f"a file valley-rt did not write")
        if "answer" in row:
            done.add(_id_key(row["id"]))
    if tail:
        if not tail.startswith(b'{"id": '):
            raise ValleyError(f"--out {out_file}: its last line is not a valley-rt answers line; refusing to "
                              f"append to a file valley-rt did not write")
        try:
            row = json.loads(tail.decode("utf-8"))
        except ValueError:
            row = None
        if isinstance(row, dict) and "id" in row:  # whole, only its newline is missing: keep it
            out.write(b"\n")
            if "answer" in row:
                done.add(_id_key(row["id"]))
        else:  # cut: the record that was in flight is redone
            out.truncate(len(data) - len(tail))
    out.seek(0, os.SEEK_END)
    return done
