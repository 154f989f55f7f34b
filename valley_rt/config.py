"""One dataclass per part of Valley, and named presets.

The whole `ValleyConfig` is written into every checkpoint (`valley.json`) and engine manifest, so a
model is never guessed from file or folder names. Sizes that follow from others (patch count, the
projector's shapes) are properties, not fields, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from valley_rt.errors import ConfigError

TEMPORAL_MODES = ("mean", "max", "importance", "transformer")

# The six tokens Valley adds to the LLaMA tokenizer, in the order it adds them (spec: token layout).
SPECIAL_TOKENS = ("<im_patch>", "<vi_frame>", "<im_start>", "<im_end>", "<vi_start>", "<vi_end>")

DEFAULT_SYSTEM_PROMPT = (
    "You are Valley, a large language and vision assistant trained by ByteDance. You are able to "
    "understand the visual content or video that the user provides, and assist the user with a "
    "variety of tasks using natural language. Follow the instructions carefully and explain your "
    "answers in detail."
)


@dataclass
class VisionConfig:
    """A CLIP ViT (`transformers.CLIPVisionConfig` fields that matter)."""

    hidden_size: int = 1024  # width of every token
    intermediate_size: int = 4096  # MLP width
    num_layers: int = 24  # layers in the saved tower (the ones after select_layer are never run)
    num_heads: int = 16
    image_size: int = 224  # input side in pixels
    patch_size: int = 14
    select_layer: int = -2  # index into hidden_states; -2 = output of the second-to-last layer
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_run(self) -> int:
        """How many encoder layers produce hidden_states[select_layer] (hidden_states[0] = embeddings)."""
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside a {self.num_layers}-layer tower")
        return n

    @property
    def frame_flops(self) -> float:
        """Multiply-adds x 2 of the tower on one frame: the patch embedding and the layers run."""
        L, C, I, N = self.num_patches + 1, self.hidden_size, self.intermediate_size, self.num_patches
        patch = 2 * N * (3 * self.patch_size**2) * C  # the patch-embedding convolution
        per_layer = 2 * L * (4 * C * C + 2 * C * I) + 2 * 2 * L * L * C  # qkv+out, MLP; QK^T and AV
        return patch + self.layers_run * per_layer


@dataclass
class TemporalConfig:
    """How the T frames' projected patch tokens become one set of patch tokens (spec: temporal modules)."""

    mode: str = "mean"  # one of TEMPORAL_MODES
    num_heads: int = 8  # transformer mode: heads of the one encoder layer
    ff_size: int = 2048  # transformer mode: feed-forward width (PyTorch default)
    max_frames: int = 2048  # transformer mode: rows of the sinusoidal position table

    def __post_init__(self) -> None:
        if self.mode not in TEMPORAL_MODES:
            raise ValueError(f"temporal mode must be one of {TEMPORAL_MODES}, got {self.mode!r}")


@dataclass
class LLMConfig:
    """A LLaMA decoder (`transformers.LlamaConfig` fields that matter)."""

    vocab_size: int = 32006  # base vocabulary + the six added tokens
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2


@dataclass
class TokenLayout:
    """Ids of the six added tokens; `<video>` expands to im_start, patches, im_end, vi_start, frames, vi_end."""

    im_patch: int = 32000
    vi_frame: int = 32001
    im_start: int = 32002
    im_end: int = 32003
    vi_start: int = 32004
    vi_end: int = 32005


@dataclass
class PreprocessConfig:
    """Valley's video transform (spec: video preprocessing)."""

    resize_short: int = 256  # bilinear resize so the short side is this many pixels
    crop_size: int = 224  # then a centre crop of this side
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SamplingConfig:
    """Which frames of a video are read."""

    mode: str = "fixed"  # "fixed": num_frames evenly spaced; "fps": `fps` frames per second
    num_frames: int = 8
    fps: float = 0.5  # fps mode: frames per second of video (Valley: one frame every 2 s)
    max_frames: int = 64  # fps mode: cap on the count


@dataclass
class ValleyConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokens: TokenLayout = field(default_factory=TokenLayout)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    projector_bias: bool = True  # nn.Linear(vision.hidden_size, llm.hidden_size, bias=True)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ValleyConfig":
        """Build from `to_dict`'s output; ConfigError names the first field that is unknown or of the
        wrong type (the JSON parsed, but e.g. `"config": []` or `"hidden_size": "64"`)."""
        parts = {
            "vision": VisionConfig,
            "temporal": TemporalConfig,
            "llm": LLMConfig,
            "tokens": TokenLayout,
            "preprocess": PreprocessConfig,
            "sampling": SamplingConfig,
        }
        kwargs = _checked_fields(cls, d, "config")
        for key, sub in parts.items():
            if key in kwargs:
                value = _checked_fields(sub, kwargs[key], key)
                try:
                    kwargs[key] = sub(**value)
                except ValueError as e:  # a field's own check (e.g. temporal mode)
                    raise ConfigError(f"{key}: {e}") from None
        return cls(**kwargs)


# Field annotation (a string under `from __future__ import annotations`) -> does this JSON value fit?
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_FITS = {
    "int": _is_int,
    "float": _is_float,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "tuple[float, float, float]": lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_float, v)),
}


def _checked_fields(cls, d, where: str) -> dict[str, Any]:
    """d's items after checking that d is a dict of cls's fields whose plain values have the right types."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {where} fields: {sorted(unknown)}")
    out = dict(d)
    for key, value in d.items():
        fits = _FITS.get(str(fields[key].type))
        if fits is not None and not fits(value):
            raise ConfigError(f"{where}.{key} must be {fields[key].type}, got {value!r}"[:300])
        if str(fields[key].type).startswith("tuple"):
            out[key] = tuple(value)
    return out


def _llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, ctx: int, eps: float) -> LLMConfig:
    return LLMConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, max_position_embeddings=ctx, rms_norm_eps=eps)


def _layout(base_vocab: int) -> TokenLayout:
    return TokenLayout(*range(base_vocab, base_vocab + 6))


VIT_L_14 = VisionConfig()  # CLIP ViT-L/14 at 224 px: 256 patches, width 1024, 24 layers

PRESETS: dict[str, ValleyConfig] = {
    # valley-13b-v1: Stable-Vicuna-13B, ViT-L/14, mean pooling (v1).
    "valley-13b-v1": ValleyConfig(
        name="valley-13b-v1", vision=VIT_L_14, llm=_llama(32006, 5120, 13824, 40, 40, 40, 2048, 1e-6),
        tokens=_layout(32000)),
    # Valley2-7b: LLaMA-2-7B-chat, ViT-L/14, mean pooling.
    "valley2-7b": ValleyConfig(
        name="valley2-7b", vision=VIT_L_14, llm=_llama(32006, 4096, 11008, 32, 32, 32, 4096, 1e-5),
        tokens=_layout(32000)),
    # Real vision shapes with a TinyLlama-1.1B-shaped LLM: the benchmarks' "real shapes".
    "bench-1b": ValleyConfig(
        name="bench-1b", vision=VIT_L_14, llm=_llama(32006, 2048, 5632, 22, 32, 4, 2048, 1e-5),
        tokens=_layout(32000)),
    # Tiny: for tests. 64 px frames, patch 4 -> 256 patches like ViT-L/14 at 224.
    "tiny": ValleyConfig(
        name="tiny",
        vision=VisionConfig(hidden_size=96, intermediate_size=192, num_layers=3, num_heads=4,
                            image_size=64, patch_size=4),
        temporal=TemporalConfig(ff_size=128),
        llm=_llama(1000, 64, 128, 2, 8, 8, 2048, 1e-6),
        tokens=_layout(994),
        preprocess=PreprocessConfig(resize_short=73, crop_size=64)),
}


def preset(name: str) -> ValleyConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ValleyConfig.from_dict(PRESETS[name].to_dict())  # a fresh copy the caller may edit
