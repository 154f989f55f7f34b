"""The serving path: video -> frames -> vision engine -> visual tokens -> LLM -> streamed answer.

`load(path)` returns a `Valley` for an engine folder (the fast path: ONNX Runtime vision graph + int4
ONNX LLM), a checkpoint folder (exported once into the user cache, or run on the PyTorch reference with
`reference=True`), or, with no path, the bundled demo model. A video is decoded, preprocessed and encoded
once (`encode_video`); every question about it reuses those visual tokens, and the KV cache of the prompt
prefix they share (system prompt + video) is reused too: a second question or chat turn only prefills
its own text. Nothing here imports transformers on the fast path (the tokenizer is the `tokenizers`
library reading tokenizer.json), which keeps a cold `valley-rt ask` near the cost of importing torch.
"""

from __future__ import annotations

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
import torch

from valley_rt.config import ValleyConfig
from valley_rt.errors import EngineError, ValleyError
from valley_rt.generate import SamplingParams, generate
from valley_rt.prompt import Turn, VIDEO, clean_answer, encode, format_conversation, splice

ASSETS = Path(__file__).resolve().parent / "assets"
WARM_VISION_MAX_FLOPS = 1e9  # warm the vision session at load when one frame costs less than this
DEMO_CHECKPOINT = ASSETS / "demo"
DEMO_ENGINE = ASSETS / "demo_engine"


def cache_dir() -> Path:
    return Path(os.environ.get("VALLEY_RT_CACHE", Path.home() / ".cache" / "valley-rt"))


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


# -- vision backends -------------------------------------------------------------------------------
class ReferenceVision:
    """The PyTorch reference's vision stage on frames preprocessed exactly as the original (PIL)."""

    name = "torch-reference"

    def __init__(self, model):
        self.model = model
        self.cfg = model.cfg

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        from valley_rt.video import preprocess

        weight = self.model.mm_projector.weight
        pixels = preprocess(frames, self.cfg.preprocess)[None].to(weight.device, weight.dtype)
        pooled, frame_tokens = self.model.encode_video(pixels)
        return pooled[0], frame_tokens[0]


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
    visual: tuple[torch.Tensor, torch.Tensor]  # pooled [N, D], frame tokens [T, D]
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

    # -- video ------------------------------------------------------------------------------------
    def encode_video(self, path, *, frames: int | None = None, fps: float | None = None) -> VideoContext:
        """Decode, preprocess and encode a video once. frames: fixed-mode count; fps: fps mode."""
        from valley_rt.video import resize_crop

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
        if isinstance(self.vision, ReferenceVision):
            crops = clip.frames  # the reference preprocesses inside, exactly like the original
        else:
            crops = resize_crop(clip.frames, self.cfg.preprocess)
        t2 = time.perf_counter()
        pooled, frame_tokens = self.vision.encode(crops)
        t3 = time.perf_counter()
        return VideoContext(path=str(path), frames=clip.frames, indices=list(clip.indices),
                            timestamps=list(clip.timestamps), visual=(pooled.float(), frame_tokens.float()),
                            timings={"video_decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3,
                                     # pooling runs inside the vision engine's graph (or kernel)
                                     "vision_ms": (t3 - t2) * 1e3},
                            notes=list(getattr(clip, "notes", [])))

    # -- prompts ----------------------------------------------------------------------------------
    def _embeds(self, ids: list[int], ctx: VideoContext) -> torch.Tensor:
        """Token embeddings with the visual tokens spliced in: [S, H]."""
        table = self.llm.embed(ids)  # [S, H]
        pooled, frames = ctx.visual
        return splice(table[None], torch.tensor([ids], device=table.device), (pooled[None], frames[None]), self.cfg)[0]

    def _answer(self, ctx: VideoContext, turns: list[Turn], question: str, *, params: SamplingParams,
                system: str | None, on_text: Callable[[str], None] | None,
                stop: tuple[str, ...] = ("###",), ignore_eos: bool = False) -> tuple[Answer, list[int]]:
        text, _ = format_conversation(turns, system=self.cfg.system_prompt if system is None else system)
        t0 = time.perf_counter()
        ids, _ = encode(self.tokenizer, text, cfg=self.cfg, num_frames=ctx.num_frames)
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
        ans = Answer(question=question, answer=clean_answer(result.text), tokens_in=len(ids),
                     tokens_prefilled=len(ids) - common, tokens_out=len(answer_ids),
                     stop_reason=result.stop_reason, timings=timings, backends=self.backends)
        return ans, answer_ids

    def ask(self, video, question: str, *, params: SamplingParams | None = None, system: str | None = None,
            on_text: Callable[[str], None] | None = None, frames: int | None = None,
            fps: float | None = None, stop: tuple[str, ...] = ("###",), ignore_eos: bool = False) -> Answer:
        """Answer one question about `video` (a path, or a VideoContext from encode_video).

        stop / ignore_eos: benchmarks generate a fixed number of tokens with stop=() and ignore_eos=True.
        """
        ctx = video if isinstance(video, VideoContext) else self.encode_video(video, frames=frames, fps=fps)
        q = question if VIDEO in question else f"{VIDEO}\n{question}"
        ans, _ = self._answer(ctx, [Turn("human", q)], question, params=params or SamplingParams(max_new_tokens=256),
                              system=system, on_text=on_text, stop=stop, ignore_eos=ignore_eos)
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
    each turn prefills only its new text (never the visual tokens again)."""

    def __init__(self, valley: Valley, ctx: VideoContext, system: str | None):
        self.valley, self.ctx, self.system = valley, ctx, system
        self.turns: list[Turn] = []

    def send(self, question: str, *, params: SamplingParams | None = None,
             on_text: Callable[[str], None] | None = None) -> Answer:
        q = question
        if not self.turns and VIDEO not in q:
            q = f"{VIDEO}\n{q}"
        turns = self.turns + [Turn("human", q)]
        ans, _ = self.valley._answer(self.ctx, turns, question, params=params or SamplingParams(max_new_tokens=256),
                                     system=self.system, on_text=on_text)
        self.turns = turns + [Turn("gpt", ans.answer)]
        return ans


# -- loading ---------------------------------------------------------------------------------------
def load(path: str | Path | None = None, *, reference: bool = False, device: str = "auto", threads: int = 2,
         llm: str = "builtin", llm_url: str | None = None, llm_options: dict | None = None) -> Valley:
    """Load an engine folder, a checkpoint folder, or (path None) the bundled demo model.

    device: "auto" / "cpu" / "cuda". A checkpoint on CUDA runs the torch GPU path (fp16 vision tower with
    the fused Triton temporal-pooling kernel, fp16 LLM); on CPU it is exported once to an engine.
    llm: "builtin" (the engine's / checkpoint's own LLM backend) or "vllm": an in-process vLLM engine on
    the checkpoint's LLM folder, or with llm_url a remote `vllm serve` (backends/llm_vllm.py);
    llm_options go to the vLLM backend (e.g. memory=0.15). The vision side stays as loaded.
    """
    if llm not in ("builtin", "vllm"):
        raise ValleyError(f"--llm must be builtin or vllm, got {llm!r}")
    if llm_url is not None:
        llm = "vllm"
    if device not in ("auto", "cpu", "cuda"):
        raise ValleyError(f"--device must be auto, cpu or cuda, got {device!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValleyError("--device cuda: torch sees no CUDA GPU on this machine")
    t0 = time.perf_counter()
    if path is None:
        path = DEMO_CHECKPOINT if reference or (cuda and device != "cpu") else demo_engine()
    path = Path(path)
    if (path / "manifest.json").is_file():
        if reference:
            raise EngineError(f"{path}: --reference needs a checkpoint folder, this is an engine folder")
        valley = _load_engine(path, threads=threads)
    elif (path / "valley.json").is_file():
        if reference:
            valley = _load_reference(path)
        elif cuda and device != "cpu":
            valley = _load_torch(path, device="cuda", dtype=torch.float16)
        else:
            valley = _load_engine(ensure_engine(path), threads=threads)
    elif not path.exists():
        raise EngineError(f"{path}: no such model folder")
    else:
        raise EngineError(f"{path}: neither an engine folder (manifest.json) nor a valley-rt checkpoint (valley.json)")
    if llm == "vllm":
        _use_vllm(valley, url=llm_url, **(llm_options or {}))
    if valley.kind == "engine":
        _warm_up(valley)
    valley.load_ms = (time.perf_counter() - t0) * 1e3
    return valley


def _use_vllm(valley: Valley, *, url: str | None = None, **options) -> None:
    """Replace the loaded LLM backend with vLLM (in process, or the server at `url`)."""
    from valley_rt.backends.llm_vllm import RemoteVllmLLM, VllmLLM, llm_folder

    folder = llm_folder(valley.source)
    if url is not None:
        backend = RemoteVllmLLM(url, folder, tokenizer=valley.tokenizer, **options)
    else:
        backend = VllmLLM(folder, tokenizer=valley.tokenizer, **options)
    close = getattr(valley.llm, "close", None)
    if close is not None:
        close()
    valley.llm = backend
    valley._cached_ids, valley._cached_video = [], None


def _warm_up(valley: Valley) -> None:
    """Pay one-time costs during load instead of in the first answer's latency: PyAV/FFmpeg's decoder
    and pixel-format converter set-up (~50 ms on the first frame a process decodes), PIL's resampling
    set-up, the tokenizer's and ONNX Runtime's first runs (one question about a blank video).

    The whole encode path (decode, resize, vision session) runs on a bundled 7 KB clip only for small
    towers: measured here, a process's first decode + resize of the demo clip took 10.4 ms vs 4.8 ms
    warm, and the demo's time to first token after load went from 19.9 to 16.2 ms. At real sizes
    (ViT-L/14: ~155 GFLOP a frame) one warm-up frame costs more than it saves."""
    from valley_rt.video import read_video

    clips = sorted((ASSETS / "clips").glob("*.mp4"))
    if clips and valley.cfg.vision.frame_flops < WARM_VISION_MAX_FLOPS:
        valley.encode_video(clips[0])
    elif clips:
        read_video(clips[0], num_frames=1)
    # One real question (tokenizer, splice, prefill at a real prompt length, one decode step) about a
    # video whose visual tokens are all zero.
    t, n, d = valley.cfg.sampling.num_frames, valley.cfg.num_patches, valley.llm.hidden_size
    blank = VideoContext(path="<warm-up>", frames=np.zeros((t, 1, 1, 3), np.uint8), indices=list(range(t)),
                         timestamps=[0.0] * t, visual=(torch.zeros(n, d), torch.zeros(t, d)), timings={})
    valley.ask(blank, "What happens in the video?", params=SamplingParams(max_new_tokens=2))
    valley.reset()


def _load_engine(path: Path, *, threads: int) -> Valley:
    from valley_rt.backends.llm_onnx import OnnxLLM
    from valley_rt.backends.vision import OnnxVision
    from valley_rt.export.manifest import load_manifest

    manifest = load_manifest(path, verify=True)
    try:
        cfg = ValleyConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{path / 'manifest.json'}: bad config ({e})") from None
    files = manifest.get("files", {})
    vision = OnnxVision.from_engine(path, manifest=manifest, threads=threads)
    vision.name = f"onnxruntime-{manifest.get('precision', {}).get('vision', '?')}"
    llm = OnnxLLM(path / files.get("llm", "llm/").rstrip("/"), threads=threads)
    llm.name = f"onnxruntime-{manifest.get('precision', {}).get('llm', '?')}"
    tok = open_tokenizer(path / files.get("tokenizer", "tokenizer/"))
    return Valley(cfg=cfg, tokenizer=tok, vision=vision, llm=llm, source=str(path), kind="engine")


def _load_reference(path: Path) -> Valley:
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer

    return torch_valley(load_checkpoint(path), load_tokenizer(path), source=str(path), reference=True)


def _load_torch(path: Path, *, device: str, dtype: torch.dtype) -> Valley:
    from valley_rt.checkpoint import load_checkpoint, load_tokenizer

    return torch_valley(load_checkpoint(path, dtype=dtype, device=device), load_tokenizer(path), source=str(path))


def torch_valley(model, tokenizer, *, source: str, reference: bool = False) -> Valley:
    """A Valley over an in-memory ValleyModel, on the model's device and in its dtype.

    reference=False: the torch path for GPUs, temporal pooling through valley_rt.kernels.temporal_pool
    (the fused Triton kernel on CUDA, its torch reference elsewhere). reference=True: what the original
    does (every frame decoded, PIL preprocessing, the reference pooling)."""
    from valley_rt.backends.llm_torch import TorchLLM
    from valley_rt.backends.vision import TorchVision
    from valley_rt.video import read_video_naive

    weight = model.mm_projector.weight
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight.dtype, str(weight.dtype))
    device = weight.device.type
    llm = TorchLLM(model.llm)
    if reference:
        llm.name = f"transformers-{dtype}" if device == "cpu" else f"transformers-{device}-{dtype}"
        return Valley(cfg=model.cfg, tokenizer=tokenizer, vision=ReferenceVision(model), llm=llm, source=source,
                      kind="reference", read_video=read_video_naive)
    vision = TorchVision(model)
    vision.name = f"torch-{device}-{dtype}+temporal_pool"
    llm.name = f"transformers-{device}-{dtype}"
    return Valley(cfg=model.cfg, tokenizer=tokenizer, vision=vision, llm=llm, source=source, kind="torch")


def demo_engine() -> Path:
    """The bundled demo engine; if it is missing or no longer loads (e.g. exported by another format
    version), an engine exported from the bundled demo checkpoint into the user cache."""
    from valley_rt.export.manifest import load_manifest

    if (DEMO_ENGINE / "manifest.json").is_file():
        try:
            load_manifest(DEMO_ENGINE, verify=False)
            return DEMO_ENGINE
        except EngineError:
            pass
    if not (DEMO_CHECKPOINT / "valley.json").is_file():
        raise EngineError(f"{DEMO_CHECKPOINT}: the bundled demo model is missing from this install")
    return ensure_engine(DEMO_CHECKPOINT)


def ensure_engine(ckpt: Path) -> Path:
    """Export `ckpt` once into the user cache (int4 round-to-nearest LLM, default vision precision).

    Two processes asking at once are serialized by a lock file; the second finds the first's engine.
    The export itself is atomic (built aside, renamed into place), so a killed export leaves nothing.
    """
    from valley_rt.checkpoint import read_config
    from valley_rt.export.engine import export_engine
    from valley_rt.export.manifest import hash_folder, load_manifest

    key = hash_folder(ckpt)[:16]
    root = cache_dir() / "engines"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{Path(ckpt).name}-{key}"
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            load_manifest(out, verify=False)
            return out
        except EngineError:
            pass
        export_engine(ckpt, out, quant="rtn4", group_size=_group_size(read_config(ckpt)), force=True)
    return out


def _group_size(cfg: ValleyConfig, largest: int = 128) -> int:
    """The largest power-of-two int4 group size (<= 128) that divides every linear's input width."""
    size = largest
    while size > 8 and (cfg.llm.hidden_size % size or cfg.llm.intermediate_size % size):
        size //= 2
    return size


# -- batch -----------------------------------------------------------------------------------------
def ask_batch(valley: Valley, batch_file: str | Path, out_file: str | Path, *, params: SamplingParams,
              system: str | None = None, frames: int | None = None, fps: float | None = None,
              progress: bool = True) -> dict:
    """Answer every record of a JSONL file ({"id", "video", "question"}) into `out_file` (JSONL).

    Each answer (or the record's one-line error) is appended and flushed as soon as it exists, so an
    interrupted run loses at most the record in flight; a rerun skips ids already answered and retries
    the ones that failed. Videos are resolved relative to the batch file; consecutive records about
    the same video share one decode + encode.
    """
    batch_file, out_file = Path(batch_file), Path(out_file)
    if not batch_file.is_file():
        raise ValleyError(f"{batch_file}: no such batch file")
    records = []
    for n, line in enumerate(batch_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ValleyError(f"{batch_file}:{n}: not a JSON object ({e})") from None
        rec.setdefault("id", f"line-{n}")
        records.append(rec)
    done = set()
    if out_file.is_file():
        for line in out_file.read_text().splitlines():
            try:
                prev = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption: that record is simply redone
            if isinstance(prev, dict) and "answer" in prev:
                done.add(str(prev.get("id")))
    todo = [r for r in records if str(r["id"]) not in done]
    stats = {"records": len(records), "skipped": len(records) - len(todo), "answered": 0, "failed": 0}
    ctx = None
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar, open(out_file, "a") as out:
        task = bar.add_task("answering", total=len(todo))
        for rec in todo:
            result = {"id": rec["id"], "video": rec.get("video"), "question": rec.get("question")}
            try:
                if not isinstance(rec.get("video"), str) or not isinstance(rec.get("question"), str):
                    raise ValleyError("record needs string fields 'video' and 'question'")
                video = Path(rec["video"])
                video = video if video.is_absolute() else batch_file.parent / video
                if ctx is None or ctx.path != str(video):
                    ctx = valley.encode_video(video, frames=frames, fps=fps)
                ans = valley.ask(ctx, rec["question"], params=params, system=system)
                result.update({"answer": ans.answer, "tokens_in": ans.tokens_in, "tokens_out": ans.tokens_out,
                               "timings": ans.timings})
                stats["answered"] += 1
            except ValleyError as e:
                result["error"] = str(e)
                stats["failed"] += 1
            out.write(json.dumps(result) + "\n")
            out.flush()
            bar.advance(task)
    return stats
