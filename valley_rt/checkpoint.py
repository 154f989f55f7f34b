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

import copy
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from valley_rt.config import (SPECIAL_TOKENS, LLMConfig, PreprocessConfig, TemporalConfig, TokenLayout,
                              ValleyConfig, VisionConfig, preset, PRESETS)
from valley_rt.errors import CheckpointError
from valley_rt.model import ValleyModel, build_model, parameter_counts, restore_buffers
from valley_rt.progress import Progress, or_silent
from valley_rt.shards import TensorIndex, nbytes, write_sharded

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


def _weights(folder: Path) -> TensorIndex:
    """The (possibly sharded) safetensors of an HF folder inside a checkpoint, headers checked."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing")
    if not any(folder.glob("model*.safetensors")) and not (folder / "model.safetensors.index.json").is_file():
        raise CheckpointError(f"{folder / 'model.safetensors'}: missing")
    return TensorIndex(folder)


def _check_tensors(index: TensorIndex, prefix: str, expected: dict[str, torch.Tensor],
                   optional: set[str] = frozenset()) -> dict[str, str]:
    """{model name: stored name} of `index`'s tensors under `prefix`, names and shapes checked against
    the model built from config (headers only: nothing is read)."""
    where = index.files[0] if len(index.files) == 1 else index.folder
    names = {prefix + k: k for k in index.keys()}
    wanted = {k for k in expected if k.startswith(prefix)}
    missing = sorted(wanted - set(names) - optional)
    extra = sorted(set(names) - wanted)
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s) the config needs, e.g. {missing[0][len(prefix):]}")
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} tensor(s) the config does not have, e.g. {extra[0][len(prefix):]}")
    for k, name in names.items():
        if tuple(index[name].shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{index[name].file}: {name} has shape {list(index[name].shape)}, "
                                  f"config {CONFIG_FILE} implies {list(expected[k].shape)}")
    return names


def _read_tensors(index: TensorIndex, prefix: str, expected: dict[str, torch.Tensor],
                  optional: set[str] = frozenset(), dtype: torch.dtype | None = None) -> dict:
    """`index`'s tensors under `prefix`, checked (_check_tensors) before any is read; then read one at a
    time and cast to `dtype` (floating tensors only)."""
    names = _check_tensors(index, prefix, expected, optional)
    out = {}
    for k, name in names.items():
        t = index.get(name)
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    index.close()
    return out


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    llm: bool = True) -> ValleyModel:
    """Load a valley-rt checkpoint folder into the reference model (eval mode).

    Tensors are read one at a time (from single or sharded safetensors) and cast as they arrive, so the
    peak is the model in `dtype` plus one tensor. llm=False leaves the LLM on the meta device (no memory):
    enough for the vision tower, temporal module and projector, e.g. to export the vision engine of a 7B;
    the LLM's files are still checked (headers, names, shapes).
    """
    path = Path(path)
    cfg = read_config(path)
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    tied = {"llm.lm_head.weight"} if cfg.llm.tie_word_embeddings else set()
    state = {}
    if llm:
        state.update(_read_tensors(_weights(path / "llm"), "llm.", expected, optional=tied, dtype=dtype))
    else:  # still check every LLM header, so a bad shard is reported before work that comes before the LLM's
        _check_tensors(_weights(path / "llm"), "llm.", expected, optional=tied)
    state.update(_read_tensors(_weights(path / "vision_tower"), "vision_tower.", expected,
                               optional={"vision_tower.embeddings.position_ids"}, dtype=dtype))
    extra_file = path / EXTRA_WEIGHTS
    if not extra_file.is_file():
        raise CheckpointError(f"{extra_file}: missing")
    state.update(_read_tensors(TensorIndex(files=[extra_file]), "", {k: v for k, v in expected.items()
                                                                  if not k.startswith(("llm.", "vision_tower."))},
                               dtype=dtype))
    state = {k: v.to(device=device) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.llm.tie_word_embeddings and llm:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    restore_buffers(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta and (llm or not n.startswith("llm."))]
    if leftover:
        raise CheckpointError(f"{path}: no weights for {leftover[0]}")
    if not llm:
        return model.eval()
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
    """All tensors of an HF folder: safetensors (single or sharded) or pickled .bin shards, in memory.

    .bin files are pickles: they are read with torch.load(weights_only=True), whose unpickler only
    rebuilds tensors and plain containers and refuses anything that would run code. convert_original
    streams through a TensorIndex instead; this is the whole-model path, for small models and tests.
    """
    index = TensorIndex(folder)
    return {k: index.get(k) for k in index.keys()}


def map_original_key(k: str) -> str | None:
    """The valley-rt module name of one original Valley key, or None for a key that is dropped.

    Quirks of the original layout:
    - the CLIP tower is saved inside the checkpoint, as `model.vision_tower.vision_model.*` (older
      transformers) or `model.vision_tower.*` (newer, where CLIPVisionModel has no vision_model level);
    - `model.transforemr_adding_layer.*` (sic) is a TransformerEncoderLayer the original builds next to
      the delta transformer but never calls: its weights are dropped;
    - `*.position_ids` / `rotary_emb.inv_freq` buffers of old transformers versions are recomputed.
    """
    if k.endswith(("position_ids", "rotary_emb.inv_freq")) or k.startswith("model.transforemr_adding_layer."):
        return None
    m = re.match(r"model\.vision_tower\.(?:vision_tower\.)?(?:vision_model\.)?(.*)", k)
    if m:
        return "vision_tower." + m.group(1)
    if k.startswith("model.mm_projector."):
        return k[len("model."):]
    if k.startswith(("model.pooling_layer.", "model.transformer_delta_encoder.")) or k == "model.position_matrix":
        return "temporal." + k[len("model."):]
    if k.startswith("model.") or k.startswith("lm_head."):
        return "llm." + k
    return None


def sanitize(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map original Valley keys to valley-rt module names (map_original_key); return (mapped, dropped keys)."""
    out, dropped = {}, []
    for k, v in weights.items():
        m = map_original_key(k)
        if m is None:
            dropped.append(k)
        else:
            out[m] = v
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


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARD_BYTES = 2 * 2**30  # the converted LLM's shard size (a tensor bigger than this gets its own shard)


def convert_original(*, original_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None,
                     vision_tower_dir: str | Path | None = None, overwrite: bool = False, dtype: str = "auto",
                     max_shard_bytes: int = SHARD_BYTES, progress: Progress | None = None) -> Path:
    """Convert an original Valley checkpoint folder into a valley-rt checkpoint, one tensor at a time.

    Every input file's header is read and checked first (missing or wrong shards, truncated files, names
    and shapes against the config, base vs delta shapes): a problem is one CheckpointError naming the
    file and tensor, before anything is written. Then each output tensor is read, mapped (plus its base
    tensor for a delta release), cast and streamed to its shard, so the peak memory is a few tensors,
    not the model. The LLM is written sharded (max_shard_bytes) as Hugging Face writes it.

    base_dir: for delta releases (valley-13b-v1), a base LLaMA folder whose weights are added to the
    delta's LLM weights (rows beyond the base vocabulary, i.e. the added tokens, are kept as is; the sum
    is computed in fp32). dtype: "auto" keeps each tensor's stored floating dtype, or "fp32"/"fp16"/"bf16".
    overwrite: replace a valley-rt checkpoint already at out_dir. Any other existing, non-empty out_dir,
    and one equal to, inside or containing an input folder, is refused (valley_rt.outdir).
    progress: stage lines and the bytes written so far, with an estimate (valley_rt.progress).
    """
    from transformers import AutoTokenizer

    from valley_rt.outdir import atomic_folder, check_target

    _quiet_transformers()
    original_dir, out_dir = Path(original_dir), Path(out_dir)
    if not original_dir.is_dir():
        raise CheckpointError(f"{original_dir}: not a folder")
    if dtype != "auto" and dtype not in DTYPES:
        raise CheckpointError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    sources = (original_dir, base_dir, vision_tower_dir)
    check_target(out_dir, kind="checkpoint", sources=sources, overwrite=overwrite)  # before the slow part
    src = TensorIndex(original_dir)  # every header, checked
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(original_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{original_dir}: no usable tokenizer ({e})") from None
    cfg = original_config(original_dir, src, tokenizer, Path(vision_tower_dir) if vision_tower_dir else None)
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    names = _mapped_names(src, original_dir, expected, cfg)
    base, base_names = None, {}
    if base_dir is not None:
        if not Path(base_dir).is_dir():
            raise CheckpointError(f"{base_dir}: not a folder")
        base = TensorIndex(Path(base_dir))
        base_names = _base_names(base, src, names)

    def out_dtype(k: str) -> torch.dtype:
        stored = src[names[k]].dtype
        if not stored.is_floating_point:
            return stored
        return stored if dtype == "auto" else DTYPES[dtype]

    written = 0

    def produce(k: str) -> torch.Tensor:
        nonlocal written
        t = src.get(names[k])
        if k in base_names:  # delta + base, in fp32, over the base's extent (added vocabulary rows kept)
            t, b = t.float(), base.get(base_names[k]).float()
            t[tuple(slice(0, s) for s in b.shape)] += b
            del b
        t = t.to(out_dtype(k))
        written += t.numel() * t.element_size()
        progress.advance(written)
        return t

    # tensors in the order they are stored, so each source shard is read once, front to back
    order = sorted(names, key=lambda k: (src.files.index(src[names[k]].file), src[names[k]].start))
    tied = cfg.llm.tie_word_embeddings

    def entries(prefix: str, strip: bool):
        out = []
        for k in order:
            if k.startswith(prefix) and not (tied and k == "llm.lm_head.weight"):
                out.append((k[len(prefix):] if strip else k, tuple(expected[k].shape), out_dtype(k)))
        return out

    llm_dtype = out_dtype("llm.model.embed_tokens.weight")
    extras = [e for e in entries("", strip=False) if e[0].startswith(("mm_projector.", "temporal."))]
    vision, llm = entries("vision_tower.", True), entries("llm.", True)
    total = sum(nbytes(shape, dt) for _, shape, dt in extras + vision + llm)
    progress = or_silent(progress)
    progress.stage(f"writing {len(extras + vision + llm)} tensors" + (" (delta + base)" if base is not None else ""),
                   total=total, unit="GB")
    with atomic_folder(out_dir, kind="checkpoint", sources=sources, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                   "config": cfg.to_dict()}, indent=2) + "\n")
        write_sharded(tmp, extras, produce, max_shard_bytes=2**62, name=EXTRA_WEIGHTS.removesuffix(".safetensors"),
                      metadata={})
        write_sharded(tmp / "vision_tower", vision, lambda n: produce("vision_tower." + n),
                      max_shard_bytes=2**62)
        _save_hf_config(model.vision_tower, tmp / "vision_tower", llm_dtype)
        write_sharded(tmp / "llm", llm, lambda n: produce("llm." + n),
                      max_shard_bytes=max_shard_bytes)
        _save_hf_config(model.llm, tmp / "llm", llm_dtype)
        for name in TOKENIZER_FILES:
            if (original_dir / name).is_file():
                shutil.copy2(original_dir / name, tmp / "llm" / name)
    src.close()
    return out_dir


def _mapped_names(src: TensorIndex, original_dir: Path, expected: dict, cfg: ValleyConfig) -> dict[str, str]:
    """{valley-rt name: original name}, every name and shape checked against the model of `cfg`."""
    names = {}
    for k in src.keys():
        m = map_original_key(k)
        if m is None:
            continue
        if m not in expected:
            raise CheckpointError(f"{src[k].file}: weight {k} has no place in a {cfg.temporal.mode}-pooling Valley")
        if tuple(src[k].shape) != tuple(expected[m].shape):
            raise CheckpointError(f"{src[k].file}: {k} has shape {list(src[k].shape)}, "
                                  f"config.json implies {list(expected[m].shape)}")
        names[m] = k
    optional = {"vision_tower.embeddings.position_ids"} | ({"llm.lm_head.weight"} if cfg.llm.tie_word_embeddings else set())
    missing = sorted(set(expected) - set(names) - optional)
    if missing:
        raise CheckpointError(f"{original_dir}: missing weight {missing[0]} ({len(missing)} missing)")
    return names


def _base_names(base: TensorIndex, src: TensorIndex, names: dict[str, str]) -> dict[str, str]:
    """{valley-rt name: base name} for the LLM tensors a delta release adds its base to. A base tensor
    must have the delta's shape, except fewer rows in the (vocabulary-sized) embedding and lm_head."""
    out = {}
    for k in base.keys():
        m = map_original_key(k)
        if m is None or not m.startswith("llm.") or m not in names:
            continue
        b, d = tuple(base[k].shape), tuple(src[names[m]].shape)
        vocab = m in ("llm.model.embed_tokens.weight", "llm.lm_head.weight")
        fits = b == d or (vocab and len(b) == len(d) == 2 and b[1] == d[1] and b[0] <= d[0])
        if not fits:
            raise CheckpointError(f"{base[k].file}: base tensor {k} has shape {list(b)}, the delta's "
                                  f"({src[names[m]].file.name}) has {list(d)}")
        out[m] = k
    if not out:
        raise CheckpointError(f"{base.folder}: no LLaMA weights matching the delta's (is this the base model?)")
    return out


def _save_hf_config(module, folder: Path, dtype: torch.dtype) -> None:
    """config.json (and generation_config.json) as save_pretrained writes them, for a module built on meta."""
    config = copy.deepcopy(module.config)
    config.architectures = [type(module).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    gen = getattr(module, "generation_config", None)
    if gen is not None and module.can_generate():
        gen.save_pretrained(folder)
