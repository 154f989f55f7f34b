"""The `valley-rt` command line: thin typer commands, each mapping onto one keyword-only function.

Heavy imports (torch, transformers, onnxruntime) happen inside the commands so `--help` is instant.
Every `ValleyError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from valley_rt import __version__
from valley_rt.errors import ValleyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="valley-rt: fast, faithful inference for the Valley video LLM.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"valley-rt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def user_errors(fn):
    """Turn a ValleyError (and a missing file) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValleyError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


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
                None, help="CLIP vision folder, when the original does not carry the tower in its weights.")) -> None:
    """Convert an original Valley checkpoint into the valley-rt format."""
    from valley_rt.checkpoint import convert_original

    convert_original(original_dir=original_dir, out_dir=out_dir, base_dir=base, vision_tower_dir=vision_tower)
    typer.echo(f"wrote {out_dir}")


# Commands of the other modules are registered below (one line each).


@app.command()
@user_errors
def synth(out_dir: Path = typer.Argument(..., help="Folder for videos/*.mp4, data.json and meta.json."),
          n: int = typer.Option(..., "--n", help="Number of clips (each gives several records)."),
          seed: int = typer.Option(..., "--seed", help="Split seed; different seeds never share a clip."),
          frames_hint: int = typer.Option(8, "--frames-hint", help="Frames the model samples; events stay visible in them."),
          workers: int = typer.Option(1, "--workers", help="Processes; the output does not depend on it.")) -> None:
    """Generate the synthetic video-instruction dataset (rendered mp4 clips + Valley-format records)."""
    from valley_rt.train.synth import generate

    meta = generate(out_dir, n=n, seed=seed, frames_hint=frames_hint, workers=workers)
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
