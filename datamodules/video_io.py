"""Video files in and out with PyAV (the FFmpeg bundled in its wheel).

Reading returns uint8 frames, ``(T, H, W)`` grayscale or ``(T, H, W, 3)`` RGB. Frame counts come from decoding: container
headers are often wrong (``stream.frames`` is 0 for some AVIs). Writing is atomic: frames go to a temporary file in the
target folder, which is renamed onto the final name only once the container is closed, so a killed writer never leaves
a half video under its final name.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from datamodules.errors import UserInputError

# FFmpeg's FF_QP2LAMBDA: `-q:v q` sets global_quality = q * FF_QP2LAMBDA.
_QP2LAMBDA = 118
_CODEC_BY_SUFFIX = {".avi": "mjpeg", ".mp4": "libx264", ".mkv": "ffv1"}
_CONTAINER_BY_SUFFIX = {".avi": "avi", ".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm"}


class VideoReadError(UserInputError, RuntimeError):
    """A video that is missing, not a video, or cannot be decoded. The message names the file."""


class ShortVideoError(VideoReadError):
    """Fewer frames decode than were asked for (the FileList or header overstated the length)."""

    def __init__(self, message: str, decoded: int) -> None:
        super().__init__(message)
        self.decoded = decoded


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns of a file. ``num_frames`` is decoded, not read from the header."""

    path: Path
    num_frames: int
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class FrameCount:
    """What :func:`count_frames` learns of a file without decoding it (but its first frame).

    ``frames``: video packets in the file, one per frame. ``header_frames``: the length the container's header
    records (its duration × frame rate, less one, where it records no count; 0: neither). ``corrupt``: packets the demuxer flags as damaged (a file cut inside a frame).
    """

    path: Path
    frames: int
    header_frames: int
    corrupt: int
    fps: float

    @property
    def truncated(self) -> bool:
        """A file cut short: a damaged packet, or fewer frames than its own header announced."""
        return self.corrupt > 0 or self.frames < self.header_frames

    def problem(self) -> str | None:
        """Why the file cannot be used whole, or None."""
        if self.corrupt:
            return f"truncated video: its last frame is cut ({self.frames} frames, {self.corrupt} damaged)"
        if self.frames < self.header_frames:
            return f"truncated video: {self.frames} frames, its header records {self.header_frames}"
        return None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name is hidden and ends in ``.tmp``, so neither ``Videos/*.avi`` nor a FileList ever sees a partial
    file; a killed writer leaves at most such a ``.tmp`` file behind.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _open_video_stream(path: Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open ``path``'s first video stream for single-threaded decoding; FFmpeg errors become VideoReadError.

    Single-threaded decoding is deliberate: FFmpeg's frame threads oversubscribe small machines; parallelism comes from
    DataLoader workers instead.
    """
    if not path.is_file():
        raise VideoReadError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream in file")
            stream = container.streams.video[0]
            stream.thread_type = "NONE"
            yield container, stream
    except av.FFmpegError as err:
        raise VideoReadError(f"{path}: cannot decode video ({err})") from err


# 8-bit formats whose first plane is luma. FFmpeg's gray conversion copies it for full-range (JPEG) streams and
# stretches 16–235 to 0–255 for limited-range ones; doing the same in numpy gives identical values and skips swscale,
# which otherwise costs twice the decoding itself.
_LUMA_FIRST = {"gray", "yuv420p", "yuv422p", "yuv444p", "yuvj420p", "yuvj422p", "yuvj444p", "nv12", "nv21"}
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
_JPEG_RANGE = 2  # AVCOL_RANGE_JPEG


def frame_to_array(frame: av.VideoFrame, gray: bool, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """A decoded frame as uint8 ``(H, W)`` (gray: the luma, full range) or ``(H, W, 3)`` RGB.

    Pass one ``reformatter`` for all frames of a video: it keeps FFmpeg's scaler context, which
    ``frame.to_ndarray(format=...)`` rebuilds for every frame at ~10× the cost.
    """
    name = frame.format.name
    if not gray or name not in _LUMA_FIRST:
        target = "gray" if gray else "rgb24"
        return (reformatter or VideoReformatter()).reformat(frame, format=target).to_ndarray()
    plane = frame.planes[0]
    luma = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:, : frame.width]
    if name == "gray" or name.startswith("yuvj") or frame.color_range == _JPEG_RANGE:
        return luma.copy()
    return _LIMITED_TO_FULL[luma]


def _decode(path: str | os.PathLike, stop: int | None) -> Iterator[av.VideoFrame]:
    with _open_video_stream(Path(path)) as (container, stream):
        for i, frame in enumerate(container.decode(stream)):
            if stop is not None and i >= stop:
                break
            yield frame


def iter_frames(path: str | os.PathLike, *, gray: bool = True, stop: int | None = None) -> Iterator[np.ndarray]:
    """Decode frames ``0 .. stop-1`` (all when ``stop`` is None) one at a time."""
    reformatter = VideoReformatter()
    for frame in _decode(path, stop):
        yield frame_to_array(frame, gray, reformatter)


def read_video(
    path: str | os.PathLike, *, gray: bool = True, indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Read a video as uint8 ``(T, H, W)`` (gray) or ``(T, H, W, 3)`` (RGB).

    ``indices`` picks frames (any order, repeats allowed); decoding stops after the largest one and only the picked
    frames are converted. An index past the end of the video raises :class:`ShortVideoError` naming the file and the
    decoded length.
    """
    if indices is None:
        frames = list(iter_frames(path, gray=gray))
        if not frames:
            raise VideoReadError(f"{path}: video has no decodable frame")
        return np.stack(frames)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("indices is empty")
    if indices.min() < 0:
        raise ValueError(f"negative frame index {int(indices.min())}")
    stop = int(indices.max()) + 1
    wanted = set(indices.tolist())
    picked, decoded, reformatter = {}, 0, VideoReformatter()
    for i, frame in enumerate(_decode(path, stop)):
        decoded = i + 1
        if i in wanted:
            picked[i] = frame_to_array(frame, gray, reformatter)
    if decoded < stop:
        raise ShortVideoError(f"{path}: frame {stop - 1} requested but the video decodes to {decoded} frames", decoded)
    return np.stack([picked[i] for i in indices.tolist()])


def count_frames(path: str | os.PathLike) -> FrameCount:
    """Count a video's frames by demuxing its packets — no decoding but the first frame, which proves the stream
    decodes — and compare with the header: a file cut short shows as fewer packets than the header records, or as a
    damaged last packet (:attr:`FrameCount.truncated`). About as fast as opening the file."""
    path = Path(path)
    with _open_video_stream(path) as (container, stream):
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        frames = corrupt = 0
        decoded = False
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            frames += 1
            corrupt += bool(packet.is_corrupt)
            if not decoded:
                decoded = bool(packet.decode())
        if not decoded and frames:
            decoded = bool(stream.codec_context.decode(None))  # a decoder with delay: flush it
        if not decoded:
            raise VideoReadError(f"{path}: video has no decodable frame")
        announced = max(int(stream.frames), 0)
        if not announced and container.duration and rate:
            # No frame count in the header (Matroska): its duration at the stream's rate, less one for rounding.
            announced = max(0, round(container.duration / av.time_base * float(rate)) - 1)
        return FrameCount(path, frames, announced, corrupt, float(rate) if rate else 0.0)


def probe_video(path: str | os.PathLike, *, decode: bool = True) -> VideoInfo:
    """Size, fps and frame count of a video. With ``decode=False`` only the first frame is decoded and the frame count
    is the header's (possibly 0); with ``decode=True`` every frame is decoded and counted."""
    path = Path(path)
    with _open_video_stream(path) as (container, stream):
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        count, first = 0, None
        for frame in container.decode(stream):
            if first is None:
                first = frame
                if not decode:
                    break
            count += 1
        if first is None:
            raise VideoReadError(f"{path}: video has no decodable frame")
        return VideoInfo(path, count if decode else int(stream.frames), first.height, first.width,
                         float(rate) if rate else 0.0)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    *,
    codec: str | None = None,
    quality: int = 2,
    crf: int = 18,
) -> Path:
    """Write uint8 frames ``(T, H, W)`` (gray) or ``(T, H, W, 3)`` (RGB) atomically; return the final path.

    The codec follows the suffix unless given: ``.avi`` → MJPEG at ``-q:v quality`` (2 = visually lossless, what
    EchoNet-style AVIs hold), ``.mp4`` → H.264 at ``crf`` (what browsers and wandb play), ``.mkv`` → lossless FFV1.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3):
        raise ValueError(f"frames must be uint8 (T, H, W) or (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError(f"{path}: refusing to write a video with no frame")
    suffix = path.suffix.lower()
    codec = codec or _CODEC_BY_SUFFIX.get(suffix)
    if codec is None or suffix not in _CONTAINER_BY_SUFFIX:
        raise ValueError(f"{path}: cannot write suffix {path.suffix!r}; use one of {', '.join(_CONTAINER_BY_SUFFIX)}")
    in_format = "gray" if frames.ndim == 3 else "rgb24"
    height, width = frames.shape[1:3]
    with atomic_output(path) as tmp:
        with av.open(str(tmp), "w", format=_CONTAINER_BY_SUFFIX[suffix]) as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = width, height
            if codec == "mjpeg":
                stream.pix_fmt = "yuvj444p"
                stream.codec_context.qscale = True
                stream.codec_context.global_quality = quality * _QP2LAMBDA
                stream.options = {"qmin": str(quality), "qmax": str(quality)}
            elif codec == "libx264":
                if height % 2 or width % 2:
                    raise ValueError(f"{path}: H.264 needs even frame sizes, got {height}x{width}")
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "medium"}
            elif codec == "ffv1":
                stream.pix_fmt = "gray" if in_format == "gray" else "bgr0"
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=in_format)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path
