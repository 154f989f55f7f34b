"""GPTQ 4-bit quantization of Valley's LLaMA at export, a plain-torch loader for the result, and the
accuracy figures + gate the export command writes into the manifest.

Quantization runs GPTQModel (the maintained successor of auto-gptq): it writes the standard GPTQ folder
(config.json `quantization_config`, safetensors `qweight/qzeros/scales/g_idx`, checkpoint_format
"gptq" i.e. zeros stored minus one) that GPTQModel, transformers and vLLM load as they are.

Calibration comes in two kinds. Text-only: token ids. Multimodal: input embeddings with the visual
tokens spliced in — what the Valley LLM really sees, and text-only calibration is a known accuracy loss
for vision LLMs. GPTQ only needs the inputs of the first decoder layer (every later layer is calibrated
from the quantized output of the one before), and GPTQModel captures them by running
`model(**example)` up to a pre-hook on layer 0. Its dataset preparation only accepts token ids, so a
multimodal example enters as placeholder ids that name its index, and our override of that one forward
(`run_input_capture`) swaps them for the stored embeddings: `LlamaForCausalLM(inputs_embeds=...)`.
The GPTQ algorithm itself stays GPTQModel's; a test checks that embeddings of real ids give the very
same weights as the ids themselves.

GPTQModel costs ~6 s and ~600 MB to import, so it is imported only inside `quantize_llm`; loading,
evaluating and gating a GPTQ folder (`load_gptq_as_torch`, `perplexity`, `compare_quantized`, `gate`)
need only torch + transformers. `load_gptq_as_torch` dequantizes to float weights: slow, but the exact
reference every int4 runtime is checked against.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from valley_rt.checkpoint import TEXT_FILES
from valley_rt.errors import CheckpointError, DataError
from valley_rt.export.gptq_format import FORMATS, OUTPUT_MARKER, GPTQLinear, check_replaceable, remove_earlier_output

EMBED_KEY = "model.embed_tokens.weight"


@dataclass
class GPTQSettings:
    """GPTQ knobs; all of them end up in the folder's `quantization_config`."""

    bits: int = 4  # weight bits (2, 4 or 8 pack evenly into int32)
    group_size: int = 128  # input columns sharing one scale/zero; -1 = one group per row
    desc_act: bool = False  # act-order: quantize columns by falling Hessian diagonal (non-trivial g_idx)
    sym: bool = True  # symmetric: zero point fixed at 2**(bits-1)
    damp: float = 0.01  # GPTQModel `damp_percent`: H += damp * mean(diag H) * I before the Cholesky
    act_group_aware: bool = True  # GPTQModel's group-aware reordering; only with desc_act=False, keeps g_idx static

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"GPTQ bits must be 2, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"GPTQ group_size must be positive or -1, got {self.group_size}")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"GPTQ damp must be in (0, 1), got {self.damp}")


# ----------------------------------------------------------------------------------------------------
# Quantize (GPTQModel)
# ----------------------------------------------------------------------------------------------------

def _check_calibration(calibration: list[dict], vocab: int, hidden: int, max_pos: int) -> str:
    """Validate the examples; return "ids" when all are token ids, "embeds" when any is an embedding."""
    if not calibration:
        raise DataError("GPTQ calibration: expected at least one example, got none")
    kinds = set()
    for i, ex in enumerate(calibration):
        if "inputs_embeds" in ex:
            x = ex["inputs_embeds"]
            if x.ndim != 2 or x.shape[1] != hidden:
                raise DataError(f"GPTQ calibration example {i}: inputs_embeds expected [S, {hidden}], "
                                f"got {list(x.shape)}")
            kinds.add("embeds")
        elif "input_ids" in ex:
            x = torch.as_tensor(ex["input_ids"])
            if x.ndim != 1 or x.dtype not in (torch.int32, torch.int64):
                raise DataError(f"GPTQ calibration example {i}: input_ids expected an integer [S] tensor, "
                                f"got {x.dtype} {list(x.shape)}")
            if int(x.min()) < 0 or int(x.max()) >= vocab:
                raise DataError(f"GPTQ calibration example {i}: token ids expected in [0, {vocab}), "
                                f"got [{int(x.min())}, {int(x.max())}]")
            kinds.add("ids")
        else:
            raise DataError(f"GPTQ calibration example {i}: expected key input_ids or inputs_embeds, "
                            f"got {sorted(ex)}")
        if not 2 <= x.shape[0] <= max_pos:
            raise DataError(f"GPTQ calibration example {i}: length expected in [2, {max_pos}], got {x.shape[0]}")
    return "embeds" if "embeds" in kinds else "ids"


def _placeholder_ids(index: int, length: int, vocab: int) -> torch.Tensor:
    """Token ids that name calibration example `index` (two base-`vocab` digits up front)."""
    ids = torch.zeros(length, dtype=torch.long)
    ids[0], ids[1] = index % vocab, index // vocab
    return ids


def _install_embeds_capture(qmodel, embeds: list[torch.Tensor], vocab: int) -> None:
    """Make GPTQModel's first-layer input capture run the LLM on stored embeddings, not on ids.

    GPTQModel prepares the (placeholder) ids, then calls `run_input_capture(example, ...)`, which runs
    the model forward until a pre-hook on decoder layer 0 records its inputs and stops it.
    """

    def run_input_capture(self, example: dict[str, Any], use_cache: bool, data_device: torch.device):
        ids = example["input_ids"]  # [1, S] placeholder
        index = int(ids[0, 0]) + int(ids[0, 1]) * vocab
        x = embeds[index]  # [S, H]
        if ids.shape[1] != x.shape[0]:
            raise RuntimeError(f"calibration example {index}: placeholder has {ids.shape[1]} tokens, "
                               f"embeddings {x.shape[0]} (GPTQModel trimmed or concatenated it)")
        param = next(self.model.parameters())
        x = x.to(device=data_device, dtype=param.dtype)[None]  # [1, S, H]
        return self.model(inputs_embeds=x, attention_mask=example.get("attention_mask"), use_cache=use_cache)

    qmodel.run_input_capture = types.MethodType(run_input_capture, qmodel)


def _embedding_table(llm_dir: Path) -> torch.Tensor:
    """The LLM's token embedding table [V, H], read from the source safetensors (GPTQModel keeps the
    model lazily on the meta device while it quantizes)."""
    from safetensors import safe_open

    for f in sorted(llm_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            if EMBED_KEY in st.keys():
                return st.get_tensor(EMBED_KEY).float()
    raise CheckpointError(f"{llm_dir}: expected {EMBED_KEY} in a *.safetensors file, not found")


@contextlib.contextmanager
def _gptqmodel_logs_in(folder: Path):
    """GPTQModel writes a log file per quantized module under `./logs`, relative to the working directory
    (gptqmodel.looper.loop_processor._PROJECT_LOG_DIR): send them to `folder` for the duration, so an export
    leaves nothing behind where it was run. Without that attribute (another GPTQModel), nothing changes."""
    from gptqmodel.looper import loop_processor

    before = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if not isinstance(before, Path):
        yield
        return
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = before


def quantize_llm(llm_dir, out_dir, *, calibration: list[dict], settings: GPTQSettings) -> Path:
    """Quantize the HF LLaMA folder `llm_dir` with GPTQ into a standard GPTQ folder `out_dir`.

    calibration: examples, each {"input_ids": LongTensor [S]} (text-only) or
    {"inputs_embeds": FloatTensor [S, H]} (multimodal: text embeddings with visual tokens spliced in).
    A list mixing both is calibrated on embeddings (ids are embedded with the model's own table).
    """
    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    for name in ("config.json", "tokenizer_config.json"):
        if not (llm_dir / name).is_file():
            raise CheckpointError(f"{llm_dir}: expected an HF LLaMA folder with {name} (and a tokenizer), not found")
    src_config = json.loads((llm_dir / "config.json").read_text())
    vocab, hidden = int(src_config["vocab_size"]), int(src_config["hidden_size"])
    kind = _check_calibration(calibration, vocab, hidden, int(src_config.get("max_position_embeddings", 2048)))
    check_replaceable(out_dir)

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(8, os.cpu_count() or 1))))
    from gptqmodel import GPTQModel, QuantizeConfig  # ~6 s import: only here

    qcfg = QuantizeConfig(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act,
                          sym=settings.sym, damp_percent=settings.damp,
                          act_group_aware=settings.act_group_aware and not settings.desc_act,
                          offload_to_disk=True)
    # float32 weights while calibrating: Hessians and error feedback in full precision on CPU.
    # offload_to_disk (GPTQModel's default) keeps the model lazy on the meta device and materializes
    # layers as it goes, so an LLM larger than RAM can be quantized.
    qmodel = GPTQModel.load(str(llm_dir), qcfg, dtype=torch.float32)

    if kind == "ids":
        rows = [{"input_ids": torch.as_tensor(ex["input_ids"]).long()} for ex in calibration]
    else:
        table = _embedding_table(llm_dir) if any("input_ids" in ex for ex in calibration) else None  # [V, H]
        embeds = [ex["inputs_embeds"].detach().float() if "inputs_embeds" in ex
                  else table[torch.as_tensor(ex["input_ids"]).long()].float() for ex in calibration]
        rows = [{"input_ids": _placeholder_ids(i, x.shape[0], vocab)} for i, x in enumerate(embeds)]
        _install_embeds_capture(qmodel, embeds, vocab)

    # batch 1 and no concatenation: each example keeps its own length (and its placeholder intact).
    with tempfile.TemporaryDirectory(prefix="valley-gptq-logs-") as logs, _gptqmodel_logs_in(Path(logs)):
        qmodel.quantize(rows, batch_size=1, calibration_concat_size=None, calibration_data_min_length=1)
    remove_earlier_output(out_dir)
    qmodel.save(str(out_dir))

    # config.json = the source config + quantization_config; tokenizer files = the source's, verbatim.
    saved = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" not in saved:
        raise RuntimeError(f"{out_dir}/config.json: GPTQModel wrote no quantization_config")
    (out_dir / "config.json").write_text(json.dumps({**src_config, "quantization_config": saved["quantization_config"]},
                                                    indent=2) + "\n")
    for name in TEXT_FILES:  # verbatim: GPTQModel's own save may rewrite pad-token settings
        if (llm_dir / name).is_file():
            shutil.copy2(llm_dir / name, out_dir / name)
    (out_dir / OUTPUT_MARKER).write_text(json.dumps(
        {"settings": asdict(settings), "calibration": kind, "examples": len(calibration),
         "tokens": int(sum(int(torch.as_tensor(ex.get("input_ids", ex.get("inputs_embeds"))).shape[0])
                           for ex in calibration))}, indent=2) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Load: GPTQ tensors -> float weights (the reference for every int4 runtime), via gptq_format's reader
# ----------------------------------------------------------------------------------------------------

def load_gptq_as_torch(gptq_dir, dtype: torch.dtype = torch.float32):
    """Load a GPTQ folder as a plain `LlamaForCausalLM` with dequantized float weights."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    gptq_dir = Path(gptq_dir)
    cfg_path = gptq_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{gptq_dir}: expected a GPTQ folder with config.json, not found")
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.pop("quantization_config", None)
    if not qc or qc.get("quant_method", qc.get("method")) != "gptq":
        raise CheckpointError(f"{cfg_path}: expected quantization_config with quant_method 'gptq', "
                              f"got {None if not qc else qc.get('quant_method')}")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in FORMATS:
        raise CheckpointError(f"{cfg_path}: expected checkpoint_format 'gptq' or 'gptq_v2', got {fmt!r}")
    bits, group_size = int(qc["bits"]), int(qc.get("group_size", -1))
    if bits not in (2, 4, 8):
        raise CheckpointError(f"{cfg_path}: expected bits 2, 4 or 8, got {bits}")

    files = sorted(gptq_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{gptq_dir}: expected *.safetensors weights, found none")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".qweight"):
            p = key[: -len(".qweight")]
            lin = GPTQLinear.from_checkpoint(value, tensors[p + ".qzeros"], tensors[p + ".scales"],
                                             tensors.get(p + ".g_idx"), bits=bits, group_size=group_size,
                                             zeros_stored_minus_one=fmt == "gptq")
            state[p + ".weight"] = lin.dequantize().t().contiguous()  # [in, out] -> nn.Linear's [out, in]
            if p + ".bias" in tensors:
                state[p + ".bias"] = tensors[p + ".bias"]
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            state[key] = value

    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).to(dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{gptq_dir}: weights do not match the config: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Accuracy: perplexity, quantized-vs-reference figures, the gate
# ----------------------------------------------------------------------------------------------------

@torch.inference_mode()
def _label_logits(model_or_backend, example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each labelled token, and those tokens: ([N, V] float32, [N] long).

    example: {"labels": [S] (-100 = not scored), and "input_ids" [S] or "inputs_embeds" [S, H]}; the
    token at t is predicted by the logits at t-1. An nn.Module runs once over the whole sequence; an
    LLMBackend (prefill/decode with a KV cache, last-position logits only) is fed in chunks that end
    just before each labelled token, so any backend can be scored the same way.
    """
    labels = torch.as_tensor(example["labels"]).long()
    targets_at = (labels[1:] != -100).nonzero().flatten()  # positions t-1 whose logits are scored
    if targets_at.numel() == 0:
        raise DataError("perplexity example: expected at least one label != -100 after position 0, got none")
    if isinstance(model_or_backend, torch.nn.Module):
        param = next(model_or_backend.parameters())
        if "inputs_embeds" in example:
            x = example["inputs_embeds"].to(param.dtype)[None]  # [1, S, H]
            logits = model_or_backend(inputs_embeds=x).logits[0]  # [S, V]
        else:
            logits = model_or_backend(input_ids=torch.as_tensor(example["input_ids"]).long()[None]).logits[0]
        return logits[targets_at].float(), labels[targets_at + 1]

    backend = model_or_backend
    x = torch.as_tensor(example["inputs_embeds"] if "inputs_embeds" in example else backend.embed(
        torch.as_tensor(example["input_ids"]).tolist()))  # [S, H]
    backend.reset()
    rows, start = [], 0
    for t in targets_at.tolist():
        rows.append(torch.as_tensor(backend.prefill(x[start: t + 1].float())))  # logits at position t: [V]
        start = t + 1
    backend.reset()
    return torch.stack(rows).float(), labels[targets_at + 1]


def perplexity(model_or_backend, examples: Sequence[dict]) -> float:
    """exp(mean cross-entropy) over every labelled token of every example (labels = assistant tokens)."""
    nll, count = 0.0, 0
    for ex in examples:
        logits, targets = _label_logits(model_or_backend, ex)
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += targets.numel()
    if count == 0:
        raise DataError("perplexity: expected at least one example, got none")
    return math.exp(nll / count)


def compare_quantized(ref_model, quant_model, examples: Sequence[dict]) -> dict:
    """Quantized vs reference on held-out examples, over the labelled positions (`figures_from_logits`)."""
    pairs = []
    for ex in examples:
        lr, targets = _label_logits(ref_model, ex)
        lq, _ = _label_logits(quant_model, ex)
        pairs.append((lr, lq, targets))
    return figures_from_logits(pairs)


def figures_from_logits(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
    """pairs: (reference logits [N, V], quantized logits [N, V], targets [N]) per example.

    Returns ppl_ref, ppl_quant, ppl_delta (relative: +0.03 = 3 % worse), ppl_delta_pct, sqnr_db
    (10 log10 of logit power over error power), cosine (mean per-position logit cosine), agreement
    (fraction of positions whose greedy next token agrees) and tokens (positions scored).
    """
    ce = torch.nn.functional.cross_entropy
    nll_r = nll_q = sig = err = cos = 0.0
    agree = count = 0
    for lr, lq, targets in pairs:
        lr, lq = lr.float(), lq.float()
        nll_r += float(ce(lr, targets, reduction="sum"))
        nll_q += float(ce(lq, targets, reduction="sum"))
        sig += float(lr.double().pow(2).sum())
        err += float((lr.double() - lq.double()).pow(2).sum())
        cos += float(torch.nn.functional.cosine_similarity(lr, lq, dim=-1).sum())
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        count += targets.numel()
    if count == 0:
        raise DataError("compare_quantized: expected at least one example, got none")
    ppl_r, ppl_q = math.exp(nll_r / count), math.exp(nll_q / count)
    delta = (ppl_q - ppl_r) / ppl_r
    return {"ppl_ref": ppl_r, "ppl_quant": ppl_q, "ppl_delta": delta, "ppl_delta_pct": 100.0 * delta,
            "sqnr_db": 10.0 * math.log10(sig / err) if err > 0 else math.inf,
            "cosine": cos / count, "agreement": agree / count, "tokens": count}


def gate(figures: dict, *, max_ppl_delta: float = 0.05, min_agreement: float = 0.97,
         max_em_drop: float = 0.01) -> list[str]:
    """The export's accuracy gate: one line per failed check; an empty list passes.

    figures: `compare_quantized`'s dict, optionally with answer-level figures the export adds for the
    demo model: answer_agreement (fraction of greedy answers identical to the unquantized model's) and
    em_ref / em_quant (exact-match accuracy, fractions). ppl_delta and one agreement figure are required.
    """
    failed = []
    if "ppl_delta" not in figures:
        failed.append("ppl_delta: missing from the figures")
    elif figures["ppl_delta"] > max_ppl_delta:
        failed.append(f"perplexity: {100 * figures['ppl_delta']:+.2f}% vs the unquantized model, "
                      f"allowed <= {100 * max_ppl_delta:+.2f}%")
    agreements = [k for k in ("agreement", "answer_agreement") if k in figures]
    if not agreements:
        failed.append("agreement: missing from the figures (need agreement or answer_agreement)")
    for key in agreements:
        if figures[key] < min_agreement:
            failed.append(f"{key}: {100 * figures[key]:.2f}%, required >= {100 * min_agreement:.2f}%")
    if ("em_ref" in figures) != ("em_quant" in figures):
        failed.append("exact match: need both em_ref and em_quant")
    elif "em_ref" in figures:
        drop = figures["em_ref"] - figures["em_quant"]
        if drop > max_em_drop:
            failed.append(f"exact match: dropped {100 * drop:.2f} points ({100 * figures['em_ref']:.2f}% -> "
                          f"{100 * figures['em_quant']:.2f}%), allowed <= {100 * max_em_drop:.2f}")
    return failed
