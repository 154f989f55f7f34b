"""Tensor-at-a-time reading and writing of (sharded) weight folders, so a 7B/13B model is never whole in memory.

Reading: `TensorIndex(folder)` reads every file's header first (safetensors: the 8-byte length + JSON
header; pickled `pytorch_model*.bin`: a weights-only, memory-mapped `torch.load`) and checks the folder
before any long work starts: the shard index (`*.index.json`) names files that exist and tensors that
are in them, and no safetensors file is shorter than its header says. A problem is one CheckpointError
naming the file and the tensor. `get(key)` then reads one tensor with plain file reads (no mmap), so
the process holds only the tensors it is working on; .bin shards are kept memory-mapped one file at a
time (a pickle has no offsets to seek to).

Writing: `write_sharded` plans the shards from names, shapes and dtypes, writes each file's header,
then asks `produce(name)` for one tensor at a time and streams its bytes: the layout Hugging Face
writes (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from valley_rt.errors import CheckpointError

# safetensors dtype names <-> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
HEADER_ALIGN = 8  # data starts 8-byte aligned, as safetensors itself pads


@dataclass
class TensorInfo:
    """Where one tensor lives: a safetensors byte range, or a key of a memory-mapped .bin shard."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = 0  # absolute byte offset in `file` (safetensors)
    end: int = 0

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Names, shapes, dtypes and byte ranges of a safetensors file, checked against the file's size."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} does not fit in the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[h["dtype"]]
            a, b = (int(x) for x in h["data_offsets"])
            info = TensorInfo(file, tuple(int(s) for s in h["shape"]), dtype, base + a, base + b)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name}: unreadable header entry {h!r}") from None
        if info.end - info.start != info.nbytes:
            raise CheckpointError(f"{file}: tensor {name}: {info.end - info.start} bytes for shape "
                                  f"{list(info.shape)} {h['dtype']} ({info.nbytes} expected)")
        if info.end > size:
            raise CheckpointError(f"{file}: truncated: tensor {name} ends at byte {info.end}, "
                                  f"the file has {size}")
        out[name] = info
    return out


def weight_files(folder: Path) -> tuple[list[Path], str]:
    """The weight files of an HF-style folder and their kind ("safetensors" or "bin"), following a
    shard index when there is one (every file it names must exist)."""
    for index_name, kind, pattern in (("model.safetensors.index.json", "safetensors", "model*.safetensors"),
                                      ("pytorch_model.bin.index.json", "bin", "pytorch_model*.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_index(index)
            files = []
            for fname in dict.fromkeys(weight_map.values()):
                if not (folder / fname).is_file():
                    example = next(k for k, v in weight_map.items() if v == fname)
                    raise CheckpointError(f"{folder / fname}: missing shard (listed in {index_name} for "
                                          f"tensor {example}, among others)")
                files.append(folder / fname)
            return files, kind
        found = sorted(folder.glob(pattern))
        if found:
            return found, kind
    raise CheckpointError(f"{folder}: no model*.safetensors or pytorch_model*.bin weights")


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a readable shard index ({type(e).__name__}: {e})") from None
    return weight_map


class TensorIndex:
    """Every tensor of a weight folder (or of explicit files), by name, read on demand."""

    def __init__(self, folder: Path | None = None, *, files: Iterable[Path] | None = None):
        if files is None:
            files, kind = weight_files(Path(folder))
        else:
            files = list(files)
            kind = "bin" if files and files[0].suffix == ".bin" else "safetensors"
        self.folder, self.kind, self.files = folder, kind, list(files)
        self.info: dict[str, TensorInfo] = {}
        self._bin: tuple[Path, dict] | None = None  # the one memory-mapped .bin shard kept open
        for f in self.files:
            part = read_safetensors_header(f) if kind == "safetensors" else self._bin_header(f)
            for name, info in part.items():
                if name in self.info:
                    raise CheckpointError(f"{f}: tensor {name} is also in {self.info[name].file}")
                self.info[name] = info
        if folder is not None:
            self._check_index(Path(folder))

    def _check_index(self, folder: Path) -> None:
        index_name = "model.safetensors.index.json" if self.kind == "safetensors" else "pytorch_model.bin.index.json"
        if not (folder / index_name).is_file():
            return
        for name, fname in _read_index(folder / index_name).items():
            info = self.info.get(name)
            if info is None or info.file.name != fname:
                where = f"it is in {info.file.name}" if info else "it is in no shard"
                raise CheckpointError(f"{folder / fname}: wrong shard: {index_name} puts tensor {name} there, "
                                      f"{where}")

    def _bin_header(self, f: Path) -> dict[str, TensorInfo]:
        part = self._load_bin(f)
        return {k: TensorInfo(f, tuple(v.shape), v.dtype) for k, v in part.items()}

    def _load_bin(self, f: Path) -> dict:
        if self._bin is not None and self._bin[0] == f:
            return self._bin[1]
        self._bin = None  # unmap the previous shard before mapping the next
        try:
            part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "refused"
            raise CheckpointError(f"{f}: refused or unreadable as a weights-only pickle "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{f}: expected a dict of tensors, found {type(part).__name__}")
        self._bin = (f, part)
        return part

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def __getitem__(self, key: str) -> TensorInfo:
        return self.info[key]

    def keys(self) -> list[str]:
        return list(self.info)

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read into fresh, 64-byte aligned memory (its dtype as stored)."""
        info = self.info.get(key)
        if info is None:
            raise CheckpointError(f"{self.folder}: expected tensor {key!r}, not found")
        if self.kind == "bin":
            return self._load_bin(info.file)[key].clone()
        t = torch.empty(info.shape, dtype=info.dtype)  # torch's allocator: 64-byte aligned
        if t.numel():
            with open(info.file, "rb") as f:
                f.seek(info.start)
                if f.readinto(t.view(-1).view(torch.uint8).numpy()) != info.end - info.start:
                    raise CheckpointError(f"{info.file}: truncated while reading tensor {key}")
        return t

    def close(self) -> None:
        self._bin = None


# -- writing --------------------------------------------------------------------------------------
def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list]:
    """Split entries, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, cur, size = [], [], 0
    for e in entries:
        n = nbytes(tuple(e[1]), e[2])
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _write_one(file: Path, entries: list, produce: Callable[[str], torch.Tensor | None], metadata: dict | None) -> int:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in entries:
        n = nbytes(tuple(shape), dtype)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % HEADER_ALIGN)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            t = produce(name)
            if t is None:  # all zeros: skipped over, a hole where the file system keeps them sparse
                f.seek(nbytes(tuple(shape), dtype), os.SEEK_CUR)
                continue
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: produced {list(t.shape)} {t.dtype}, planned {list(shape)} {dtype}")
            t = t.detach().contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)
            del t
        f.truncate(8 + len(raw) + offset)  # the length, when the last tensors were skipped over
    return offset


def write_sharded(folder: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                  produce: Callable[[str], torch.Tensor], *, max_shard_bytes: int = 2 * 2**30,
                  name: str = "model", metadata: dict | None = None) -> list[Path]:
    """Write entries [(name, shape, dtype)] as `{name}.safetensors`, or as numbered shards plus
    `{name}.safetensors.index.json` when they exceed max_shard_bytes. produce(name) is called once per
    tensor, in order, and its result is written and dropped before the next call; None stands for an
    all-zero tensor, which is not written but skipped over (a hole: no disk blocks where the file system
    keeps files sparse)."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"} if metadata is None else metadata
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        f = folder / f"{name}.safetensors"
        _write_one(f, shards[0], produce, metadata)
        return [f]
    files, weight_map, total = [], {}, 0
    for i, part in enumerate(shards):
        f = folder / f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_one(f, part, produce, metadata)
        weight_map.update({e[0]: f.name for e in part})
        files.append(f)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files
