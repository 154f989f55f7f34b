"""The reference LLM backend: a transformers `LlamaForCausalLM` with a `DynamicCache`.

Plain and slow on purpose: every fast backend is tested against it token for token. Runs in the
model's own dtype; embeddings in and logits out are NumPy float32 like every backend (converted here,
at the boundary, so generation and the runtime stay torch-free).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (earlier 5.x, e.g. 5.17). The wrong name is swallowed by
    forward's **kwargs, so the cache would silently stay empty and every decode step would see one token."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class TorchLLM:
    """One batch-1 KV-cached session over a `LlamaForCausalLM` (implements generate.LLMBackend)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, max_context: int | None = None):
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(max_context or cfg.max_position_embeddings)
        self._param = next(model.parameters())
        self._cache_kw = cache_keyword(model)
        self.cache = DynamicCache(config=cfg)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype = torch.float32) -> "TorchLLM":
        """Load an HF LLaMA folder (config.json + safetensors)."""
        from transformers import LlamaForCausalLM

        return cls(LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype))

    @property
    def position(self) -> int:
        return int(self.cache.get_seq_length())

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        table = self.model.get_input_embeddings().weight  # [V, H]
        rows = table[torch.as_tensor(list(ids), dtype=torch.long, device=table.device)]
        return rows.detach().float().cpu().numpy()  # [S, H]

    @torch.inference_mode()
    def _forward(self, **inputs) -> np.ndarray:
        before = self.position
        new = next(v for v in inputs.values()).shape[1]
        out = self.model(**inputs, **{self._cache_kw: self.cache}, use_cache=True, logits_to_keep=1)
        if self.position != before + new:
            raise RuntimeError(f"the KV cache holds {self.position} tokens after a forward of {new} from {before}: "
                               f"this transformers version ignored the {self._cache_kw!r} argument")
        return out.logits[0, -1].float().cpu().numpy()  # [V]

    def prefill(self, embeds) -> np.ndarray:
        # embeds: [S, H] (NumPy or torch) -> [1, S, H] in the model's dtype
        x = torch.as_tensor(embeds).to(device=self._param.device, dtype=self._param.dtype)[None]
        return self._forward(inputs_embeds=x)

    def decode(self, token_id: int) -> np.ndarray:
        ids = torch.tensor([[token_id]], dtype=torch.long, device=self._param.device)  # [1, 1]
        return self._forward(input_ids=ids)

    def truncate(self, position: int) -> None:
        cur = self.position
        if not 0 <= position <= cur:
            raise ValueError(f"truncate to {position} outside the cache of {cur} tokens")
        if position == 0:
            self.reset()
        elif position < cur:
            self.cache.crop(position - cur)  # transformers 5 crops by a negative count

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config)
