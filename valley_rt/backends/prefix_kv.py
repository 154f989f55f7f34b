"""The system prompt's KV-cache rows, kept per machine so that a new process does not prefill them again.

Every first question about a video starts with the same text: the system prompt and "###  Human: ",
up to the first visual token. Its keys and values depend on nothing after it (causal attention, and
the prompt graph quantizes activations per token), so they can be computed once and reused. The
runtime prefills that prefix on its own (never as part of a longer prompt, so a stored copy and a
fresh one hold the same rows), stores the rows under $VALLEY_RT_CACHE/prefix-kv/, and a later process
with the same engine, runtime and CPU copies them into its KV cache instead of prefilling them.

The key hashes the LLM backend's identity (`OnnxLLM.prefix_identity`: the graph files' stat, the
ONNX Runtime version, the CPU's flags, which graph prefills) and the prefix's token ids. Each entry
is `<key>.npy` (float32 [2 * layers, kv_heads, tokens, head_dim]) beside `<key>.json` holding its
shape and sha256, checked on every read: a damaged or foreign entry is ignored and written again.
Only the newest MAX_ENTRIES entries are kept. Nothing here raises: a store that cannot be read or
written only costs the prefill it would have saved. `VALLEY_RT_PREFIX_CACHE=off` turns it off (the
whole prompt is then prefilled at once, as before).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from valley_rt.engine_format import cache_root
from valley_rt.errors import EngineError

PREFIX_DIR = "prefix-kv"  # under $VALLEY_RT_CACHE
PREFIX_ENV = "VALLEY_RT_PREFIX_CACHE"  # "on" (default) or "off"
PREFIX_MIN_FLOPS = 5e10  # a prefix cheaper than this to prefill is not worth a file (the demo's: ~1e7)
MAX_ENTRIES = 64


def prefix_store_enabled() -> bool:
    choice = os.environ.get(PREFIX_ENV, "on")
    if choice not in ("on", "off"):
        raise EngineError(f"{PREFIX_ENV}={choice!r}: expected on or off")
    return choice == "on"


class PrefixStore:
    """Prefix KV rows on disk, keyed by (backend identity, token ids)."""

    def __init__(self, identity: list, root: Path | None = None):
        self.identity = identity
        self.root = (root or cache_root()) / PREFIX_DIR
        self.hits = self.misses = 0

    def _key(self, ids: list[int]) -> str:
        material = json.dumps([self.identity, [int(i) for i in ids]])
        return hashlib.sha256(material.encode()).hexdigest()[:40]

    def get(self, ids: list[int], shape: tuple[int, ...]) -> np.ndarray | None:
        """The stored rows for `ids` when present, intact and of `shape`; else None."""
        key = self._key(ids)
        try:
            meta = json.loads((self.root / f"{key}.json").read_text())
            with open(self.root / f"{key}.npy", "rb") as f:
                rows = np.load(f, allow_pickle=False)
            ok = (rows.dtype == np.float32 and tuple(rows.shape) == tuple(shape) == tuple(meta["shape"])
                  and hashlib.sha256(rows.tobytes()).hexdigest() == meta["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.misses += 1
            return None
        self.hits += 1
        return rows

    def put(self, ids: list[int], rows: np.ndarray) -> None:
        """Store rows for ids (atomically: a reader sees the old entry, the new one, or none)."""
        key = self._key(ids)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        tmp = f".{os.getpid()}.tmp"
        with contextlib.suppress(OSError, ValueError):
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f"{key}.npy{tmp}", "wb") as f:
                np.save(f, rows, allow_pickle=False)
            meta = {"shape": list(rows.shape), "sha256": hashlib.sha256(rows.tobytes()).hexdigest(), "tokens": len(ids)}
            (self.root / f"{key}.json{tmp}").write_text(json.dumps(meta))
            os.replace(self.root / f"{key}.npy{tmp}", self.root / f"{key}.npy")
            os.replace(self.root / f"{key}.json{tmp}", self.root / f"{key}.json")
            self._prune()
        for name in (f"{key}.npy{tmp}", f"{key}.json{tmp}"):  # left over only when a write failed
            with contextlib.suppress(OSError):
                (self.root / name).unlink()

    def _prune(self) -> None:
        """Keep the newest MAX_ENTRIES entries (only files this store names: <40 hex>.npy / .json)."""
        entries = sorted((p for p in self.root.glob("*.npy") if _is_key(p.stem)),
                         key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in entries[MAX_ENTRIES:]:
            for p in (old, old.with_suffix(".json")):
                with contextlib.suppress(OSError):
                    p.unlink()


def _is_key(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)
