import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite's user cache (verified stamps, optimized graphs, exported engines, prefix KV rows) lives in a
# folder of its own, removed at exit, unless VALLEY_RT_CACHE names one: the tests export hundreds of
# throw-away engines, whose cache entries do not belong in the user's ~/.cache/valley-rt.
if not os.environ.get("VALLEY_RT_CACHE"):
    os.environ["VALLEY_RT_CACHE"] = tempfile.mkdtemp(prefix="valley-rt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VALLEY_RT_CACHE"], ignore_errors=True)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # the core install (.ci/torchfree.sh) has no torch
        return False

    return torch.cuda.is_available()


# Triton reads TRITON_INTERPRET once, at its first import (which other modules trigger indirectly):
# set it before anything imports triton, so the kernel tests run under the interpreter on CPU machines.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("VALLEY_RT_SHARED") or Path(__file__).resolve().parents[2] / "shared")  # overridable
FIXTURES = SHARED / "fixtures" / "original_valley"
VIDEOS = SHARED / "videos"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the shared test data beside the repo) is not present")
    return SHARED
