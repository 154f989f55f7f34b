"""The engine folder format, as the runtime reads it: file names, format versions, graph I/O names and
the manifest check. The exporters (valley_rt.export) write this format and import these names from here;
the runtime never imports the exporters.

    ENGINE/manifest.json   {"format": "valley-rt-engine", "version": 1, "source": {...}, "config": ValleyConfig,
                            "precision": {...}, "parity": {...}, "packages": {...}, "files": {...},
                            "gpu": {...} | null, "artifacts": {relative path: {"sha256", "bytes"}}}
    ENGINE/vision.onnx     crops uint8 [T, H, W, 3] -> pooled [N, D], frames [T, D]
    ENGINE/openvino/       optional OpenVINO IR of the vision graph (vision.xml + .bin, bf16 / int8 on the CPU),
                           named by the manifest's "vision_cpu" entry with the ISA it was chosen on
    ENGINE/gpu/            optional fp16 CUDA graph and TensorRT engine cache
    ENGINE/llm/            llm.onnx (+ .data), embed_tokens.npy, llm_onnx.json
    ENGINE/tokenizer/      the checkpoint's tokenizer files, verbatim

Trade-off: the manifest lists every file with its sha256, so loading can prove the folder is the one
that was exported (a flipped byte, a truncated copy, a file from another export all fail in one line).
Hashing reads every byte (~1 s per GB); `load_manifest(verify=False)` checks presence and sizes only,
for callers that verified once and want a fast cold start.

Verified stamps: after a full check (or an export), $VALLEY_RT_CACHE/verified/<manifest hash>.json
records each artifact's size, mtime, ctime, inode and device; a later `verify=True` load re-hashes only
the artifacts whose stat changed, or changed within RACY_NS of the stamp (timestamp ticks are coarse).
A file rewritten in place changes its ctime, which no user call can set back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from valley_rt.errors import CheckpointError, EngineError

# -- the folder --------------------------------------------------------------------------------------
FORMAT = "valley-rt-engine"
VERSION = 1
MANIFEST = "manifest.json"
VISION_FILE = "vision.onnx"
LLM_DIR = "llm"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")

# -- the vision graph --------------------------------------------------------------------------------
VISION_INPUT = "crops"  # uint8 [T, H, W, 3]
VISION_OUTPUTS = ("pooled", "frames")  # float32 [N, D], [T, D]
VISION_FEATURES = "features"  # optional extra output: float32 [T, 1+N, C], the selected layer's hidden states

# -- the OpenVINO vision graph (ENGINE/openvino/, written when the export measured it fastest on the CPU) -
OPENVINO_FILE = "openvino/vision.xml"  # its weights: openvino/vision.bin

# -- the GPU vision graphs (ENGINE/gpu/, written on a CUDA machine) -----------------------------------
GPU_DIR = "gpu"
FP16_FILE = "vision_fp16.onnx"
TRT_FILE = "vision_trt.onnx"
TRT_CACHE = "trt_cache"
MIN_FRAMES, OPT_FRAMES, MAX_FRAMES = 1, 8, 64  # the TensorRT optimization profile

# -- the LLM half (ENGINE/llm/) -----------------------------------------------------------------------
LLM_FORMAT_VERSION = 2  # bump on any change of the graph or files; OnnxLLM refuses other versions
LLM_MODEL_FILE = "llm.onnx"
LLM_DATA_FILE = "llm.onnx.data"
LLM_EMBED_FILE = "embed_tokens.npy"
LLM_META_FILE = "llm_onnx.json"

# -- the LLM graph's shape and column layout (written by export/llm_onnx.py, read back by backends/llm_cuda.py)
@dataclass
class LlamaShape:
    """The decoder's sizes, read from the HF config.json."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool = False

    @property
    def cache_head_dim(self) -> int:
        """GroupQueryAttention on the CPU needs head_size % 16 == 0; smaller heads are zero-padded."""
        return -(-self.head_dim // 16) * 16

    @classmethod
    def from_hf_config(cls, cfg: dict, path: Path) -> "LlamaShape":
        rope = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{path}: expected default rotary embeddings, got rope_scaling {rope}")
        heads = int(cfg["num_attention_heads"])
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def head_columns(shape: LlamaShape, heads: int, rotary: bool) -> np.ndarray:
    """Source column of each padded projection column (-1 = a zero column). Rotary heads keep their
    two halves aligned with the padded halves, [x0 | 0 | x1 | 0], so rotate_half pairs stay pairs;
    value heads are [v | 0]."""
    hd, hp = shape.head_dim, shape.cache_head_dim
    cols = np.full((heads, hp), -1, np.int64)
    base = np.arange(heads)[:, None] * hd
    if rotary:
        half, half_p = hd // 2, hp // 2
        cols[:, :half] = base + np.arange(half)
        cols[:, half_p:half_p + half] = base + half + np.arange(half)
    else:
        cols[:, :hd] = base + np.arange(hd)
    return cols.reshape(-1)


_CHUNK = 1 << 22  # 4 MiB reads while hashing


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(folder: str | Path) -> list[str]:
    """Every regular file under folder, as sorted POSIX relative paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def folder_bytes(folder: str | Path) -> int:
    """The size of every regular file under folder (what file_hashes reads)."""
    return sum((Path(folder) / rel).stat().st_size for rel in list_files(folder))


def file_hashes(folder: str | Path) -> dict[str, str]:
    """Each regular file's sha256 under folder, by sorted POSIX relative path (one read of every byte)."""
    return {rel: sha256_file(Path(folder) / rel) for rel in list_files(folder)}


def folder_digest(hashes: dict[str, str], under: str = "") -> str:
    """hash_folder's digest from file_hashes; under="llm/": the digest of that subfolder alone, without
    reading its files again."""
    h = hashlib.sha256()
    for rel in sorted(r for r in hashes if r.startswith(under)):
        h.update(rel[len(under):].encode() + b"\0" + hashes[rel].encode() + b"\n")
    return h.hexdigest()


def hash_folder(folder: str | Path) -> str:
    """One sha256 over a folder: its sorted relative paths and each file's sha256 (the source checkpoint's id)."""
    return folder_digest(file_hashes(folder))


def artifact_path(engine_dir: str | Path, rel, *, where: str = "artifacts") -> Path:
    """engine_dir / rel, refused (EngineError) unless it is a relative path that stays inside engine_dir
    once symlinks are resolved."""
    engine_dir = Path(engine_dir)
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise EngineError(f"{engine_dir / MANIFEST}: {where} entry {rel!r} is not a relative path")
    pure = Path(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise EngineError(f"{engine_dir / MANIFEST}: {where} entry {rel!r} points outside the engine folder")
    path = engine_dir / pure
    root = engine_dir.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise EngineError(f"{engine_dir / MANIFEST}: {where} entry {rel!r} resolves to {real}, outside the "
                          f"engine folder")
    return path


def load_manifest(engine_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check an engine folder's manifest; EngineError (one line) on anything wrong.

    Checks: folder and manifest exist, JSON parses, format name and version match this valley-rt,
    every listed artifact exists with its size, no unlisted file was added, and (verify=True) every
    artifact's sha256.
    """
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: no such engine folder (create one with `valley-rt export CKPT --out {engine_dir}`)")
    if not path.is_file():
        raise EngineError(f"{path}: missing; {engine_dir} is not an engine folder (or its export did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"{path}: format {got!r}, expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise EngineError(f"{path}: engine format version {manifest.get('version')!r}, this valley-rt reads "
                          f"version {VERSION}; re-export the engine")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        raise EngineError(f"{path}: no artifacts listed")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise EngineError(f"{path}: 'files' is not an object")
    for name, rel in files.items():
        artifact_path(engine_dir, rel, where=f"files.{name}")
    for name in ("vision", "trt", "trt_cache"):
        gpu = manifest.get("gpu")
        if isinstance(gpu, dict) and gpu.get(name):
            artifact_path(engine_dir, gpu[name], where=f"gpu.{name}")
    cpu = manifest.get("vision_cpu")
    if isinstance(cpu, dict) and cpu.get("file"):
        artifact_path(engine_dir, cpu["file"], where="vision_cpu.file")
    for rel, entry in artifacts.items():
        f = artifact_path(engine_dir, rel)
        if not isinstance(entry, dict):
            raise EngineError(f"{path}: artifacts entry {rel!r} is not an object")
        if not f.is_file():
            raise EngineError(f"{f}: listed in {MANIFEST} but missing")
        size = f.stat().st_size
        if size != entry.get("bytes"):
            raise EngineError(f"{f}: {size} bytes, {MANIFEST} says {entry.get('bytes')} (truncated or replaced)")
    unlisted = [rel for rel in list_files(engine_dir) if rel != MANIFEST and rel not in artifacts]
    if unlisted:
        raise EngineError(f"{engine_dir / unlisted[0]}: not listed in {MANIFEST} (files were added after export)")
    if verify:
        trusted = _stamped_unchanged(engine_dir)
        for rel, entry in artifacts.items():
            if rel in trusted:
                continue
            digest = sha256_file(engine_dir / rel)
            if digest != entry.get("sha256"):
                raise EngineError(f"{engine_dir / rel}: sha256 {digest[:12]}..., {MANIFEST} says "
                                  f"{str(entry.get('sha256'))[:12]}... (modified after export)")
        if len(trusted) < len(artifacts):
            write_verified_stamp(engine_dir)
    return manifest


# -- verified stamps (see the module docstring) ------------------------------------------------------
RACY_NS = 2_000_000_000  # files changed within 2 s of the stamp are re-hashed: timestamp ticks are coarse


def cache_root() -> Path:
    """The user cache: $VALLEY_RT_CACHE, else ~/.cache/valley-rt (stamps, ORT's optimized graphs, prefix KV)."""
    return Path(os.environ.get("VALLEY_RT_CACHE") or Path.home() / ".cache" / "valley-rt")


# Entries of the user cache derived from one engine file (ORT's optimized vision graph, OpenVINO's
# compiled one) are folders holding a marker file: JSON with {"source": {"path", "stat"}} (the file
# they were derived from, as it was), whose mtime is the entry's last use. A new entry prunes the
# others: an entry whose source is gone or rewritten can never be used again (its key held the old
# stat), and one no load has used for UNUSED_DAYS is stale (another ONNX Runtime version, another CPU).
UNUSED_DAYS = 30


def source_record(path: Path) -> dict:
    """What a cache entry derived from `path` records of it (see `prune_cache_entries`)."""
    return {"path": str(Path(path).resolve()), "stat": file_stat(Path(path))}


def touch_entry(marker: Path) -> None:
    """Mark a cache entry used now (its marker's mtime); a cache that cannot be written stays as it is."""
    with contextlib.suppress(OSError):
        os.utime(marker)


def prune_cache_entries(root: Path, marker: str, *, keep: Path | None = None) -> list[Path]:
    """Remove the entry folders under `root` whose `marker` names a source that is gone or rewritten, or
    that were not used for UNUSED_DAYS; returns them. Only folders holding `marker` (what valley-rt wrote)
    are touched; folders being written (*.tmp), `keep` and anything unreadable are left alone."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = [e for e in root.iterdir() if e.is_dir() and not e.name.endswith(".tmp") and e != keep]
    except OSError:
        return removed
    for entry in entries:
        try:
            record = json.loads((entry / marker).read_text()).get("source")
            used = (entry / marker).stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        gone = False
        if isinstance(record, dict) and "path" in record:
            try:
                gone = file_stat(Path(record["path"])) != record.get("stat")
            except OSError:
                gone = True
        if gone or now - used > UNUSED_DAYS * 86400:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def stamp_dir() -> Path:
    """Where stamps live: $VALLEY_RT_CACHE/verified (default ~/.cache/valley-rt/verified)."""
    return cache_root() / "verified"


def _stamp_path(engine_dir: Path) -> Path:
    return stamp_dir() / (sha256_file(engine_dir / MANIFEST)[:32] + ".json")


def file_stat(path: Path) -> list[int]:
    """What says a file changed: size, mtime, ctime, inode, device (any write moves ctime)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def write_verified_stamp(engine_dir: str | Path) -> None:
    """Record that engine_dir's artifacts, as they are now, match its manifest. Call only right after
    hashing them (load_manifest(verify=True), or an export's write_manifest). A cache that cannot be
    written only costs the next load a full verification, so OSError is not raised."""
    engine_dir = Path(engine_dir)
    manifest = json.loads((engine_dir / MANIFEST).read_text())
    stamp = {"written_ns": time.time_ns(), "files": {rel: file_stat(engine_dir / rel) for rel in manifest["artifacts"]}}
    with contextlib.suppress(OSError):
        path = _stamp_path(engine_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path)


def _stamped_unchanged(engine_dir: Path) -> set[str]:
    """Artifacts whose stat equals the stamp's and which were not changed within RACY_NS of it."""
    try:
        stamp = json.loads(_stamp_path(engine_dir).read_text())
        written, files = int(stamp["written_ns"]), dict(stamp["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    trusted = set()
    for rel, recorded in files.items():
        with contextlib.suppress(OSError):
            now = file_stat(engine_dir / rel)
            if now == recorded and now[2] + RACY_NS < written:
                trusted.add(rel)
    return trusted
