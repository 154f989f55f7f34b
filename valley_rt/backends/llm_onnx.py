"""The fast LLM backend: the whole LLaMA decoder as one ONNX Runtime session (int4 MatMulNBits).

The graph comes from `valley_rt.export.llm_onnx`. The KV cache is one buffer per layer and per K/V
(KV_START_SLOTS rows at first, doubled when a prompt needs more, up to max_context), bound through
IOBinding as both GroupQueryAttention's past input and its present output (the op writes the new
rows in place), so a decode step copies nothing but the
[1, 1, H] embedding in and the [V] logits out. `truncate` is free: the cache length is just the
`seqlens_k` / `total_sequence_length` we pass next time, rows past it are never read. Embeddings
and logits are NumPy float32 arrays (no torch on this path).

Prompts and decode steps want different kernels. A decode step multiplies one row by every weight:
memory bound, so int4 weights (MatMulNBits) are fastest. A prompt of hundreds of tokens is compute
bound, and MatMulNBits' int8 compute path stays on AVX-512 dot products while the CPU may have int8
matrix tiles (AMX). So an engine may carry a second graph, `llm_prefill.onnx`: the same ops, inputs
and KV cache, with the decoder linears as W8A8 int8 GEMMs (MLAS QGEMM: AMX-INT8 where present).
`prefill_policy` decides when it runs; both sessions bind the same cache buffers, so decoding
continues from the prompt graph's cache.

Opening the two graphs is most of an engine's load time: ONNX Runtime repacks every weight for its
kernels (int4 blocks for MatMulNBits, int8 panels for the GEMM) and hashes the packed bytes, on one
thread: ~1.6 GB at 1.1B (docs/cpu_latency.md). With `defer_load=True` neither is opened in
`__init__`; `load_rest_in_background()` opens them on a worker thread while the caller reads and
encodes a video. The prompt graph opens first, and a first prompt waits only for it. The int4 decode
graph is opened once the first decode step needs it: opened earlier, its repacking shares the cores
with the vision encode and the prompt, which the first token waits for, while the decode graph is
needed only after it. (Without a prompt graph the int4 graph serves the prompt too, and opens at once,
then is warmed on a private scratch cache.) The CPU work is the same; it leaves the load path, and
the part the first token does not need comes after it.

On CPUs with AVX-512 VNNI, what the int4 graph computes runs in native code instead
(`native_decode.py`: the same computation over the int4 graph's own weights, memory-mapped; decode
steps at about the CPU's read rate); the int4 graph is then not opened at all. Where this process may
use AMX-INT8 tiles, the native code also runs prompts on them, faster than the W8A8 graph's QGEMM
(docs/cpu_latency.md), and "auto" then leaves the prompt graph closed (`native_prompt_policy`): no
repacking of its weights in the load, ~1 GB less resident at 1.1B. Beside a prompt graph, appends of
more than NATIVE_MAX_APPEND tokens go to the prompt graph. `VALLEY_RT_DECODE` chooses (auto, native,
onnxruntime).

Attention runs in ONNX Runtime's CPU GroupQueryAttention, which has two kernels: a tiled online-softmax
("flash") one, ORT's default, and one that materializes each head's [S, T] scores in fp32 and runs the
two products on MLAS' SGEMM. `gqa_kernel_policy` picks the second by default: it ran a 554-token
prompt's attention 2x faster on an AMX Xeon, and decode steps about as fast (benchmarks/bench_gqa.py,
docs/cpu_latency.md). Its scratch grows with S x T, so a long append runs in chunks whose scores fit
ATTN_SCRATCH_BYTES.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from valley_rt.backends.ort_session import llm_session_options as session_options
from valley_rt.engine_format import LLM_EMBED_FILE, LLM_FORMAT_VERSION, LLM_META_FILE, LLM_MODEL_FILE
from valley_rt.errors import EngineError


KV_START_SLOTS = 512  # KV cache rows allocated at load; grown (doubled) on demand up to max_context
PREFILL_MIN_TOKENS = 64  # shorter appends (chat turns, decode) stay on the int4 graph (or the native step)
# With the native decoder (native_decode.py) the int4 graph is not opened. Beside a prompt graph, appends
# of up to NATIVE_MAX_APPEND tokens run natively and longer ones on the prompt graph; without one, all.
NATIVE_MAX_APPEND = 3
NATIVE_APPEND_CHUNK = 512  # tokens per native run of a long append, at most (its scratch grows with them)
PREFILL_ENV = "VALLEY_RT_PREFILL"  # "auto" (default), "int8" (always when the engine has it), "int4" (never)
# "background" (default): the LLM graphs open on a worker thread, the decode graph once a decode step needs it
# when the engine has a prompt graph; "background-both": both at once; "eager": both before `load` returns
LOAD_ENV = "VALLEY_RT_LLM_LOAD"
LOAD_CHOICES = ("background", "background-both", "eager")
HOLD_POLL_S = 0.1  # how often a worker holding the decode graph looks at the caller and the main thread
IDLE_S = 0.25  # ... and how long the caller must have been out of first-token work for it to go on
GQA_ENV = "VALLEY_RT_GQA"  # "materialized" (default) or "flash": which GroupQueryAttention kernel ORT builds
ORT_GQA_FLASH_OFF = "ORT_GQA_DISABLE_FLASH_ATTENTION"  # read by ORT when it builds each GQA kernel
ATTN_SCRATCH_BYTES = 256 * 2**20  # the materialized kernel's fp32 scores [heads, S, T] for one run, at most


def cpu_has_int8_gemm() -> bool:
    """Int8 dot-product units MLAS' QGEMM runs the prompt graph on, as Linux reports them: AMX-INT8
    tiles (where this process may use them) or AVX512-VNNI."""
    from valley_rt.cpu import cpu_flags

    flags = cpu_flags()
    return "amx_int8" in flags or "avx512_vnni" in flags


PREFILL_MEMORY_SHARE = 0.25  # "auto" loads the prompt graph only when its weights fit this share of RAM


def total_memory_bytes() -> int | None:
    """MemTotal from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def prefill_policy(graph_bytes: int = 0) -> bool:
    """Whether to load and use an engine's W8A8 prompt graph. "auto": on CPUs with AMX-INT8 or
    AVX512-VNNI (`cpu_has_int8_gemm`), where the QGEMM measured ~10x (AMX) and 2.5x (VNNI, AMX denied)
    MatMulNBits' prompt rate (docs/cpu_latency.md), and only when its int8 weights (graph_bytes, held
    resident beside the int4 ones) fit PREFILL_MEMORY_SHARE of the machine's RAM: a 7B's 6.6 GB prompt
    graph would more than double the int4 engine's memory (docs/real_size.md). Elsewhere (AVX2, with
    or without AVX-VNNI: not measured) the second graph is not loaded. "int8" loads it whatever its
    size; "int4" never does. Where the native decoder runs prompts on AMX tiles, "auto" then leaves it
    closed after all (`native_prompt_policy`)."""
    choice = os.environ.get(PREFILL_ENV, "auto")
    if choice not in ("auto", "int8", "int4"):
        raise EngineError(f"{PREFILL_ENV}={choice!r}: expected auto, int8 or int4")
    if choice != "auto":
        return choice == "int8"
    total = total_memory_bytes()
    fits = total is None or graph_bytes <= PREFILL_MEMORY_SHARE * total
    return cpu_has_int8_gemm() and fits


def native_prompt_policy() -> bool:
    """Whether prompts may go to the native decoder's AMX-INT8 kernel instead of the W8A8 prompt graph:
    $VALLEY_RT_PREFILL is "auto" and this process may use the tiles. (Whether the native decoder runs
    this engine's graph, and was built with the tiles, is known once it opens.)"""
    from valley_rt.cpu import cpu_flags

    return os.environ.get(PREFILL_ENV, "auto") == "auto" and "amx_int8" in cpu_flags()


def near_equal_runs(s: int, most: int) -> list[int]:
    """s tokens as the fewest near-equal runs of at most `most` each."""
    n = -(-s // most)
    return [s // n + (i < s % n) for i in range(n)]


def native_chunks(s: int) -> list[int]:
    """A native append of s tokens as runs of at most NATIVE_APPEND_CHUNK (its scratch grows with them)."""
    return near_equal_runs(s, NATIVE_APPEND_CHUNK)


def _graph_bytes(model_file: Path) -> int:
    """A graph's size on disk with its external data file (`<name>.data`)."""
    data = model_file.with_name(model_file.name + ".data")
    return sum(f.stat().st_size for f in (model_file, data) if f.is_file())


def gqa_kernel_policy() -> str:
    """Which CPU GroupQueryAttention kernel the LLM graphs are built with: "materialized" (default) or
    "flash" ($VALLEY_RT_GQA). Both are exact fp32 attention and differ only in summation order. An
    ORT_GQA_DISABLE_FLASH_ATTENTION set by the user is left to ONNX Runtime and decides instead."""
    if ORT_GQA_FLASH_OFF in os.environ:
        return "flash" if os.environ[ORT_GQA_FLASH_OFF].strip().lower() in ("0", "false", "") else "materialized"
    choice = os.environ.get(GQA_ENV, "materialized")
    if choice not in ("materialized", "flash"):
        raise EngineError(f"{GQA_ENV}={choice!r}: expected materialized or flash")
    return choice


_ENV_LOCK = threading.Lock()


@contextmanager
def _gqa_kernel(choice: str) -> Iterator[None]:
    """ORT reads ORT_GQA_DISABLE_FLASH_ATTENTION when it builds a GroupQueryAttention kernel, i.e. while
    it creates a session: set it for that session's creation only (unless the user set it)."""
    if ORT_GQA_FLASH_OFF in os.environ or choice == "flash":
        yield
        return
    with _ENV_LOCK:
        os.environ[ORT_GQA_FLASH_OFF] = "1"
        try:
            yield
        finally:
            os.environ.pop(ORT_GQA_FLASH_OFF, None)


def append_chunks(s: int, past: int, heads: int, kernel: str, scratch: int = ATTN_SCRATCH_BYTES) -> list[int]:
    """Split an append of s tokens after `past` cached ones into runs whose materialized attention scores
    (heads x chunk x total, fp32) fit `scratch` bytes, in near-equal chunks; one run for the flash kernel."""
    if kernel == "flash" or s <= 1:
        return [s]
    rows = max(1, scratch // (4 * heads * (past + s)))  # query rows per run at the final total length
    return near_equal_runs(s, rows)


def _native_wanted() -> tuple[bool, str]:
    """Whether to try the native decoder (VALLEY_RT_DECODE) in place of the int4 graph, and if not,
    why. "auto": on CPUs it runs on (whether it also runs on this engine's graph is known when it
    opens); "native": the same, but an error where it cannot run; "onnxruntime": never."""
    from valley_rt.backends.native_decode import cpu_reason, decode_choice

    choice = decode_choice()
    if choice == "onnxruntime":
        return False, "VALLEY_RT_DECODE=onnxruntime"
    why = cpu_reason()
    if why:
        if choice == "native":
            raise EngineError(f"VALLEY_RT_DECODE=native, but {why}")
        return False, why
    return True, ""


def _load_choice() -> str:
    choice = os.environ.get(LOAD_ENV, "background")
    if choice not in LOAD_CHOICES:
        raise EngineError(f"{LOAD_ENV}={choice!r}: expected {', '.join(LOAD_CHOICES[:-1])} or {LOAD_CHOICES[-1]}")
    return choice


def background_load_policy() -> bool:
    """Whether the runtime defers the LLM graphs and the decode warm-up to a worker thread
    (`OnnxLLM.load_rest_in_background`) instead of doing them before `load` returns."""
    return _load_choice() != "eager"


class OnnxLLM:
    """One batch-1 KV-cached session over an exported `llm.onnx` (implements generate.LLMBackend)."""

    def __init__(self, path, *, threads: int | None = None, spinning: bool = True, max_context: int | None = None,
                 defer_load: bool = False):
        """defer_load: open neither graph's session here (the int4 decode graph, the W8A8 prompt graph)
        but in `load_rest_in_background` or the first run that needs them; the caller then also warms
        up in the background."""
        import onnxruntime  # noqa: F401  (a missing onnxruntime fails here, at load, not in the worker thread)

        t0 = time.perf_counter()
        path = Path(path)
        folder = path.parent if path.suffix == ".onnx" else path
        model_file = path if path.suffix == ".onnx" else folder / LLM_MODEL_FILE
        meta_file = folder / LLM_META_FILE
        for f in (model_file, meta_file, folder / LLM_EMBED_FILE):
            if not f.is_file():
                raise EngineError(f"{f}: expected an exported LLM file (valley_rt.export.llm_onnx), not found")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format_version") != LLM_FORMAT_VERSION:
            raise EngineError(f"{meta_file}: expected LLM format_version {LLM_FORMAT_VERSION}, got "
                              f"{self.meta.get('format_version')}; re-export the engine")
        shape = self.meta["shape"]
        self.hidden_size = int(shape["hidden_size"])
        self.vocab_size = int(shape["vocab_size"])
        self.num_layers = int(shape["num_layers"])
        self.max_context = int(min(max_context or shape["max_position_embeddings"], shape["max_position_embeddings"]))
        quant = self.meta["quant"]["quant"]
        self.label = f"onnx-{'fp32' if quant == 'none' else 'int4'}"  # `name` = label + `tags`
        self.weight_bytes_per_token = int(self.meta["weight_bytes_per_token"])

        self.embed_table = np.load(folder / LLM_EMBED_FILE, mmap_mode="r")  # [V, H], rows read on demand
        self._kv_heads, self._head_dim = int(shape["num_kv_heads"]), int(self.meta["cache_head_dim"])
        self.kv_bytes_per_token = 2 * self.num_layers * self._kv_heads * self._head_dim * 4  # K and V, fp32
        self._cache = self._new_cache(min(KV_START_SLOTS, self.max_context))
        self._logits = np.zeros((1, 1, self.vocab_size), np.float32)
        self._model_file = model_file
        self._session_options = (threads, spinning)
        self._num_heads = int(shape["num_heads"])
        self.gqa_kernel = gqa_kernel_policy()
        self.session = None  # the int4 graph (every decode step, short appends), once opened
        self.prefill_session = None  # the W8A8 prompt graph, once opened
        self._prefill_file = None  # ... when the engine has one and the policy says so
        prefill = self.meta.get("prefill") or {}
        if prefill.get("file") and path.suffix != ".onnx" and prefill_policy(_graph_bytes(folder / prefill["file"])):
            self._prefill_file = folder / prefill["file"]
            if not self._prefill_file.is_file():
                raise EngineError(f"{self._prefill_file}: the prompt graph named in {meta_file} is missing; "
                                  "re-export the engine")
        # What the int4 graph would run: ORT's session, or native_decode where the CPU allows (chosen now,
        # opened in its place; a native decoder that cannot run this graph falls back to the session).
        self._native = None
        self._want_native, self.native_reason = _native_wanted()
        if self._prefill_file is not None and self._want_native and native_prompt_policy():
            self._open_native()  # now, not deferred: it decides whether the prompt graph is needed at all
            if self._native is not None and self._native.prompt_kernel == "amx":
                self._prefill_file = None
        self._loader: _Loader | None = None  # the worker finishing the load, while it runs
        self._cache_lock = threading.Lock()  # binding a session vs. growing the cache (loader vs caller)
        self.background_load_s = 0.0  # the worker's own time, once joined
        self.load_wait_s = 0.0  # time runs spent waiting for the worker or opening deferred sessions
        self.prompt_wait_s = 0.0  # ... of it, prompts (appends of more than one token) waiting
        self._busy, self._busy_lock, self._last_busy = 0, threading.Lock(), time.monotonic()  # first_token_work
        self.defer_load = defer_load
        if not defer_load:
            self._open_sessions()
        self._pos = 0
        self.load_s = time.perf_counter() - t0

    @property
    def tags(self) -> list[str]:
        """What runs: "w8a8-prefill" (the prompt graph), "native-decode", "amx-prompt" (prompts natively
        on the AMX tiles: the native decoder's kernel, and no prompt graph)."""
        tags = ["w8a8-prefill"] if self._prefill_file is not None else []
        if self._native is not None:
            tags.append("native-decode")
            if self._native.prompt_kernel == "amx" and self._prefill_file is None:
                tags.append("amx-prompt")
        return tags

    @property
    def name(self) -> str:
        """The label, then the tags: e.g. onnxruntime-rtn4-g128+native-decode+amx-prompt."""
        return "+".join([self.label, *self.tags])

    @property
    def decode_ready(self) -> bool:
        """Whether the decode step is open: ORT's int4 graph or the native decoder."""
        return self.session is not None or self._native is not None

    @property
    def decode_backend(self) -> str:
        """"native" (native_decode.py), "onnxruntime" (the int4 graph), or "pending" before the load."""
        return "native" if self._native is not None else ("onnxruntime" if self.session is not None else "pending")

    @property
    def has_prefill_graph(self) -> bool:
        """Whether prompts of PREFILL_MIN_TOKENS or more run on the W8A8 graph (opened or deferred)."""
        return self._prefill_file is not None

    def _open_sessions(self, which: tuple[str, ...] = ("prefill_session", "session")) -> None:
        """Create whichever of the two sessions named in `which` is not open yet (the prompt graph
        first: a prompt needs it before any decode step needs the int4 graph), each bound to the shared
        KV cache. The binding is made under the cache lock: the caller's thread may grow the cache
        while this one (the background loader) opens a session."""
        import onnxruntime as ort

        files = {"session": self._model_file, "prefill_session": self._prefill_file}
        for attr in which:
            file = files[attr]
            if attr == "session" and self._want_native:
                if self._native is None:
                    self._open_native()
                if self._native is not None:
                    continue
            if file is None or getattr(self, attr) is not None:
                continue
            try:
                with _gqa_kernel(self.gqa_kernel):
                    session = ort.InferenceSession(str(file), sess_options=session_options(*self._session_options),
                                                   providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT's own exception types: a damaged or foreign graph file
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EngineError(f"{file}: ONNX Runtime cannot open it ({first_line}); re-export the engine") from None
            with self._cache_lock:
                setattr(self, "_binding" if attr == "session" else "_prefill_binding", self._bind_static(ort, session))
                setattr(self, attr, session)

    def _open_native(self) -> None:
        """Open the native decoder over the decode graph's weights; where it cannot run, say why in
        native_reason and keep ORT's graph (VALLEY_RT_DECODE=native makes that an error instead)."""
        from valley_rt.backends.native_decode import NativeDecoder, decode_choice

        native, why = NativeDecoder.open(self._model_file, self.meta, self._session_options[0])
        if native is None:
            if decode_choice() == "native":
                raise EngineError(f"{self._model_file}: VALLEY_RT_DECODE=native, but {why}")
            self._want_native = False
            self.native_reason = why
            return
        self._native = native

    def load_rest_in_background(self, warm: bool = True) -> None:
        """Open the deferred sessions on a worker thread, the prompt graph first; the next run, fork or
        warm-up waits for what it needs, and re-raises the worker's error.

        With a prompt graph (and LOAD_ENV "background") the worker opens the int4 decode graph only
        once something needs it (`wait_loaded`: the first decode step, a short append, a fork) or the
        caller is idle (`caller_idle`): a video's encode and the first prompt then have the cores to
        themselves, and the first token comes that much sooner; the decode graph is opened right after
        it. Otherwise (no prompt graph, which leaves the decode graph to serve the prompt, or
        "background-both") the worker opens both at once. It warms the decode graph when `warm` (see
        `warm_up`) unless a decode step is already waiting for it."""
        if self._loader is None:
            hold = self._prefill_file is not None and _load_choice() == "background"
            self._loader = _Loader(self, warm, hold)

    @contextmanager
    def first_token_work(self) -> Iterator[None]:
        """Mark caller work that a first token waits for (a video's encode, an answer). A worker holding
        the decode graph goes on to open it only once the caller has been out of such work for IDLE_S
        (e.g. a chat waiting for its first question), or when a decode step needs it."""
        with self._busy_lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1
                self._last_busy = time.monotonic()

    def caller_idle(self) -> bool:
        """No first-token work now, nor in the last IDLE_S."""
        with self._busy_lock:
            return self._busy == 0 and time.monotonic() - self._last_busy >= IDLE_S

    def wait_loaded(self) -> None:
        """Block until the background load is done (re-raising its error as an EngineError); open still
        deferred sessions here when no worker was started."""
        t0 = time.perf_counter()
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.decode_graph_needed.set()
            loader.join()
            self.background_load_s = loader.seconds
        self._open_sessions()
        self.load_wait_s += time.perf_counter() - t0

    def _wait_prompt_graph(self) -> None:
        """Block until the prompt graph is open (the loader opens it first; the int4 graph may still be
        opening, or wait to be needed), or the whole load when the loader failed."""
        t0 = time.perf_counter()
        loader = self._loader
        if loader is None or self.prefill_session is not None:
            if self.prefill_session is None:
                self._open_sessions(("prefill_session",))
                self.load_wait_s += time.perf_counter() - t0
            return
        loader.prompt_graph_ready.wait()
        self.load_wait_s += time.perf_counter() - t0
        if loader.error is not None or self.prefill_session is None:
            self.wait_loaded()

    def _new_cache(self, slots: int) -> list[np.ndarray]:
        return [np.zeros((1, self._kv_heads, slots, self._head_dim), np.float32) for _ in range(2 * self.num_layers)]

    @property
    def cache_slots(self) -> int:
        """Token rows the KV cache holds now (it grows towards max_context as prompts need)."""
        return self._cache[0].shape[2]

    def _ensure_slots(self, total: int) -> None:
        """Grow the KV cache to hold `total` tokens: double it (at least), copy the rows in use, rebind.
        GroupQueryAttention writes all of its present buffer's rows, so a max_context cache allocated up
        front would be resident in full (4 GB at 7B for 4096 tokens) whatever the prompt's length."""
        if total <= self.cache_slots:
            return
        import onnxruntime as ort

        slots = min(self.max_context, max(total, 2 * self.cache_slots))
        grown = self._new_cache(slots)
        for new, old in zip(grown, self._cache):
            new[:, :, :self._pos] = old[:, :, :self._pos]
        with self._cache_lock:  # a session the loader opens now binds the grown cache
            self._cache = grown
            if self.session is not None:  # a session still deferred binds the cache when it opens
                self._binding = self._bind_static(ort, self.session)
            if self.prefill_session is not None:
                self._prefill_binding = self._bind_static(ort, self.prefill_session)

    def _bind_static(self, ort, session, cache: list[np.ndarray] | None = None, logits: np.ndarray | None = None):
        """Bind what never changes: each layer's K/V buffer (of `cache`, default the LLM's own) as past
        input AND present output, and the logits buffer."""
        cache = self._cache if cache is None else cache
        b = session.io_binding()
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                ov = ort.OrtValue.ortvalue_from_numpy(cache[2 * i + j])  # shares the numpy memory
                b.bind_ortvalue_input(f"past_key_values.{i}.{kind}", ov)
                b.bind_ortvalue_output(f"present.{i}.{kind}", ov)
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits if logits is None else logits))
        return b

    # ------------------------------------------------------------------------------ LLMBackend

    @property
    def position(self) -> int:
        return self._pos

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        return np.asarray(self.embed_table[ids], dtype=np.float32)  # [S, H]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """x: [1, S, H] float32 appended after the cache -> last-position logits [V]. A long append runs
        in chunks (append_chunks), each on the graph the whole append's length chose."""
        s = x.shape[1]
        native = self._want_native  # the native decoder in place of the int4 graph (unless it cannot open)
        prompt_graph = self._prefill_file is not None and (s >= PREFILL_MIN_TOKENS or (native and s > NATIVE_MAX_APPEND))
        waited = self.load_wait_s
        if prompt_graph:
            self._wait_prompt_graph()  # the decode step may go on opening meanwhile
        elif self._loader is not None or not self.decode_ready:
            self.wait_loaded()
        if s > 1:
            self.prompt_wait_s += self.load_wait_s - waited
        total = self._pos + s
        if total > self.max_context:
            raise ValueError(f"{total} tokens exceed the KV cache of {self.max_context}")
        self._ensure_slots(total)
        if not prompt_graph and self._native is not None:
            start = 0
            for n in native_chunks(s):  # bounded scratch memory per run
                self._native.append(x[0, start:start + n], self._cache, self._pos + start, self._logits[0, 0])
                start += n
            self._pos = total
            return self._logits[0, 0].copy()
        session, binding = (self.prefill_session, self._prefill_binding) if prompt_graph else (self.session, self._binding)
        done = 0
        for n in append_chunks(s, self._pos, self._num_heads, self.gqa_kernel):
            self._run_graph(session, binding, x[:, done:done + n], self._pos + done + n)
            done += n
        self._pos = total
        return self._logits[0, 0].copy()  # [V]; the buffer is reused next step

    def _run_graph(self, session, binding, x: np.ndarray, total: int) -> None:
        """Append x [1, S, H] to a cache of total - S rows; the logits land in self._logits."""
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(x, dtype=np.float32))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        session.run_with_iobinding(binding)

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        # embeds: [S, H] -> [1, S, H]
        return self._run(np.asarray(embeds, dtype=np.float32)[None])

    def decode(self, token_id: int) -> np.ndarray:
        return self._run(np.asarray(self.embed_table[[token_id]], dtype=np.float32)[None])  # [1, 1, H]

    def warm_up(self) -> None:
        """Run the decode graph once on a short prompt and one step, then empty the cache: ORT's first-run
        set-up is paid here instead of in the first answer. The prompt graph is not run: its first long
        prefill costs no more than later ones, while warming it would cost a whole prompt's compute
        (docs/cpu_latency.md)."""
        self.wait_loaded()
        self._warm_decode_graph()
        self.reset()

    def _warm_decode_graph(self) -> None:
        """4 prompt tokens then 1 decode step through the int4 graph, into a private 8-row cache and
        logits buffer: the background loader runs this while the caller may be prefilling a prompt
        into the LLM's own cache through the prompt graph."""
        import onnxruntime as ort

        if self._native is not None:  # its pages read in, and one step's first-run costs paid
            self._native.warm()
            self._native.step(np.asarray(self.embed_table[1], np.float32), self._new_cache(8), 0,
                              np.zeros(self.vocab_size, np.float32))
            if self.session is None:
                return
        binding = self._bind_static(ort, self.session, cache=self._new_cache(8), logits=np.zeros_like(self._logits))
        x = np.asarray(self.embed_table[[1] * 4], dtype=np.float32)[None]  # [1, 4, H]
        self._run_graph(self.session, binding, x, 4)
        self._run_graph(self.session, binding, x[:, :1], 5)

    # ------------------------------------------------------------------ prefix rows (backends/prefix_kv.py)

    def prefix_identity(self) -> list:
        """What a stored prefix's rows depend on besides its tokens: the graphs that compute them (by
        stat: any rewrite changes ctime), ONNX Runtime's version and the CPU's flags (kernels differ)."""
        import onnxruntime as ort

        from valley_rt.backends.native_decode import source_key as native_source_key
        from valley_rt.cpu import cpu_flags

        stats = []
        for f in (self._model_file, self._prefill_file):
            if f is not None:
                st = f.stat()
                stats.append([str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
        return ["onnx-llm", LLM_FORMAT_VERSION, stats, ort.__version__, sorted(cpu_flags()), PREFILL_MIN_TOKENS,
                self.gqa_kernel] + ([["native-decode", NATIVE_MAX_APPEND, NATIVE_APPEND_CHUNK, native_source_key()]]
                                    if self._want_native else [])

    def prefix_shape(self, tokens: int) -> tuple[int, int, int, int]:
        return (2 * self.num_layers, self._kv_heads, tokens, self._head_dim)

    def read_prefix(self, tokens: int) -> np.ndarray:
        """A copy of the cache's first `tokens` rows: [2 * layers, kv_heads, tokens, head_dim] float32."""
        if not 0 < tokens <= self._pos:
            raise ValueError(f"read {tokens} prefix rows from a cache of {self._pos} tokens")
        return np.stack([c[0, :, :tokens] for c in self._cache])

    def write_prefix(self, rows: np.ndarray) -> None:
        """Put stored prefix rows (read_prefix's layout) at the start of the cache; position = their count."""
        tokens = rows.shape[2]
        if tuple(rows.shape) != self.prefix_shape(tokens) or tokens > self.max_context:
            raise ValueError(f"prefix rows of shape {list(rows.shape)} do not fit this LLM's cache")
        self._pos = 0
        self._ensure_slots(tokens)
        for c, r in zip(self._cache, rows):
            c[0, :, :tokens] = r
        self._pos = tokens

    def truncate(self, position: int) -> None:
        if not 0 <= position <= self._pos:
            raise ValueError(f"truncate to {position} outside the cache of {self._pos} tokens")
        self._pos = position

    def reset(self) -> None:
        self._pos = 0

    def fork(self) -> "OnnxLLM":
        """Another KV cache over the same session, weights and embedding table: a second conversation
        slot costs kv_bytes_per_token * its cache rows (at most max_context), not a second copy of the
        model. Slots may run one after another on one thread (the server interleaves their decode
        steps); calling one session from several threads at once is left to ONNX Runtime's own thread
        safety."""
        import onnxruntime as ort

        self.wait_loaded()
        other = object.__new__(OnnxLLM)
        other.__dict__.update(self.__dict__)
        other._cache = other._new_cache(min(KV_START_SLOTS, self.max_context))
        other._cache_lock = threading.Lock()
        other._logits = np.zeros_like(self._logits)
        if other.session is not None:
            other._binding = other._bind_static(ort, other.session)
        if other.prefill_session is not None:
            other._prefill_binding = other._bind_static(ort, other.prefill_session)
        other._pos = 0
        return other


class _Loader:
    """The worker thread of `OnnxLLM.load_rest_in_background`. ONNX Runtime releases the GIL while it
    creates a session or runs one, so the caller's own work goes on meanwhile. Not a daemon: a process
    that exits first waits for it, since tearing the interpreter down under a thread inside ORT aborts
    the process ('terminate called without an active exception'). A worker holding the decode graph
    (hold=True) waits in Python, not in ORT, and gives up once the main thread has ended, so that such
    a process exits without opening it."""

    def __init__(self, llm: OnnxLLM, warm: bool, hold: bool = False):
        self.error: BaseException | None = None
        self.seconds = 0.0  # the worker's time, the hold excluded
        self.held_s = 0.0  # time it waited between the two graphs for a decode step to need the second
        self.prompt_graph_ready = threading.Event()  # set once the prompt graph is open (or the load failed)
        self.decode_graph_needed = threading.Event()  # set by OnnxLLM.wait_loaded
        self._thread = threading.Thread(target=self._work, args=(llm, warm, hold), name="valley-rt-llm-load")
        self._thread.start()

    def _work(self, llm: OnnxLLM, warm: bool, hold: bool) -> None:
        t0 = time.perf_counter()
        try:
            try:
                llm._open_sessions(("prefill_session",))  # a first prompt needs only this one
            finally:
                self.prompt_graph_ready.set()
            if hold:
                t1 = time.perf_counter()
                while not self.decode_graph_needed.wait(HOLD_POLL_S):
                    if not threading.main_thread().is_alive():  # the interpreter is exiting
                        return
                    if llm.caller_idle():  # nothing waits on the cores: open it now
                        break
                self.held_s = time.perf_counter() - t1
                # a decode step that waits for the graph pays ORT's first-run set-up itself
                warm = warm and not self.decode_graph_needed.is_set()
            llm._open_sessions(("session",))
            if warm:
                llm._warm_decode_graph()
        except BaseException as e:  # handed to the thread that waits
            self.error = e
        finally:
            self.seconds = time.perf_counter() - t0 - self.held_s

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            e = self.error
            if isinstance(e, EngineError):
                raise e
            raise EngineError(f"loading the LLM graphs failed: {type(e).__name__}: {e}") from e
