"""Video in and out with PyAV (the optional extra ``rclip-toolkit[video]``): frames decoded,
sampled (every N-th frame, or at a target rate), run through any per-image runner (the
zero-shot pipeline: trunk once per frame, the text side once per run), optionally tracked
with supervision's ByteTrack, and written back as an annotated video.

Frame times are the stream's presentation timestamps in seconds (``frame.time``), the frame
index counts decoded frames from 0. ``--fps F`` keeps the first frame at or after each
multiple of 1/F seconds; ``--every N`` keeps frames 0, N, 2N, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from rclip_core.errors import InputError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

__all__ = ["VIDEO_EXTENSIONS", "VideoInfo", "is_video", "probe_video", "sample_frames", "VideoWriter"]


def _av():
    try:
        import av
    except ImportError:
        raise InputError("video input needs PyAV", "pip install 'rclip-toolkit[video]'") from None
    return av


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float  # the stream's average rate
    frames: int | None  # as the container says (None when it does not)
    duration: float | None  # seconds


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open ``path`` and decode its first frame: a one-line InputError for a missing file, a
    file FFmpeg cannot read, or one without a decodable video stream."""
    av = _av()
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"video not found: {p}")
    if os.path.isdir(p):
        raise InputError(f"{p} is a directory, expected a video file")
    try:
        with av.open(p) as c:
            if not c.streams.video:
                raise InputError(f"{p} has no video stream")
            s = c.streams.video[0]
            first = next(c.decode(s), None)
            if first is None:
                raise InputError(f"cannot read video {p}: no frame could be decoded")
            rate = float(s.average_rate or s.guessed_rate or 0) or 25.0
            duration = float(s.duration * s.time_base) if s.duration and s.time_base else \
                (c.duration / 1e6 if c.duration else None)
            return VideoInfo(p, int(first.width), int(first.height), rate, int(s.frames) or None, duration)
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, StopIteration) as e:
        raise InputError(f"cannot read video {p}: {' '.join(str(e).split())[:160]}") from None


def sample_frames(path: str | os.PathLike, every: int = 1, fps: float | None = None
                  ) -> Iterator[tuple[int, float, Image.Image]]:
    """``(frame index, time in s, RGB PIL image)`` of the kept frames, in order."""
    av = _av()
    if every < 1:
        raise InputError("--every must be >= 1")
    if fps is not None and fps <= 0:
        raise InputError("--fps must be > 0")
    p = os.fspath(path)
    next_t = 0.0
    try:
        with av.open(p) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for i, frame in enumerate(c.decode(s)):
                t = float(frame.time) if frame.time is not None else i / (float(s.average_rate or 25))
                if fps is not None:
                    if t + 1e-6 < next_t:
                        continue
                    next_t = (int(t * fps + 1e-6) + 1) / fps
                elif i % every:
                    continue
                yield i, t, frame.to_image()
    except av.error.FFmpegError as e:
        raise InputError(f"cannot read video {p}: {' '.join(str(e).split())[:160]}") from None


class VideoWriter:
    """Encode RGB frames (PIL images or uint8 [H, W, 3]) to ``path`` (H.264 when the FFmpeg of
    PyAV has it, else MPEG-4 Part 2), at ``fps``. Odd sizes are padded to even ones (yuv420p)."""

    def __init__(self, path: str | os.PathLike, fps: float, width: int, height: int):
        av = _av()
        self.path = os.fspath(path)
        self._c = av.open(self.path, mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._s = self._c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.width, self.height = width + width % 2, height + height % 2
        self._s.width, self._s.height, self._s.pix_fmt = self.width, self.height, "yuv420p"
        self.frames = 0

    def write(self, image: Image.Image | np.ndarray) -> None:
        av = _av()
        arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
        if arr.shape[:2] != (self.height, self.width):
            pad = np.zeros((self.height, self.width, 3), dtype=np.uint8)
            pad[: arr.shape[0], : arr.shape[1]] = arr[: self.height, : self.width]
            arr = pad
        for packet in self._s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            self._c.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._s.encode():
            self._c.mux(packet)
        self._c.close()

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
