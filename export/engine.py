"""`valley-rt export`: a checkpoint folder -> an engine folder (vision half + LLM half + tokenizer + manifest).

    ENGINE/vision.onnx      crops uint8 [T, H, W, 3] -> pooled [N, D], frames [T, D]   (export/onnx_vision.py)
    ENGINE/llm/             llm.onnx (+ .data, embed_tokens.npy, llm_onnx.json), and for int4 LLMs
                            llm_prefill.onnx (+ .data): the W8A8 prompt graph           (export/llm_onnx.py)
    ENGINE/tokenizer/       the checkpoint's tokenizer files, verbatim
    ENGINE/manifest.json    hashes, config, precision, parity figures                     (export/manifest.py)

The folder is built in a hidden sibling and renamed into place at the end (manifest.atomic_folder):
Ctrl-C, a failed accuracy gate or a crash leave nothing at ENGINE. An existing ENGINE is replaced only
when it is an engine folder and --overwrite is given; any other existing folder, and an ENGINE equal
to, inside or containing the checkpoint, is refused (valley_rt.outdir). Every stage measures itself
against the PyTorch reference at export time and the figures go into the manifest; a GPTQ LLM that
misses its accuracy bar fails the export (EngineError, exit code 2) unless --keep-failed-gate.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from valley_rt.engine_format import LLM_DIR, TOKENIZER_DIR, VISION_FILE, file_hashes, folder_bytes, folder_digest
from valley_rt.errors import EngineError
from valley_rt.progress import Progress, or_silent

GPTQ_DIR = "gptq"  # ENGINE/llm/gptq/: the standard GPTQ folder a --quant gptq export keeps



def export_engine(ckpt, out, *, precision: str = "auto", quant: str = "gptq", bits: int = 4,
                  group_size: int = 128, desc_act: bool = False, sym: bool = True, calib=None,
                  calib_samples: int = 64, overwrite: bool = False, keep_failed_gate: bool = False,
                  gpu: str = "auto", cpu_vision: str = "auto", source_hashes: dict[str, str] | None = None,
                  gptq_stream: str = "auto", gptq_folder: bool = False, progress: Progress | None = None) -> dict:
    """Export checkpoint folder `ckpt` into engine folder `out`; returns the manifest written.

    precision: the vision engine on CPU — "auto" (int8 if faster and cosine >= 0.999 per token, else
    fp32), "fp32" or "int8". quant: the LLM — "gptq" (needs `calib`, a Valley instruction JSON; the
    accuracy gate must pass unless keep_failed_gate), "rtn4" (int4 round-to-nearest) or "none" (fp32).
    overwrite: replace an engine folder already at `out` (nothing else is ever replaced).
    keep_failed_gate: keep a GPTQ LLM that fails the accuracy gate (its figures are still recorded).
    gpu: "auto" (also build the fp16 CUDA/TensorRT vision graphs when onnxruntime-gpu and a GPU are
    present), "yes" (fail without them) or "no".
    cpu_vision: which runtime runs the vision graph on this CPU (manifest "vision_cpu", with the ISA it
    was chosen on; export/openvino_vision.py): "auto" (with the `[openvino]` extra installed and a tower
    of >= 1 GFLOP per frame, OpenVINO's bf16 / int8 variants for this CPU's ISA are measured against
    ONNX Runtime's graph and the fastest at cosine >= 0.999 per token is kept), "openvino" (the fastest
    accurate OpenVINO variant, always; fails without the extra) or "onnxruntime". The ONNX Runtime graph
    is always written: the fallback on machines without openvino.
    gptq_stream: "auto" (LLMs of GPTQ_STREAM_MIN_PARAMS or more), "yes" or "no": GPTQ one decoder layer at a
    time (export/gptq_stream.py: the LLM is never whole in memory, the gate scores perplexity and
    next-token agreement) instead of GPTQModel on the whole model (which also scores greedy answers).
    gptq_folder: with quant "rtn4", quantize symmetrically into the standard GPTQ folder
    (`ENGINE/llm/gptq/`, as a gptq export always keeps) and build the LLM graph from it, for loaders
    that take GPTQ as it is (vLLM, which refuses asymmetric GPTQ): both serve the same int4 weights.
    progress: a line per stage, and counted stages (decoder layers, calibration clips) with an estimate.
    """
    from valley_rt.checkpoint import load_checkpoint, read_config
    from valley_rt.export.manifest import atomic_folder, write_manifest, write_verified_stamp
    from valley_rt.export.llm_onnx import QUANTS
    from valley_rt.export.onnx_vision import export_raw, export_vision

    ckpt, out = Path(ckpt), Path(out)
    if quant not in QUANTS:
        raise EngineError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if gptq_folder and quant == "none":
        raise EngineError("--gptq-folder keeps int4 weights as a GPTQ folder: it needs --quant rtn4 (or gptq, which "
                          "always keeps one)")
    if quant == "gptq" and calib is None:
        raise EngineError("--quant gptq needs --calib DATA (a Valley instruction JSON whose videos are calibration "
                          "and held-out inputs); or pass --quant rtn4 / none")
    from valley_rt.export import tensorrt

    if gpu not in ("auto", "yes", "no"):
        raise EngineError(f"--gpu must be auto, yes or no, got {gpu!r}")
    from valley_rt.export import openvino_vision

    if cpu_vision not in openvino_vision.CPU_VISION:
        raise EngineError(f"--cpu-vision must be one of {', '.join(openvino_vision.CPU_VISION)}, got {cpu_vision!r}")
    if cpu_vision == "openvino" and openvino_vision.installed():
        raise EngineError(f"--cpu-vision openvino: {openvino_vision.installed()}")
    no_gpu = tensorrt.why_no_gpu() if gpu != "no" else "disabled"
    if gpu == "yes" and no_gpu:
        raise EngineError(f"--gpu yes: {no_gpu}")
    cfg = read_config(ckpt)  # CheckpointError on a bad folder, before anything is written
    from valley_rt.outdir import check_target

    check_target(out, kind="engine", sources=(ckpt, calib), overwrite=overwrite)  # before hashing the source
    _check_quant_shape(cfg, quant, bits, group_size)
    stream = quant == "gptq" and _gptq_streams(cfg, gptq_stream, desc_act)
    progress = or_silent(progress)
    t_start = time.perf_counter()
    # Every checkpoint file is read once for its sha256 (the engine's and the LLM's source ids derive from
    # it); source_hashes: engine_format.file_hashes(ckpt), when the caller already has them.
    if source_hashes is None:
        progress.stage(f"hashing the checkpoint ({folder_bytes(ckpt) / 2**30:.1f} GB)")
    hashes = source_hashes if source_hashes is not None else file_hashes(ckpt)
    source = {"name": ckpt.resolve().name, "sha256": folder_digest(hashes)}  # no machine's path in a shipped folder
    with atomic_folder(out, overwrite=overwrite, sources=(ckpt, calib)) as work:
        # rtn4/none read the LLM straight from ckpt/llm one layer at a time (export_llm_onnx), and so does
        # streamed GPTQ; only GPTQModel's calibration and gate need the whole reference model in memory.
        model = load_checkpoint(ckpt, llm=quant == "gptq" and not stream)
        with tempfile.TemporaryDirectory(dir=work, prefix=".raw-") as tmp:
            progress.stage("vision: tracing the ONNX graph")
            raw = export_raw(model, Path(tmp) / "raw.onnx")  # one trace for the CPU and the GPU graphs
            progress.stage(f"vision: the CPU graph ({precision}), its parity and timing")
            try:
                vision = export_vision(model, work, precision=precision, name=VISION_FILE, raw=raw)
            except ValueError as e:  # the accuracy bar of the requested precision
                raise EngineError(f"{ckpt}: vision export: {e}") from None
            vision_cpu = _cpu_vision(model, raw, work, cpu_vision, vision.precision, progress)
            if "ms" in vision_cpu:
                vision.figures["export_s"]["openvino"] = sum(vision_cpu["export_s"].values())
            gpu_entry = None
            if not no_gpu:
                progress.stage("vision: the fp16 CUDA / TensorRT graphs")
                t0 = time.perf_counter()
                gpu_entry = tensorrt.export_gpu(model, raw, work)
                vision.figures["export_s"]["gpu"] = time.perf_counter() - t0
        llm = _export_llm(ckpt, work / LLM_DIR, model=model, quant=quant, bits=bits, group_size=group_size,
                          desc_act=desc_act, sym=sym, calib=calib, calib_samples=calib_samples,
                          llm_sha256=folder_digest(hashes, under="llm/"),
                          keep_failed_gate=keep_failed_gate, stream=stream, gptq_folder=gptq_folder,
                          progress=progress)
        del model
        _copy_tokenizer(ckpt / "llm", work / TOKENIZER_DIR)
        progress.stage(f"manifest: hashing the engine ({folder_bytes(work) / 2**30:.1f} GB)")
        manifest = write_manifest(
            work, config=cfg.to_dict(), source=source,
            precision={"vision": vision.precision, "llm": llm["quant"]},
            parity={"vision": vision.figures, "llm": llm.get("figures", {})},
            extra={"gpu": gpu_entry, "vision_cpu": vision_cpu, "export_s": round(time.perf_counter() - t_start, 2),
                   "files": {"vision": VISION_FILE, "llm": f"{LLM_DIR}/", "tokenizer": f"{TOKENIZER_DIR}/",
                             **({"gptq": f"{LLM_DIR}/{GPTQ_DIR}/"} if (work / LLM_DIR / GPTQ_DIR).is_dir() else {})}})
        write_verified_stamp(work)  # every file was just hashed: the first load need not read them again
    progress.done()
    return manifest


def _cpu_vision(model, raw: Path, work: Path, cpu_vision: str, ort_precision: str, progress: Progress) -> dict:
    """The manifest's "vision_cpu" entry: OpenVINO measured against ONNX Runtime on this CPU when
    cpu_vision asks for it (see export_engine), else ONNX Runtime with the reason recorded."""
    from valley_rt.cpu import isa_class
    from valley_rt.export import openvino_vision

    isa = isa_class()
    why = None
    if cpu_vision == "onnxruntime":
        why = "--cpu-vision onnxruntime"
    elif cpu_vision == "auto" and openvino_vision.installed():
        why = openvino_vision.installed()
    elif cpu_vision == "auto" and model.cfg.vision.frame_flops < openvino_vision.AUTO_MIN_FRAME_FLOPS:
        why = (f"tower of {model.cfg.vision.frame_flops / 1e9:.2f} GFLOP per frame < "
               f"{openvino_vision.AUTO_MIN_FRAME_FLOPS / 1e9:g}: not measured")
    if why:
        return {"backend": "onnxruntime", "variant": ort_precision, "isa": isa, "decision": why}
    progress.stage(f"vision: OpenVINO variants for this CPU ({isa}), timed against ONNX Runtime")
    try:
        return openvino_vision.choose_cpu_vision(model, raw, work, ort_path=work / VISION_FILE,
                                                 ort_precision=ort_precision, isa=isa, force=cpu_vision == "openvino")
    except ValueError as e:
        raise EngineError(f"vision export: {e}") from None


GPTQ_STREAM_MIN_PARAMS = 2_000_000_000  # gptq_stream="auto": a 7B's fp32 reference (27 GB) is not loaded


def _gptq_streams(cfg, choice: str, desc_act: bool) -> bool:
    """Whether GPTQ runs layer by layer (export/gptq_stream.py)."""
    if choice not in ("auto", "yes", "no"):
        raise EngineError(f"--gptq-stream must be auto, yes or no, got {choice!r}")
    if choice == "auto":
        from valley_rt.model import build_model

        params = sum(p.numel() for p in build_model(cfg, device="meta").llm.parameters())
        return params >= GPTQ_STREAM_MIN_PARAMS and not desc_act
    if choice == "yes" and desc_act:
        raise EngineError("--gptq-stream yes does not support --desc-act (act-order): use --gptq-stream no")
    return choice == "yes"


def _load_input_embeddings(model, ckpt: Path) -> None:
    """Give a model whose LLM is on the meta device its token embedding table (fp32), so prompts can be
    embedded (and visual tokens spliced in) without loading the decoder."""
    from valley_rt.shards import TensorIndex, weight_files

    files, _ = weight_files(ckpt / "llm")
    index = TensorIndex(ckpt / "llm", files=files)
    table = index.get("model.embed_tokens.weight").float()
    index.close()
    model.llm.model.embed_tokens.weight = torch.nn.Parameter(table, requires_grad=False)


def _check_quant_shape(cfg, quant: str, bits: int, group_size: int) -> None:
    """Refuse, before any work, int4/GPTQ settings the LLM's shapes cannot take: every quantized linear's
    input width (hidden_size, intermediate_size) must split into whole groups."""
    if quant == "none":
        return
    if quant == "gptq" and bits not in (2, 4, 8):
        raise EngineError(f"--bits must be 2, 4 or 8, got {bits}")
    if group_size < 1:
        raise EngineError(f"--group-size must be >= 1, got {group_size}")
    widths = (cfg.llm.hidden_size, cfg.llm.intermediate_size)
    if any(w % group_size for w in widths):
        fits = [g for g in (128, 64, 32, 16, 8) if all(w % g == 0 for w in widths)]
        hint = f"; use --group-size {fits[0]}" if fits else ""
        raise EngineError(f"--group-size {group_size} does not divide the LLM's input widths "
                          f"(hidden {widths[0]}, intermediate {widths[1]}){hint}")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    from valley_rt.checkpoint import TEXT_FILES

    found = [n for n in TEXT_FILES if (src / n).is_file()]
    if not found:
        raise EngineError(f"{src}: no tokenizer files (expected tokenizer.json or tokenizer.model)")
    for name in found:
        shutil.copy2(src / name, dst / name)


# -- the LLM half ---------------------------------------------------------------------------------
def _export_llm(ckpt: Path, out: Path, *, model, quant: str, bits: int, group_size: int, desc_act: bool,
                calib, calib_samples: int, keep_failed_gate: bool, sym: bool = True,
                llm_sha256: str | None = None, stream: bool = False, gptq_folder: bool = False,
                progress: Progress | None = None) -> dict:
    """ckpt/llm -> out/ (llm_onnx format). gptq: GPTQModel on multimodal calibration, gated, then repacked.

    Returns {"quant": str, "figures": dict} for the manifest.
    """
    from valley_rt.export.llm_onnx import export_llm_onnx

    progress = or_silent(progress)
    if quant == "rtn4" and gptq_folder:
        # Round-to-nearest written as a standard GPTQ folder (symmetric: vLLM's GPTQ loader takes no
        # other), and the graph built from that folder as a GPTQ export's is: both hold the same weights.
        from valley_rt.export.llm_onnx import write_rtn_gptq_folder

        progress.stage("LLM: round-to-nearest int4 into a GPTQ folder")
        qdir = write_rtn_gptq_folder(ckpt / "llm", out / GPTQ_DIR, group_size=group_size, sym=True)
        export_llm_onnx(qdir, out, quant="gptq", group_size=group_size, source_sha256=llm_sha256, progress=progress)
        return {"quant": f"rtn4-g{group_size}-sym", "figures": {"method": "rtn4", "sym": True, "gptq_folder": True}}
    if quant != "gptq":
        export_llm_onnx(ckpt / "llm", out, quant=quant, group_size=group_size, source_sha256=llm_sha256,
                        progress=progress)
        label = "fp32" if quant == "none" else f"rtn4-g{group_size}"  # rtn4 is always 4-bit
        return {"quant": label, "figures": {"method": quant}}

    from valley_rt.export import gptq

    if stream:
        _load_input_embeddings(model, ckpt)
    examples = calibration_examples(model, ckpt, calib, limit=calib_samples, progress=progress)
    held_out = examples[::4]  # every 4th example scores the quantized LLM; the rest calibrate it
    train = [ex for i, ex in enumerate(examples) if i % 4]
    if not train or not held_out:
        raise EngineError(f"{calib}: {len(examples)} usable examples; GPTQ needs at least 2 "
                          f"(calibration + held out)")
    settings = gptq.GPTQSettings(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    if stream:
        return _export_llm_streamed(ckpt, out, train=train, held_out=held_out, settings=settings,
                                    keep_failed_gate=keep_failed_gate, progress=progress)
    calibrations = {
        # what the LLM really sees: text embeddings with the video's visual tokens spliced in
        "multimodal": [{"inputs_embeds": e["inputs_embeds"]} for e in train],
        # the common shortcut: the same prompts as plain text, visual placeholders removed
        "text": [{"input_ids": e["text_ids"]} for e in train],
    }
    tokenizer = _tokenizer(ckpt)
    with tempfile.TemporaryDirectory(prefix=".gptq-", dir=out.parent.parent) as tmp:
        tried = {}
        for kind, calibration in calibrations.items():
            progress.stage(f"LLM: GPTQModel on the {kind} calibration ({len(calibration)} prompts), then scored")
            qdir = Path(tmp) / kind
            gptq.quantize_llm(ckpt / "llm", qdir, calibration=calibration, settings=settings)
            qmodel = gptq.load_gptq_as_torch(qdir)
            figures = gptq.compare_quantized(model.llm, qmodel, held_out)
            figures.update(answer_figures(model.llm, qmodel, held_out, tokenizer))
            tried[kind] = (qdir, figures)
        # keep the calibration whose quantized LLM answers more like the original, then perplexity
        best = max(tried, key=lambda k: (tried[k][1]["answer_agreement"], -tried[k][1]["ppl_delta"]))
        qdir, figures = tried[best]
        figures = dict(figures, calibration=best, calibration_examples=len(train), held_out_examples=len(held_out),
                       alternatives={k: {m: f[m] for m in ("ppl_delta", "agreement", "answer_agreement", "em_quant")}
                                     for k, (_, f) in tried.items()})
        failed = gptq.gate(figures)
        figures["gate"] = "passed" if not failed else ("kept despite: " + "; ".join(failed))
        if failed and not keep_failed_gate:
            raise EngineError("GPTQ accuracy gate failed: " + "; ".join(failed) + " (--keep-failed-gate keeps it)")
        export_llm_onnx(qdir, out, quant="gptq", group_size=group_size, progress=progress)
        # The standard GPTQ folder itself (config.json with quantization_config, qweight / qzeros /
        # scales / g_idx safetensors, the checkpoint's tokenizer with its added tokens) stays in the
        # engine, hashed by the manifest like every file, for loaders that take GPTQ as it is
        # (vLLM's GPTQ-Marlin on NVIDIA, GPTQModel, transformers; docs/vllm.md). It costs the int4
        # weights a second time on disk.
        shutil.move(str(qdir), str(out / GPTQ_DIR))
    return {"quant": f"gptq{bits}-g{group_size}{'-act' if desc_act else ''}", "figures": figures}


def _export_llm_streamed(ckpt: Path, out: Path, *, train: list[dict], held_out: list[dict], settings,
                         keep_failed_gate: bool, progress: Progress) -> dict:
    """GPTQ one decoder layer at a time on the multimodal calibration (what the LLM really sees), gated on
    the held-out perplexity and next-token agreement, then repacked into the ONNX graph."""
    from valley_rt.export import gptq
    from valley_rt.export.gptq_stream import quantize_llm_streamed
    from valley_rt.export.llm_onnx import export_llm_onnx

    with tempfile.TemporaryDirectory(prefix=".gptq-", dir=out.parent.parent) as tmp:
        report = quantize_llm_streamed(ckpt / "llm", Path(tmp) / "multimodal",
                                       calibration=[{"inputs_embeds": e["inputs_embeds"]} for e in train],
                                       held_out=held_out, settings=settings, progress=progress)
        figures = dict(report.figures, calibration="multimodal", streamed=True, calibration_examples=len(train),
                       calibration_tokens=report.tokens, held_out_examples=len(held_out),
                       seconds_per_layer=[round(s, 2) for s in report.seconds_per_layer])
        failed = gptq.gate(figures)
        figures["gate"] = "passed" if not failed else ("kept despite: " + "; ".join(failed))
        if failed and not keep_failed_gate:
            raise EngineError("GPTQ accuracy gate failed: " + "; ".join(failed) + " (--keep-failed-gate keeps it)")
        export_llm_onnx(report.out_dir, out, quant="gptq", group_size=settings.group_size, progress=progress)
    s = settings
    return {"quant": f"gptq{s.bits}-g{s.group_size}", "figures": figures}


@torch.no_grad()
def calibration_examples(model, ckpt: Path, data, *, limit: int = 32, seed: int = 0,
                         progress: Progress | None = None) -> list[dict]:
    """Valley instruction records -> [{"inputs_embeds" [S, H], "labels" [S]}]: what the LLM really sees,
    text embeddings with the video's visual tokens spliced in (text-only calibration loses accuracy).
    Records whose video cannot be read or whose prompt exceeds the LLM's context are skipped."""
    from valley_rt.checkpoint import load_tokenizer
    from valley_rt.errors import DataError, VideoError
    from valley_rt.prompt import encode, format_conversation
    from valley_rt.records import load_records
    from valley_rt.video import normalize, read_video, resize_crop

    cfg = model.cfg
    tokenizer = load_tokenizer(ckpt)
    records, _ = load_records(data, skip_bad=True)
    random.Random(seed).shuffle(records)
    visual = {cfg.tokens.im_patch, cfg.tokens.vi_frame, cfg.tokens.im_start, cfg.tokens.im_end,
              cfg.tokens.vi_start, cfg.tokens.vi_end}
    examples = []
    progress = or_silent(progress)
    records = records[:limit]
    progress.stage(f"GPTQ calibration: encoding {len(records)} clips", total=len(records), unit="clips")
    for done, rec in enumerate(records):
        progress.advance(done)  # the clips finished so far
        try:
            frames = read_video(rec.video, num_frames=cfg.sampling.num_frames).frames
        except (DataError, VideoError):
            continue
        pixels = normalize(resize_crop(frames, cfg.preprocess), cfg.preprocess)  # [T, 3, crop, crop]
        text, spans = format_conversation(rec.turns, system=cfg.system_prompt)
        ids, labels = encode(tokenizer, text, cfg=cfg, num_frames=pixels.shape[0], spans=spans)
        if len(ids) > cfg.llm.max_position_embeddings:
            continue
        embeds = model.embed_inputs(torch.tensor(ids)[None], pixels[None])[0]  # [S, H]
        examples.append({"inputs_embeds": embeds, "labels": torch.tensor(labels),
                         "text_ids": torch.tensor([t for t in ids if t not in visual])})
    progress.advance(len(records))
    return examples


def _tokenizer(ckpt: Path):
    from valley_rt.checkpoint import load_tokenizer

    return load_tokenizer(ckpt)


@torch.no_grad()
def answer_figures(ref_llm, quant_llm, examples: list[dict], tokenizer, *, max_new_tokens: int = 24) -> dict:
    """Greedy answers of both LLMs to each held-out prompt (the embeds before the first labelled token):
    answer agreement, and exact match of each against the reference answer in the data."""
    from valley_rt.backends.llm_torch import TorchLLM
    from valley_rt.generate import SamplingParams, generate
    from valley_rt.prompt import clean_answer, normalize_answer

    params = SamplingParams(max_new_tokens=max_new_tokens)
    same = em_ref = em_quant = 0
    for ex in examples:
        labels = ex["labels"]
        start = int((labels != -100).nonzero()[0])  # the assistant turn begins here
        gold = clean_answer(tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True))
        answers = []
        for llm in (ref_llm, quant_llm):
            text = generate(TorchLLM(llm), tokenizer, ex["inputs_embeds"][:start], params=params).text
            answers.append(normalize_answer(clean_answer(text)))
        same += answers[0] == answers[1]
        em_ref += answers[0] == normalize_answer(gold)
        em_quant += answers[1] == normalize_answer(gold)
    n = max(len(examples), 1)
    return {"answer_agreement": same / n, "em_ref": em_ref / n, "em_quant": em_quant / n, "answers": len(examples)}
