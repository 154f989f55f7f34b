"""Video input benchmark: sampling 8 frames vs decoding every frame, and decode + preprocess at 1080p/2160p.

1. A long video (10 min, 25 fps, 320x240 H.264, keyframe every 10 s; generated once into /tmp):
   `read_video` (8 frames, seeks) vs `read_video_naive` (the original Valley: decode every frame to
   rgb24, then index). Goal: >= 20x faster and <= 2 s.
2. Decode + preprocess of 8 frames from a 1080p and a 2160p H.264 clip (6 s, 25 fps, keyframe every 2 s), fast path
   and naive path, each in a fresh subprocess so ru_maxrss is that path's own peak RSS.

Both sides run the same number of times (--repeats) and are compared on the same statistic: the median
(the minimum of each side is printed and recorded too). Ratios are median / median.

Usage: python benchmarks/bench_video.py [--minutes 10] [--repeats 3]. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path("/tmp/valley_rt_bench")


def make_video(path: Path, *, seconds: float, width: int, height: int, fps: int = 25, gop_s: float = 10.0) -> Path:
    """Smooth moving content (a drifting gradient with a bouncing square), libx264 ultrafast, fixed GOP."""
    import av

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.mp4")
    gop = int(round(gop_s * fps))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for i in range(int(seconds * fps)):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = ((xx + 2 * i) % width) * (255.0 / width)
            img[..., 1] = ((yy + i) % height) * (255.0 / height)
            img[..., 2] = (i * 3) % 256
            s = height // 6
            x0, y0 = (i * 7) % (width - s), (i * 5) % (height - s)
            img[y0:y0 + s, x0:x0 + s] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)
    return path


def one_run(which: str, path: str) -> dict:
    """Child process: decode + preprocess 8 frames by one path; report times and this process's peak RSS."""
    from valley_rt.config import PreprocessConfig
    from valley_rt.video import preprocess, read_video, read_video_naive

    t0 = time.perf_counter()
    clip = read_video(path, num_frames=8) if which == "fast" else read_video_naive(path, num_frames=8)
    t1 = time.perf_counter()
    pixels = preprocess(clip.frames, PreprocessConfig())
    t2 = time.perf_counter()
    assert tuple(pixels.shape) == (8, 3, 224, 224)
    return {"decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3, "total_ms": (t2 - t0) * 1e3,
            "peak_rss_mb": peak_rss_mb(), "indices": clip.indices}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_subprocess(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(fn, repeats: int) -> tuple[dict, object]:
    """Run fn `repeats` times: ({"median_s", "min_s", "runs"}, the last result)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": repeats}, result


def median_run(runs: list[dict]) -> dict:
    """The run with the median total time (odd counts; the upper middle one for even counts)."""
    return sorted(runs, key=lambda r: r["total_ms"])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_run(*args.child)))
        return

    from valley_rt.video import read_video, read_video_naive

    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()}"
    print(f"hardware: {hardware}; load average {os.getloadavg()[0]:.1f} (other work on the machine slows every number)")

    t0 = time.perf_counter()
    long = make_video(CACHE / f"long_{args.minutes:g}min_320x240_25fps_gop10s.mp4", seconds=args.minutes * 60,
                      width=320, height=240)
    print(f"long video: {long} ({long.stat().st_size / 1e6:.1f} MB, ready in {time.perf_counter() - t0:.1f} s)")
    fast_t, clip = timed(lambda: read_video(long, num_frames=8), args.repeats)
    naive_t, ref = timed(lambda: read_video_naive(long, num_frames=8), args.repeats)  # same number of runs
    fast_s, naive_s = fast_t["median_s"], naive_t["median_s"]
    same = clip.indices == ref.indices and bool(np.array_equal(clip.frames, ref.frames))
    print(f"8 of {clip.num_source_frames} frames, median of {args.repeats} runs each: read_video {fast_s * 1e3:.0f} ms "
          f"(min {fast_t['min_s'] * 1e3:.0f}), decode-all {naive_s * 1e3:.0f} ms (min {naive_t['min_s'] * 1e3:.0f}),"
          f" {naive_s / fast_s:.1f}x; identical frames: {same}")

    sizes = {}
    for name, (w, h) in {"1080p": (1920, 1080), "2160p": (3840, 2160)}.items():
        clip_path = make_video(CACHE / f"clip_{name}_6s.mp4", seconds=6, width=w, height=h, gop_s=2.0)
        fast = median_run([in_subprocess("fast", clip_path) for _ in range(args.repeats)])
        naive = median_run([in_subprocess("naive", clip_path) for _ in range(args.repeats)])
        print(f"{name}: read_video+preprocess {fast['total_ms']:.0f} ms (decode {fast['decode_ms']:.0f}, preprocess "
              f"{fast['preprocess_ms']:.0f}), peak RSS {fast['peak_rss_mb']:.0f} MB; decode-all+preprocess "
              f"{naive['total_ms']:.0f} ms, peak RSS {naive['peak_rss_mb']:.0f} MB")
        sizes[name] = {"fast_ms": round(fast["total_ms"], 1), "fast_decode_ms": round(fast["decode_ms"], 1),
                       "fast_preprocess_ms": round(fast["preprocess_ms"], 1),
                       "fast_peak_rss_mb": round(fast["peak_rss_mb"], 1), "naive_ms": round(naive["total_ms"], 1),
                       "naive_peak_rss_mb": round(naive["peak_rss_mb"], 1),
                       "speedup": round(naive["total_ms"] / fast["total_ms"], 2),
                       "same_indices": fast["indices"] == naive["indices"]}

    result = {"bench": "video", "hardware": hardware, "load_avg_1min": round(os.getloadavg()[0], 1), "long_video_frames": clip.num_source_frames,
              "long_video_minutes": args.minutes, "repeats": args.repeats, "statistic": "median",
              "read_video_s": round(fast_s, 4), "decode_all_s": round(naive_s, 3),
              "read_video_min_s": round(fast_t["min_s"], 4), "decode_all_min_s": round(naive_t["min_s"], 3),
              "speedup": round(naive_s / fast_s, 1), "goal_met": naive_s / fast_s >= 20 and fast_s <= 2.0,
              "identical_frames": same, **{f"clip_{k}": v for k, v in sizes.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
