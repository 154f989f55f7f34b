"""valley-rt: a fast, faithful inference runtime for the Valley video LLM."""

__version__ = "0.1.0"


def load(path=None, *, reference: bool = False, device: str = "auto", threads: int | None = None):
    """Load an engine folder, a checkpoint folder, or (no path) the bundled demo model; returns a
    `valley_rt.runtime.Valley` with `encode_video`, `ask`, `stream` and `chat`; threads=None uses one CPU
    thread per physical core. (Imported lazily so that
    `import valley_rt` stays free of torch.)"""
    from valley_rt.runtime import load as _load

    return _load(path, reference=reference, device=device, threads=threads)
