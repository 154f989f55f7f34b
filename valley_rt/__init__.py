"""valley-rt: a fast, faithful inference runtime for the Valley video LLM."""

from pathlib import Path

__version__ = "0.1.0"


def load(path=None, *, reference: bool = False, device: str = "auto", threads: int | None = None,
         llm: str = "builtin", llm_url: str | None = None, llm_options: dict | None = None):
    """Load an engine folder, a checkpoint folder, or (no path) the bundled demo model; returns a
    `valley_rt.runtime.Valley` with `encode_video`, `ask`, `stream` and `chat`; threads=None uses one CPU
    thread per physical core.

    A checkpoint that is to run on a CPU is exported once into the user cache (`VALLEY_RT_CACHE`,
    default ~/.cache/valley-rt; needs the `export` extra), and a damaged cache entry is rebuilt;
    `valley_rt.runtime.load` is the same call without those steps; llm="vllm" / llm_url hand generation to vLLM
    (docs/vllm.md). (Imported lazily so that `import valley_rt` stays free of torch.)"""
    from valley_rt.runtime import load as _load

    if path is not None and (Path(path) / "manifest.json").is_file():
        from valley_rt.export.cache import is_cache_entry, verified_entry

        if is_cache_entry(path):  # an engine valley-rt cached: rebuilt when damaged
            path = verified_entry(path)
    return _load(path, reference=reference, device=device, threads=threads, exporter=export_on_first_use,
                 llm=llm, llm_url=llm_url, llm_options=llm_options)


def export_on_first_use(ckpt):
    """The runtime's `exporter` hook: `valley_rt.export.cache.ensure_engine`."""
    from valley_rt.export.cache import ensure_engine

    return ensure_engine(ckpt)
