"""Valley instruction data for training: label masking, a decoded-frame cache, batching.

Records are read by `valley_rt.records` (Valley's JSON format). Prompts are built with
`prompt.format_conversation` and tokenized with `prompt.encode`, exactly as at inference, and the
labels cover only assistant turns.

Decoding is the slow part of a CPU epoch, so each clip is decoded and resized once: `FrameCache`
keeps the uint8 centre crops ([T, crop, crop, 3], 4x smaller than floats) in memory, optionally also
as .npy files on disk, keyed by the file's path, size and mtime plus the frame count and
preprocessing config; normalization to floats happens per batch.

`group_by_video` merges the records of one clip into a single multi-turn conversation (the video in
the first human turn, as in Valley's multi-turn data), so a training step encodes each clip once for
all its questions; the turn order is reshuffled every epoch, so every question is seen first too.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from valley_rt.config import ValleyConfig
from valley_rt.errors import DataError, VideoError
from valley_rt.prompt import IGNORE_INDEX, VIDEO, Turn, encode, format_conversation
from valley_rt.records import Record, load_records  # noqa: F401  (the trainer's data API)

def group_by_video(records: list[Record]) -> list[Record]:
    """One multi-turn record per video (first appearance order); the video token goes in turn 0."""
    groups: dict[Path, list[Record]] = {}
    for r in records:
        groups.setdefault(r.video, []).append(r)
    out = []
    for video, recs in groups.items():
        turns = []
        for r in recs:
            for t in r.turns:
                turns.append(Turn(t.role, t.text.replace(VIDEO + "\n", "").replace(VIDEO, "")))
        turns[0] = Turn("human", f"{VIDEO}\n{turns[0].text}")
        out.append(Record("+".join(r.id for r in recs), video, turns, None, False, {"parts": len(recs)}))
    return out


def shuffle_turns(record: Record, rng: random.Random) -> list[Turn]:
    """The record's QA pairs in a random order, the video token moved to the new first question."""
    pairs = [(record.turns[i], record.turns[i + 1]) for i in range(0, len(record.turns), 2)]
    pairs = [(Turn("human", q.text.replace(VIDEO + "\n", "").replace(VIDEO, "")), a) for q, a in pairs]
    rng.shuffle(pairs)
    turns = [t for pair in pairs for t in pair]
    turns[0] = Turn("human", f"{VIDEO}\n{turns[0].text}")
    return turns


# ------------------------------------------------------------------------------------------- frames
class FrameCache:
    """Decoded, resized and cropped frames per clip (uint8 [T, crop, crop, 3]), decoded once."""

    def __init__(self, cfg: ValleyConfig, *, num_frames: int | None = None, disk_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self.num_frames = num_frames or cfg.sampling.num_frames
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.mem: dict[str, np.ndarray] = {}
        self.decoded = 0  # clips actually decoded (misses)

    def key(self, path: Path) -> str:
        st = path.stat()
        p = self.cfg.preprocess
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.num_frames}|{p.resize_short}|{p.crop_size}"
        return hashlib.sha1(ident.encode()).hexdigest()[:20]

    def crops(self, path: str | os.PathLike) -> np.ndarray:
        path = Path(path)
        hit = self.lookup(path)
        if hit is not None:
            return hit
        return self.store(path, decode_crops(path, self.cfg, self.num_frames))

    def lookup(self, path: Path) -> np.ndarray | None:
        """The clip's crops if they are in memory or on disk (then kept in memory), else None."""
        try:
            key = self.key(path)
        except FileNotFoundError:
            raise DataError(f"video {path} does not exist") from None
        hit = self.mem.get(key)
        if hit is None and self.disk_dir is not None and (self.disk_dir / f"{key}.npy").is_file():
            hit = self.mem[key] = np.load(self.disk_dir / f"{key}.npy")
        return hit

    def store(self, path: Path, arr: np.ndarray) -> np.ndarray:
        """Keep crops decoded (by decode_crops, maybe in another process) for `path`; counts a decode."""
        key = self.key(path)
        self.decoded += 1
        if self.disk_dir is not None:
            file = self.disk_dir / f"{key}.npy"
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, file)
        self.mem[key] = arr
        return arr

    def pixels(self, path: str | os.PathLike) -> torch.Tensor:
        """float32 [T, 3, crop, crop], normalized exactly like video.preprocess."""
        from valley_rt.video import normalize

        return normalize(self.crops(path), self.cfg.preprocess)


def decode_crops(path: Path, cfg: ValleyConfig, num_frames: int) -> np.ndarray:
    """Decode `num_frames` frames of a clip (read_video's sampling), resized and cropped: uint8 [T, c, c, 3]."""
    from valley_rt.video import read_video, resize_crop

    return resize_crop(read_video(path, num_frames=num_frames).frames, cfg.preprocess)


# ------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # [T, 3, crop, crop]


class InstructionDataset:
    """Records -> tokenized, label-masked samples with their video's pixels.

    `sample(i, epoch)` is deterministic in (seed, epoch, i): the multi-turn order of grouped records
    is drawn from it, so a resumed run sees exactly the same samples.
    """

    def __init__(self, records: list[Record], tokenizer, cfg: ValleyConfig, *, cache: FrameCache | None = None,
                 shuffle_turns: bool = True, seed: int = 0, max_length: int | None = None, skip_bad: bool = False):
        self.records = records
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.cache = cache or FrameCache(cfg)
        self.shuffle = shuffle_turns
        self.seed = seed
        self.max_length = max_length or cfg.llm.max_position_embeddings
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int, epoch: int = 0) -> Sample | None:
        rec = self.records[i]
        turns = rec.turns
        if self.shuffle and len(turns) > 2:
            turns = shuffle_turns(rec, random.Random(f"{self.seed}:{epoch}:{i}"))
        try:
            pixels = self.cache.pixels(rec.video)
        except (DataError, VideoError) as e:
            return self._bad(rec, f"video {rec.video}: {e}")
        text, spans = format_conversation(turns, system=self.cfg.system_prompt)
        ids, labels = encode(self.tokenizer, text, cfg=self.cfg, num_frames=pixels.shape[0], spans=spans)
        if len(ids) > self.max_length:
            return self._bad(rec, f"{len(ids)} tokens exceed max_length {self.max_length}")
        return Sample(rec.id, ids, labels, pixels)

    def _bad(self, rec: Record, why: str) -> None:
        msg = f"record {rec.id!r}: {why}"
        if not self.skip_bad:
            raise DataError(msg)
        self.skipped.append(msg)
        return None


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids / labels / attention_mask [B, L], pixel_values [B, T, 3, H, W]."""
    samples = [s for s in samples if s is not None]
    if not samples:
        raise DataError("a batch with no usable samples")
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        mask[b, :n] = 1
    frames = {s.pixel_values.shape[0] for s in samples}
    if len(frames) > 1:
        raise DataError(f"a batch mixes clips of {sorted(frames)} frames; use one frame count per run")
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack([s.pixel_values for s in samples])}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (n, seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
