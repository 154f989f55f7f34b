"""What the exported int4 decode graph computes, in native code (native_decode.c): decode steps with an
int4 GEMV that streams the weights at about the CPU's read rate, and appends of many tokens (a prompt)
with the linears as int8 GEMMs over all of them: on the AMX-INT8 tiles where this process may use them
(`amx_usable`; the tiles' permission is asked for by `valley_rt.cpu.cpu_flags`), else with AVX512-VNNI.

A decode step reads every weight once, so its speed is how fast the weights stream from memory. ONNX
Runtime's MatMulNBits keeps 67-75 % of the read rate of the threads it runs on, and a 1.1B step adds
attention and norms on top (docs/peers.md); the GEMV here prefetches ahead of its loads and reaches
about the read rate itself (benchmarks/bench_native_decode.py). It reads the decode graph's own
initializers in place (the data file memory-mapped, no packing at load), so an engine needs no
re-export, and it writes the same KV cache rows the ONNX graphs read.

Used in place of the int4 graph where `VALLEY_RT_DECODE` allows (auto: wherever it can run): an x86 CPU
with AVX512-F/BW/VL/DQ and AVX512-VNNI, a C compiler to build the kernel once per machine (into
$VALLEY_RT_CACHE/native/), and a decode graph of the layout `valley_rt.export.llm_onnx` writes for int4
layers (fused q/k/v and gate/up, no act-order permutation, head size unpadded, int8 or int4 lm_head).
Anything else keeps ONNX Runtime's graph, and `NativeDecoder.open` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

import numpy as np

from valley_rt.errors import EngineError

DECODE_ENV = "VALLEY_RT_DECODE"  # "auto" (default), "native" (required: fail if it cannot run), "onnxruntime"
DECODE_CHOICES = ("auto", "native", "onnxruntime")
SOURCE = Path(__file__).with_name("native_decode.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-mavx512f", "-mavx512bw", "-mavx512vl",
          "-mavx512dq", "-mavx512vnni", "-mfma"]
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
ALLOWED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "MatMulNBits",
               "GroupQueryAttention", "Split", "QuickGelu", "Mul", "Slice", "Identity"}


def decode_choice() -> str:
    choice = os.environ.get(DECODE_ENV, "auto")
    if choice not in DECODE_CHOICES:
        raise EngineError(f"{DECODE_ENV}={choice!r}: expected auto, native or onnxruntime")
    return choice


def cpu_reason() -> str | None:
    """Why this CPU cannot run the kernel, or None."""
    from valley_rt.cpu import cpu_flags

    missing = [f for f in NEEDED_FLAGS if f not in cpu_flags()]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def amx_usable(lib: ctypes.CDLL) -> bool:
    """Whether prompts run on the AMX-INT8 tiles: the CPU has them, Linux lets this process use them
    (`cpu_flags` asks), and the kernel was built with them."""
    from valley_rt.cpu import cpu_flags

    return "amx_int8" in cpu_flags() and bool(lib.vrt_amx_built())


class _Linear(ctypes.Structure):
    _fields_ = [("b", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zp", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bits", ctypes.c_int32), ("bs", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("threads", ctypes.c_int32), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("max_pos", ctypes.c_int64), ("final_norm", ctypes.c_void_p), ("lm_head", _Linear),
                ("layer", ctypes.POINTER(_Layer)), ("amx", ctypes.c_int32)]


@functools.cache
def source_key() -> str:
    """The kernel source's hash (with its header): what results computed by one version of it (e.g.
    stored prefix rows) are keyed by."""
    return _file_key(SOURCE)


# Appends of up to this many tokens run as decode steps: on the 1.1B bench engine two steps took 54 ms
# where one 2-token GEMM pass took 93-98 ms (it unpacks every weight for the tokens); from 8 tokens on the
# GEMM is ahead (docs/cpu_latency.md section 11).
STEPWISE_MAX = 3

_BUILD_LOCK = threading.Lock()
_LOADED: dict[Path, ctypes.CDLL] = {}  # per process: one library per build


def build_library(source: Path, cflags: list[str], name: str, what: str) -> tuple[ctypes.CDLL | None, str]:
    """The C file `source` compiled with `cflags` into $VALLEY_RT_CACHE/native/<key>/<name> (key: the
    hash of the source and native_common.h, the flags and the compiler's version) and loaded, or None and
    why not. The build writes a temporary file and renames it, so concurrent builds never see half a file.
    what: the kernel's name in messages."""
    from valley_rt.engine_format import cache_root

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, f"no C compiler (cc) to build the {what} kernel"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    key = hashlib.sha256((_file_key(source) + " ".join(cflags) + version).encode()).hexdigest()[:16]
    target = cache_root() / "native" / key / name
    with _BUILD_LOCK:
        if target in _LOADED:
            return _LOADED[target], ""
        try:
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                run = subprocess.run([cc, *cflags, "-o", str(tmp), str(source), "-lm"], capture_output=True,
                                     text=True, timeout=300)
                if run.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    lines = (run.stderr or run.stdout).strip().splitlines()
                    return None, f"building the {what} kernel failed: {lines[0] if lines else run.returncode}"
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
            st = target.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o022:  # loaded into this process: ours, and ours only
                return None, f"{target}: not owned by this user or writable by others; not loaded"
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as e:  # an unwritable cache, a compiler that hangs, ...
            return None, f"building or loading the {what} kernel ({target}) failed: {e}"
        _LOADED[target] = lib
    return lib, ""


HEADER = Path(__file__).with_name("native_common.h")  # included by every native kernel


@functools.cache
def _file_key(path: Path) -> str:
    """The hash of a kernel's source and the header it includes."""
    return hashlib.sha256(Path(path).read_bytes() + HEADER.read_bytes()).hexdigest()[:16]


def library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled decode kernel, or None and why not (`build_library`)."""
    lib, why = build_library(SOURCE, CFLAGS, "libvrt_decode.so", "native decode")
    if lib is None:
        return None, why
    lib.vrt_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.vrt_decode_step.restype = ctypes.c_int
    lib.vrt_prefill.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p),
                                ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.vrt_prefill.restype = ctypes.c_int
    lib.vrt_linear_rows.argtypes = [ctypes.POINTER(_Linear), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int, ctypes.c_int]
    lib.vrt_linear_rows.restype = ctypes.c_int
    lib.vrt_amx_built.argtypes = []
    lib.vrt_amx_built.restype = ctypes.c_int
    return lib, ""


_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}


def _fields(buf: memoryview):
    """(field number, wire type, value) of one protobuf message: varints as ints, fixed32/64 as bytes,
    length-delimited fields as memoryviews (sub-messages, strings, packed arrays)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = bytes(buf[i:i + 4]), i + 4
        elif wire == 1:
            value, i = bytes(buf[i:i + 8]), i + 8
        else:
            raise ValueError(f"protobuf wire type {wire} is not read here")
        yield field, wire, value


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _attribute(buf: memoryview):
    name, value, ints = "", None, []
    for f, w, v in _fields(buf):
        if f == 1:
            name = bytes(v).decode()
        elif f == 2:
            value = float(np.frombuffer(v, "<f4")[0])
        elif f == 3:
            value = _signed(v)
        elif f == 4:
            value = bytes(v)
        elif f == 8:  # ints, packed or not
            if w == 2:
                j = 0
                while j < len(v):
                    x, j = _varint(v, j)
                    ints.append(_signed(x))
            else:
                ints.append(_signed(v))
    return name, (ints if ints and value is None else value)


def read_graph(model_file: Path) -> tuple[list[dict], dict[str, dict]]:
    """The nodes (op_type, inputs, outputs, attrs, in order) and initializers (dims, dtype and raw bytes or
    external location / offset / length) of an ONNX file, read straight from its protobuf encoding:
    the engine path does not depend on the onnx package."""
    with open(model_file, "rb") as f:  # mapped, not read: a graph with its weights inside can be large
        buf = memoryview(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
    graph = next((v for f, w, v in _fields(buf) if f == 7), None)
    if graph is None:
        raise EngineError(f"{model_file}: no graph in this ONNX file")
    nodes, inits = [], {}
    for f, w, v in _fields(graph):
        if f == 1:
            node = {"op_type": "", "inputs": [], "outputs": [], "attrs": {}}
            for nf, nw, nv in _fields(v):
                if nf == 1:
                    node["inputs"].append(bytes(nv).decode())
                elif nf == 2:
                    node["outputs"].append(bytes(nv).decode())
                elif nf == 4:
                    node["op_type"] = bytes(nv).decode()
                elif nf == 5:
                    k, a = _attribute(nv)
                    node["attrs"][k] = a
            nodes.append(node)
        elif f == 5:
            t = {"dims": [], "dtype": None, "raw": None, "external": {}}
            for tf, tw, tv in _fields(v):
                if tf == 1:
                    if tw == 2:
                        j = 0
                        while j < len(tv):
                            x, j = _varint(tv, j)
                            t["dims"].append(x)
                    else:
                        t["dims"].append(tv)
                elif tf == 2:
                    t["dtype"] = _DTYPES.get(tv)
                elif tf == 8:
                    t["name"] = bytes(tv).decode()
                elif tf == 9:
                    t["raw"] = tv
                elif tf == 4 and tw == 2:  # float_data, packed
                    t["typed"] = np.frombuffer(bytes(tv), "<f4")
                elif tf == 5 and tw == 2:  # int32_data, packed varints (also int8 / uint8 / int16 values)
                    j, vals = 0, []
                    while j < len(tv):
                        x, j = _varint(tv, j)
                        vals.append(_signed(x))
                    t["typed"] = np.array(vals, np.int64)
                elif tf == 13:
                    entry = dict((ef, bytes(ev).decode()) for ef, ew, ev in _fields(tv))
                    t["external"][entry.get(1, "")] = entry.get(2, "")
            if "name" in t:
                inits[t["name"]] = t
    return nodes, inits


class Initializers:
    """The graph's initializers by name, as arrays: external ones viewed in place in the mapped data file."""

    def __init__(self, inits: dict[str, dict], folder: Path):
        self._maps: dict[str, mmap.mmap] = {}
        self._folder = folder
        self._by_name = inits

    def _map(self, location: str) -> mmap.mmap:
        if location not in self._maps:
            with open(self._folder / location, "rb") as f:
                self._maps[location] = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        return self._maps[location]

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._by_name[name]
        if t["dtype"] is None:
            raise EngineError(f"initializer {name}: a data type the native decoder does not read")
        count = int(np.prod(t["dims"])) if t["dims"] else 1
        if t["external"]:
            ext = t["external"]
            arr = np.frombuffer(self._map(ext["location"]), dtype=t["dtype"], count=count, offset=int(ext.get("offset", 0)))
        elif t["raw"] is not None:
            arr = np.frombuffer(t["raw"], dtype=t["dtype"], count=count)  # read-only, in the mapped graph file
        elif t.get("typed") is not None and t["typed"].size == count:
            arr = t["typed"].astype(t["dtype"])
        else:
            raise EngineError(f"initializer {name}: stored as typed fields, which the native decoder does not read")
        return arr.reshape(tuple(t["dims"]))

    def touch(self) -> None:
        """Read every mapped page once (the first decode step would otherwise fault them in)."""
        for m in self._maps.values():
            m.madvise(mmap.MADV_WILLNEED)
            np.frombuffer(m, np.uint8)[::4096].sum()


class NativeDecoder:
    """The int4 decode graph's computation in native code, over its own weights (see the module doc).
    Stateless between calls: the caller owns the KV cache and the position."""

    def __init__(self, lib, model_struct, keep, inits: Initializers, shape: dict):
        self._lib, self._model, self._keep, self._inits = lib, model_struct, keep, inits
        self.hidden, self.vocab = int(shape["hidden_size"]), int(shape["vocab_size"])
        self.layers = int(shape["num_layers"])

    @classmethod
    def open(cls, model_file: Path, meta: dict, threads: int | None) -> tuple["NativeDecoder | None", str]:
        """The decoder for this graph, or None and why it cannot run here."""
        why = cpu_reason()
        if why:
            return None, why
        nodes, tensors = read_graph(model_file)
        plan, why = _plan(nodes, meta)
        if plan is None:
            return None, why
        lib, why = library()
        if lib is None:
            return None, why
        inits = Initializers(tensors, model_file.parent)
        keep: list = []

        def ptr(name: str, dtype) -> int:
            arr = inits[name]
            if arr.dtype != dtype:
                raise EngineError(f"{model_file}: initializer {name} is {arr.dtype}, expected {np.dtype(dtype)}")
            keep.append(arr)
            return arr.ctypes.data

        def lin(node: dict) -> _Linear:
            a, i = node["attrs"], node["inputs"]
            return _Linear(ptr(i[1], np.uint8), ptr(i[2], np.float32), ptr(i[3], np.uint8),
                           int(a["N"]), int(a["K"]), int(a["bits"]), int(a["block_size"]))

        shape = meta["shape"]
        layers = (_Layer * len(plan["layers"]))()
        for i, ly in enumerate(plan["layers"]):
            layers[i] = _Layer(ptr(ly["ln1"], np.float32), ptr(ly["ln2"], np.float32), lin(ly["qkv"]), lin(ly["o"]),
                               lin(ly["gate_up"]), lin(ly["down"]))
        cos, sin = inits[plan["cos"]], inits[plan["sin"]]
        keep += [cos, sin, layers]
        m = _Model(len(plan["layers"]), int(shape["hidden_size"]), int(shape["num_heads"]), int(shape["num_kv_heads"]),
                   int(meta["cache_head_dim"]), int(shape["intermediate_size"]), int(shape["vocab_size"]),
                   int(threads or os.cpu_count() or 1), plan["eps"], plan["scale"], cos.ctypes.data, sin.ctypes.data,
                   cos.shape[0], ptr(plan["final_norm"], np.float32), lin(plan["lm_head"]),
                   ctypes.cast(layers, ctypes.POINTER(_Layer)), int(amx_usable(lib)))
        return cls(lib, m, keep, inits, shape), ""

    @property
    def prompt_kernel(self) -> str:
        """What appends of many tokens run on: "amx" (the AMX-INT8 tiles) or "vnni" (AVX512-VNNI)."""
        return "amx" if self._model.amx else "vnni"

    @property
    def max_positions(self) -> int:
        return int(self._model.max_pos)

    def warm(self) -> None:
        self._inits.touch()

    def step(self, x: np.ndarray, cache: list[np.ndarray], pos: int, logits: np.ndarray) -> None:
        """Append the token embedded as x [hidden] at `pos` to `cache` (OnnxLLM's: K and V per layer,
        [1, kv_heads, slots, head_dim] fp32) and write its next-token logits into `logits` [vocab]."""
        self.append(np.asarray(x, np.float32).reshape(1, -1), cache, pos, logits)

    def append(self, x: np.ndarray, cache: list[np.ndarray], pos: int, logits: np.ndarray) -> None:
        """Append the tokens embedded as x [m, hidden] at positions pos .. pos + m - 1 (as m steps would,
        with the linears as int8 GEMMs over the m rows) and write the last one's next-token logits."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0] if x.ndim == 2 else 0
        m = self._model
        slots = cache[0].shape[2]
        want = (1, m.kv_heads, slots, m.head_dim)
        # the kernel writes through these pointers: every buffer must be what it assumes
        if (len(cache) != 2 * self.layers or any(c.shape != want or c.dtype != np.float32 or not c.flags.c_contiguous
                                                 for c in cache)):
            raise ValueError(f"native decode step: expected {2 * self.layers} float32 KV buffers of shape {list(want)}")
        if (n < 1 or x.shape[1] != self.hidden or logits.size != self.vocab or logits.dtype != np.float32
                or not logits.flags.c_contiguous):
            raise ValueError(f"native decode step: expected [m, {self.hidden}] embeddings and a float32 "
                             f"[{self.vocab}] logits buffer")
        if pos < 0 or pos + n > min(slots, self.max_positions):
            raise ValueError(f"native decode: positions {pos}..{pos + n - 1} outside the cache of {slots} rows")
        keys = (ctypes.c_void_p * self.layers)(*[c.ctypes.data for c in cache[0::2]])
        values = (ctypes.c_void_p * self.layers)(*[c.ctypes.data for c in cache[1::2]])
        if n <= STEPWISE_MAX:  # one decode step per token: each streams the weights once, no unpacking
            for i in range(n):
                rc = self._lib.vrt_decode_step(ctypes.byref(self._model), x[i].ctypes.data, keys, values, slots,
                                               pos + i, logits.ctypes.data)
                if rc != 0:
                    break
        else:
            rc = self._lib.vrt_prefill(ctypes.byref(self._model), x.ctypes.data, n, keys, values, slots, pos,
                                       logits.ctypes.data)
        if rc != 0:
            raise MemoryError("native decode: no scratch memory")


def _plan(nodes: list[dict], meta: dict) -> tuple[dict | None, str]:
    """The decode graph's weights per layer, when it has exactly the layout the kernel computes."""
    shape = meta["shape"]
    L = int(shape["num_layers"])
    if int(meta["cache_head_dim"]) != int(shape.get("head_dim") or shape["hidden_size"] // shape["num_heads"]):
        return None, "the decode graph pads its attention heads"
    counts = Counter(n["op_type"] for n in nodes)
    other = sorted(set(counts) - ALLOWED_OPS)
    if other:
        return None, f"the decode graph has ops the native kernel does not compute ({', '.join(other)})"
    want = {"MatMulNBits": 4 * L + 1, "GroupQueryAttention": L, "SimplifiedLayerNormalization": 1,
            "SkipSimplifiedLayerNormalization": 2 * L, "Split": L, "QuickGelu": L, "Mul": L}
    if any(counts.get(op, 0) != n for op, n in want.items()):
        return None, "the decode graph's layout differs from fused q/k/v and gate/up int4 layers"
    mm = [n for n in nodes if n["op_type"] == "MatMulNBits"]
    for n in mm:
        a = n["attrs"]
        if len(n["inputs"]) < 4 or not n["inputs"][3] or a.get("bits") not in (4, 8) or a.get("block_size") not in (32, 64, 128):
            return None, "a MatMulNBits node without zero points, or with bits / block size the kernel lacks"
    norms = [n for n in nodes if n["op_type"] in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")]
    gqa = [n for n in nodes if n["op_type"] == "GroupQueryAttention"]
    ga = gqa[0]["attrs"]
    if (ga.get("do_rotary") != 1 or ga.get("rotary_interleaved", 0) != 0 or ga.get("num_heads") != int(shape["num_heads"])
            or ga.get("kv_num_heads") != int(shape["num_kv_heads"])):
        return None, "the attention is not rotary (half split) over the engine's heads"
    if any(len(q["inputs"]) < 9 or q["inputs"][1] or q["inputs"][2] for q in gqa):
        return None, "the attention does not take packed q/k/v"
    eps = {n["attrs"].get("epsilon", 1e-5) for n in norms}
    if len(eps) != 1:
        return None, "the norms differ in epsilon"
    inter = int(shape["intermediate_size"])
    if any(mm[4 * i + 2]["attrs"].get("N") != 2 * inter for i in range(L)):
        return None, "gate/up are not one fused linear"
    layers = []
    for i in range(L):
        ln1 = norms[2 * i]
        layers.append({"ln1": ln1["inputs"][1] if ln1["op_type"] == "SimplifiedLayerNormalization" else ln1["inputs"][2],
                       "ln2": norms[2 * i + 1]["inputs"][2], "qkv": mm[4 * i], "o": mm[4 * i + 1],
                       "gate_up": mm[4 * i + 2], "down": mm[4 * i + 3]})
    return {"layers": layers, "lm_head": mm[-1], "final_norm": norms[-1]["inputs"][2], "eps": float(eps.pop()),
            "scale": float(ga.get("scale", 1.0 / np.sqrt(int(meta["cache_head_dim"])))),
            "cos": gqa[0]["inputs"][7], "sin": gqa[0]["inputs"][8]}, ""
