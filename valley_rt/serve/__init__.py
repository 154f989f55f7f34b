"""`valley-rt serve`: an OpenAI-compatible video QA server over the runtime (see docs/serve.md).

protocol.py (the OpenAI wire format), media.py (URLs, limits), llm.py (the LLM service interface and
the built-in interleaving scheduler), engine.py (admission, encoder cache, prompts, metrics), app.py
(the FastAPI app factory and handlers). `serve()` is what the CLI command calls.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from valley_rt.errors import ValleyError


def serve(model: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 2,
          log_level: str = "info", llm: str = "builtin", llm_url: str | None = None,
          llm_options: dict | None = None, **settings) -> None:
    """Load `model` (engine folder, checkpoint, or None for the bundled demo) and serve it until
    SIGTERM / SIGINT, which stop accepting connections, finish the requests in flight and return.

    llm="vllm" (or an llm_url): the LLM runs on vLLM, in process or at a `vllm serve` URL
    (docs/vllm.md); kv_slots is then the number of requests handed to vLLM at once (default 32),
    which batches them."""
    import uvicorn

    from valley_rt.runtime import load
    from valley_rt.serve.app import build_app
    from valley_rt.serve.engine import ServeEngine, Settings
    from valley_rt.serve.llm import VllmService

    on_vllm = llm == "vllm" or llm_url is not None
    if settings.get("kv_slots") is None:
        settings["kv_slots"] = 32 if on_vllm else 4
    if on_vllm and llm_url is None:  # vLLM schedules as many sequences as the server hands it
        llm_options = {"max_num_seqs": settings["kv_slots"], **(llm_options or {})}
    try:
        s = Settings(**settings)
    except TypeError as e:
        raise ValleyError(str(e)) from None
    if s.allowed_media_path is not None:
        s.allowed_media_path = Path(s.allowed_media_path).resolve()
        if not s.allowed_media_path.is_dir():
            raise ValleyError(f"--allowed-media-path {s.allowed_media_path}: no such folder")
    for name in ("max_queue", "kv_slots", "max_frames", "max_prompt_tokens", "default_max_tokens"):
        if getattr(s, name) < (0 if name == "max_queue" else 1):
            raise ValleyError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}")
    valley = load(model, threads=threads, llm=llm, llm_url=llm_url, llm_options=llm_options)
    finish_load = getattr(valley.llm, "wait_loaded", None)
    if finish_load is not None:  # every LLM graph open before the server listens, not in its first answer
        finish_load()
    try:
        service = VllmService(valley.llm, valley.tokenizer, slots=s.kv_slots) if on_vllm else None
        app = build_app(ServeEngine(valley, s, llm=service), s)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                                access_log=log_level == "debug")
        _Server(config).run()
    finally:
        close = getattr(valley.llm, "close", None)
        if on_vllm and close is not None:
            close()  # an in-process vLLM engine's core process; a remote client's connections


class _Server:
    """uvicorn's Server, except that a SIGTERM/SIGINT ends `run` normally after the drain (uvicorn
    re-raises the signal once shut down, so the process would die of it instead of exiting 0)."""

    def __init__(self, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in old.items():
                        signal.signal(sig, handler)

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()
        if not self.server.started:
            raise ValleyError(f"could not start the server on {self.server.config.host}:{self.server.config.port} "
                              "(see the log above)")
