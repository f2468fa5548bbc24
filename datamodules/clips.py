"""Which frames of a video make one training example: pure index arithmetic, no I/O.

A clip is ``length`` frames taken every ``step`` source frames (``step`` = the period, or source fps / target fps, so it
may be fractional). Frame ``i`` of the clip is source frame ``round(start + i * step)``.

Short videos (fewer source frames than the clip spans) are padded by one of these documented rules:

- ``"reflect"`` (default): the clip runs back and forth through the video, 0 1 2 … n-1 n-2 … 1 0 1 …. Motion stays
  continuous (a heart that contracts, then relaxes backwards), with no black frames and no jump — what a generative or
  identity model should see.
- ``"loop"``: wraps around, 0 … n-1 0 1 … (a jump at the seam, but each cycle is played forwards).
- ``"last"``: holds the last frame.
- ``"zeros"``: black frames after the end — EchoNet-Dynamic's rule, for reproducing its EF protocol. Returned as -1.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PadMode = Literal["reflect", "loop", "last", "zeros"]
PAD_MODES = ("reflect", "loop", "last", "zeros")


def clip_span(length: int, step: float) -> int:
    """Source frames a clip of ``length`` frames every ``step`` frames touches."""
    return int(np.floor((length - 1) * step + 0.5)) + 1


def max_clip_start(num_frames: int, length: int, step: float) -> int:
    """The last start at which the clip fits inside the video (0 when it does not fit at all)."""
    return max(0, num_frames - clip_span(length, step))


def pad_indices(positions: np.ndarray, num_frames: int, pad: PadMode) -> np.ndarray:
    """Map source positions ≥ ``num_frames`` into the video by the pad rule (-1 marks a black frame for "zeros")."""
    positions = np.asarray(positions, dtype=np.int64)
    if num_frames < 1:
        raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
    if pad == "reflect":
        if num_frames == 1:
            return np.zeros_like(positions)
        cycle = 2 * num_frames - 2
        phase = positions % cycle
        return np.where(phase < num_frames, phase, cycle - phase)
    if pad == "loop":
        return positions % num_frames
    if pad == "last":
        return np.minimum(positions, num_frames - 1)
    if pad == "zeros":
        return np.where(positions < num_frames, positions, -1)
    raise ValueError(f"pad must be one of {PAD_MODES}, got {pad!r}")


def clip_indices(num_frames: int, length: int, step: float, start: int, pad: PadMode = "reflect") -> np.ndarray:
    """Source frame indices ``(length,)`` of the clip starting at ``start`` (-1 = black frame, ``pad="zeros"``)."""
    if length < 1 or step <= 0:
        raise ValueError(f"need length ≥ 1 and step > 0, got length={length}, step={step}")
    positions = np.floor(start + np.arange(length) * step + 0.5).astype(np.int64)
    return pad_indices(positions, num_frames, pad)


def frame_sample_indices(num_frames: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct frames of one video in increasing order (with repeats only when the video has fewer than k)."""
    if num_frames >= k:
        return np.sort(rng.choice(num_frames, size=k, replace=False))
    return np.sort(rng.choice(num_frames, size=k, replace=True))
