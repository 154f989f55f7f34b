"""The LLM's peers for `bench_llm.py --peers`, and the yardstick every quantized model is judged by.

- llama.cpp through llama-cpp-python: GGUF files made by llama.cpp's own converter
  (`convert_hf_to_gguf.py` from its source tree) and quantizer (`llama_model_quantize`), Q4_0 and
  Q4_K_M, from the same HF folder valley-rt exports.
- vLLM's CPU build: `peer_vllm.py` in vLLM's own environment, a separate process.
- Quality: each model's next-token distribution against the fp32 model's, on the same held-out tokens.
  With random weights there is no natural text whose perplexity means anything, so the text is the
  fp32 model's own: KL(p_fp32 || q) per position, and the perplexity q scores on text distributed as
  p_fp32 says, exp(E_p[-log q]) = exp(H(p) + KL): the fp32 model's own figure is the floor. The same
  measure applies unchanged to trained weights.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

LLAMA_CPP_QUANTS = ("Q4_0", "Q4_K_M")


# ---------------------------------------------------------------------------------------------- fp32 yardstick

def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for a single-file or sharded HF folder."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: hf_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    f = hf_dir / "model.safetensors"
    with safe_open(str(f), "pt") as st:
        return {k: f for k in st.keys()}


def fp32_logits(hf_dir: Path, ids: list[int], threads: int) -> np.ndarray:
    """[T, V] float32 logits of the HF LLaMA in fp32 on `ids`, one decoder layer in memory at a time
    (a 7B's fp32 weights are 27 GB; its activations for a few hundred tokens are a few MB)."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.set_num_threads(threads)
    cfg = LlamaConfig.from_pretrained(str(hf_dir))
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    files = _tensor_files(hf_dir)

    def read(name: str) -> torch.Tensor:
        with safe_open(str(files[name]), "pt") as st:
            return st.get_tensor(name).float()

    def materialize(module: torch.nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        module.load_state_dict({k: read(prefix + k) for k in module.state_dict()}, strict=True)

    pos = torch.arange(len(ids))[None]
    with torch.inference_mode():
        x = read("model.embed_tokens.weight")[torch.tensor(ids)][None]  # [1, T, H]
        cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
        for i, layer in enumerate(model.model.layers):
            materialize(layer, f"model.layers.{i}.")
            out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)  # causal (sdpa)
            x = out[0] if isinstance(out, tuple) else out
            layer.to("meta")
        materialize(model.model.norm, "model.norm.")
        head = "lm_head.weight" if "lm_head.weight" in files else "model.embed_tokens.weight"
        logits = model.model.norm(x)[0] @ read(head).T
    return logits.numpy()


def quality(ref: np.ndarray, q: np.ndarray) -> dict:
    """ref, q: [T, V] logits. KL(p_ref || q) in nats, perplexity of q on ref-distributed text, top-1 agreement."""
    ref, q = ref.astype(np.float64), q.astype(np.float64)
    lp = ref - np.logaddexp.reduce(ref, axis=1, keepdims=True)
    lq = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    p = np.exp(lp)
    ce = -(p * lq).sum(1)  # expected cross-entropy per position
    ent = -(p * lp).sum(1)
    return {"kl_nats": float((ce - ent).mean()), "ppl_vs_fp32_text": float(np.exp(ce.mean())),
            "ppl_fp32_floor": float(np.exp(ent.mean())),
            "top1_agree": float((ref.argmax(1) == q.argmax(1)).mean())}


# ---------------------------------------------------------------------------------------------- llama.cpp

def _placeholder_spm(path: Path, vocab_size: int) -> None:
    """A SentencePiece model with exactly vocab_size pieces (<unk>, <s>, </s>, then filler words).

    The converter insists on a tokenizer it recognizes, and a random-weight checkpoint's is a
    placeholder; the benchmark feeds token ids, so only the vocabulary's size and special ids matter.
    A real checkpoint's tokenizer.model is used as it is."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    m = spm.ModelProto()
    m.trainer_spec.model_type = spm.TrainerSpec.UNIGRAM
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    for text, kind in (("<unk>", spm.ModelProto.SentencePiece.UNKNOWN), ("<s>", spm.ModelProto.SentencePiece.CONTROL),
                       ("</s>", spm.ModelProto.SentencePiece.CONTROL)):
        m.pieces.add(piece=text, score=0.0, type=kind)
    for i in range(3, vocab_size):
        m.pieces.add(piece=f"\u2581w{i}", score=-float(i), type=spm.ModelProto.SentencePiece.NORMAL)
    path.write_bytes(m.SerializeToString())


def _converter_view(hf_dir: Path, view: Path) -> Path:
    """The HF folder as the converter should see it: links to the config and weights, and the
    checkpoint's tokenizer.model, or a placeholder of the same vocabulary size when it has none."""
    view.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.name == "config.json" or f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json" \
                or f.name == "tokenizer.model":
            link = view / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    if not (view / "tokenizer.model").exists():
        cfg = json.loads((hf_dir / "config.json").read_text())
        _placeholder_spm(view / "tokenizer.model", int(cfg["vocab_size"]))
    return view


def make_ggufs(hf_dir: Path, out: Path, src: Path, threads: int, base: str = "f16") -> dict[str, Path]:
    """llama.cpp's converter (HF -> GGUF `base`) then its quantizer (-> Q4_0, Q4_K_M); cached in `out`.
    The unquantized intermediate this call converted is deleted once both quantized files exist (a 7B's
    f16 GGUF is 13.5 GB); one that was already there is left."""
    out.mkdir(parents=True, exist_ok=True)
    files = {q: out / f"model-{q}.gguf" for q in LLAMA_CPP_QUANTS}
    if all(f.is_file() for f in files.values()):
        return files
    converter = src / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise SystemExit(f"error: {converter}: llama.cpp's converter not found (--llama-cpp-src: the llama.cpp "
                         "source, e.g. vendor/llama.cpp of llama-cpp-python's sdist; see docs/peers.md)")
    inter = out / f"model-{base}.gguf"
    converted = not inter.is_file()  # only a file this call writes is deleted below
    if converted:
        view = _converter_view(hf_dir, out / "hf-view")
        subprocess.run([sys.executable, str(converter), str(view), "--outfile", str(inter), "--outtype", base],
                       check=True, stdout=subprocess.DEVNULL)
    import llama_cpp

    for q, f in files.items():
        if f.is_file():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")
        params.nthread = threads
        params.allow_requantize = base not in ("f16", "f32", "bf16")
        tmp = f.with_suffix(".part")
        rc = llama_cpp.llama_model_quantize(str(inter).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"error: llama_model_quantize {q} returned {rc}")
        tmp.rename(f)
    if converted:
        inter.unlink()
    return files


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes one decode step streams from the GGUF: every tensor but the embedding table (one row is read)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight"))


def llama_cpp_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + 16, n_batch=len(ids), n_ubatch=len(ids), n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def llama_cpp_info() -> dict:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    return {"version": llama_cpp.__version__, "system_info": info.strip()}


# ---------------------------------------------------------------------------------------------- vLLM

def bench_vllm(python: str, hf_dir: Path, prompt: list[int], n_new: int, threads: int, dtype: str,
               memory: float, scratch: Path, timeout_s: float = 1800) -> dict:
    """peer_vllm.py in vLLM's environment; its last stdout line is the JSON result."""
    ids = scratch / "vllm_prompt_ids.json"
    ids.write_text(json.dumps(prompt))
    script = Path(__file__).with_name("peer_vllm.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([python, str(script), str(hf_dir), "--prompt-ids", str(ids), "--new", str(n_new),
                              "--threads", str(threads), "--dtype", dtype, "--memory", str(memory)],
                             capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:] or ''}"}
    res = json.loads(lines[-1])
    res["process_s"] = round(time.perf_counter() - t0, 2)
    return res
