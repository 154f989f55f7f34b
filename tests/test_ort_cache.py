"""The per-machine cache of ORT's optimized vision graph (backends/ort_session.optimized_cpu_session):
used when intact, bit-identical outputs, rebuilt when damaged or when the source changes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from valley_rt.backends.ort_session import OPTIMIZED_DATA, OPTIMIZED_DIR, optimized_cpu_session
from valley_rt.engine_format import MANIFEST, VISION_INPUT, VISION_OUTPUTS
from valley_rt.runtime import DEMO_ENGINE


def _opts():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 2
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.log_severity_level = 3
    return o


@pytest.fixture
def vision(tmp_path, monkeypatch):
    """A copy of the demo engine's vision graph (its bytes stay untouched) and an empty cache."""
    monkeypatch.setenv("VALLEY_RT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "vision.onnx"
    shutil.copyfile(DEMO_ENGINE / "vision.onnx", path)
    return path


def _run(session, crops):
    return session.run(list(VISION_OUTPUTS), {VISION_INPUT: crops})


def _folders(tmp_path):
    return sorted((tmp_path / "cache" / OPTIMIZED_DIR).iterdir())


def test_the_cached_graph_is_used_and_gives_identical_outputs(vision, tmp_path):
    size = json.loads((DEMO_ENGINE / MANIFEST).read_text())["config"]["preprocess"]["crop_size"]
    crops = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    want = _run(ort.InferenceSession(str(vision), sess_options=_opts(), providers=["CPUExecutionProvider"]), crops)
    first, how1 = optimized_cpu_session(vision, _opts())
    second, how2 = optimized_cpu_session(vision, _opts())
    third, how3 = optimized_cpu_session(vision, _opts())  # after the first check re-stamped the files
    assert (how1, how2, how3) == ("written", "cached", "cached")
    for session in (first, second, third):
        for got, ref in zip(_run(session, crops), want):
            np.testing.assert_array_equal(got, ref)
    assert len(_folders(tmp_path)) == 1


def test_a_damaged_cache_is_rebuilt_and_a_changed_source_gets_a_new_entry(vision, tmp_path):
    optimized_cpu_session(vision, _opts())
    (folder,) = _folders(tmp_path)
    data = folder / OPTIMIZED_DATA
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one flipped byte
    st = data.stat()
    data.write_bytes(bytes(blob))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back; ctime still moves
    assert optimized_cpu_session(vision, _opts())[1] == "rebuilt"
    assert optimized_cpu_session(vision, _opts())[1] == "cached"
    vision.write_bytes(vision.read_bytes())  # the source rewritten: another key; the old entry can never match again
    assert optimized_cpu_session(vision, _opts())[1] == "written"
    (new,) = _folders(tmp_path)
    assert new != folder


def test_a_folder_at_the_entrys_name_that_valley_rt_did_not_write_is_left_alone(vision, tmp_path):
    """A folder where the cache entry would go but without its stamp is not valley-rt's: the session is
    the plain one and the folder keeps its files."""
    from valley_rt.backends.ort_session import _optimized_folder

    folder = _optimized_folder(vision, _opts())
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("a user's file")
    assert optimized_cpu_session(vision, _opts())[1] == "uncached"
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_writing_an_entry_prunes_dead_and_unused_ones_and_nothing_else(vision, tmp_path):
    """A new entry removes entries whose source is gone or that went unused for UNUSED_DAYS; an entry
    whose source is alive and recently used stays, and so does a folder valley-rt did not write."""
    from valley_rt.engine_format import UNUSED_DAYS

    other = tmp_path / "other.onnx"
    shutil.copyfile(vision, other)
    gone = tmp_path / "gone.onnx"
    shutil.copyfile(vision, gone)
    old = tmp_path / "old.onnx"
    shutil.copyfile(vision, old)
    for path in (other, gone, old):
        optimized_cpu_session(path, _opts())
    stamps = {json.loads((f / "stamp.json").read_text())["source"]["path"]: f for f in _folders(tmp_path)}
    assert set(stamps) == {str(p.resolve()) for p in (other, gone, old)}
    gone.unlink()
    old_stamp = stamps[str(old.resolve())] / "stamp.json"
    stale = os.stat(old_stamp).st_mtime - (UNUSED_DAYS + 1) * 86400
    os.utime(old_stamp, (stale, stale))
    foreign = tmp_path / "cache" / OPTIMIZED_DIR / "not-ours"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    assert optimized_cpu_session(vision, _opts())[1] == "written"
    left = set(_folders(tmp_path))
    assert stamps[str(other.resolve())] in left and foreign in left and (foreign / "notes.txt").is_file()
    assert stamps[str(gone.resolve())] not in left and stamps[str(old.resolve())] not in left
    assert len(left) == 3  # other, foreign and the new entry
    optimized_cpu_session(other, _opts())  # a cached hit marks its entry used
    assert os.stat(stamps[str(other.resolve())] / "stamp.json").st_mtime > stale + UNUSED_DAYS * 86400


def test_an_unusable_cache_folder_means_the_plain_session(vision, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VALLEY_RT_CACHE", str(blocker))
    session, how = optimized_cpu_session(vision, _opts())
    assert how == "uncached" and session.get_outputs()


def test_the_cache_can_be_turned_off(vision, tmp_path, monkeypatch):
    from valley_rt.backends.ort_session import OPTIMIZED_CACHE_ENV
    from valley_rt.errors import EngineError

    monkeypatch.setenv(OPTIMIZED_CACHE_ENV, "off")
    assert optimized_cpu_session(vision, _opts())[1] == "uncached"
    assert not (tmp_path / "cache" / OPTIMIZED_DIR).exists()
    monkeypatch.setenv(OPTIMIZED_CACHE_ENV, "maybe")
    with pytest.raises(EngineError, match="expected on or off"):
        optimized_cpu_session(vision, _opts())


def test_the_vision_session_does_not_spin_unless_asked(vision, monkeypatch):
    """Vision's threads do not spin between ops (VALLEY_RT_VISION_SPIN=on makes them), on the session that
    writes the optimized graph and on the one that opens it from the cache alike."""
    from valley_rt.backends import ort_session
    from valley_rt.errors import EngineError

    seen = []
    real = ort.InferenceSession

    def spy(path, sess_options=None, providers=None):
        seen.append(sess_options.get_session_config_entry("session.intra_op.allow_spinning"))
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    ort_session.vision_session(vision)  # written
    ort_session.vision_session(vision)  # cached
    monkeypatch.setenv("VALLEY_RT_VISION_SPIN", "on")
    ort_session.vision_session(vision)
    assert seen == ["0", "0", "1"]
    monkeypatch.setenv("VALLEY_RT_VISION_SPIN", "yes")
    with pytest.raises(EngineError, match="VALLEY_RT_VISION_SPIN"):
        ort_session.vision_session(vision)
