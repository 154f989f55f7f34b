"""Write a random-weight Valley checkpoint of a real shape (Valley2-7b, Valley-13B), tensor by tensor.

    python benchmarks/make_real_checkpoint.py OUT --preset valley2-7b                # original layout
    python benchmarks/make_real_checkpoint.py OUT --preset valley-13b-v1 --delta     # delta + base LLaMA
    python benchmarks/make_real_checkpoint.py OUT --preset valley2-7b --layout valley-rt
    python benchmarks/make_real_checkpoint.py OUT --preset valley2-7b --layers 2     # shape-faithful, shorter

Writes, under OUT:
    original/   the original Valley layout, as `valley-rt convert` reads it: config.json (model_type
                valley, transformers-4.3x fields, mm_vision_tower "openai/clip-vit-large-patch14"),
                tokenizer with the six added tokens, fp16 safetensors shards
                model-0000i-of-0000n.safetensors + model.safetensors.index.json, the CLIP tower inside
                (`model.vision_tower.vision_model.*`), `model.mm_projector.*`, and the temporal weights
                of the preset's pooling mode. With --delta, the LLM tensors are a delta on base/.
    base/       (--delta) a plain HF LLaMA folder of the base vocabulary (no added tokens); with
                --zero-base its tensors are all zeros, stored as holes (sparse files: skipped over, not
                written), for a disk that cannot hold a 13B base beside its delta and the converted
                checkpoint. Reading a hole costs no disk I/O, so a convert's time is then a lower bound;
                its memory is not changed (the tensors are read and summed all the same).
    clip/       the CLIP vision config.json (pass it as `valley-rt convert --vision-tower OUT/clip`)
    valley-rt/  (--layout valley-rt) a valley-rt checkpoint folder, LLM sharded as convert writes it

Only names, shapes and dtypes come from the model (built on the meta device); every tensor is generated
from a seed of its own name (see random_tensor), written and dropped, so the peak memory is one tensor whatever the size,
and the bytes do not depend on the shard size. Real weights drop in unchanged: the same folders from a
real release convert the same way. The tokenizer is a word-level one of the real vocabulary size
(words it lacks become <unk>): enough for timing and memory, not for reading answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch

from valley_rt.checkpoint import CONFIG_FILE, EXTRA_WEIGHTS, FORMAT, VERSION, _save_hf_config
from valley_rt.config import SPECIAL_TOKENS, ValleyConfig, preset
from valley_rt.model import build_model
from valley_rt.shards import write_sharded

CLIP_NAME = "openai/clip-vit-large-patch14"


BLOCK = 1 << 20  # random values drawn per tensor; larger tensors repeat them (generation runs at memcpy speed)


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic per name: norms near 1, biases and matrices small (std 0.02, HF's LLaMA/CLIP init).
    A tensor of more than BLOCK values repeats one seeded block of BLOCK normal values at an offset of
    its own: drawing 7e9 normals would dominate the time, and timing and memory do not depend on it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    numel = 1
    for s in shape:
        numel *= s
    block = torch.randn(min(numel, BLOCK), generator=g) * 0.02
    if len(shape) == 1 and name.endswith("weight") and "norm" in name:
        block += 1.0
    block = block.to(dtype)
    if numel <= BLOCK:
        return block.reshape(shape)
    start = int(torch.randint(0, BLOCK, (1,), generator=g))
    reps = -(-(numel + start) // BLOCK)
    return block.repeat(reps)[start:start + numel].reshape(shape)


def original_name(k: str) -> str:
    """The original Valley key of a valley-rt module name (the inverse of checkpoint.map_original_key)."""
    if k.startswith("llm."):
        return k[len("llm."):]
    if k.startswith("vision_tower."):
        return "model.vision_tower.vision_model." + k[len("vision_tower."):]
    if k.startswith("temporal."):
        return "model." + k[len("temporal."):]
    return "model." + k  # mm_projector.*


def _model_entries(cfg: ValleyConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(valley-rt name, shape) of every tensor a checkpoint of cfg carries, LLM layers in order."""
    sd = build_model(cfg, device="meta").state_dict()
    skip = {"vision_tower.embeddings.position_ids"}
    if cfg.llm.tie_word_embeddings:
        skip.add("llm.lm_head.weight")

    def order(k: str):
        parts = k.split(".")
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
        return (not k.startswith("llm."), layer, k)

    return [(k, tuple(v.shape)) for k, v in sorted(sd.items(), key=lambda kv: order(kv[0])) if k not in skip]


def tokenizer_files(folder: Path, cfg: ValleyConfig) -> None:
    """A word-level tokenizer: <unk> <s> </s>, filler words up to the base vocabulary, the six added tokens."""
    base = cfg.tokens.im_patch
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, base)}}
    special = [(0, "<unk>"), (1, "<s>"), (2, "</s>")] + [(base + i, t) for i, t in enumerate(SPECIAL_TOKENS)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in special]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"backend": "tokenizers", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "model_max_length": cfg.llm.max_position_embeddings, "tokenizer_class": "TokenizersBackend"}, indent=2))


def _llama_config(cfg: ValleyConfig, vocab: int, dtype: torch.dtype) -> dict:
    l = cfg.llm
    return {"vocab_size": vocab, "hidden_size": l.hidden_size, "intermediate_size": l.intermediate_size,
            "num_hidden_layers": l.num_layers, "num_attention_heads": l.num_heads,
            "num_key_value_heads": l.num_kv_heads, "max_position_embeddings": l.max_position_embeddings,
            "rms_norm_eps": l.rms_norm_eps, "rope_theta": l.rope_theta, "hidden_act": "silu",
            "tie_word_embeddings": l.tie_word_embeddings, "bos_token_id": l.bos_token_id,
            "eos_token_id": l.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
            "transformers_version": "4.31.0", "use_cache": True}


def clip_config(cfg: ValleyConfig, folder: Path) -> None:
    v = cfg.vision
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps, "num_channels": 3,
        "projection_dim": 768}, indent=2))


def write_original(out: Path, cfg: ValleyConfig, *, dtype=torch.float16, shard_bytes: int = 10 * 2**30,
                   seed: int = 0, delta: bool = False, zero_base: bool = False) -> Path:
    """OUT/original (+ OUT/base with delta) + OUT/clip; returns OUT/original."""
    entries = _model_entries(cfg)
    base_vocab = cfg.tokens.im_patch
    orig = out / "original"
    names = {original_name(k): (k, shape) for k, shape in entries}

    def produce(name: str) -> torch.Tensor:
        return random_tensor(name, names[name][1], dtype, seed)

    write_sharded(orig, [(n, s, dtype) for n, (_, s) in names.items()], produce, max_shard_bytes=shard_bytes)
    mode = cfg.temporal.mode
    config = {"architectures": ["ValleyLlamaForCausalLM"], "model_type": "valley",
              **_llama_config(cfg, cfg.llm.vocab_size, dtype),
              "mm_vision_tower": CLIP_NAME, "mm_hidden_size": cfg.vision.hidden_size,
              "mm_vision_select_layer": cfg.vision.select_layer, "use_mm_proj": True,
              "use_delta_transformer": mode == "transformer", "use_patch_importance_pooling": mode == "importance"}
    (orig / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_files(orig, cfg)
    clip_config(cfg, out / "clip")
    if delta:
        base = out / "base"

        def base_shape(k: str, shape: tuple[int, ...]) -> tuple[int, ...]:
            vocab = k in ("llm.model.embed_tokens.weight", "llm.lm_head.weight")
            return (base_vocab, *shape[1:]) if vocab else shape

        base_entries = {original_name(k): base_shape(k, s) for k, s in entries if k.startswith("llm.")}
        write_sharded(base, [(n, s, dtype) for n, s in base_entries.items()],
                      lambda n: None if zero_base else random_tensor("base." + n, base_entries[n], dtype, seed),
                      max_shard_bytes=shard_bytes)
        (base / "config.json").write_text(json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_llama_config(cfg, base_vocab, dtype)},
            indent=2))
    return orig


def write_valley_rt(out: Path, cfg: ValleyConfig, *, dtype=torch.float16, shard_bytes: int = 2 * 2**30,
                    seed: int = 0) -> Path:
    """OUT/valley-rt: valley.json, valley.safetensors, llm/ (sharded HF LLaMA + tokenizer), vision_tower/."""
    ck = out / "valley-rt"
    entries = _model_entries(cfg)
    shapes = dict(entries)
    model = build_model(cfg, device="meta")

    def part(prefix: str) -> list:
        return [(k[len(prefix):], s, dtype) for k, s in entries if k.startswith(prefix)]

    def produce(prefix: str):
        # the same bytes as write_original: seeded by the original name
        return lambda n: random_tensor(original_name(prefix + n), shapes[prefix + n], dtype, seed)

    ck.mkdir(parents=True, exist_ok=True)
    (ck / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "config": cfg.to_dict()},
                                             indent=2) + "\n")
    extras = [(k, s, dtype) for k, s in entries if k.startswith(("mm_projector.", "temporal."))]
    write_sharded(ck, extras, produce(""), max_shard_bytes=2**62, name=EXTRA_WEIGHTS.removesuffix(".safetensors"),
                  metadata={})
    write_sharded(ck / "vision_tower", part("vision_tower."), produce("vision_tower."), max_shard_bytes=2**62)
    _save_hf_config(model.vision_tower, ck / "vision_tower", dtype)
    write_sharded(ck / "llm", part("llm."), produce("llm."), max_shard_bytes=shard_bytes)
    _save_hf_config(model.llm, ck / "llm", dtype)
    tokenizer_files(ck / "llm", cfg)
    return ck


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder to write into (must not exist or be empty)")
    ap.add_argument("--preset", default="valley2-7b", help="valley2-7b, valley-13b-v1, bench-1b, tiny")
    ap.add_argument("--layout", choices=("original", "valley-rt"), default="original")
    ap.add_argument("--delta", action="store_true", help="original layout as a delta on a base LLaMA (Valley-13B v1)")
    ap.add_argument("--zero-base", action="store_true",
                    help="with --delta: an all-zero base stored as holes (sparse files; see base/ above)")
    ap.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: the preset's)")
    ap.add_argument("--vision-layers", type=int, default=None, help="CLIP layers (default: the preset's)")
    ap.add_argument("--mode", default=None, help="temporal pooling mode (default: the preset's)")
    ap.add_argument("--shard-mb", type=float, default=None,
                    help="shard size in MiB (default: 10240 for the original layout, 2048 for valley-rt)")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out}: exists and is not empty", file=sys.stderr)
        return 2
    cfg = preset(args.preset)
    if args.layers is not None:
        cfg.llm.num_layers = args.layers
    if args.vision_layers is not None:
        cfg.vision.num_layers = args.vision_layers
    if args.mode is not None:
        cfg.temporal.mode = args.mode
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    if args.layout == "original":
        shard = int((args.shard_mb or 10240) * 2**20)
        if args.zero_base and not args.delta:
            print("error: --zero-base is for --delta", file=sys.stderr)
            return 2
        path = write_original(args.out, cfg, dtype=dtype, shard_bytes=shard, seed=args.seed, delta=args.delta,
                              zero_base=args.zero_base)
    else:
        if args.delta:
            print("error: --delta is for the original layout", file=sys.stderr)
            return 2
        path = write_valley_rt(args.out, cfg, dtype=dtype, shard_bytes=int((args.shard_mb or 2048) * 2**20),
                               seed=args.seed)
    files = [f for f in args.out.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    on_disk = sum(f.stat().st_blocks * 512 for f in files)  # less than bytes where a zero base is sparse
    print(json.dumps({"path": str(path), "preset": args.preset, "layout": args.layout, "delta": args.delta,
                      "zero_base": args.zero_base, "llm_layers": cfg.llm.num_layers, "bytes": size,
                      "bytes_on_disk": on_disk, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
