"""The LLM served by vLLM, from the spliced input embeddings valley-rt builds.

vLLM takes a prompt as input embeddings [L, H] (`enable_prompt_embeds`), so it needs no Valley model
class: valley-rt keeps video decoding, the vision engine, the splice of the visual tokens and the
Valley prompt, and hands vLLM the result. Two shapes:

- `VllmLLM`: an in-process `AsyncLLM` engine (its own event loop on a background thread) started on a
  plain HF LLaMA folder. Concurrent callers are batched by vLLM's scheduler.
- `RemoteVllmLLM`: a client of a separately started `vllm serve LLM_DIR --enable-prompt-embeds`,
  through its OpenAI completions endpoint (`prompt_embeds`: base64 of a `torch.save`d tensor). Any
  number of front ends can share one vLLM deployment, sized and sharded by vLLM's own options.

Both are request-level, not step-level: vLLM owns the KV cache, so they offer
`generate_from_embeds(embeds, ...)` (used by `Valley._answer` when present) instead of faking
`prefill` / `decode`. The generated token ids come back from vLLM and go through the same
`_TextTracker` as the built-in loop, so stop strings, the streamed text (a possible stop string held
back) and the end-of-answer rules are the built-in ones; the stop strings are also passed to vLLM so
it stops generating at the same point. Token embeddings for the splice come from the LLM folder's
own `embed_tokens` weight (float32), as with the built-in backends.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from valley_rt.errors import ContextLengthError, ValleyError
from valley_rt.generate import GenerationResult, SamplingParams, _TextTracker


class VllmUnavailableError(ValleyError):
    """vLLM cannot be used: not installed, the engine failed to start, or a remote vLLM server is down
    (nothing was generated; a server maps it to 503)."""


class VllmFailedError(ValleyError):
    """The vLLM server or engine failed in the middle of a request (a server maps it to 502)."""


# -- shared pieces ---------------------------------------------------------------------------------
def read_llm_config(folder: Path) -> dict:
    cfg_file = Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise ValleyError(f"{folder}: vLLM needs an HF LLM folder (config.json + safetensors + tokenizer)")
    return json.loads(cfg_file.read_text())


def vllm_dtype(cfg: dict, dtype: str = "auto") -> str:
    """The dtype vLLM runs an LLM folder in, from its config.json (`read_llm_config`): "auto" is float32
    for an fp LLM folder (greedy answers equal to the fp32 reference) and bfloat16 for a quantized one
    (vLLM's GPTQ kernels take float16 / bfloat16 activations only, and its CPU build's int4 path runs on
    AMX in bfloat16); anything else as given."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cfg.get("quantization_config") else "float32"


CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's CPU build: the CPUs its model threads run on
FEW_CORES = 4  # at or below this many physical cores, valley-rt gives vLLM's model threads all of them


def cpu_thread_binding(ranks: int = 1) -> str | None:
    """The VLLM_CPU_OMP_THREADS_BIND value for an in-process engine, or None to leave vLLM's own choice.

    Left to "auto", vLLM's CPU build runs each rank's model threads on one CPU per physical core and
    keeps one core per rank free for its scheduler process. On a machine with few cores that is a
    large share of the compute: on 2 cores vLLM decodes on one thread while valley-rt's built-in
    backend uses both. So for a single rank (no tensor / pipeline parallelism) on a CPU-only machine
    with at most FEW_CORES cores, the model's threads get one CPU on every core this process may run
    on. A value the user set always wins, and bigger machines keep vLLM's default."""
    if os.environ.get(CPU_BIND_ENV) or ranks != 1 or torch.cuda.is_available():
        return None
    from valley_rt.cpu import one_cpu_per_core

    cpus = one_cpu_per_core()
    return ",".join(map(str, cpus)) if len(cpus) <= FEW_CORES else None


def as_tensor(embeds) -> torch.Tensor:
    """The runtime's NumPy [S, H] embeddings (or a tensor) as a float32 CPU tensor, vLLM's input type."""
    return embeds if isinstance(embeds, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(embeds, np.float32))


def load_embed_table(folder: Path) -> torch.Tensor:
    """The LLM's input embedding table [V, H] float32, read from the folder's safetensors."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    return st.get_tensor(key).float()
    raise ValleyError(f"{folder}: no embed_tokens.weight in its safetensors")


def vllm_sampling_kwargs(params: SamplingParams, stop: Sequence[str], ignore_eos: bool) -> dict:
    """valley-rt SamplingParams -> vLLM SamplingParams keywords (same names on the OpenAI endpoint).

    top_k 0 means "all" in both. vLLM seeds a per-request generator, so a seed gives repeatable
    answers, but not the same sampled tokens as the built-in backend's torch.Generator."""
    kw = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
          "top_k": params.top_k, "stop": [s for s in stop if s], "ignore_eos": ignore_eos,
          "skip_special_tokens": True}
    if params.seed is not None:
        kw["seed"] = params.seed
    return kw


class _Collector:
    """Feeds the token ids vLLM returns through the built-in text tracker; decides when to stop."""

    def __init__(self, tokenizer, stop: Sequence[str], on_text, eos_token_id: int | None, n_prompt: int,
                 on_first_token: Callable[[], None] | None = None, cancelled: Callable[[], bool] | None = None):
        self.tracker = _TextTracker(tokenizer, stop, on_text)
        self.on_first_token = on_first_token
        self.cancelled = cancelled
        self.eos = eos_token_id
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.n_prompt = n_prompt
        self.t0 = time.perf_counter()
        self.t_first: float | None = None

    def add(self, ids: Sequence[int]) -> bool:
        """Returns True once the answer is over (eos or a stop string)."""
        if self.cancelled is not None and self.cancelled():
            self.reason = "cancelled"
            return True
        for tok in ids:
            if self.t_first is None:
                self.t_first = time.perf_counter()
                if self.on_first_token is not None:
                    self.on_first_token()
            self.tokens.append(int(tok))
            if self.eos is not None and tok == self.eos:
                self.reason = "eos"
            elif self.tracker.add(int(tok)):
                self.reason = "stop_string"
            if self.reason:
                return True
        return False

    def result(self) -> GenerationResult:
        t_end = time.perf_counter()
        if self.reason is None:
            self.reason = "length"
            self.tracker.emit(len(self.tracker.text))  # a held-back partial stop string is ordinary text
        first = self.t_first or t_end
        decode_s = t_end - first
        n = len(self.tokens)
        return GenerationResult(
            text=self.tracker.final_text(), token_ids=self.tokens, stop_reason=self.reason,
            prefill_ms=(first - self.t0) * 1e3,  # vLLM does not report prefill alone: time to first token
            first_token_ms=(first - self.t0) * 1e3,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            n_prompt_tokens=self.n_prompt,
            timings={"decode_ms": decode_s * 1e3, "total_ms": (t_end - self.t0) * 1e3})


class _RequestLevel:
    """What Valley needs from an LLM besides generation: embeddings and the (empty) cache protocol.

    vLLM keeps its own KV cache (with prefix caching), so `position` is always 0: every request sends
    the whole prompt."""

    name = "vllm"
    position = 0

    def __init__(self, llm_dir: Path | None, table: torch.Tensor, max_context: int, tokenizer=None):
        self.llm_dir = llm_dir
        self.table = table  # [V, H] float32
        self.hidden_size = int(table.shape[1])
        self.vocab_size = int(table.shape[0])
        self.max_context = int(max_context)
        self.tokenizer = tokenizer

    def embed(self, ids: Sequence[int]):
        """[S, H] float32 NumPy rows, like the other backends (the runtime splices in NumPy)."""
        return self.table[torch.as_tensor(list(ids), dtype=torch.long)].float().numpy()

    def truncate(self, position: int) -> None:
        if position != 0:
            raise ValueError("a vLLM backend keeps no client-side cache")

    def reset(self) -> None:
        pass

    def prefill(self, embeds):  # the step-level protocol does not map onto vLLM's requests
        raise NotImplementedError("vLLM backends are request-level: use generate_from_embeds")

    decode = prefill

    def _check(self, embeds: torch.Tensor, params: SamplingParams) -> None:
        if embeds.dim() != 2 or embeds.shape[1] != self.hidden_size:
            raise ValueError(f"embeds must be [S, {self.hidden_size}], got {list(embeds.shape)}")
        if embeds.shape[0] + params.max_new_tokens > self.max_context:
            raise ContextLengthError(f"prompt of {embeds.shape[0]} tokens + max_new_tokens {params.max_new_tokens} "
                                     f"exceeds the context of {self.max_context}")


# -- in process ------------------------------------------------------------------------------------
class VllmLLM(_RequestLevel):
    """An in-process vLLM AsyncLLM engine over an HF LLaMA folder, prompt embeddings enabled.

    The engine runs on its own event loop in a daemon thread; `generate_from_embeds` is thread-safe and
    blocking, `agenerate` streams token-id deltas to asyncio callers (a server). vLLM spawns its engine
    core process, so a script that builds one needs the `if __name__ == "__main__":` guard.

    memory: vLLM's `gpu_memory_utilization`, on its CPU build the fraction of RAM for the weights,
    activations and KV cache together (the KV cache gets what is left: it must exceed the weights).
    dtype: "auto" (`vllm_dtype`: float32 for an fp folder, which keeps greedy answers equal to the fp32
    reference; bfloat16 for a GPTQ folder), or any dtype vLLM takes."""

    def __init__(self, llm_dir: str | Path, *, tokenizer=None, memory: float = 0.15, dtype: str = "auto",
                 max_num_seqs: int = 32, **engine_kwargs):
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise VllmUnavailableError(f"vLLM is not importable here ({e}); see docs/vllm.md to install it") from None
        llm_dir = Path(llm_dir)
        cfg = read_llm_config(llm_dir)
        super().__init__(llm_dir, load_embed_table(llm_dir), cfg.get("max_position_embeddings", 2048), tokenizer)
        dtype = vllm_dtype(cfg, dtype)
        args = AsyncEngineArgs(model=str(llm_dir), enable_prompt_embeds=True, dtype=dtype,
                               gpu_memory_utilization=memory, max_model_len=self.max_context,
                               max_num_seqs=max_num_seqs, disable_log_stats=True, **engine_kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._ids = itertools.count()
        ranks = int(engine_kwargs.get("tensor_parallel_size", 1)) * int(engine_kwargs.get("pipeline_parallel_size", 1))
        self.cpu_binding = cpu_thread_binding(ranks)  # None: vLLM's own (or the user's) thread binding
        t0 = time.perf_counter()
        try:
            if self.cpu_binding is not None:  # read by the engine core process vLLM spawns now
                os.environ[CPU_BIND_ENV] = self.cpu_binding
            self.engine = self._call(self._start(AsyncLLM, args))
        except Exception as e:
            self._stop_loop()
            raise VllmUnavailableError(f"the vLLM engine did not start on {llm_dir}: {e}") from e
        finally:
            if self.cpu_binding is not None:
                os.environ.pop(CPU_BIND_ENV, None)
        self.start_s = time.perf_counter() - t0
        self.name = f"vllm-{dtype}"

    @staticmethod
    async def _start(cls, args):
        return cls.from_engine_args(args)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def agenerate(self, embeds: torch.Tensor, params: SamplingParams, stop: Sequence[str] = (),
                        ignore_eos: bool = False):
        """Async generator of token-id lists (deltas) for one request; closing it aborts the request."""
        from vllm import SamplingParams as VP
        from vllm.sampling_params import RequestOutputKind

        self._check(embeds, params)
        sp = VP(output_kind=RequestOutputKind.DELTA, detokenize=False,
                **vllm_sampling_kwargs(params, (), ignore_eos))
        rid = f"valley-{next(self._ids)}"
        try:
            async for out in self.engine.generate({"prompt_embeds": embeds.float().contiguous()}, sp, rid):
                ids = list(out.outputs[0].token_ids)
                if ids:
                    yield ids
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except ValleyError:
            raise
        except Exception as e:
            raise VllmFailedError(f"vLLM failed during the request: {type(e).__name__}: {e}") from e

    def generate_from_embeds(self, embeds: torch.Tensor, *, tokenizer=None, params: SamplingParams,
                             stop: Sequence[str] = ("###",), on_text: Callable[[str], None] | None = None,
                             eos_token_id: int | None = None, on_first_token: Callable[[], None] | None = None,
                             cancelled: Callable[[], bool] | None = None) -> GenerationResult:
        """Blocking and thread-safe: generate the answer after `embeds` [S, H]. eos_token_id -1 ignores
        eos; `cancelled` is polled at each delta (True: the request is aborted, stop_reason "cancelled")."""
        embeds = as_tensor(embeds)
        tok = tokenizer or self.tokenizer
        eos = getattr(tok, "eos_token_id", None) if eos_token_id is None else eos_token_id
        col = _Collector(tok, stop, on_text, eos, int(embeds.shape[0]), on_first_token, cancelled)
        self._check(embeds, params)
        deltas: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            # Stop strings are matched here on the caller's side (the built-in tracker); vLLM gets no
            # stop strings (detokenize=False), the request is aborted once the caller has its answer.
            try:
                async for ids in self.agenerate(embeds, params, (), ignore_eos=eos_token_id == -1):
                    deltas.put(ids)
            except BaseException as e:
                deltas.put(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
            finally:
                deltas.put(done)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := deltas.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                if col.add(item):
                    break
        finally:
            if not fut.done():
                fut.cancel()  # closes the async generator, which aborts the vLLM request
        return col.result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def close(self) -> None:
        """Shut the engine (and its core process) down, on the event loop's thread: its output handler
        runs there and is cancelled by the shutdown, instead of finding the engine core gone and logging
        an EngineDeadError."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None

            async def shutdown():
                engine.shutdown()

            if self._thread.is_alive():
                self._call(shutdown())
            else:
                engine.shutdown()
        if self._thread.is_alive():
            self._stop_loop()


# -- remote ----------------------------------------------------------------------------------------
def encode_embeds(embeds: torch.Tensor) -> str:
    """What vLLM's `prompt_embeds` field takes: base64 of `torch.save` of a [L, H] tensor (it loads it
    with weights_only=True and checks H against the model's hidden size)."""
    buf = io.BytesIO()
    torch.save(embeds.detach().float().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class RemoteVllmLLM(_RequestLevel):
    """A client of `vllm serve LLM_DIR --enable-prompt-embeds` (OpenAI completions, streamed).

    The embedding table and tokenizer come from the local checkpoint's LLM folder; the server must
    serve the same LLM (its hidden size is checked by vLLM, its model name by `/v1/models`). A server
    that is down gives VllmUnavailableError; one that fails or drops the stream mid-answer gives
    VllmFailedError. Each request opens its own connection, so the client recovers as soon as the
    server is back."""

    def __init__(self, url: str, llm_dir: str | Path, *, tokenizer=None, timeout_s: float = 600.0,
                 model: str | None = None):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValleyError(f"--llm-url must start with http:// or https://, got {url!r}")
        llm_dir = Path(llm_dir)
        cfg = read_llm_config(llm_dir)
        super().__init__(llm_dir, load_embed_table(llm_dir), cfg.get("max_position_embeddings", 2048), tokenizer)
        self.url = url.rstrip("/")
        self.model = model
        self._client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.name = f"vllm-remote({self.url})"

    def _model_name(self) -> str:
        import httpx

        if self.model is None:
            try:
                r = self._client.get(f"{self.url}/v1/models")
                r.raise_for_status()
                self.model = r.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise VllmUnavailableError(f"the vLLM server at {self.url} is not answering ({e})") from None
        return self.model

    def stream_ids(self, embeds: torch.Tensor, params: SamplingParams, stop: Sequence[str] = (),
                   ignore_eos: bool = False) -> Iterator[list[int]]:
        """Token-id deltas of one streamed completion; closing the iterator closes the connection
        (vLLM aborts the request)."""
        import httpx

        self._check(embeds, params)
        body = {"model": self._model_name(), "prompt_embeds": encode_embeds(embeds), "stream": True,
                "return_token_ids": True, **vllm_sampling_kwargs(params, stop, ignore_eos)}
        started = False
        try:
            with self._client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code >= 400:
                    detail = r.read().decode("utf-8", "replace")[:300]
                    if r.status_code < 500:
                        raise ValleyError(f"the vLLM server refused the request ({r.status_code}): {detail}")
                    raise VllmUnavailableError(f"the vLLM server at {self.url} answered {r.status_code}: {detail}")
                finished = False
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise VllmFailedError(f"the vLLM server failed mid-answer: {chunk['error']}")
                    for choice in chunk.get("choices", []):
                        ids = choice.get("token_ids") or []
                        if ids:
                            started = True
                            yield list(ids)
                if not finished:
                    raise VllmFailedError(f"the vLLM server at {self.url} closed the stream mid-answer")
        except httpx.ConnectError as e:
            self.model = None if not started else self.model
            raise VllmUnavailableError(f"the vLLM server at {self.url} is down ({e})") from None
        except (httpx.HTTPError, json.JSONDecodeError) as e:  # dropped connection, read timeout, bad chunk
            raise VllmFailedError(f"the vLLM server at {self.url} failed mid-answer ({type(e).__name__}: {e})") from None

    def generate_from_embeds(self, embeds: torch.Tensor, *, tokenizer=None, params: SamplingParams,
                             stop: Sequence[str] = ("###",), on_text: Callable[[str], None] | None = None,
                             eos_token_id: int | None = None, on_first_token: Callable[[], None] | None = None,
                             cancelled: Callable[[], bool] | None = None) -> GenerationResult:
        """Thread-safe; the same contract as VllmLLM.generate_from_embeds."""
        embeds = as_tensor(embeds)
        tok = tokenizer or self.tokenizer
        eos = getattr(tok, "eos_token_id", None) if eos_token_id is None else eos_token_id
        col = _Collector(tok, stop, on_text, eos, int(embeds.shape[0]), on_first_token, cancelled)
        # The stop strings also go to the server, so it stops where the tracker below does (vLLM's
        # stop match is on its own detokenized text; the tracker decides what the answer is).
        stream = self.stream_ids(embeds, params, stop, ignore_eos=eos_token_id == -1)
        try:
            for ids in stream:
                if col.add(ids):
                    break
        finally:
            stream.close()
        return col.result()

    def close(self) -> None:
        self._client.close()


# -- where the LLM folder is -----------------------------------------------------------------------
def llm_folder(source: str | Path) -> Path:
    """The folder vLLM loads for a checkpoint or an engine.

    A checkpoint: its HF LLM folder (`CKPT/llm`). An engine: its standard GPTQ folder
    (`ENGINE/llm/gptq/`, kept by `export --quant gptq`) when vLLM can load it (not act-order in groups,
    which vLLM refuses), so that vLLM runs the engine's own quantized LLM; else the LLM folder of the
    engine's source checkpoint when the manifest names one that is still on disk."""
    path = Path(source)
    if (path / "llm" / "config.json").is_file():
        return path / "llm"
    manifest = path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        gptq = path / m.get("files", {}).get("gptq", "llm/gptq/")
        why = ""
        if (gptq / "config.json").is_file():
            qc = json.loads((gptq / "config.json").read_text()).get("quantization_config", {})
            if not (qc.get("desc_act") and qc.get("group_size", -1) != -1):
                return gptq
            why = f" ({gptq} is GPTQ with desc_act=True in groups, which vLLM refuses)"
        src = m.get("source", {}).get("path")
        if src and (Path(src) / "llm" / "config.json").is_file():
            return Path(src) / "llm"
        raise ValleyError(f"{path}: no folder vLLM can load{why}: an engine exported with --quant gptq "
                          f"(without --desc-act) has one; else load the checkpoint folder instead of the engine")
    raise ValleyError(f"{path}: no HF LLM folder for vLLM (a checkpoint's llm/ with config.json)")


def serve_env(ranks: int = 1) -> dict[str, str]:
    """Environment for a `vllm serve` started on this machine (`serve_command`): on a CPU-only machine
    with few cores, its model threads on every core (`cpu_thread_binding`); empty otherwise."""
    binding = cpu_thread_binding(ranks)
    return {} if binding is None else {CPU_BIND_ENV: binding}


def serve_command(llm_dir: str | Path, *, port: int, host: str = "127.0.0.1", memory: float = 0.15,
                  dtype: str = "auto", python: str = "python") -> list[str]:
    """The command line of the vLLM OpenAI server a remote front end talks to (prompt embeddings on;
    the context length is the LLM's own): `vllm serve`'s module form, because the `vllm` command of
    the CPU build (distribution `vllm-cpu`) fails looking up the version of a distribution named
    `vllm`. Add vLLM's own options for sharding (--tensor-parallel-size, --pipeline-parallel-size,
    --distributed-executor-backend ray) on a real deployment."""
    cfg = read_llm_config(Path(llm_dir))
    max_len = cfg.get("max_position_embeddings", 2048)
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(llm_dir), "--enable-prompt-embeds",
            "--dtype", vllm_dtype(cfg, dtype), "--host", host, "--port", str(port), "--gpu-memory-utilization", str(memory),
            "--max-model-len", str(max_len), "--disable-log-stats"]
