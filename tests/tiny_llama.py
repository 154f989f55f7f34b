"""Tiny random LLaMAs for the LLM backend tests (test_llm_backend.py, test_native_decode.py).

Not a test module: the tests put this folder on sys.path and import it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(hidden: int, heads: int, kv_heads: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A 2-layer LLaMA (vocab 1000, intermediate 2 x hidden, 128 positions) with confident logits
    (lm_head x 20: greedy paths are not decided by near-ties) and non-trivial RMSNorm weights."""
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for name, p in model.named_parameters():
            if "layernorm" in name or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    return model


def save_tiny_llamas(tmp_path_factory, shapes: dict[str, tuple[int, int, int]]) -> dict[str, Path]:
    """One saved HF folder per named shape (hidden, heads, kv heads): {name: folder}."""
    out = {}
    for kind, shape in shapes.items():
        out[kind] = tmp_path_factory.mktemp(f"hf_{kind}")
        tiny_llama(*shape).save_pretrained(out[kind])
    return out
