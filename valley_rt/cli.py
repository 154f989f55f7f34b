"""The `valley-rt` command line: thin typer commands, each mapping onto one keyword-only function.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands so `--help` is instant.
Every `ValleyError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from valley_rt import __version__
from valley_rt.errors import ValleyError
from valley_rt.train.options import TrainOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="valley-rt: fast, faithful inference for the Valley video LLM.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"valley-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    import logging

    # torchao (pulled in by gptqmodel) logs missing CUDA extensions and torch's pytree logs deprecations
    # at import: noise for a CPU user, not errors.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


# A package a command needs but the core install lacks -> the extra that brings it (pyproject.toml).
EXTRAS = {"torch": "torch", "transformers": "torch", "safetensors": "torch", "onnx": "export",
          "gptqmodel": "export", "triton": "gpu", "matplotlib": "train"}


def missing_extra(e: ImportError) -> str | None:
    """The one-line message for an ImportError of a package from an extra, else None."""
    top = (e.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return f"this command needs {top}, which this install lacks: pip install \"valley-rt[{extra}]\""


# OS errors a user's paths or disk cause (a name too long, no permission, a full or read-only disk, a file
# where a folder belongs): one error line like a ValleyError. Others stay tracebacks (they are bugs).
USER_OS_ERRORS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                  errno.ELOOP, errno.ENOTDIR, errno.EISDIR}


def user_errors(fn):
    """Turn a ValleyError (and a package missing from the install) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValleyError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except ImportError as e:
            message = missing_extra(e)
            if message is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2)
        except OSError as e:
            if e.errno not in USER_OS_ERRORS:
                raise
            where = str(e.filename) if e.filename is not None else ""
            where = where if len(where) <= 200 else f"{where[:100]}...{where[-100:]}"
            typer.echo(f"error: {where + ': ' if where else ''}{e.strerror}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def load_model(model, **kwargs):
    """`valley_rt.load`: the runtime, plus export on first use for a checkpoint that runs on a CPU. An LLM
    backend with a `close` (vLLM's engine and its core process) is closed at exit, before the
    interpreter's teardown."""
    import atexit

    from valley_rt import load

    valley = load(model, **kwargs)
    close = getattr(valley.llm, "close", None)
    if close is not None:
        atexit.register(close)
    return valley


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output path that cannot become a file: a folder, a path through a file,
    a missing folder (named, not created), a name the file system refuses."""
    try:
        if path.is_dir():
            raise ValleyError(f"{option} {path}: is a folder, expected a file name")
        if not path.parent.is_dir():
            raise ValleyError(f"{option} {path}: folder {path.parent} does not exist")
        if len(path.name.encode(errors="surrogateescape")) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise ValleyError(f"{option}: file name longer than the file system allows")
    except OSError as e:
        raise ValleyError(f"{option} {str(path)[:200]}: {e.strerror or e}") from None


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


@app.command()
@user_errors
def info(path: str = typer.Argument(..., help="Checkpoint folder, or a preset name (e.g. valley2-7b).")) -> None:
    """Print a checkpoint's config, parameter counts per part and the token layout."""
    from valley_rt.checkpoint import describe

    emit_json(describe(path=path))


@app.command()
@user_errors
def convert(original_dir: Path = typer.Argument(..., help="Original Valley checkpoint folder."),
            out_dir: Path = typer.Argument(..., help="Where to write the valley-rt checkpoint."),
            base: Optional[Path] = typer.Option(None, help="Base LLaMA folder to add a delta release to."),
            vision_tower: Optional[Path] = typer.Option(
                None, help="CLIP vision folder, when the original does not carry the tower in its weights."),
            dtype: str = typer.Option("auto", help="Stored dtype: auto (as in the original), fp32, fp16 or bf16."),
            overwrite: bool = typer.Option(False, "--overwrite",
                                           help="Replace a valley-rt checkpoint already at OUT_DIR (nothing else is replaced)."),
            progress: bool = typer.Option(True, "--progress/--no-progress", help="Stage and estimate lines on stderr.")) -> None:
    """Convert an original Valley checkpoint into the valley-rt format."""
    from valley_rt.checkpoint import convert_original
    from valley_rt.progress import Progress

    convert_original(original_dir=original_dir, out_dir=out_dir, base_dir=base, vision_tower_dir=vision_tower,
                     overwrite=overwrite, dtype=dtype, progress=Progress("convert" if progress else None))
    typer.echo(f"wrote {out_dir}")


# Commands of the other modules are registered below (one line each).


@app.command()
@user_errors
def synth(out_dir: Path = typer.Argument(..., help="Folder for videos/*.mp4, data.json and meta.json."),
          n: int = typer.Option(..., "--n", help="Number of clips (each gives several records)."),
          seed: int = typer.Option(..., "--seed", help="Split seed; different seeds never share a clip."),
          frames_hint: int = typer.Option(8, "--frames-hint", help="Frames the model samples; events stay visible in them."),
          workers: int = typer.Option(1, "--workers", help="Processes; the output does not depend on it."),
          extra_questions: bool = typer.Option(False, "--extra-questions",
                                               help="Training data: also ask every other mover's direction and "
                                                    "every other pair's order.")) -> None:
    """Generate the synthetic video-instruction dataset (rendered mp4 clips + Valley-format records)."""
    from valley_rt.demo.synth import generate

    meta = generate(out_dir, n=n, seed=seed, frames_hint=frames_hint, workers=workers,
                    extra_questions=extra_questions)
    emit_json({k: v for k, v in meta.items() if k != "clip_hashes"})


@app.command()
@user_errors
def probe(video: Path = typer.Argument(..., help="Video file (or a still image)."),
          frames: int = typer.Option(8, "--frames", help="Frames to sample in fixed mode."),
          fps: Optional[float] = typer.Option(None, "--fps", help="Sample this many frames per second instead."),
          max_frames: int = typer.Option(64, "--max-frames", help="Cap on the count in --fps mode.")) -> None:
    """Print as JSON what would be sampled from a video: stream info, indices, timestamps, decode time."""
    from valley_rt.video import probe as probe_video

    emit_json(probe_video(video, num_frames=frames, mode="fixed" if fps is None else "fps",
                          fps=fps if fps is not None else 0.5, max_frames=max_frames))


_T = TrainOptions(data="", out="")  # the trainer's defaults, so the options below state none of their own


@app.command()
@user_errors
def train(data: Optional[Path] = typer.Argument(None, help="Valley instruction JSON (not needed with --recipe)."),
          out: Path = typer.Option(..., "--out", help="Run folder: state.pt, metrics.jsonl, model/ (the checkpoint)."),
          recipe: Optional[str] = typer.Option(None, "--recipe", help="demo | smoke: synthesize data, train the demo model from scratch."),
          init: Optional[Path] = typer.Option(None, "--init", help="valley-rt checkpoint to start from."),
          val_data: Optional[Path] = typer.Option(None, "--val-data", help="JSON whose short answers are scored."),
          resume: bool = typer.Option(False, "--resume", help="Continue from OUT/state.pt exactly."),
          stage: int = typer.Option(_T.stage, "--stage", help="1: projector + temporal; 2: + LLM."),
          train_vision: bool = typer.Option(_T.train_vision, "--train-vision", help="Also train the CLIP tower."),
          freeze_temporal: bool = typer.Option(not _T.train_temporal, "--freeze-temporal", help="Keep the temporal module as --init has it."),
          freeze_projector: bool = typer.Option(not _T.train_projector, "--freeze-projector", help="Keep the projector as --init has it."),
          epochs: Optional[float] = typer.Option(None, "--epochs", help=f"Passes over DATA (default {_T.epochs:g}; a recipe's own)."),
          max_steps: Optional[int] = typer.Option(_T.max_steps, "--max-steps"),
          batch_size: int = typer.Option(_T.batch_size, "--batch-size"),
          grad_accum: int = typer.Option(_T.grad_accum, "--grad-accum"),
          lr: float = typer.Option(_T.lr, "--lr"),
          seed: int = typer.Option(_T.seed, "--seed"),
          save_every: int = typer.Option(_T.save_every, "--save-every", help="Optimizer steps between state.pt writes."),
          eval_every: int = typer.Option(_T.eval_every, "--eval-every", help="Optimizer steps between validations."),
          precision: str = typer.Option(_T.precision, "--precision", help="auto | fp32 | bf16 (autocast)."),
          device: str = typer.Option(_T.device, "--device"),
          threads: Optional[int] = typer.Option(_T.threads, "--threads", help="Torch CPU threads (default: torch's)."),
          no_progress: bool = typer.Option(not _T.progress, "--no-progress")) -> None:
    """Train Valley (stage 1 or 2) from DATA, or the demo model with --recipe; writes OUT/model, a valley-rt checkpoint."""
    if recipe:
        from valley_rt.demo.recipes import run_recipe

        emit_json(run_recipe(name=recipe, out=str(out), resume=resume, threads=threads, progress=not no_progress,
                             epochs=epochs, max_steps=max_steps, device=device))
        return
    from valley_rt.train.trainer import train_main

    opts = TrainOptions(data=str(data) if data else "", out=str(out), val_data=str(val_data) if val_data else None,
                        init=str(init) if init else None, stage=stage, train_vision=train_vision,
                        train_temporal=not freeze_temporal, train_projector=not freeze_projector,
                        epochs=epochs or _T.epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                        lr=lr, seed=seed, save_every=save_every, eval_every=eval_every, precision=precision,
                        device=device, threads=threads, progress=not no_progress)
    emit_json(train_main(opts, resume=resume))


@app.command(name="eval")
@user_errors
def eval_(model: Path = typer.Argument(..., help="valley-rt checkpoint folder."),
          data: Path = typer.Argument(..., help="Valley JSON with short-answer records (e.g. from synth)."),
          blind: bool = typer.Option(False, "--blind", help="Only the blind control (every video blank)."),
          both: bool = typer.Option(False, "--both", help="Real videos and the blind control."),
          limit: Optional[int] = typer.Option(None, "--limit", help="Score the first N short-answer records."),
          out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON here."),
          threads: Optional[int] = typer.Option(None, "--threads")) -> None:
    """Exact-match accuracy on short answers per task family (and a blind control); JSON output."""
    from valley_rt.train.evaluate import evaluate

    if out is not None:
        check_output_file(out, "--out")
    emit_json(evaluate(model=model, data=data, blind=blind, both=both, limit=limit, out=out, threads=threads))


@app.command()
@user_errors
def ask(video: Optional[Path] = typer.Argument(None, help="Video file (or a still image)."),
        question: Optional[str] = typer.Argument(None, help="The question."),
        q: list[str] = typer.Option([], "-q", "--question", help="More questions about the same video (repeatable)."),
        model: Optional[Path] = typer.Option(None, "--model", "-m", help="Engine or checkpoint folder (default: the bundled demo)."),
        reference: bool = typer.Option(False, help="Run the PyTorch reference path (needs a checkpoint)."),
        device: str = typer.Option("auto", help="auto, cpu or cuda: an engine's GPU vision graph and int4 LLM in CUDA graphs, or the torch GPU path of a checkpoint."),
        frames: Optional[int] = typer.Option(None, help="Frames to sample (fixed mode; default from the model)."),
        fps: Optional[float] = typer.Option(None, help="Sample this many frames per second instead."),
        max_new_tokens: int = typer.Option(256, help="Longest answer in tokens."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_p: float = typer.Option(1.0),
        top_k: int = typer.Option(0),
        seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
        system: Optional[str] = typer.Option(None, help="System prompt (default: the model's)."),
        stream: bool = typer.Option(True, "--stream/--no-stream", help="Print the answer as it is generated."),
        as_json: bool = typer.Option(False, "--json", help="Print answers, token counts, stage timings and backends as JSON."),
        batch: Optional[Path] = typer.Option(None, help="JSONL of {id, video, question}: answer them all."),
        out: Optional[Path] = typer.Option(None, help="With --batch: the JSONL answers file (reruns skip answered ids)."),
        llm: str = typer.Option("builtin", "--llm", help="builtin, or vllm: the LLM in an in-process vLLM engine (docs/vllm.md)."),
        llm_url: Optional[str] = typer.Option(None, "--llm-url", help="A `vllm serve --enable-prompt-embeds` server (implies --llm vllm).")) -> None:
    """Answer questions about a video."""
    import time as _time

    t_start = _time.perf_counter()
    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import ask_batch, check_batch, check_question

    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
    except ValueError as e:
        raise ValleyError(str(e)) from None
    if batch is not None:
        if out is None:
            raise ValleyError("--batch needs --out FILE for the answers")
        check_batch(batch, out)
        valley = load_model(model, reference=reference, device=device, llm=llm, llm_url=llm_url)
        stats = ask_batch(valley, batch, out, params=params, system=system, frames=frames, fps=fps,
                          progress=sys.stderr.isatty())
        typer.echo(json.dumps(stats))
        if stats["failed"]:
            raise typer.Exit(1)
        return
    if video is None or (question is None and not q):
        raise ValleyError("give a VIDEO and a QUESTION (or --batch FILE --out FILE)")
    questions = ([question] if question is not None else []) + list(q)
    for text in questions:
        check_question(text)
    valley = load_model(model, reference=reference, device=device, llm=llm, llm_url=llm_url)
    ctx = valley.encode_video(video, frames=frames, fps=fps)
    answers = []
    for i, text in enumerate(questions):
        live = stream and not as_json
        if live and len(questions) > 1:
            typer.echo(f"Q: {text}")
        on_text = (lambda s: (sys.stdout.write(s), sys.stdout.flush())) if live else None
        ans = valley.ask(ctx, text, params=params, system=system, on_text=on_text)
        ans.timings["load_ms"] = valley.load_ms
        ans.timings["total_ms"] = (_time.perf_counter() - t_start) * 1e3  # process-level: imports included
        answers.append(ans)
        if live:
            typer.echo("")  # the streamed text was the raw answer; end its line
        elif not as_json:
            typer.echo(ans.answer)
    if as_json:
        emit_json({"video": str(video), "frames": ctx.indices, "notes": ctx.notes,
                   "answers": [a.to_dict() for a in answers]})


@app.command()
@user_errors
def chat(video: Path = typer.Argument(..., help="Video file."),
         model: Optional[Path] = typer.Option(None, "--model", "-m", help="Engine or checkpoint folder (default: the bundled demo)."),
         reference: bool = typer.Option(False, help="Run the PyTorch reference path."),
         frames: Optional[int] = typer.Option(None), fps: Optional[float] = typer.Option(None),
         max_new_tokens: int = typer.Option(256), system: Optional[str] = typer.Option(None)) -> None:
    """Talk about one video over several turns (the video's KV cache is reused; empty line or Ctrl-D ends)."""
    from valley_rt.generate import SamplingParams
    from valley_rt.runtime import check_question

    try:
        params = SamplingParams(max_new_tokens=max_new_tokens)
    except ValueError as e:
        raise ValleyError(str(e)) from None
    valley = load_model(model, reference=reference)
    conv = valley.chat(video, system=system, frames=frames, fps=fps)
    told = False
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        except UnicodeDecodeError:
            raise ValleyError("the question is not valid UTF-8 text") from None
        if not line.strip():
            break
        check_question(line)
        sys.stdout.write("valley> ")
        ans = conv.send(line, params=params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        if ans.dropped_turns and not told:
            told = True
            typer.echo("\nnote: the conversation outgrew the model's context; the oldest turns are left out "
                       "from now on (the video and the system prompt stay)", err=True)
        sys.stdout.write(f"\n  [{ans.tokens_prefilled} new tokens prefilled of {ans.tokens_in}; "
                         f"first token {ans.timings['first_token_ms']:.0f} ms]\n")


@app.command()
@user_errors
def export(ckpt: Path = typer.Argument(..., help="valley-rt checkpoint folder."),
           out: Path = typer.Option(..., "--out", "-o", help="Engine folder to write (atomically)."),
           precision: str = typer.Option("auto", help="Vision engine on CPU: auto (int8 if faster and cosine >= 0.999 per token), fp32 or int8."),
           quant: str = typer.Option("gptq", help="LLM weights: gptq (needs --calib), rtn4 or none (fp32)."),
           bits: int = typer.Option(4, help="GPTQ bits."),
           group_size: int = typer.Option(128, help="GPTQ / int4 group size."),
           desc_act: bool = typer.Option(False, "--desc-act", help="GPTQ act-order."),
           sym: bool = typer.Option(True, "--sym/--asym", help="GPTQ symmetric (zero point fixed) or asymmetric (a zero point per group)."),
           calib: Optional[Path] = typer.Option(None, help="Valley instruction JSON for GPTQ calibration + held-out gate."),
           calib_samples: int = typer.Option(64, help="Records drawn from --calib: 3/4 calibrate, 1/4 score the gate."),
           gpu: str = typer.Option("auto", help="Also build fp16 CUDA/TensorRT vision graphs: auto, yes or no."),
           cpu_vision: str = typer.Option("auto", "--cpu-vision",
                                          help="Vision runtime on this CPU: auto (OpenVINO bf16/int8 when installed and faster "
                                               "at cosine >= 0.999, chosen from the CPU's ISA), openvino or onnxruntime."),
           gptq_stream: str = typer.Option("auto", help="GPTQ one decoder layer at a time: auto (LLMs of 2B+ parameters), yes or no."),
           gptq_folder: bool = typer.Option(False, "--gptq-folder",
                                            help="With --quant rtn4: quantize symmetrically into a standard GPTQ folder "
                                                 "(ENGINE/llm/gptq/, for vLLM) and build the LLM graph from it; "
                                                 "--quant gptq always keeps one."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an engine folder already at OUT (nothing else is replaced)."),
           keep_failed_gate: bool = typer.Option(False, "--keep-failed-gate",
                                                 help="Keep a GPTQ LLM that fails the accuracy gate (figures still recorded)."),
           progress: bool = typer.Option(True, "--progress/--no-progress", help="Stage and estimate lines on stderr."),
           force: bool = typer.Option(False, "--force", hidden=True, help="Removed: use --overwrite / --keep-failed-gate.")) -> None:
    """Export a checkpoint into an engine folder: ONNX vision graph, LLM, tokenizer, manifest.json."""
    from valley_rt.export.engine import export_engine
    from valley_rt.progress import Progress

    if force:
        raise ValleyError("--force is gone: pass --overwrite to replace an engine folder at --out, and/or "
                          "--keep-failed-gate to keep a GPTQ LLM that fails the accuracy gate")
    m = export_engine(ckpt, out, precision=precision, quant=quant, bits=bits, group_size=group_size,
                      desc_act=desc_act, sym=sym, calib=calib, calib_samples=calib_samples, overwrite=overwrite,
                      keep_failed_gate=keep_failed_gate, gpu=gpu, cpu_vision=cpu_vision,
                      gptq_stream=gptq_stream, gptq_folder=gptq_folder,
                      progress=Progress("export" if progress else None))
    emit_json({"engine": str(out), "precision": m["precision"], "vision_cpu": m["vision_cpu"], "export_s": m["export_s"],
               "vision_parity": m["parity"]["vision"].get("parity"), "llm": m["parity"]["llm"]})


@app.command()
@user_errors
def serve(model: Optional[Path] = typer.Argument(None, help="Engine or checkpoint folder (default: the bundled demo)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          served_model_name: str = typer.Option("valley-rt-demo", help="Model id for /v1/models and requests."),
          allowed_media_path: Optional[Path] = typer.Option(None, help="Serve file:// URLs under this folder only (default: refuse file://)."),
          max_queue: int = typer.Option(64, help="Requests waiting beyond those generating; more get 429."),
          kv_slots: Optional[int] = typer.Option(None, help="Requests generating at once (one KV cache each), interleaved token by token (default 4); with --llm vllm, requests handed to vLLM at once (default 32)."),
          encoder_cache_mb: float = typer.Option(256.0, help="Encoder cache (LRU of encoded videos) size in MiB."),
          max_body_mb: float = typer.Option(96.0, help="Largest request body in MiB."),
          max_video_mb: float = typer.Option(64.0, help="Largest video (or frame list) in MiB."),
          max_duration_s: float = typer.Option(3600.0, help="Longest video in seconds."),
          max_frames: int = typer.Option(64, help="Most frames a request may sample or send."),
          max_prompt_tokens: int = typer.Option(4096, help="Longest prompt in tokens (video placeholders included)."),
          default_max_tokens: int = typer.Option(256, help="Answer cap when a request gives no max_tokens."),
          media_timeout_s: float = typer.Option(10.0, help="Timeout of an http(s) media download."),
          threads: int = typer.Option(2, help="ONNX Runtime threads per session."),
          log_level: str = typer.Option("info", help="uvicorn log level."),
          llm: str = typer.Option("builtin", "--llm", help="builtin, or vllm: the LLM in an in-process vLLM engine (docs/vllm.md)."),
          llm_url: Optional[str] = typer.Option(None, "--llm-url", help="A `vllm serve --enable-prompt-embeds` server (implies --llm vllm)."),
          vllm_memory: float = typer.Option(0.15, help="With --llm vllm: vLLM's gpu_memory_utilization (on its CPU build, the share of RAM for weights, activations and KV cache)."),
          vllm_dtype: str = typer.Option("auto", help="With --llm vllm: the LLM's dtype in vLLM: auto (float32 for an fp LLM folder, which keeps greedy answers equal to the reference; bfloat16 for an engine's GPTQ folder), or float32, bfloat16, float16.")) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions with video_url parts)."""
    from valley_rt.serve import serve as run

    options = {"memory": vllm_memory, "dtype": vllm_dtype} if llm_url is None else None
    run(model, host=host, port=port, threads=threads, log_level=log_level, model_name=served_model_name,
        llm=llm, llm_url=llm_url, llm_options=options,
        allowed_media_path=allowed_media_path, max_queue=max_queue, kv_slots=kv_slots,
        encoder_cache_mb=encoder_cache_mb, max_body_mb=max_body_mb, max_video_mb=max_video_mb,
        max_duration_s=max_duration_s, max_frames=max_frames, max_prompt_tokens=max_prompt_tokens,
        default_max_tokens=default_max_tokens, media_timeout_s=media_timeout_s)


def main(argv: list[str] | None = None) -> None:
    """The `valley-rt` command: the typer app, with a command-line usage error (an unknown option, a
    missing or extra argument, a value of the wrong type) reported as one `error:` line and exit 2, like
    every other bad input, instead of click's boxed usage panel."""
    try:  # typer >= 0.2x vendors click under typer._click; older ones use click itself
        from typer._click.exceptions import ClickException, UsageError
    except ImportError:
        from click.exceptions import ClickException, UsageError

    try:
        rc = app(args=argv, prog_name="valley-rt", standalone_mode=False)
    except UsageError as e:
        if e.ctx is not None and not (argv if argv is not None else sys.argv[1:]):  # bare `valley-rt`: its help
            print(e.ctx.get_help())
            sys.exit(2)
        where = f"valley-rt {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else "valley-rt"
        print(f"error: {e.format_message()} (see `{where} --help`)", file=sys.stderr)
        sys.exit(2)
    except ClickException as e:  # e.g. a file argument click could not open
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C at a prompt
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
