"""Media from a request: URLs -> bytes -> a content key, within limits.

A video arrives as one `video_url` part, or as a list of frames in several `image_url` parts (the
convention vLLM and SGLang share). URLs may be `data:` (base64), `file://` (only under the server's
`--allowed-media-path`; refused otherwise, so a client cannot read the server's files) or http(s)
(fetched with a byte cap and a wall-clock timeout, the body streamed so an oversized answer is cut
off, not buffered). The content key is the SHA-256 of the bytes, so the encoder cache hits on the
same video whatever URL or path it came by. Every failure is an `APIError` naming the limit or the
part, a 4xx, never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from valley_rt.errors import ValleyError

MAX_IMAGE_PIXELS = 4096 * 4096  # one frame's pixel cap (a decompression-bomb guard)


class APIError(ValleyError):
    """A request the server refuses: becomes an OpenAI error object with this HTTP status."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers or {}


def limit_error(message: str, flag: str, *, status: int = 400) -> APIError:
    return APIError(f"{message} (server limit {flag})", status=status, code="limit_exceeded", param=flag)


@dataclass
class MediaLimits:
    allowed_media_path: Path | None = None  # file:// URLs must resolve under it; None refuses file://
    max_video_bytes: int = 64 << 20
    max_duration_s: float = 3600.0
    max_frames: int = 64
    http_timeout_s: float = 10.0


@dataclass
class Media:
    """One request's video: raw bytes (a file the decoder can open) or decoded frames, and its key."""

    key: str  # sha256 of the bytes (of every frame's bytes, in order, for a frame list)
    path: Path | None = None  # a video file to decode
    frames: np.ndarray | None = None  # uint8 [T, H, W, 3] from image_url parts
    nbytes: int = 0


async def fetch(url: str, limits: MediaLimits, *, what: str) -> tuple[bytes, Path | None]:
    """The bytes behind a URL, and the local path when it was a file:// URL."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    cap = limits.max_video_bytes
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise APIError(f"{what}: a data: URL must be base64 (data:<mime>;base64,<bytes>)", param=what)
        if len(payload) * 3 // 4 > cap:
            raise limit_error(f"{what}: {len(payload) * 3 // 4} bytes is over {cap} bytes", "--max-video-mb", status=413)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(f"{what}: invalid base64 in data: URL ({e})", param=what) from None
        return data, None
    if scheme == "file":
        return _read_file(url, limits, what=what)
    if scheme in ("http", "https"):
        return await _download(url, limits, what=what), None
    raise APIError(f"{what}: unsupported URL scheme {scheme!r} (use data:, file:// or http(s)://)", param=what)


def _read_file(url: str, limits: MediaLimits, *, what: str) -> tuple[bytes, Path]:
    if limits.allowed_media_path is None:
        raise APIError(f"{what}: file:// URLs are refused (start the server with --allowed-media-path DIR)",
                       status=403, type="permission_error", param=what)
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise APIError(f"{what}: file:// URL with a remote host {parsed.netloc!r}", param=what)
    path = Path(urllib.parse.unquote(parsed.path))
    root = limits.allowed_media_path.resolve()
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(f"{what}: {path}: no such file", status=404, code="media_not_found", param=what) from None
    if real != root and root not in real.parents:
        raise APIError(f"{what}: {path} is outside --allowed-media-path {root}", status=403,
                       type="permission_error", param=what)
    if not real.is_file():
        raise APIError(f"{what}: {path} is not a file", param=what)
    size = real.stat().st_size
    if size > limits.max_video_bytes:
        raise limit_error(f"{what}: {path} is {size} bytes, over {limits.max_video_bytes}", "--max-video-mb", status=413)
    return real.read_bytes(), real


async def _download(url: str, limits: MediaLimits, *, what: str) -> bytes:
    import httpx

    cap = limits.max_video_bytes
    try:
        async with httpx.AsyncClient(timeout=limits.http_timeout_s, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise APIError(f"{what}: GET {url} answered HTTP {r.status_code}", param=what, code="media_fetch_failed")
                declared = r.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > cap:
                    raise limit_error(f"{what}: {url} is {declared} bytes, over {cap}", "--max-video-mb", status=413)
                buf = bytearray()
                async for chunk in r.aiter_bytes():
                    buf += chunk
                    if len(buf) > cap:
                        raise limit_error(f"{what}: {url} is over {cap} bytes", "--max-video-mb", status=413)
                return bytes(buf)
    except httpx.TimeoutException:
        raise limit_error(f"{what}: GET {url} took longer than {limits.http_timeout_s} s", "--media-timeout-s",
                          status=408) from None
    except httpx.HTTPError as e:
        raise APIError(f"{what}: GET {url} failed ({type(e).__name__}: {e})", param=what, code="media_fetch_failed") from None


def decode_image(data: bytes, *, what: str) -> np.ndarray:
    """JPEG/PNG/... bytes -> upright RGB uint8 [H, W, 3]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise APIError(f"{what}: {img.width}x{img.height} image is over {MAX_IMAGE_PIXELS} pixels",
                           param=what, code="limit_exceeded")
        img = ImageOps.exif_transpose(img).convert("RGB")
        return np.asarray(img, dtype=np.uint8)
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise APIError(f"{what}: not a decodable image ({type(e).__name__}: {e})", param=what, code="invalid_image") from None


def stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    """Frames of different sizes are resized to the first one's (as the video reader does)."""
    from PIL import Image

    h, w = frames[0].shape[:2]
    same = [f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR))
            for f in frames]
    return np.stack(same)  # [T, H, W, 3]


def video_duration(path: Path) -> float | None:
    """The container's stated duration in seconds (header only, nothing decoded); None if unknown
    or unreadable (the decoder then reports what is wrong with the file)."""
    import av

    try:
        with av.open(str(path)) as c:
            if c.duration is not None:
                return c.duration / 1e6
            s = c.streams.video[0] if c.streams.video else None
            if s is not None and s.duration is not None and s.time_base is not None:
                return float(s.duration * s.time_base)
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None
    return None


async def load(urls: list[tuple[str, str]], limits: MediaLimits, spool: Path) -> Media:
    """urls: [(kind, url)] with kind "video" (exactly one) or "image" (one frame each, in order).
    Bytes that did not come from an allowed local file are spooled to a file under `spool` for the
    decoder; the caller removes `Media.path` when it lies under `spool`."""
    kinds = {k for k, _ in urls}
    if kinds == {"video"}:
        if len(urls) > 1:
            raise APIError(f"a request may hold one video, found {len(urls)} video_url parts", param="messages")
        data, local = await fetch(urls[0][1], limits, what="video_url")
        if not data:
            raise APIError("video_url: empty video (0 bytes)", param="video_url", code="invalid_video")
        key = hashlib.sha256(data).hexdigest()
        path = local
        if path is None:
            fd, name = tempfile.mkstemp(dir=spool, suffix=".video")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            path = Path(name)
        return Media(key=key, path=path, nbytes=len(data))
    if kinds == {"image"}:
        if len(urls) > limits.max_frames:
            raise limit_error(f"{len(urls)} image_url frames, over {limits.max_frames}", "--max-frames")
        h = hashlib.sha256()
        frames, total = [], 0
        for i, (_, url) in enumerate(urls):
            data, _ = await fetch(url, limits, what=f"image_url[{i}]")
            total += len(data)
            if total > limits.max_video_bytes:
                raise limit_error(f"image_url frames total {total} bytes, over {limits.max_video_bytes}",
                                  "--max-video-mb", status=413)
            h.update(hashlib.sha256(data).digest())
            frames.append(decode_image(data, what=f"image_url[{i}]"))
        return Media(key="frames:" + h.hexdigest(), frames=stack_frames(frames), nbytes=total)
    raise APIError("a request's video is either one video_url part or a list of image_url frames, not both",
                   param="messages")
