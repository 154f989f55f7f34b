"""Streamed GPTQ: an HF LLaMA folder quantized one decoder layer at a time, for LLMs larger than memory.

`gptq.quantize_llm` runs GPTQModel, and the export around it holds the reference LLM in fp32 for its
accuracy gate: 27 GB at 7B. This module holds one decoder layer in fp32 (0.8 GB at 7B), the Hessians
of its four distinct linear inputs (in x in fp32: 0.5 GB for down_proj at 7B) and the hidden states of
the calibration and held-out prompts ([S, H] fp32 each: 16 prompts of 512 tokens are 134 MB at 7B).

Per decoder layer i (X_i: every calibration prompt's hidden states entering layer i):
 1. read layer i's weights from the source folder (plain file reads, fp32);
 2. run X_i through it; hooks on the linears sum x x^T of their inputs (q/k/v share one input, gate/up
    another, so four Hessians per layer);
 3. GPTQ each linear (`gptq_linear`: Frantar et al. 2022, the reference `fasterquant` with lazy blocks of
    one group, groups' scales taken from the error-updated weights, symmetric or asymmetric);
 4. write the dequantized weights into the layer and run X_i again: X_{i+1} is what the quantized model
    feeds layer i+1, so each layer is calibrated on its quantized predecessors' output, as in GPTQ;
 5. emit the layer's GPTQ tensors (standard v1 folder: qweight/qzeros/scales/g_idx) and drop the layer.
Held-out prompts run through the unquantized and the quantized layer alike (two hidden-state streams), and
the final norm + lm_head score both at the end: the accuracy figures of `gptq.compare_quantized`, without
either model ever being whole in memory.

Trade-offs against GPTQModel: within a layer every Hessian comes from the unquantized layer (one
calibration pass, plus the pass that produces X_{i+1}), where GPTQModel re-runs the layer after each
group of sublayers ("true sequential": five passes); no act-order (desc_act) and no group-aware
reordering. The embedding table, final norm and lm_head are copied as stored (the lm_head is
quantized later by the ONNX export, int8). Greedy answers cannot be scored without the whole model, so
the streamed gate checks perplexity and next-token agreement only.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from valley_rt.checkpoint import TEXT_FILES
from valley_rt.errors import CheckpointError, DataError
from valley_rt.export.gptq_format import (OUTPUT_MARKER, GPTQLinear, check_replaceable, remove_earlier_output,
                                          to_gptq_checkpoint)
from valley_rt.progress import Progress, or_silent

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# linears that read the same input share one Hessian: the first of each group carries the hook
HESSIAN_OF = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
              "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
              "mlp.down_proj": "mlp_mid"}
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
SUB_BLOCK = 32  # columns updated eagerly inside a group; the rest of the group gets one matmul per sub-block


# ----------------------------------------------------------------------------------------------------
# GPTQ of one linear
# ----------------------------------------------------------------------------------------------------

def _group_params(w: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point of a column group w [out, g] (GPTQ's Quantizer.find_params)."""
    zero = torch.zeros(w.shape[0])
    xmin = torch.minimum(w.min(dim=1).values, zero)
    xmax = torch.maximum(w.max(dim=1).values, zero)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    same = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(same, -1.0, xmin), torch.where(same, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zeros = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zeros


def gptq_linear(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                sym: bool = True, damp: float = 0.01) -> GPTQLinear:
    """GPTQ one linear: weight [out, in] (nn.Linear layout), hessian [in, in] = 2/N sum x x^T of its inputs.

    Columns are quantized left to right; each one's rounding error, divided by the inverse Hessian's
    Cholesky diagonal, is spread over the columns still to come (in place within a block of one group,
    lazily to the rest), which is what makes GPTQ's output error lower than round-to-nearest's.
    """
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ValueError(f"GPTQ: group_size {gs} does not divide in_features {in_f}")
    maxq = 2 ** bits - 1
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    del h
    wt = w.t().contiguous()  # [in, out]: a column of the weight is a contiguous row here
    del w
    q = torch.zeros(in_f, out_f, dtype=torch.int64)
    groups = in_f // gs
    scales = torch.zeros(groups, out_f)
    zeros = torch.zeros(groups, out_f, dtype=torch.int64)
    for g in range(groups):  # one lazy block per group
        i1, i2 = g * gs, (g + 1) * gs
        w1 = wt[i1:i2].clone()  # [gs, out]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        scale, zero = _group_params(w1.t(), maxq, sym)
        scales[g], zeros[g] = scale, zero.long()
        for j1 in range(0, gs, SUB_BLOCK):  # sub-blocks: the per-column update touches SUB_BLOCK rows, not gs
            j2 = min(j1 + SUB_BLOCK, gs)
            for i in range(j1, j2):
                row = w1[i]
                code = torch.clamp(torch.round(row / scale) + zero, 0, maxq)
                q[i1 + i] = code.long()
                err = (row - scale * (code - zero)) / hinv1[i, i]
                w1[i:j2].sub_(hinv1[i, i:j2, None] * err[None, :])
                err1[i] = err
            w1[j2:].sub_(hinv1[j1:j2, j2:].t() @ err1[j1:j2])
        wt[i2:].sub_(hinv[i1:i2, i2:].t() @ err1)
    return GPTQLinear(q=q, zeros=zeros, scales=scales, g_idx=torch.arange(in_f) // gs, bits=bits, group_size=gs)


# ----------------------------------------------------------------------------------------------------
# The streamed quantizer
# ----------------------------------------------------------------------------------------------------

@dataclass
class StreamReport:
    """What one streamed run did: per-layer seconds, the accuracy figures, the folder written."""

    out_dir: Path
    layers: int
    examples: int
    tokens: int
    seconds_per_layer: list[float] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def _llama_config(cfg: dict):
    from transformers import LlamaConfig

    c = LlamaConfig.from_dict({k: v for k, v in cfg.items() if k != "quantization_config"})
    c._attn_implementation = "sdpa"  # causal masking from is_causal (no mask tensor): eager would need one
    return c


def _rotary(config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [1, length, head_dim] for positions 0..length-1."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, length, config.hidden_size)
    return rope(x, torch.arange(length)[None])


class _Rotary:
    """Rotary tables computed once for the longest prompt and sliced per prompt."""

    def __init__(self, config, length: int):
        self.cos, self.sin = _rotary(config, length)

    def __call__(self, length: int):
        return self.cos[:, :length], self.sin[:, :length]


def _load_layer(config, tensors, i: int):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=i)
    state = {k: tensors.get(f"model.layers.{i}.{k}").float() for k in (*(n + ".weight" for n in LINEARS), *NORMS)}
    layer.load_state_dict(state, assign=True)
    return layer.eval()


@torch.no_grad()
def _run_layer(layer, hidden: list[torch.Tensor], rotary: _Rotary) -> list[torch.Tensor]:
    """Each prompt's [S, H] hidden states through one decoder layer (batch 1, causal)."""
    out = []
    for x in hidden:
        y = layer(x[None], attention_mask=None, position_embeddings=rotary(x.shape[0]))
        out.append((y[0] if isinstance(y, tuple) else y)[0])
    return out


@torch.no_grad()
def _hessians(layer, hidden: list[torch.Tensor], rotary: _Rotary) -> dict[str, torch.Tensor]:
    """2/N sum x x^T of each distinct linear input over every token of every prompt: {kind: [in, in]}."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    hooks = []
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        kind = HESSIAN_OF[name]

        def hook(_module, args, kind=kind):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [S, in]
            if kind in sums:
                sums[kind].addmm_(x.t(), x)
            else:
                sums[kind] = x.t() @ x
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for x in hidden:
            layer(x[None], attention_mask=None, position_embeddings=rotary(x.shape[0]))
            count += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return {k: v.mul_(2.0 / count) for k, v in sums.items()}


def _check_examples(calibration: list[dict], held_out: list[dict], hidden: int, max_pos: int) -> None:
    if not calibration:
        raise DataError("GPTQ calibration: expected at least one example, got none")
    for kind, examples in (("calibration", calibration), ("held-out", held_out)):
        for i, ex in enumerate(examples):
            x = ex.get("inputs_embeds")
            if x is None or x.ndim != 2 or x.shape[1] != hidden:
                raise DataError(f"GPTQ {kind} example {i}: expected inputs_embeds [S, {hidden}], "
                                f"got {None if x is None else list(x.shape)}")
            if not 2 <= x.shape[0] <= max_pos:
                raise DataError(f"GPTQ {kind} example {i}: length expected in [2, {max_pos}], got {x.shape[0]}")


def quantize_llm_streamed(llm_dir, out_dir, *, calibration: list[dict], held_out: list[dict] | None = None,
                          settings=None, layers: int | None = None,
                          progress: Progress | None = None) -> StreamReport:
    """Quantize the HF LLaMA folder `llm_dir` with GPTQ, one decoder layer at a time, into a standard
    GPTQ folder `out_dir` (the same layout and config as `gptq.quantize_llm` writes).

    calibration / held_out: [{"inputs_embeds": [S, H]}] (held-out ones also "labels" [S]: the positions
    the figures score). settings: gptq.GPTQSettings (desc_act is not supported here).
    layers: quantize only the first `layers` decoder layers and write a folder whose config says so (a
    measurement of a model's per-layer cost; the result is a shorter model). progress: a line per layer
    with the estimate of what is left (valley_rt.progress).
    """
    from valley_rt.export.gptq import GPTQSettings, figures_from_logits
    from valley_rt.shards import TensorIndex, weight_files, write_sharded

    settings = settings or GPTQSettings()
    if settings.desc_act:
        raise ValueError("streamed GPTQ: desc_act (act-order) is not supported; use gptq.quantize_llm")
    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    if not (llm_dir / "config.json").is_file():
        raise CheckpointError(f"{llm_dir}: expected an HF LLaMA folder with config.json, not found")
    src_cfg = json.loads((llm_dir / "config.json").read_text())
    if src_cfg.get("quantization_config"):
        raise CheckpointError(f"{llm_dir}/config.json: already quantized; expected fp weights")
    check_replaceable(out_dir)
    held_out = held_out or []
    config = _llama_config(src_cfg)
    _check_examples(calibration, held_out, config.hidden_size, config.max_position_embeddings)
    n_layers = config.num_hidden_layers if layers is None else min(int(layers), config.num_hidden_layers)
    files, _ = weight_files(llm_dir)
    tensors = TensorIndex(llm_dir, files=files)  # every header checked here, before any long work
    progress = or_silent(progress)

    calib = [ex["inputs_embeds"].detach().float() for ex in calibration]
    ref = [ex["inputs_embeds"].detach().float() for ex in held_out]
    quant = [x.clone() for x in ref]
    rotary = _Rotary(config, max(x.shape[0] for x in calib + ref))
    tokens = sum(x.shape[0] for x in calib)
    report = StreamReport(out_dir=out_dir, layers=n_layers, examples=len(calib), tokens=tokens)
    bits, gs = settings.bits, settings.group_size
    progress.stage(f"GPTQ, one decoder layer at a time ({len(calib)} prompts, {tokens} tokens)", total=n_layers,
                   unit="layers")

    def layer_tensors(i: int) -> dict[str, torch.Tensor]:
        nonlocal calib, ref, quant
        t0 = time.perf_counter()
        layer = _load_layer(config, tensors, i)
        if ref:
            ref = _run_layer(layer, ref, rotary)  # the unquantized model's stream, for the figures
        hess = _hessians(layer, calib, rotary)
        stored: dict[str, torch.Tensor] = {}
        for name in LINEARS:
            lin = layer.get_submodule(name)
            g = gptq_linear(lin.weight, hess[HESSIAN_OF[name]], bits=bits, group_size=gs, sym=settings.sym,
                            damp=settings.damp)
            lin.weight.data = g.dequantize().t().contiguous()  # [in, out] -> [out, in]
            for k, v in to_gptq_checkpoint(g).items():
                stored[f"model.layers.{i}.{name}.{k}"] = v
        del hess
        calib = _run_layer(layer, calib, rotary)
        if quant:
            quant = _run_layer(layer, quant, rotary)
        for k in NORMS:
            stored[f"model.layers.{i}.{k}"] = tensors.get(f"model.layers.{i}.{k}")
        report.seconds_per_layer.append(time.perf_counter() - t0)
        done = len(report.seconds_per_layer)
        progress.advance(done)
        return stored

    entries = _output_entries(config, tensors, n_layers, bits, gs)
    current: dict[str, torch.Tensor] = {}
    current_layer = -1

    def produce(name: str) -> torch.Tensor:
        nonlocal current, current_layer
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if i != current_layer:
                current, current_layer = layer_tensors(i), i
            return current.pop(name)
        return tensors.get(name)

    remove_earlier_output(out_dir)
    write_sharded(out_dir, entries, produce, max_shard_bytes=2 * 2**30)

    if held_out:
        report.figures = _held_out_figures(config, tensors, ref, quant, held_out, figures_from_logits)
    qcfg = {"bits": bits, "group_size": gs, "desc_act": False, "sym": settings.sym, "quant_method": "gptq",
            "checkpoint_format": "gptq", "damp_percent": settings.damp, "true_sequential": False,
            "quantizer": ["valley-rt gptq_stream"]}
    (out_dir / "config.json").write_text(json.dumps(
        {**src_cfg, "num_hidden_layers": n_layers, "quantization_config": qcfg}, indent=2) + "\n")
    for name in TEXT_FILES:
        if (llm_dir / name).is_file():
            shutil.copy2(llm_dir / name, out_dir / name)
    (out_dir / OUTPUT_MARKER).write_text(json.dumps(
        {"settings": asdict(settings), "calibration": "embeds", "examples": len(calib), "tokens": tokens,
         "streamed": True, "layers": n_layers, "of_layers": config.num_hidden_layers,
         "seconds_per_layer": [round(s, 2) for s in report.seconds_per_layer]}, indent=2) + "\n")
    tensors.close()
    return report


def _output_entries(config, tensors, n_layers: int, bits: int, gs: int) -> list[tuple]:
    """(name, shape, dtype) of every tensor of the GPTQ folder, layers first, in write order."""
    entries = []
    pack = 32 // bits
    for i in range(n_layers):
        for name in LINEARS:
            out_f, in_f = tensors[f"model.layers.{i}.{name}.weight"].shape
            if in_f % pack or out_f % pack:
                raise CheckpointError(f"model.layers.{i}.{name}: shape [{out_f}, {in_f}] does not pack into int32 words")
            groups = in_f // (in_f if gs == -1 else gs)
            p = f"model.layers.{i}.{name}."
            entries += [(p + "qweight", (in_f // pack, out_f), torch.int32),
                        (p + "qzeros", (groups, out_f // pack), torch.int32),
                        (p + "scales", (groups, out_f), torch.float16),
                        (p + "g_idx", (in_f,), torch.int32)]
        for k in NORMS:
            info = tensors[f"model.layers.{i}.{k}"]
            entries.append((f"model.layers.{i}.{k}", tuple(info.shape), info.dtype))
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if k in tensors:
            info = tensors[k]
            entries.append((k, tuple(info.shape), info.dtype))
    return entries


@torch.no_grad()
def _held_out_figures(config, tensors, ref, quant, held_out, figures_from_logits) -> dict:
    """Final norm + lm_head over both streams at the labelled positions -> compare_quantized's figures."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.weight.data = tensors.get("model.norm.weight").float()
    head_key = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    head = tensors.get(head_key).float()  # [V, H]
    pairs = []
    for r, q, ex in zip(ref, quant, held_out):
        labels = torch.as_tensor(ex["labels"]).long()
        at = (labels[1:] != -100).nonzero().flatten()
        if at.numel() == 0:
            continue
        pairs.append((norm(r[at]) @ head.t(), norm(q[at]) @ head.t(), labels[at + 1]))
    return figures_from_logits(pairs) if pairs else {}


def project_total(seconds_per_layer: list[float], layers: int) -> float:
    """Projected seconds for `layers` layers from measured per-layer times (the first layer excluded
    when there are more: it pays one-off set-up)."""
    steady = seconds_per_layer[1:] or seconds_per_layer
    return sum(seconds_per_layer) + (layers - len(seconds_per_layer)) * (sum(steady) / len(steady))


__all__ = ["gptq_linear", "quantize_llm_streamed", "StreamReport", "project_total"]
