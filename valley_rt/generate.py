"""Text generation over a KV-cached LLaMA backend: prefill, a decode loop, sampling, stop strings.

The loop is backend-agnostic: an `LLMBackend` holds one batch-1 KV cache and turns input embeddings
(text + visual tokens, already spliced) or single token ids into last-position logits. The reference
backend wraps a transformers `LlamaForCausalLM` (`backends/llm_torch.py`); the fast one runs the whole
decoder as one ONNX Runtime graph with int4 `MatMulNBits` weights (`backends/llm_onnx.py`).

Decode steps touch only the LLM: the video is encoded once, its embeddings are prefilled once, and
each further step feeds back one token id. Everything here is NumPy (logits [V] and embeddings [S, H]
are float32 arrays), so the engine path runs without torch; the torch backends convert at their
boundary. Stop strings are matched on the incrementally decoded text,
and the streaming callback only ever sees text that can no longer turn into a stop string, so a
streamed answer never shows a half-printed `###`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from valley_rt.errors import ContextLengthError


@runtime_checkable
class LLMBackend(Protocol):
    """One KV-cached LLaMA session, batch 1. Logits are float32 [V]; embeddings float32 [S, H]; both
    NumPy arrays (array-likes such as CPU tensors are accepted where they are read)."""

    hidden_size: int
    vocab_size: int
    max_context: int
    name: str

    def embed(self, ids: Sequence[int]) -> np.ndarray:  # -> [S, H]
        ...

    def prefill(self, embeds: np.ndarray) -> np.ndarray:  # embeds [S, H] -> logits [V]
        ...

    def decode(self, token_id: int) -> np.ndarray:  # -> logits [V]
        ...

    @property
    def position(self) -> int:  # tokens now in the KV cache
        ...

    def truncate(self, position: int) -> None:  # keep the first `position` cached tokens
        ...

    def reset(self) -> None:
        ...


class Tokenizer(Protocol):
    """What generation needs from a tokenizer (a transformers tokenizer fits)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str:
        ...


SEED_MIN, SEED_MAX = 0, 2**64 - 1  # numpy.random.default_rng takes non-negative seeds; 64 bits are plenty


@dataclass
class SamplingParams:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability sums to >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    seed: int | None = None  # seeds a private numpy.random.Generator; None = nondeterministic

    def __post_init__(self) -> None:
        # Comparisons with NaN are all False, so each check is written to fail on NaN and infinity.
        if not self.max_new_tokens >= 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.top_k >= 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}] (a non-negative 64-bit integer), got {self.seed}")


@dataclass
class GenerationResult:
    text: str  # the answer, without the stop string
    token_ids: list[int]  # every sampled token (a final eos included, as transformers does)
    stop_reason: str  # "stop_string" | "eos" | "length"
    prefill_ms: float  # prefill alone (the backend call)
    first_token_ms: float  # from the call to the first sampled token (prefill + sampling)
    decode_tokens_per_s: float  # tokens after the first ÷ time spent producing them
    n_prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # extra: decode_ms, total_ms


# --------------------------------------------------------------------------------------------------
# sampling


def sample(logits, params: SamplingParams, generator: np.random.Generator | None) -> int:
    """logits: [V] float32 -> one token id. Greedy when temperature == 0.

    Sampling runs in float64 on the host: a softmax over a ~32k vocabulary is a few microseconds, and
    the cumulative sums of top-p and of the draw do not lose the tail to rounding."""
    logits = np.asarray(logits, dtype=np.float32).reshape(-1)  # [V]
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    # float64 and shifted by the max first: the max maps to 0 and the rest to <= 0, so a tiny temperature
    # can only send the others to -inf (probability 0: greedy), never the max to inf
    with np.errstate(over="ignore"):
        logits = (logits.astype(np.float64) - logits.max()) / params.temperature
    if 0 < params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())  # [V]
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # [V], most likely first
        sorted_p = probs[order]
        drop = np.cumsum(sorted_p) - sorted_p >= params.top_p  # tokens whose predecessors already reach top_p
        drop[0] = False  # the most likely token always stays (rounding could drop it at a tiny top_p)
        sorted_p[drop] = 0.0
        probs = np.zeros_like(probs)
        probs[order] = sorted_p
    cum = np.cumsum(probs)  # [V]; a zero-probability token never has cum above the draw first
    rng = generator if generator is not None else np.random.default_rng()
    return int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))


# --------------------------------------------------------------------------------------------------
# incremental detokenization and stop strings


class _TextTracker:
    """Decodes token ids incrementally (vLLM-style offsets, so multi-byte and leading-space tokens
    come out right) and finds stop strings; `emit` releases only text no stop string can claim."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # chars of self.text already given to on_text
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already counted
        self.read_offset = 0
        self.stop_at: int | None = None  # index in self.text where a stop string begins

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when a stop string has appeared."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # U+FFFD: an incomplete byte run
            start = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            longest = max((len(s) for s in self.stop), default=0)
            for s in self.stop:
                i = self.text.find(s, max(0, start - longest + 1))
                if i >= 0 and (self.stop_at is None or i < self.stop_at):
                    self.stop_at = i
        if self.stop_at is not None:
            self.emit(self.stop_at)
            return True
        self.emit(len(self.text) - self._held_back())
        return False

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def emit(self, upto: int) -> None:
        if upto > self.emitted:
            if self.on_text is not None:
                self.on_text(self.text[self.emitted:upto])
            self.emitted = upto

    def final_text(self) -> str:
        return self.text if self.stop_at is None else self.text[: self.stop_at]


# --------------------------------------------------------------------------------------------------
# the loop


def check_context(backend: LLMBackend, n_prompt: int, max_new_tokens: int) -> None:
    """Raise ContextLengthError before any work when the cache + prompt + answer cannot fit."""
    used = backend.position
    if used + n_prompt + max_new_tokens > backend.max_context:
        cached = f" (after {used} cached tokens)" if used else ""
        raise ContextLengthError(
            f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} exceeds the context of "
            f"{backend.max_context}{cached}"
        )


def prefill(backend: LLMBackend, embeds: np.ndarray) -> np.ndarray:
    """embeds: [S, H] -> last-position logits [V]; the S positions join the KV cache."""
    if embeds.ndim != 2 or embeds.shape[1] != backend.hidden_size:
        raise ValueError(f"embeds must be [S, {backend.hidden_size}], got {list(embeds.shape)}")
    return backend.prefill(embeds)


def sampler(backend: LLMBackend) -> Callable[..., int]:
    """The backend's own `sample` (same rules, run where its logits live: the CUDA backend samples on
    the GPU) or `sample` above."""
    return getattr(backend, "sample", sample)


def decode_one_token(backend: LLMBackend, token_id: int, params: SamplingParams,
                     generator: np.random.Generator | None) -> int:
    """Feed the previous token into the cache, sample the next one."""
    logits = backend.decode(token_id)  # [V]
    return sampler(backend)(logits, params, generator)


def decode_n_tokens(backend: LLMBackend, first_token: int, n: int, params: SamplingParams,
                    generator: np.random.Generator | None,
                    on_token: Callable[[int], str | None]) -> tuple[list[int], str | None]:
    """Sample up to n more tokens after `first_token`; `on_token` returns a stop reason to stop early.
    Returns the new tokens and the reason for an early stop (None: ran out of n)."""
    tokens: list[int] = []
    cur = first_token
    for _ in range(n):
        cur = decode_one_token(backend, cur, params, generator)
        tokens.append(cur)
        reason = on_token(cur)
        if reason:
            return tokens, reason
    return tokens, None


def generate(backend: LLMBackend, tokenizer: Tokenizer, embeds: np.ndarray | None = None, *,
             input_ids: Sequence[int] | None = None, params: SamplingParams | None = None,
             stop: Sequence[str] = ("###",), on_text: Callable[[str], None] | None = None,
             eos_token_id: int | None = None) -> GenerationResult:
    """Generate an answer after the prompt `embeds` [S, H] (or plain `input_ids`, embedded here).

    The prompt is appended after whatever the backend's cache already holds (chat turns). The last
    sampled token is not fed back, so the cache ends one token short of prompt + answer; callers that
    continue a conversation truncate to their own boundary and prefill again.
    """
    params = params or SamplingParams()
    if (embeds is None) == (input_ids is None):
        raise ValueError("pass exactly one of embeds or input_ids")
    if embeds is None:
        embeds = backend.embed(list(input_ids))  # [S, H]
    n_prompt = int(embeds.shape[0])
    check_context(backend, n_prompt, params.max_new_tokens)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    generator = np.random.default_rng(params.seed)  # seed None: fresh OS entropy

    tracker = _TextTracker(tokenizer, stop, on_text)

    def on_token(tok: int) -> str | None:
        if eos_token_id is not None and tok == eos_token_id:
            return "eos"
        if tracker.add(tok):
            return "stop_string"
        return None

    t0 = time.perf_counter()
    logits = prefill(backend, embeds)  # [V]
    t1 = time.perf_counter()
    first = sampler(backend)(logits, params, generator)
    t2 = time.perf_counter()
    tokens = [first]
    reason = on_token(first)
    if reason is None and params.max_new_tokens > 1:
        more, reason = decode_n_tokens(backend, first, params.max_new_tokens - 1, params, generator, on_token)
        tokens += more
    t3 = time.perf_counter()
    if reason is None:
        reason = "length"
        tracker.emit(len(tracker.text))  # a held-back partial stop string is ordinary text after all
    decode_s = t3 - t2
    return GenerationResult(
        text=tracker.final_text(),
        token_ids=tokens,
        stop_reason=reason,
        prefill_ms=(t1 - t0) * 1e3,
        first_token_ms=(t2 - t0) * 1e3,
        decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
        n_prompt_tokens=n_prompt,
        timings={"decode_ms": decode_s * 1e3, "total_ms": (t3 - t0) * 1e3},
    )
