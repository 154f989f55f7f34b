"""valley_rt.video: sampling exactness, robustness on every shared test video, and preprocessing parity
with the original Valley transform (fixture) and with an independent PIL computation of the spec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import valley_rt.video as video
from valley_rt.config import PreprocessConfig, preset
from valley_rt.errors import VideoError
from valley_rt.video import (DecodeBudgetExceeded, EmptyVideo, NotAVideo, NoVideoStream, VideoNotFound,
                             preprocess, probe, read_video, read_video_naive)

# The shared test data beside the repo (VALLEY_RT_SHARED points elsewhere); tests that read it skip without it.
SHARED = Path(os.environ.get("VALLEY_RT_SHARED") or Path(__file__).resolve().parents[2] / "shared")
VIDEOS = SHARED / "videos"
FIXTURE = SHARED / "fixtures" / "original_valley" / "preprocess" / "expected.safetensors"
needs_shared = pytest.mark.skipif(not VIDEOS.is_dir(), reason=f"{VIDEOS} (the shared test videos) is not present")

# Constant-rate files that must yield the spec's indices: name -> (real frame count, width, height).
CFR = {
    "av1.mp4": (75, 320, 180), "gray.mp4": (100, 596, 336), "hevc.mkv": (150, 596, 336),
    "hi10.mp4": (100, 596, 336), "mjpeg.mov": (100, 320, 180), "mpeg4.avi": (150, 596, 336),
    "odd_98x62.mp4": (100, 98, 62), "one_frame.mp4": (1, 596, 336), "snowmobile.mp4": (509, 596, 336),
    "three_frames.mp4": (3, 596, 336), "vp9.webm": (150, 596, 336), "yuv444.mp4": (100, 596, 336),
}
ERRORS = {"audio_only.m4a": NoVideoStream, "empty.mp4": EmptyVideo, "garbage.mp4": NotAVideo}
OTHER = {"still.jpg", "still.png", "truncated_half.mp4", "vfr.mp4"}  # checked by their own tests below


def spec_indices(n: int, t: int) -> list[int]:
    return [int(i) for i in np.linspace(0, n - 1, t).astype(int)]


@needs_shared
def test_every_shared_file_is_covered():
    assert {p.name for p in VIDEOS.iterdir()} == set(CFR) | set(ERRORS) | OTHER


@needs_shared
@pytest.mark.parametrize("name", sorted(CFR))
def test_constant_rate_files_yield_spec_indices(name):
    n, w, h = CFR[name]
    clip = read_video(VIDEOS / name, num_frames=8)
    assert clip.frames.shape == (8, h, w, 3) and clip.frames.dtype == np.uint8
    assert clip.num_source_frames == n
    assert clip.indices == spec_indices(n, 8)
    assert clip.timestamps == pytest.approx([i / 25 for i in clip.indices], abs=1e-6)
    assert (clip.width, clip.height) == (w, h)
    if n > 1:
        assert clip.fps == pytest.approx(25.0) and clip.duration == pytest.approx(n / 25)


@pytest.mark.parametrize("name", ["odd_98x62.mp4", "three_frames.mp4", "mjpeg.mov", "hi10.mp4", "mpeg4.avi",
                                  "hevc.mkv"])
@needs_shared
def test_frames_equal_decoding_everything(name):
    """Seeking + partial decoding returns the very pixels that decoding every frame gives."""
    clip, ref = read_video(VIDEOS / name), read_video_naive(VIDEOS / name)
    assert clip.indices == ref.indices
    np.testing.assert_array_equal(clip.frames, ref.frames)


@needs_shared
@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_files_raise_one_line_errors(name):
    with pytest.raises(ERRORS[name]) as e:
        read_video(VIDEOS / name)
    assert isinstance(e.value, VideoError) and str(VIDEOS / name) in str(e.value) and "\n" not in str(e.value)


def test_text_file_named_mp4_missing_path_and_directory(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(NotAVideo, match="notes.mp4: not a recognised video"):
        read_video(text)
    with pytest.raises(VideoNotFound, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(NotAVideo, match="directory"):
        read_video(tmp_path)


@needs_shared
@pytest.mark.parametrize("name", ["still.png", "still.jpg"])
def test_still_image_is_a_one_frame_video(name):
    clip = read_video(VIDEOS / name, num_frames=4)
    expected = np.asarray(Image.open(VIDEOS / name).convert("RGB"))
    assert clip.frames.shape == (4, *expected.shape) and clip.indices == [0, 0, 0, 0]
    for frame in clip.frames:
        np.testing.assert_array_equal(frame, expected)


def test_still_image_orientation_and_16_bit(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:10, :20] = 255  # white top-left
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # EXIF orientation 6: turn 90 degrees clockwise to display
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    clip = read_video(tmp_path / "phone.jpg", num_frames=1)
    assert clip.frames.shape == (1, 40, 20, 3)
    assert clip.frames[0, :5, -5:].min() > 200 and clip.frames[0, :5, :5].max() < 50  # now white top-right
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    clip = read_video(tmp_path / "deep.png", num_frames=1)
    np.testing.assert_array_equal(clip.frames[0, ..., 1], np.round(ramp / 257).astype(np.uint8))


@needs_shared
def test_short_clip_repeats_frames_in_order():
    clip = read_video(VIDEOS / "three_frames.mp4", num_frames=8)
    assert clip.indices == [0, 0, 0, 0, 1, 1, 1, 2]
    assert any("repeated" in n for n in clip.notes)
    ref = read_video_naive(VIDEOS / "three_frames.mp4", num_frames=3)
    for frame, i in zip(clip.frames, clip.indices):
        np.testing.assert_array_equal(frame, ref.frames[i])


@needs_shared
def test_truncated_file_yields_frames_with_a_note():
    clip = read_video(VIDEOS / "truncated_half.mp4", num_frames=8)
    assert clip.frames.shape[0] == 8 and clip.indices == sorted(clip.indices)
    assert 100 <= clip.num_source_frames < 250  # the header claims 250; about half is in the file
    assert clip.indices[-1] > 90
    assert any("truncated" in n for n in clip.notes)


@needs_shared
def test_file_damaged_in_the_middle_still_yields_frames(tmp_path):
    data = bytearray((VIDEOS / "snowmobile.mp4").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 50_000] = bytes(50_000)  # wipe ~10 frames' worth of packets
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with pytest.raises(av.error.InvalidDataError):
        read_video_naive(damaged)  # decoding everything in one go gives up at the damage
    clip = read_video(damaged, num_frames=64)
    good = read_video(VIDEOS / "snowmobile.mp4", num_frames=64)
    assert clip.frames.shape == good.frames.shape and clip.indices == sorted(clip.indices)
    assert any("failed to decode" in n for n in clip.notes) and any("could not be decoded" in n for n in clip.notes)
    replaced = [j for j, (a, b) in enumerate(zip(clip.indices, good.indices)) if a != b]
    assert 0 < len(replaced) <= 3
    intact = [j for j in range(64) if abs(good.indices[j] - 275) > 40]  # frames far from the damage
    np.testing.assert_array_equal(clip.frames[intact], good.frames[intact])


@needs_shared
def test_file_zeroed_to_the_end_yields_frames_without_rereading(tmp_path):
    """The sample table is intact but the last 40 % of the data is zeros: frames past the damage take the
    last decodable frame, and the reader does not re-decode the file once per such frame."""
    data = bytearray((VIDEOS / "snowmobile.mp4").read_bytes())
    cut = int(len(data) * 0.6)
    data[cut:] = bytes(len(data) - cut)
    damaged = tmp_path / "zeroed.mp4"
    damaged.write_bytes(bytes(data))
    clip = read_video(damaged, num_frames=8)
    assert clip.indices[:5] == spec_indices(509, 8)[:5]
    assert len(set(clip.indices[5:])) == 1 and 290 < clip.indices[-1] < 362
    assert any("decodable stream ends" in n for n in clip.notes)
    assert clip.stream["packets_read"] < 2 * 509


@needs_shared
def test_vfr_is_sampled_by_presentation_time():
    with av.open(str(VIDEOS / "vfr.mp4")) as c:
        times = np.array([float(f.time) for f in c.decode(video=0)])
    clip = read_video(VIDEOS / "vfr.mp4", num_frames=8)
    assert clip.num_source_frames == len(times)
    targets = np.linspace(times[0], times[-1], 8)
    expected = [int(np.flatnonzero(times <= t + 1e-9)[-1]) for t in targets]  # the frame on screen at t
    assert clip.indices == expected
    assert clip.indices != spec_indices(len(times), 8)  # i.e. the file really is VFR
    assert clip.timestamps == pytest.approx(times[clip.indices].tolist(), abs=1e-6)


@needs_shared
def test_fps_mode_and_cap():
    clip = read_video(VIDEOS / "snowmobile.mp4", mode="fps", fps=0.5, max_frames=64)
    assert clip.indices == list(range(0, 509, 50))  # every int(round(25) / 0.5) = 50th frame
    capped = read_video(VIDEOS / "snowmobile.mp4", mode="fps", fps=2.0, max_frames=5)
    assert capped.indices == spec_indices(509, 5)


def _numbered_video(path: Path, n: int, *, gop: int, rotation: int | None = None, preset_name="medium") -> Path:
    """A clip whose frame i shows i in binary as 10 black/white bars (survives compression)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 160, 32, "yuv420p"
        s.options = {"preset": preset_name, "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0",
                     "x264-params": "bframes=3:b-adapt=0"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            img = np.zeros((32, 160, 3), np.uint8)
            for b in range(10):
                img[:, b * 16:(b + 1) * 16] = 255 * ((i >> b) & 1)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def _frame_number(frame: np.ndarray) -> int:
    bars = frame[8:24, :, :].reshape(16, 10, 16, 3).mean(axis=(0, 2, 3))
    return int(sum(1 << b for b in range(10) if bars[b] > 127))


@pytest.mark.parametrize("num_frames", [8, 37])
# Frame table from the MP4 sample index / from demuxing; MPEG-TS seeks are inexact; raw H.264 has no timestamps.
@pytest.mark.parametrize("suffix", ["mp4", "mkv", "ts", "h264"])
def test_seeking_returns_exactly_the_sampled_frames(tmp_path, num_frames, suffix):
    """B-frames, a keyframe every 25 frames: each returned frame is the source frame its index names,
    and sparse sampling decodes far fewer frames than the clip holds."""
    path = _numbered_video(tmp_path / f"numbered.{suffix}", 600, gop=25)
    clip = read_video(path, num_frames=num_frames)
    assert clip.indices == spec_indices(600, num_frames)
    assert [_frame_number(f) for f in clip.frames] == clip.indices
    assert clip.num_source_frames == 600
    assert clip.stream["frame_table"] == ("index" if suffix == "mp4" else "demux")
    if num_frames == 8 and suffix in ("mp4", "mkv"):
        assert clip.stream["frames_decoded"] <= 8 * 25 and clip.stream["seeks"] >= 2


def test_rotation_metadata_gives_upright_frames(tmp_path):
    path = _numbered_video(tmp_path / "portrait.mp4", 30, gop=10, rotation=-90)  # a phone held upright
    clip = read_video(path, num_frames=4)
    assert clip.frames.shape == (4, 160, 32, 3) and (clip.width, clip.height) == (32, 160)
    # Turned clockwise: the bar for bit b (x in [16b, 16b+16) of the coded frame) is now rows 16b..16b+16.
    upright = np.stack([np.rot90(f, k=1) for f in clip.frames])  # undo the turn: back to the coded layout
    assert [_frame_number(f) for f in upright] == clip.indices


@needs_shared
def test_decoding_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "DECODE_TIMEOUT_S", -1.0)
    with pytest.raises(DecodeBudgetExceeded, match="longer than"):
        read_video(VIDEOS / "snowmobile.mp4")


def _spec_pil(frame: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """The spec's steps written out independently, one frame at a time with PIL."""
    im = Image.fromarray(frame)
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if short != cfg.resize_short:
        new_long = int(cfg.resize_short * long / short)
        im = im.resize((cfg.resize_short, new_long) if w < h else (new_long, cfg.resize_short), Image.BILINEAR)
    w, h = im.size
    x0, y0 = int(round((w - cfg.crop_size) / 2)), int(round((h - cfg.crop_size) / 2))
    arr = np.asarray(im)[y0:y0 + cfg.crop_size, x0:x0 + cfg.crop_size].astype(np.float32) / 255.0
    arr = (arr - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.mark.parametrize("hw", [(336, 596), (600, 256), (256, 300), (120, 97), (1081, 1919)])
@pytest.mark.parametrize("cfg_name", ["default", "tiny"])
def test_preprocess_matches_independent_pil_steps(hw, cfg_name):
    cfg = PreprocessConfig() if cfg_name == "default" else preset("tiny").preprocess
    frames = np.random.default_rng(sum(hw)).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    out = preprocess(frames, cfg)
    assert out.shape == (2, 3, cfg.crop_size, cfg.crop_size) and out.dtype == torch.float32
    expected = torch.stack([_spec_pil(f, cfg) for f in frames])
    assert (out - expected).abs().max().item() <= 1e-6


@needs_shared
def test_preprocess_matches_original_valley_fixture():
    from safetensors.torch import load_file

    expected = load_file(str(FIXTURE))
    clip = read_video(VIDEOS / "snowmobile.mp4", num_frames=8)
    assert clip.indices == expected["frame_indices"].tolist()
    err = (preprocess(clip.frames, PreprocessConfig()) - expected["pixel_values"]).abs().max().item()
    assert err <= 1e-6, f"max abs error vs the original transform: {err}"  # measured: 0.0


@needs_shared
def test_probe_and_cli():
    from typer.testing import CliRunner

    from valley_rt.cli import app

    info = probe(VIDEOS / "snowmobile.mp4", num_frames=4)
    assert info["indices"] == spec_indices(509, 4) and info["stream"]["codec"] == "h264"
    json.dumps(info)
    runner = CliRunner()
    ok = runner.invoke(app, ["probe", str(VIDEOS / "odd_98x62.mp4"), "--frames", "3"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["indices"] == [0, 49, 99]
    fps = runner.invoke(app, ["probe", str(VIDEOS / "snowmobile.mp4"), "--fps", "0.25"])
    assert fps.exit_code == 0 and json.loads(fps.stdout)["indices"] == list(range(0, 509, 100))
    bad = runner.invoke(app, ["probe", str(VIDEOS / "garbage.mp4")])
    assert bad.exit_code == 2
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "garbage.mp4" in lines[0]
