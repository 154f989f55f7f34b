"""valley-rt's checkpoint format, and import of original Valley checkpoints.

A checkpoint is a folder whose parts open with the ecosystem's own tools:

    valley.json            {"format": "valley-rt", "version": 1, "config": ValleyConfig}
    valley.safetensors     mm_projector.* and temporal.* (pooling_layer / transformer_delta_encoder / position_matrix)
    llm/                   a plain Hugging Face LLaMA folder (LlamaForCausalLM + tokenizer with the six added tokens)
    vision_tower/          a plain Hugging Face CLIP vision folder (CLIPVisionModel, every layer)

Loading builds the model on the meta device and assigns the safetensors tensors (memory-mapped) into it,
so a checkpoint is never held twice in memory. Every shape is checked against valley.json first, and a
mismatch is one line naming the file, the tensor and both shapes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from valley_rt.config import (SPECIAL_TOKENS, LLMConfig, PreprocessConfig, TemporalConfig, TokenLayout,
                              ValleyConfig, VisionConfig, preset, PRESETS)
from valley_rt.errors import CheckpointError
from valley_rt.model import ValleyModel, build_model, parameter_counts, restore_buffers

FORMAT = "valley-rt"
VERSION = 1
CONFIG_FILE = "valley.json"
EXTRA_WEIGHTS = "valley.safetensors"
# Files that make up a tokenizer, copied verbatim wherever an LLM folder is rewritten.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")
# ... plus the generation defaults, for the folders an export writes beside its weights.
TEXT_FILES = TOKENIZER_FILES + ("generation_config.json",)


# -- save / load ----------------------------------------------------------------------------------
def save_checkpoint(model: ValleyModel, path: str | Path, *, tokenizer=None) -> Path:
    """Write `model` (and its tokenizer) as a valley-rt checkpoint folder."""
    _quiet_transformers()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                "config": model.cfg.to_dict()}, indent=2) + "\n")
    extra = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k.startswith(("mm_projector.", "temporal."))}
    save_file(extra, str(path / EXTRA_WEIGHTS))
    model.llm.save_pretrained(path / "llm")
    model.vision_tower.save_pretrained(path / "vision_tower")
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "llm")
    return path


def read_config(path: str | Path) -> ValleyConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a valley-rt checkpoint folder)")
    if not cfg_file.is_file():
        hint = " (an original Valley checkpoint? run `valley-rt convert` first)" if (path / "config.json").is_file() else ""
        raise CheckpointError(f"{cfg_file}: missing; {path} is not a valley-rt checkpoint{hint}")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{cfg_file}: format version {meta.get('version')}, this valley-rt reads version {VERSION}")
    try:
        return ValleyConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: bad config ({e})") from None


def _weights_file(folder: Path) -> Path:
    f = folder / "model.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    return f


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A 64-byte aligned tensor. safetensors' buffers can sit at any offset, and CPU GEMM kernels pick
    their summation order by alignment: without this a loaded model's logits could differ in the last
    bit from the model that was saved."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _read_tensors(file: Path, prefix: str, expected: dict[str, torch.Tensor], optional: set[str] = frozenset()) -> dict:
    """Load `file`'s tensors under `prefix`, checking names and shapes against the model built from config."""
    try:
        tensors = {prefix + k: _aligned(v) for k, v in load_file(str(file)).items()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    wanted = {k for k in expected if k.startswith(prefix)}
    missing = sorted(wanted - set(tensors) - optional)
    extra = sorted(set(tensors) - wanted)
    if missing:
        raise CheckpointError(f"{file}: missing {len(missing)} tensor(s) the config needs, e.g. {missing[0][len(prefix):]}")
    if extra:
        raise CheckpointError(f"{file}: {len(extra)} tensor(s) the config does not have, e.g. {extra[0][len(prefix):]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{file}: {k[len(prefix):]} has shape {list(v.shape)}, "
                                  f"config {CONFIG_FILE} implies {list(expected[k].shape)}")
    return tensors


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ValleyModel:
    """Load a valley-rt checkpoint folder into the reference model (eval mode)."""
    path = Path(path)
    cfg = read_config(path)
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    tied = {"llm.lm_head.weight"} if cfg.llm.tie_word_embeddings else set()
    state = {}
    state.update(_read_tensors(_weights_file(path / "llm"), "llm.", expected, optional=tied))
    state.update(_read_tensors(_weights_file(path / "vision_tower"), "vision_tower.", expected,
                               optional={"vision_tower.embeddings.position_ids"}))
    extra_file = path / EXTRA_WEIGHTS
    if not extra_file.is_file():
        raise CheckpointError(f"{extra_file}: missing")
    state.update(_read_tensors(extra_file, "", {k: v for k, v in expected.items() if not k.startswith(("llm.", "vision_tower."))}))
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    restore_buffers(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: no weights for {leftover[0]}")
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (a standard HF tokenizer in llm/), checked against the token layout."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = Path(path)
    cfg = read_config(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path / "llm"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'llm'}: no usable tokenizer ({e})") from None
    check_token_layout(tok, cfg.tokens, path / "llm")
    return tok


def check_token_layout(tok, layout: TokenLayout, where) -> None:
    for name in ("im_patch", "vi_frame", "im_start", "im_end", "vi_start", "vi_end"):
        got = tok.convert_tokens_to_ids(f"<{name}>")
        if got != getattr(layout, name):
            raise CheckpointError(f"{where}: tokenizer maps <{name}> to {got}, the config says {getattr(layout, name)}")


# -- describe ---------------------------------------------------------------------------------------
def describe(*, path: str) -> dict:
    """Config, parameter counts per part and token layout of a checkpoint folder or a preset name.

    Builds the model on the meta device, so even 13B presets take well under a second.
    """
    if path in PRESETS and not Path(path).exists():
        cfg, source = preset(path), f"preset {path}"
    else:
        cfg, source = read_config(path), str(Path(path).resolve())
    model = build_model(cfg, device="meta")
    n, t = cfg.num_patches, cfg.sampling.num_frames
    return {
        "source": source,
        "config": cfg.to_dict(),
        "parameters": parameter_counts(model),
        "token_layout": {
            "video": f"<im_start> <im_patch>x{n} <im_end> <vi_start> <vi_frame>xT <vi_end>",
            "visual_tokens": f"{n} pooled patch tokens + T frame tokens (T={t} by default: {n + t + 4} tokens with markers)",
            "ids": cfg.tokens.__dict__,
        },
    }


# -- original Valley checkpoints ------------------------------------------------------------------
def _read_original_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: safetensors (single or sharded) or pickled .bin shards.

    .bin files are pickles: they are read with torch.load(weights_only=True), whose unpickler only
    rebuilds tensors and plain containers and refuses anything that would run code.
    """
    st = sorted(folder.glob("model*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    out: dict[str, torch.Tensor] = {}
    if st:
        for f in st:
            try:
                out.update(load_file(str(f)))
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    elif bins:
        for f in bins:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f}: refused or unreadable as a weights-only pickle ({type(e).__name__}: {str(e).splitlines()[0]})") from None
            if not isinstance(part, dict):
                raise CheckpointError(f"{f}: expected a dict of tensors, found {type(part).__name__}")
            out.update(part)
    else:
        raise CheckpointError(f"{folder}: no model*.safetensors or pytorch_model*.bin weights")
    return out


def sanitize(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map original Valley keys to valley-rt module names; return (mapped, dropped keys).

    Quirks of the original layout:
    - the CLIP tower is saved inside the checkpoint, as `model.vision_tower.vision_model.*` (older
      transformers) or `model.vision_tower.*` (newer, where CLIPVisionModel has no vision_model level);
    - `model.transforemr_adding_layer.*` (sic) is a TransformerEncoderLayer the original builds next to
      the delta transformer but never calls: its weights are dropped;
    - `*.position_ids` / `rotary_emb.inv_freq` buffers of old transformers versions are recomputed.
    """
    out, dropped = {}, []
    for k, v in weights.items():
        if k.endswith(("position_ids", "rotary_emb.inv_freq")) or k.startswith("model.transforemr_adding_layer."):
            dropped.append(k)
            continue
        m = re.match(r"model\.vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?(.*)", k)
        if m:
            out["vision_tower." + m.group(1)] = v
        elif k.startswith("model.mm_projector."):
            out[k[len("model."):]] = v
        elif k.startswith(("model.pooling_layer.", "model.transformer_delta_encoder.")) or k == "model.position_matrix":
            out["temporal." + k[len("model."):]] = v
        elif k.startswith("model.") or k.startswith("lm_head."):
            out["llm." + k] = v
        else:
            dropped.append(k)
    return out, dropped


def _vision_config(orig: dict, original_dir: Path, weights: dict, vision_tower_dir: Path | None) -> VisionConfig:
    """The CLIP tower's config: from --vision-tower, else the folder config.json's mm_vision_tower names."""
    candidates = [vision_tower_dir] if vision_tower_dir else []
    name = orig.get("mm_vision_tower")
    if name:
        candidates += [original_dir / name, Path(name)]
    for c in candidates:
        if c is not None and (Path(c) / "config.json").is_file():
            vc = json.loads((Path(c) / "config.json").read_text())
            vc = vc.get("vision_config", vc)
            return VisionConfig(hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
                                num_layers=vc["num_hidden_layers"], num_heads=vc["num_attention_heads"],
                                image_size=vc["image_size"], patch_size=vc["patch_size"],
                                select_layer=orig.get("mm_vision_select_layer", -2),
                                hidden_act=vc.get("hidden_act", "quick_gelu"),
                                layer_norm_eps=vc.get("layer_norm_eps", 1e-5))
    raise CheckpointError(f"{original_dir / 'config.json'}: mm_vision_tower {name!r} has no config.json here; "
                          "pass --vision-tower with the CLIP vision folder")


def original_config(original_dir: Path, weights: dict, tokenizer, vision_tower_dir: Path | None = None) -> ValleyConfig:
    cfg_file = original_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; not a Hugging Face checkpoint folder")
    orig = json.loads(cfg_file.read_text())
    if orig.get("model_type") != "valley":
        raise CheckpointError(f"{cfg_file}: model_type is {orig.get('model_type')!r}, expected 'valley'")
    rope = orig.get("rope_parameters") or {}
    llm = LLMConfig(
        vocab_size=orig["vocab_size"], hidden_size=orig["hidden_size"], intermediate_size=orig["intermediate_size"],
        num_layers=orig["num_hidden_layers"], num_heads=orig["num_attention_heads"],
        num_kv_heads=orig.get("num_key_value_heads") or orig["num_attention_heads"],
        max_position_embeddings=orig.get("max_position_embeddings", 2048),
        rms_norm_eps=orig.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta", orig.get("rope_theta", 10000.0)),
        tie_word_embeddings=orig.get("tie_word_embeddings", False),
        bos_token_id=orig.get("bos_token_id", 1), eos_token_id=orig.get("eos_token_id", 2))
    if orig.get("use_delta_transformer"):
        mode = "transformer"
    elif orig.get("use_patch_importance_pooling"):
        mode = "importance"
    else:
        mode = "mean"
    temporal = TemporalConfig(mode=mode)
    if mode == "transformer":
        w = weights["model.transformer_delta_encoder.layers.0.linear1.weight"]
        temporal.ff_size = w.shape[0]
        temporal.max_frames = weights["model.position_matrix"].shape[0]
    vision = _vision_config(orig, original_dir, weights, vision_tower_dir)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids):
        raise CheckpointError(f"{original_dir}: tokenizer lacks Valley's added tokens {SPECIAL_TOKENS}")
    # The spec's resize (short side 256) is for 224-px towers; keep the same ratio for other sizes.
    resize = 256 if vision.image_size == 224 else int(round(vision.image_size * 256 / 224))
    return ValleyConfig(name=original_dir.name, vision=vision, temporal=temporal, llm=llm,
                        tokens=TokenLayout(*ids), preprocess=PreprocessConfig(resize_short=resize, crop_size=vision.image_size),
                        projector_bias="model.mm_projector.bias" in weights)


def _quiet_transformers() -> None:
    """No progress bars or "model of type valley" warnings from transformers' own loaders/savers."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def convert_original(*, original_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None,
                     vision_tower_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert an original Valley checkpoint folder into a valley-rt checkpoint.

    base_dir: for delta releases (valley-13b-v1), a base LLaMA folder whose weights are added to the
    delta's LLM weights (rows beyond the base vocabulary, i.e. the added tokens, are kept as is).
    overwrite: replace a valley-rt checkpoint already at out_dir. Any other existing, non-empty out_dir,
    and one equal to, inside or containing an input folder, is refused (valley_rt.outdir).
    """
    from transformers import AutoTokenizer

    from valley_rt.outdir import atomic_folder, check_target

    _quiet_transformers()
    original_dir, out_dir = Path(original_dir), Path(out_dir)
    if not original_dir.is_dir():
        raise CheckpointError(f"{original_dir}: not a folder")
    sources = (original_dir, base_dir, vision_tower_dir)
    check_target(out_dir, kind="checkpoint", sources=sources, overwrite=overwrite)  # before the slow part
    weights = _read_original_weights(original_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(original_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{original_dir}: no usable tokenizer ({e})") from None
    cfg = original_config(original_dir, weights, tokenizer, Path(vision_tower_dir) if vision_tower_dir else None)
    mapped, _dropped = sanitize(weights)
    if base_dir is not None:
        base, _ = sanitize(_read_original_weights(Path(base_dir)))
        for k, b in base.items():
            if k.startswith("llm.") and k in mapped:
                d = mapped[k] = mapped[k].clone().float()
                d[tuple(slice(0, s) for s in b.shape)] += b.float()
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    for k in list(mapped):
        if k not in expected:
            raise CheckpointError(f"{original_dir}: weight {k} has no place in a {cfg.temporal.mode}-pooling Valley")
        if tuple(mapped[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{original_dir}: {k} has shape {list(mapped[k].shape)}, config.json implies {list(expected[k].shape)}")
    optional = {"vision_tower.embeddings.position_ids"} | ({"llm.lm_head.weight"} if cfg.llm.tie_word_embeddings else set())
    missing = sorted(set(expected) - set(mapped) - optional)
    if missing:
        raise CheckpointError(f"{original_dir}: missing weight {missing[0]} ({len(missing)} missing)")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False, assign=True)
    if cfg.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    restore_buffers(model)
    with atomic_folder(out_dir, kind="checkpoint", sources=sources, overwrite=overwrite) as tmp:
        save_checkpoint(model, tmp)
        for name in TOKENIZER_FILES:
            if (original_dir / name).is_file():
                shutil.copy2(original_dir / name, tmp / "llm" / name)
    return out_dir
