"""Valley's instruction-data format: a JSON list of records, read and checked.

A data file is a JSON list of `{"id", "video", "conversations": [{"from": "human" | "gpt", "value"}...]}`
(extra keys such as the synthetic set's `"task"` / `"short"` / `"choices"` are kept). Videos resolve
relative to the JSON file's folder, or its `videos/` subfolder (the layout the demo's synth writes).
Training, evaluation and the export's GPTQ calibration all read data through `load_records`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valley_rt.errors import DataError
from valley_rt.prompt import VIDEO, Turn

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class Record:
    id: str
    video: Path  # resolved, absolute
    turns: list[Turn]  # alternating human / gpt, the first human turn holds <video>
    task: str | None = None
    short: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.turns[-1].text


def _parse(raw: Any, index: int, root: Path, check_video: bool) -> Record:
    if not isinstance(raw, dict):
        raise DataError(f"record #{index}: expected an object, got {type(raw).__name__}")
    rid = str(raw.get("id", f"#{index}"))
    where = f"record {rid!r}"
    video = raw.get("video")
    if not isinstance(video, str) or not video:
        raise DataError(f"{where}: missing 'video' (expected a path relative to {root})")
    path = (root / video).resolve()
    if not path.is_file() and (root / "videos" / video).is_file():
        path = (root / "videos" / video).resolve()  # synth's layout: data.json next to videos/
    if check_video and not path.is_file():
        raise DataError(f"{where}: video {path} does not exist")
    conv = raw.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{where}: 'conversations' must be a list of at least 2 turns")
    turns = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {k} must be an object with a string 'value'")
        role = ROLES.get(str(turn.get("from", "")).lower())
        expected = "human" if k % 2 == 0 else "gpt"
        if role != expected:
            raise DataError(f"{where}: turn {k} is from {turn.get('from')!r}, expected {expected!r}")
        turns.append(Turn(role, turn["value"]))
    if len(turns) % 2:
        raise DataError(f"{where}: the conversation ends with a human turn (no answer to learn)")
    n_video = sum(t.text.count(VIDEO) for t in turns)
    if n_video == 0:  # Valley puts the video before the first question when the text does not say where
        turns[0] = Turn("human", f"{VIDEO}\n{turns[0].text}")
    elif n_video > 1 or VIDEO not in turns[0].text:
        raise DataError(f"{where}: expected one {VIDEO} in the first human turn, found {n_video} in total")
    extra = {k: v for k, v in raw.items() if k not in ("id", "video", "conversations", "task", "short")}
    return Record(rid, path, turns, raw.get("task"), bool(raw.get("short", False)), extra)


def load_records(path: str | os.PathLike, *, skip_bad: bool = False,
                 check_videos: bool = True) -> tuple[list[Record], list[str]]:
    """Read a Valley instruction JSON. Returns (records, problems); with skip_bad=False the first
    problem raises DataError naming the record, otherwise bad records are skipped and listed."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: data file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    records, problems = [], []
    for i, item in enumerate(raw):
        try:
            records.append(_parse(item, i, path.parent, check_videos))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path}: {e}") from None
            problems.append(str(e))
    if not records:
        raise DataError(f"{path}: no usable records ({len(problems)} skipped)")
    return records, problems
