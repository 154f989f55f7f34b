"""Fuzzing of the video reader and the image path with mutated files from ../shared/videos/ (bit flips,
truncations, spliced chunks, header overwrites): every read ends in frames or one of the project's own
errors (ValleyError), within the reader's decode deadline and a bounded memory.

The full run is marked `fuzz` and sized by VALLEY_RT_FUZZ_EXAMPLES (default 300; a CI job runs it with
`-m fuzz`); test_fuzz_smoke runs a few examples of the same property in the default suite."""

import os
import resource
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valley_rt import video
from valley_rt.config import preset
from valley_rt.errors import ValleyError

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
SEEDS = sorted(p for p in VIDEOS.glob("*") if p.is_file() and 0 < p.stat().st_size <= 3_000_000) if VIDEOS.is_dir() else []
DEADLINE_S = 20.0  # the reader's own decode deadline during fuzzing (DECODE_TIMEOUT_S)
MAX_RSS_GB = 6.0  # the test process's peak resident memory

pytestmark = pytest.mark.skipif(not SEEDS, reason="../shared/videos is not present")

mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),  # one bit at a relative position
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),  # cut the file there
    st.tuples(st.just("splice"), st.floats(0, 1), st.floats(0, 1)),  # copy a 4 KB chunk from b to a
    st.tuples(st.just("header"), st.integers(0, 63), st.integers(0, 255)),  # overwrite one of the first bytes
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 65536)),  # a run of zero bytes
)


def mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, x, y in mutations:
        if not b:
            break
        if kind == "flip":
            b[int(x * (len(b) - 1))] ^= 1 << y
        elif kind == "truncate":
            del b[max(1, int(x * len(b))):]
        elif kind == "splice":
            src, dst = int(y * len(b)), int(x * len(b))
            chunk = b[src:src + 4096]
            b[dst:dst + len(chunk)] = chunk
        elif kind == "header":
            b[min(x, len(b) - 1)] = y
        elif kind == "zero":
            start = int(x * len(b))
            b[start:start + y] = bytes(len(b[start:start + y]))
    return bytes(b)


def read_one(path: Path, mode: str) -> None:
    """The reader and the preprocessing the runtime applies to its output; only ValleyError may escape."""
    cfg = preset("tiny").preprocess
    t = time.monotonic()
    try:
        clip = video.read_video(path, num_frames=4) if mode == "fixed" else video.read_video(
            path, mode="fps", fps=2.0, max_frames=6)
        video.resize_crop(clip.frames, cfg)
    except ValleyError:
        pass
    assert time.monotonic() - t < DEADLINE_S + 30, "the reader overran its own deadline"
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert rss_gb < MAX_RSS_GB, f"peak memory {rss_gb:.1f} GB"


def _property(tmp_path_factory):
    @given(seed=st.sampled_from(SEEDS), mutations=st.lists(mutation, min_size=1, max_size=4),
           mode=st.sampled_from(["fixed", "fps"]))
    def check(seed, mutations, mode):
        path = tmp_path_factory.getbasetemp() / f"fuzz{seed.suffix}"
        path.write_bytes(mutate(seed.read_bytes(), mutations))
        read_one(path, mode)

    return check


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setattr(video, "DECODE_TIMEOUT_S", DEADLINE_S)


def test_fuzz_smoke(tmp_path_factory, short_deadline):
    settings(max_examples=6, deadline=None, derandomize=True,
             suppress_health_check=list(HealthCheck))(_property(tmp_path_factory))()


@pytest.mark.fuzz
def test_fuzz_media(tmp_path_factory, short_deadline):
    n = int(os.environ.get("VALLEY_RT_FUZZ_EXAMPLES", "300"))
    settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))(_property(tmp_path_factory))()


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_every_seed_truncated_and_flipped(tmp_path, seed, short_deadline):
    """Deterministic corner cases of each seed file: cut to 1 byte, to half, first 64 bytes flipped."""
    data = seed.read_bytes()
    for i, mutated in enumerate([data[:1], data[: len(data) // 2], bytes(x ^ 0xFF for x in data[:64]) + data[64:]]):
        path = tmp_path / f"m{i}{seed.suffix}"
        path.write_bytes(mutated)
        read_one(path, "fixed")


def test_found_by_fuzzing(tmp_path, short_deadline):
    """Each case the fuzzer found, kept: metadata that is not UTF-8 (PyAV raised UnicodeDecodeError)."""
    seed = VIDEOS / "audio_only.m4a"
    if not seed.is_file():
        pytest.skip("audio_only.m4a is not present")
    path = tmp_path / "bad_meta.m4a"
    path.write_bytes(mutate(seed.read_bytes(), [("header", 8, 128)]))
    with pytest.raises(ValleyError):
        video.read_video(path)
