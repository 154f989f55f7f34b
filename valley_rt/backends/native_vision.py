"""The vision stage of an engine whose vision graph is int8 (ONNX Runtime's dynamic quantization of the
exported CLIP ViT), with its encoder layers in native code on the CPU's AMX tiles (native_vision.c).

The encoder is ~99 % of the vision stage's work (ViT-L/14, 8 frames: ~1.2 T multiply-adds in its int8
linears). native_vision.c runs those linears as int8 GEMMs on the AMX-INT8 tiles with the graph's own int8
weights (per output channel), the activations quantized per token, int32 sums over the whole row; the
attention on the AMX-BF16 tiles. Around it, numpy: the normalization and patch embedding (a Conv of stride
= kernel: one matrix product), the class and position embeddings, the pre-LayerNorm, then the temporal
pooling and the projector (int8 weights, through the same GEMM).

Used for an engine's CPU vision (`backends.vision.pick_vision`, `native_policy`) where `VALLEY_RT_VISION_NATIVE`
allows (auto: wherever it can run): a CPU with AMX-INT8/BF16 tiles this process may use, a C compiler
(the kernel is built once per machine into $VALLEY_RT_CACHE/native/), and an int8 vision graph of the
layout `valley_rt.export.onnx_vision` writes (fused attention, LayerNorms before each block, quick-GELU,
int8 symmetric weights; head size a multiple of 32, widths multiples of 64) with mean or max pooling.
Anything else keeps the graph runtime, and `NativeVision.open` says why.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np

from valley_rt.backends.native_decode import Initializers, build_library, read_graph
from valley_rt.config import ValleyConfig
from valley_rt.errors import EngineError

NATIVE_ENV = "VALLEY_RT_VISION_NATIVE"  # "auto" (default): where it can run; "off": the graph runtime
SOURCE = Path(__file__).with_name("native_vision.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi", "avx512_bf16", "amx_tile", "amx_int8",
                "amx_bf16")
POOLING = ("mean", "max")


class _Linear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("qkv", _Linear), ("o", _Linear), ("fc1", _Linear), ("fc2", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int32), ("hidden", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32), ("threads", ctypes.c_int32),
                ("eps", ctypes.c_float), ("gelu_alpha", ctypes.c_float), ("layer", ctypes.POINTER(_Layer))]


def native_choice() -> str:
    choice = os.environ.get(NATIVE_ENV, "auto")
    if choice not in ("auto", "off"):
        raise EngineError(f"{NATIVE_ENV}={choice!r}: expected auto or off")
    return choice


def native_policy(manifest: dict | None) -> bool:
    """Whether an engine's CPU vision should run here natively (`VALLEY_RT_VISION_NATIVE` auto, an int8
    vision graph, mean or max pooling, a CPU with usable tiles); the graph's own layout is checked when
    it is opened (`NativeVision.open`), which may still decline."""
    if native_choice() == "off" or not manifest:
        return False
    if (manifest.get("precision") or {}).get("vision") != "int8":
        return False
    temporal = ((manifest.get("config") or {}).get("temporal") or {}).get("mode", "mean")
    return temporal in POOLING and cpu_reason() is None


def cpu_reason() -> str | None:
    """Why this CPU (or this process) cannot run the kernel, or None."""
    from valley_rt.cpu import cpu_flags

    missing = [f for f in NEEDED_FLAGS if f not in cpu_flags()]
    return f"the CPU lacks (or this process may not use) {', '.join(missing)}" if missing else None


def library() -> tuple[ctypes.CDLL | None, str]:
    lib, why = build_library(SOURCE, CFLAGS, "libvrt_vision.so", "native vision")
    if lib is None:
        return None, why
    lib.vv_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.vv_pack.restype = ctypes.c_int
    lib.vv_encode.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                              *[ctypes.c_void_p] * 7]
    lib.vv_encode.restype = ctypes.c_int
    lib.vv_linear_rows.argtypes = [ctypes.POINTER(_Linear), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.vv_linear_rows.restype = ctypes.c_int
    return lib, ""


class _Unsupported(Exception):
    """The graph is not of the layout the kernel computes (the message says where)."""


class _Graph:
    """Producers and consumers of an ONNX graph's tensors, to follow the exported ViT's chains."""

    def __init__(self, nodes: list[dict], inits: dict):
        self.nodes, self.inits = nodes, inits
        self.consumers: dict[str, list[dict]] = defaultdict(list)
        self.producer: dict[str, dict] = {}
        for n in nodes:
            for i in n["inputs"]:
                self.consumers[i].append(n)
            for o in n["outputs"]:
                self.producer[o] = n

    def only(self, tensor: str, op: str) -> dict:
        found = [n for n in self.consumers[tensor] if n["op_type"] == op]
        if len(found) != 1:
            raise _Unsupported(f"{tensor}: expected one {op} reading it, found {len(found)}")
        return found[0]

    def init(self, name: str) -> str:
        if name not in self.inits:
            raise _Unsupported(f"{name}: expected a weight (initializer)")
        return name

    def int8_linear(self, tensor: str) -> tuple[dict, str]:
        """The int8 linear reading `tensor` (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul by the
        activation scale times the weights' scales): its weights and the fp32 tensor it produces."""
        dq = self.only(tensor, "DynamicQuantizeLinear")
        mm = self.only(dq["outputs"][0], "MatMulInteger")
        cast = self.only(mm["outputs"][0], "Cast")
        mul = self.only(cast["outputs"][0], "Mul")
        scales = self.producer.get(next(i for i in mul["inputs"] if i != cast["outputs"][0]))
        if scales is None or scales["op_type"] != "Mul":
            raise _Unsupported(f"{mm['outputs'][0]}: its scales are not activation x weight scales")
        w_scale = next((i for i in scales["inputs"] if i in self.inits), None)
        if w_scale is None:
            raise _Unsupported(f"{mm['outputs'][0]}: no weight scales")
        return {"w": self.init(mm["inputs"][1]), "zp": mm["inputs"][3] if len(mm["inputs"]) > 3 else "",
                "scale": w_scale}, mul["outputs"][0]

    def bias_add(self, tensor: str) -> tuple[str, str]:
        """The Add of a bias to `tensor`: (bias initializer, output)."""
        add = self.only(tensor, "Add")
        bias = next((i for i in add["inputs"] if i != tensor), "")
        return self.init(bias), add["outputs"][0]


def _plan(nodes: list[dict], inits: dict, cfg: ValleyConfig) -> dict:
    """Which initializers feed the embeddings, every encoder layer and the projector."""
    g = _Graph(nodes, inits)
    v = cfg.vision
    D, heads = v.hidden_size, v.num_heads
    if cfg.temporal.mode not in POOLING:
        raise _Unsupported(f"temporal module {cfg.temporal.mode!r} (the native path pools by mean or max)")
    if v.hidden_act != "quick_gelu":
        raise _Unsupported(f"activation {v.hidden_act!r}")
    if D % 64 or v.intermediate_size % 64 or D % heads or (D // heads) % 32 or cfg.llm.hidden_size % 32:
        raise _Unsupported("widths not multiples of 64 or a head size not a multiple of 32")
    conv = [n for n in nodes if n["op_type"] == "Conv"]
    lns = [n for n in nodes if n["op_type"] == "LayerNormalization"]
    att = [n for n in nodes if n["op_type"] == "QAttention"]
    if len(conv) != 1 or not lns or not att:
        raise _Unsupported("not a fused int8 CLIP graph (one Conv, LayerNorms, QAttention)")
    names = {suffix: next((k for k in inits if k.endswith(suffix)), None)
             for suffix in ("embeddings.class_embedding", "embeddings.position_embedding.weight")}
    if None in names.values():
        raise _Unsupported("class or position embedding not found by name")
    pre = lns[0]
    plan = {"patch": g.init(conv[0]["inputs"][1]), "cls": names["embeddings.class_embedding"],
            "pos": names["embeddings.position_embedding.weight"], "pre": (pre["inputs"][1], pre["inputs"][2]),
            "layers": []}
    for i, a in enumerate(att):
        if a["attrs"].get("num_heads") != heads or len(a["inputs"]) < 8:
            raise _Unsupported(f"attention {i}: heads or inputs differ")
        if a["attrs"].get("unidirectional", 0) or (len(a["inputs"]) > 5 and a["inputs"][5]):
            raise _Unsupported(f"attention {i}: masked")
        ln1 = g.producer.get(g.producer.get(a["inputs"][0], {}).get("inputs", [""])[0])
        if ln1 is None or ln1["op_type"] not in ("LayerNormalization", "SkipLayerNormalization"):
            raise _Unsupported(f"attention {i}: its input is not a LayerNorm")
        w1 = (1, 2) if ln1["op_type"] == "LayerNormalization" else (2, 3)
        o, o_out = g.int8_linear(a["outputs"][0])
        skip = g.only(o_out, "SkipLayerNormalization")
        if skip["inputs"][0] != o_out or len(skip["inputs"]) < 5 or not skip["inputs"][4]:
            raise _Unsupported(f"layer {i}: out_proj's bias and residual are not one SkipLayerNorm")
        fc1, fc1_out = g.int8_linear(skip["outputs"][0])
        fc1_bias, fc1_out = g.bias_add(fc1_out)
        gelu = g.only(fc1_out, "QuickGelu")
        fc2, fc2_out = g.int8_linear(gelu["outputs"][0])
        nxt = [n for n in g.consumers[fc2_out] if n["op_type"] == "SkipLayerNormalization"]
        if nxt:
            fc2_bias = nxt[0]["inputs"][4] if len(nxt[0]["inputs"]) > 4 else ""
            out = nxt[0]["outputs"][3] if len(nxt[0]["outputs"]) > 3 else ""
        else:
            fc2_bias, out = g.bias_add(fc2_out)
        plan["layers"].append({
            "ln1": (ln1["inputs"][w1[0]], ln1["inputs"][w1[1]]), "ln2": (skip["inputs"][2], skip["inputs"][3]),
            "qkv": {"w": g.init(a["inputs"][1]), "scale": g.init(a["inputs"][4]), "zp": a["inputs"][7],
                    "bias": g.init(a["inputs"][2])},
            "o": {**o, "bias": g.init(skip["inputs"][4])}, "fc1": {**fc1, "bias": fc1_bias},
            "fc2": {**fc2, "bias": g.init(fc2_bias)}, "alpha": float(gelu["attrs"].get("alpha", 1.702)),
            "eps": float(ln1["attrs"].get("epsilon", 1e-5))})
    # the projector: the int8 linear after the encoder whose weights are [vision width, LLM width]
    last = nodes.index(att[-1])
    proj = [n for n in nodes[last:] if n["op_type"] == "MatMulInteger"
            and tuple(inits.get(n["inputs"][1], {}).get("dims", ())) == (D, cfg.llm.hidden_size)]
    if not proj:
        raise _Unsupported("no int8 projector after the encoder")
    p, p_out = g.int8_linear(g.producer[proj[0]["inputs"][0]]["inputs"][0])
    if cfg.projector_bias:
        p["bias"], _ = g.bias_add(p_out)
    plan["projector"] = p
    return plan


class NativeVision:
    """An engine's int8 vision graph, its encoder run by native_vision.c (see the module doc); the same
    members as `backends.vision.OnnxVision`."""

    def __init__(self, lib, cfg: ValleyConfig, model: _Model, keep: list, embed: dict, projector: _Linear,
                 threads: int):
        self._lib, self.cfg, self._model, self._keep = lib, cfg, model, keep
        self._embed, self._projector, self.threads = embed, projector, threads
        self._scratch: dict = {}
        self._lock = threading.Lock()  # one encode at a time: they share the scratch buffers
        self.stage_seconds = np.zeros(3)  # the last encode's linears, attention, norms + quantization
        self.name = "native-amx-int8"

    @classmethod
    def open(cls, path: str | Path, cfg: ValleyConfig, *,
             threads: int | None = None) -> tuple["NativeVision | None", str]:
        """The native vision stage over the int8 graph at `path`, or None and why it cannot run here."""
        from valley_rt.cpu import default_threads

        why = cpu_reason()
        if why:
            return None, why
        path = Path(path)
        nodes, tensors = read_graph(path)
        try:
            plan = _plan(nodes, tensors, cfg)
        except _Unsupported as e:
            return None, f"the vision graph's layout: {e}"
        lib, why = library()
        if lib is None:
            return None, why
        inits = Initializers(tensors, path.parent)
        threads = int(threads or default_threads())
        keep: list = []

        def f32(name: str) -> np.ndarray:  # a copy: nothing kept refers to the mapped graph file
            arr = np.array(inits[name], dtype=np.float32, order="C")
            keep.append(arr)
            return arr

        def linear(spec: dict) -> _Linear:
            w = np.ascontiguousarray(inits[spec["w"]])
            if w.dtype != np.int8 or w.ndim != 2:
                raise _Unsupported(f"{spec['w']}: {w.dtype} {list(w.shape)} weights, not int8 [k, n]")
            if spec.get("zp") and np.any(inits[spec["zp"]]):
                raise _Unsupported(f"{spec['w']}: asymmetric weights (nonzero zero points)")
            k, n = w.shape
            packed = np.empty(k * n, np.int8)
            if lib.vv_pack(w.ctypes.data, k, n, packed.ctypes.data, threads) != 0:
                raise _Unsupported(f"{spec['w']}: [{k}, {n}] cannot be packed into tiles")
            scale = np.broadcast_to(f32(spec["scale"]).reshape(-1), (n,)).copy()
            bias = f32(spec["bias"]).reshape(-1) if spec.get("bias") else np.zeros(n, np.float32)
            keep.extend([packed, scale, bias])
            return _Linear(packed.ctypes.data, scale.ctypes.data, bias.ctypes.data, n, k)

        v = cfg.vision
        first = plan["layers"][0]
        if len({(ly["alpha"], ly["eps"]) for ly in plan["layers"]}) != 1:
            return None, "the vision graph's layout: layers differ in GELU alpha or LayerNorm epsilon"
        layers = (_Layer * len(plan["layers"]))()
        try:
            for i, ly in enumerate(plan["layers"]):
                layers[i] = _Layer(f32(ly["ln1"][0]).ctypes.data, f32(ly["ln1"][1]).ctypes.data,
                                   f32(ly["ln2"][0]).ctypes.data, f32(ly["ln2"][1]).ctypes.data,
                                   linear(ly["qkv"]), linear(ly["o"]), linear(ly["fc1"]), linear(ly["fc2"]))
            projector = linear(plan["projector"])
        except _Unsupported as e:
            return None, f"the vision graph's weights: {e}"
        keep.append(layers)
        model = _Model(len(plan["layers"]), v.hidden_size, v.num_heads, v.hidden_size // v.num_heads,
                       v.intermediate_size, threads, first["eps"], first["alpha"],
                       ctypes.cast(layers, ctypes.POINTER(_Layer)))
        patch = f32(plan["patch"])
        embed = {"patch": patch.reshape(patch.shape[0], -1).T.copy(), "cls": f32(plan["cls"]).reshape(-1),
                 "pos": f32(plan["pos"]), "pre": (f32(plan["pre"][0]), f32(plan["pre"][1])), "eps": first["eps"]}
        return cls(lib, cfg, model, keep, embed, projector, threads), ""

    def preprocess(self, frames) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> uint8 crops [T, crop, crop, 3]."""
        from valley_rt.backends.vision import as_crops

        return as_crops(frames, self.cfg)

    def _buffers(self, m: int) -> dict:
        if self._scratch.get("m") != m:
            D, inter = self.cfg.vision.hidden_size, self.cfg.vision.intermediate_size
            mp = (m + 31) // 32 * 32
            self._scratch = {"m": m, "qkv": np.empty(3 * m * D, np.uint16), "h": np.empty((m, inter), np.float32),
                             "att": np.empty((m, D), np.float32), "q": np.empty(mp * max(D, inter), np.int8),
                             "sx": np.empty(mp, np.float32), "ln": np.empty((self.threads, D), np.float32)}
        return self._scratch

    def embeddings(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops [T, H, W, 3] -> the encoder's input [T, 1 + patches, D] (normalized, patch-embedded,
        class and position embeddings added, pre-LayerNorm)."""
        pre = self.cfg.preprocess
        P, e = self.cfg.vision.patch_size, self._embed
        x = crops.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        T, H, W, _ = x.shape
        gh, gw = H // P, W // P
        patches = x[:, :gh * P, :gw * P].reshape(T, gh, P, gw, P, 3).transpose(0, 1, 3, 5, 2, 4).reshape(T * gh * gw, -1)
        tokens = np.empty((T, 1 + gh * gw, e["patch"].shape[1]), np.float32)
        tokens[:, 0] = e["cls"]
        tokens[:, 1:] = (patches @ e["patch"]).reshape(T, gh * gw, -1)
        tokens += e["pos"][:1 + gh * gw]
        return _layer_norm(tokens, *e["pre"], e["eps"])

    def hidden_states(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops [T, H, W, 3] -> the selected layer's hidden states [T, 1 + patches, D]."""
        x = np.ascontiguousarray(self.embeddings(crops))
        T, seq, _ = x.shape
        b = self._buffers(T * seq)
        rc = self._lib.vv_encode(ctypes.byref(self._model), x.ctypes.data, T, seq, b["qkv"].ctypes.data,
                                 b["h"].ctypes.data, b["att"].ctypes.data, b["q"].ctypes.data, b["sx"].ctypes.data,
                                 b["ln"].ctypes.data, self.stage_seconds.ctypes.data)
        if rc != 0:
            raise MemoryError("native vision: no scratch memory")
        return x

    def project(self, x: np.ndarray) -> np.ndarray:
        """The projector over x [m, D] -> [m, LLM width] (int8 weights, tokens quantized as the encoder's)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x.shape[0]
        y = np.empty((m, self._projector.n), np.float32)
        mp = (m + 31) // 32 * 32
        q, sx = np.empty(mp * x.shape[1], np.int8), np.empty(mp, np.float32)
        self._lib.vv_linear_rows(ctypes.byref(self._projector), x.ctypes.data, m, y.ctypes.data, q.ctypes.data,
                                 sx.ctypes.data, self.threads)
        return y

    def encode(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames [T, H, W, 3] -> (pooled [N, D], frames [T, D]) float32."""
        crops = self.preprocess(frames)
        with self._lock:
            x = self.hidden_states(crops)
        T, seq, D = x.shape
        if self.cfg.temporal.mode == "mean":  # linear: pool, then project (T times less projector work)
            y = self.project(np.concatenate([x[:, 1:].mean(0), x[:, 0]]))
            return y[:seq - 1], y[seq - 1:]
        y = self.project(x.reshape(T * seq, D)).reshape(T, seq, -1)
        return y[:, 1:].max(0), np.ascontiguousarray(y[:, 0])

    visual_tokens = encode


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    d = x - mean
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + np.float32(eps)) * w + b
