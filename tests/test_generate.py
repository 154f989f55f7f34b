"""generate.py on a tiny random LLaMA (TorchLLM vs transformers generate) and on a scripted backend
(stop strings, streaming, eos, context check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from valley_rt.backends.llm_torch import TorchLLM
from valley_rt.errors import ContextLengthError
from valley_rt.generate import GenerationResult, SamplingParams, generate, sample

VOCAB = 1000


def tiny_llama(seed: int = 0, max_pos: int = 256) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_pos,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init so greedy paths are not near-ties
        model.lm_head.weight.mul_(20)
    return model


class PieceTokenizer:
    """id -> fixed text piece; enough to exercise incremental decoding and stop strings."""

    eos_token_id = 2

    def __init__(self, pieces: dict[int, str] | None = None):
        self.pieces = pieces or {}

    def piece(self, i: int) -> str:
        if i in (0, 1, 2):
            return ""  # special tokens
        return self.pieces.get(i, f" w{i}")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.piece(i) for i in ids)


class ScriptedLLM:
    """A backend whose logits force a given token script (one-hot), for loop logic tests."""

    name = "scripted"
    hidden_size = 4
    vocab_size = 50

    def __init__(self, script: list[int], max_context: int = 64):
        self.script = script
        self.max_context = max_context
        self._pos = 0
        self.step = 0
        self.calls: list[str] = []

    def _logits(self) -> torch.Tensor:
        out = torch.zeros(self.vocab_size)
        out[self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return out

    @property
    def position(self) -> int:
        return self._pos

    def embed(self, ids):
        return torch.zeros(len(ids), self.hidden_size)

    def prefill(self, embeds):
        self.calls.append("prefill")
        self._pos += embeds.shape[0]
        return self._logits()

    def decode(self, token_id):
        self.calls.append("decode")
        self._pos += 1
        return self._logits()

    def truncate(self, position):
        self._pos = position

    def reset(self):
        self._pos = 0


# ------------------------------------------------------------------------------- reference parity


def test_greedy_matches_transformers_generate():
    model = tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (17,))
    embeds = model.get_input_embeddings().weight[ids].detach()  # [S, H]
    n = 24
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, 17, dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)
    ref_tokens = ref[0, -n:].tolist()  # with inputs_embeds only the new tokens come back
    backend = TorchLLM(model)
    res = generate(backend, PieceTokenizer(), embeds, params=SamplingParams(max_new_tokens=n), stop=(),
                   eos_token_id=-1)
    assert res.token_ids == ref_tokens
    assert res.stop_reason == "length"
    assert res.n_prompt_tokens == 17
    assert backend.position == 17 + n - 1  # the last sampled token is not fed back


def test_input_ids_same_as_embeds():
    model = tiny_llama()
    ids = list(range(10, 30))
    b = TorchLLM(model)
    a = generate(b, PieceTokenizer(), input_ids=ids, params=SamplingParams(max_new_tokens=8), stop=())
    b.reset()
    e = generate(b, PieceTokenizer(), b.embed(ids), params=SamplingParams(max_new_tokens=8), stop=())
    assert a.token_ids == e.token_ids
    assert a.text == e.text == PieceTokenizer().decode(a.token_ids)


def test_seeded_sampling_is_reproducible():
    model = tiny_llama()
    b = TorchLLM(model)
    params = SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    runs = []
    for _ in range(2):
        b.reset()
        runs.append(generate(b, PieceTokenizer(), input_ids=[5, 6, 7], params=params, stop=()).token_ids)
    assert runs[0] == runs[1]
    b.reset()
    other = generate(b, PieceTokenizer(), input_ids=[5, 6, 7], stop=(),
                     params=SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=50, seed=8))
    assert other.token_ids != runs[0]


def test_sample_filters():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 1.0], np.float32)
    g = np.random.default_rng(0)
    assert sample(logits, SamplingParams(), None) == 1
    picks = {sample(logits, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert picks == {1, 2}
    # top_p: tokens 1 and 2 hold ~0.99 of the mass at temperature 1, so nothing else is drawn
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.9), g) for _ in range(200)}
    assert picks <= {1, 2} and 1 in picks


def test_truncate_then_prefill_equals_fresh_run():
    model = tiny_llama()
    b = TorchLLM(model)
    prefix, turn1, turn2 = [4, 5, 6, 7, 8], [20, 21, 22], [30, 31, 32, 33]
    b.prefill(b.embed(prefix))
    b.prefill(b.embed(turn1))
    b.decode(40)
    assert b.position == 9
    b.truncate(len(prefix))
    assert b.position == 5
    got = b.prefill(b.embed(turn2))
    fresh = TorchLLM(model)
    want = fresh.prefill(fresh.embed(prefix + turn2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        b.truncate(100)


# ------------------------------------------------------------------------------- loop logic


def test_stop_string_across_tokens_is_never_streamed():
    # pieces: 10 "Hello", 11 " world", 12 "#", 13 "##", 14 " more"
    tok = PieceTokenizer({10: "Hello", 11: " world", 12: "#", 13: "##", 14: " more"})
    backend = ScriptedLLM([10, 11, 12, 13, 14, 14])
    chunks: list[str] = []
    res = generate(backend, tok, input_ids=[3, 4], params=SamplingParams(max_new_tokens=10), on_text=chunks.append)
    assert res.stop_reason == "stop_string"
    assert res.text == "Hello world"
    assert "".join(chunks) == "Hello world"
    assert res.token_ids == [10, 11, 12, 13]
    assert all("#" not in c for c in chunks)


def test_partial_stop_prefix_is_released_when_it_is_not_a_stop():
    tok = PieceTokenizer({10: "a", 12: "#", 13: "##", 15: "b"})
    chunks: list[str] = []
    backend = ScriptedLLM([10, 13, 15, 12])  # "a##b#": "##" held back until "b" shows it is text
    res = generate(backend, tok, input_ids=[3], params=SamplingParams(max_new_tokens=4), on_text=chunks.append)
    assert res.stop_reason == "length"
    assert res.text == "a##b#"
    assert chunks[:2] == ["a", "##b"]
    assert "".join(chunks) == "a##b#"  # the trailing "#" is flushed at the end


def test_eos_stops_and_is_not_text():
    tok = PieceTokenizer({10: "x"})
    backend = ScriptedLLM([10, 10, 2, 10])
    res = generate(backend, tok, input_ids=[3], params=SamplingParams(max_new_tokens=10))
    assert res.stop_reason == "eos"
    assert res.token_ids == [10, 10, 2]
    assert res.text == "xx"
    assert backend.calls == ["prefill", "decode", "decode"]


def test_length_and_timings():
    backend = ScriptedLLM([10, 11, 12, 13])
    res = generate(backend, PieceTokenizer(), input_ids=[3, 4, 5], params=SamplingParams(max_new_tokens=3))
    assert isinstance(res, GenerationResult)
    assert res.stop_reason == "length" and len(res.token_ids) == 3
    assert backend.calls == ["prefill", "decode", "decode"]
    assert res.prefill_ms >= 0 and res.first_token_ms >= res.prefill_ms and res.decode_tokens_per_s > 0


def test_context_error_before_running():
    backend = ScriptedLLM([10], max_context=32)
    with pytest.raises(ContextLengthError, match="prompt of 20 tokens \\+ max_new_tokens 16 exceeds the context of 32"):
        generate(backend, PieceTokenizer(), input_ids=list(range(20)), params=SamplingParams(max_new_tokens=16))
    assert backend.calls == []
    generate(backend, PieceTokenizer(), input_ids=list(range(20)), params=SamplingParams(max_new_tokens=12))


class _OlderForward(torch.nn.Module):
    """A LLaMA whose forward takes its KV cache as `past_key_values`, as transformers 5.17
    does; the installed one (5.24) calls it `cache`. Unknown keywords are swallowed as there."""

    def __init__(self, model: LlamaForCausalLM, honour_cache: bool = True):
        super().__init__()
        self.inner, self.config, self.honour = model, model.config, honour_cache

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, past_key_values=None, use_cache=None, logits_to_keep=0,
                **kwargs):
        cache = past_key_values if self.honour else None
        return self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)


def test_torch_backend_passes_the_cache_under_the_installed_transformers_name():
    model = tiny_llama()
    ids = list(range(10, 30))
    want = generate(TorchLLM(model), PieceTokenizer(), input_ids=ids, params=SamplingParams(max_new_tokens=12),
                    stop=()).token_ids
    older = TorchLLM(_OlderForward(model))
    assert older._cache_kw == "past_key_values"
    assert generate(older, PieceTokenizer(), input_ids=ids, params=SamplingParams(max_new_tokens=12),
                    stop=()).token_ids == want
    assert older.position == len(ids) + 11


def test_torch_backend_refuses_a_forward_that_ignores_its_cache():
    """A forward that drops the cache would answer every decode step from one token: garbage, silently."""
    backend = TorchLLM(_OlderForward(tiny_llama(), honour_cache=False))
    with pytest.raises(RuntimeError, match="ignored the 'past_key_values' argument"):
        generate(backend, PieceTokenizer(), input_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=4), stop=())
