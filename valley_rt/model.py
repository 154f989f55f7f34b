"""The PyTorch reference of Valley: the truth every fast path is tested against.

video pixels [B, T, 3, H, W]
  -> CLIP ViT, run only up to `select_layer`          [B, T, 1+N, C]   (CLS first, no post-layernorm)
  -> mm_projector on every token of every frame       [B, T, 1+N, D]
  -> temporal module over the patch tokens            [B, N, D]        (mean | max | importance | transformer)
     + the projected CLS token of each frame          [B, T, D]
  -> spliced into the LLM's input embeddings at the <im_patch> / <vi_frame> placeholders
  -> LLaMA                                            logits [B, L, V]

It is written for clarity, not speed: the projector runs on all T*(1+N) tokens exactly as the original
does, even where pooling first would be cheaper (the engines in valley_rt.export take those shortcuts
and are tested against this file). Module attribute names are the checkpoint keys of valley-rt's format.
"""

from __future__ import annotations


import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from valley_rt.config import LLMConfig, TemporalConfig, ValleyConfig, VisionConfig
from valley_rt.prompt import splice


def clip_config(cfg: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
        num_channels=3)


def llama_config(cfg: LLMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=None, attention_bias=False, mlp_bias=False)


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """Valley's fixed position table: P[k, 2i] = sin(k / 10000^(2i/D)), P[k, 2i+1] = cos(same)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    i2 = torch.arange(0, dim, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, i2 / dim)  # [n, ceil(D/2)]
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return table.float()


class TemporalModule(nn.Module):
    """Pools projected patch tokens over frames: [B, T, N, D] -> [B, N, D] (spec: temporal modules)."""

    def __init__(self, cfg: TemporalConfig, dim: int, num_patches: int):
        super().__init__()
        self.mode = cfg.mode
        if self.mode == "importance":
            # v2: one score per frame from all its patch tokens, softmax over frames.
            self.pooling_layer = nn.Linear(dim * num_patches, 1)
        elif self.mode == "transformer":
            # v3: per patch, the frames form a sequence through one post-norm encoder layer.
            layer = nn.TransformerEncoderLayer(d_model=dim, nhead=cfg.num_heads, dim_feedforward=cfg.ff_size,
                                               batch_first=True)
            self.transformer_delta_encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
            self.register_buffer("position_matrix", sinusoid_table(cfg.max_frames, dim))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        # p: [B, T, N, D] projected patch tokens
        if self.mode == "mean":
            return p.mean(1)
        if self.mode == "max":
            return p.amax(1)
        if self.mode == "importance":
            scores = self.pooling_layer(p.flatten(2))  # [B, T, 1]
            weights = scores.softmax(dim=1)  # over frames
            return (weights[..., None] * p).sum(1)  # [B, N, D]
        b, t, n, d = p.shape
        if t > self.position_matrix.shape[0]:
            raise ValueError(f"{t} frames exceed the temporal transformer's {self.position_matrix.shape[0]} positions")
        x = p.permute(0, 2, 1, 3).reshape(b * n, t, d)  # [B*N, T, D]: each patch's frames are a sequence
        delta = self.transformer_delta_encoder(x + self.position_matrix[:t])[:, -1]  # last frame's output [B*N, D]
        return (delta + x.mean(1)).view(b, n, d)


class ValleyModel(nn.Module):
    def __init__(self, cfg: ValleyConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = CLIPVisionModel(clip_config(cfg.vision))
        self.mm_projector = nn.Linear(cfg.vision.hidden_size, cfg.llm.hidden_size, bias=cfg.projector_bias)
        self.temporal = TemporalModule(cfg.temporal, cfg.llm.hidden_size, cfg.num_patches)
        self.llm = LlamaForCausalLM(llama_config(cfg.llm))

    # -- vision ----------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """hidden_states[select_layer] of the CLIP tower; later layers are never run.

        pixel_values: [B, T, 3, H, W] -> [B, T, 1+N, C]
        """
        b, t = pixel_values.shape[:2]
        tower = self.vision_tower
        x = pixel_values.flatten(0, 1).to(tower.embeddings.patch_embedding.weight.dtype)
        h = tower.pre_layrnorm(tower.embeddings(x))  # hidden_states[0]: [B*T, 1+N, C]
        for layer in tower.encoder.layers[: self.cfg.vision.layers_run]:
            h = layer(h, None)
        return h.view(b, t, *h.shape[1:])

    def encode_video(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [B, T, 3, H, W] -> (pooled patch tokens [B, N, D], frame tokens [B, T, D])."""
        projected = self.mm_projector(self.vision_features(pixel_values))  # [B, T, 1+N, D]
        return self.temporal(projected[:, :, 1:]), projected[:, :, 0]

    # -- splice ----------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     visual: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Text embeddings with the visual tokens written over the placeholders: [B, L] -> [B, L, D].

        `visual` = (pooled [B, N, D], frames [B, T, D]) skips encoding (e.g. tokens from an engine).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        if visual is None and pixel_values is not None:
            visual = self.encode_video(pixel_values)
        return splice(embeds, input_ids, visual, self.cfg)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                visual: tuple[torch.Tensor, torch.Tensor] | None = None) -> CausalLMOutputWithPast:
        embeds = self.embed_inputs(input_ids, pixel_values, visual)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)


# -- construction ---------------------------------------------------------------------------------
def build_model(cfg: ValleyConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> ValleyModel:
    """A random-weight Valley. device="meta" allocates nothing (parameter counts, shapes).

    Weights are allocated once, directly in `dtype` on `device` (no fp32 copy first), then initialised
    in place like the HF models do (normal(0, 0.02) linears and embeddings, unit norms).
    """
    with torch.device("meta"):
        model = ValleyModel(cfg)
    model = model.to(dtype=dtype) if dtype != torch.float32 else model
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else seed)
    init_weights(model, gen)
    return model.eval()


@torch.no_grad()
def init_weights(model: ValleyModel, gen: torch.Generator) -> None:
    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            normal_(module.weight, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.MultiheadAttention):
            normal_(module.in_proj_weight, 0.02)
            module.in_proj_bias.zero_()
    emb = model.vision_tower.embeddings
    normal_(emb.class_embedding, emb.embed_dim ** -0.5)
    if model.temporal.mode == "transformer":  # after to_empty() the table is uninitialised memory
        _fill_position_table(model)
    restore_buffers(model)


def restore_buffers(model: ValleyModel) -> None:
    """Recompute the buffers that checkpoints don't carry (position ids, rotary frequencies; the temporal
    position table only when the weights lacked it)."""
    emb = model.vision_tower.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=emb.position_embedding.weight.device)[None]
    rotary = model.llm.model.rotary_emb
    inv_freq, rotary.attention_scaling = rotary.compute_default_rope_parameters(rotary.config)  # on the CPU
    rotary.inv_freq = inv_freq.to(model.llm.lm_head.weight.device)
    rotary.original_inv_freq = rotary.inv_freq.clone()
    if model.temporal.mode == "transformer" and model.temporal.position_matrix.is_meta:  # not in the weights
        _fill_position_table(model)


def _fill_position_table(model: ValleyModel) -> None:
    pm = model.temporal.position_matrix
    model.temporal.position_matrix = sinusoid_table(*pm.shape).to(device="cpu" if pm.is_meta else pm.device,
                                                                    dtype=pm.dtype)


def parameter_counts(model: ValleyModel) -> dict[str, int]:
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    tower = model.vision_tower
    used_layers = tower.encoder.layers[: model.cfg.vision.layers_run]
    vision_used = count(tower.embeddings) + count(tower.pre_layrnorm) + sum(count(l) for l in used_layers)
    counts = {
        "vision_tower": count(tower),
        "vision_tower_used": vision_used,  # up to select_layer; the rest is never run
        "projector": count(model.mm_projector),
        "temporal": count(model.temporal),
        "llm": count(model.llm),
    }
    counts["total"] = counts["vision_tower"] + counts["projector"] + counts["temporal"] + counts["llm"]
    return counts
