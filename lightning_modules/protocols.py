"""Comparison protocols: which frames of a video are compared when the re-ID model scores two videos (DESIGN.md,
"Metrics"). A video's score against another is the maximum of the head's logit over their compared frame pairs, so a
protocol that compares more frames scores every pair of videos higher — and a privacy threshold τ holds only under
the protocol it was calibrated with.

* ``first_frame`` — each video's first frame (the seed paper's protocol; an anatomy model's samples are one frame).
* ``frames:N`` — N distinct frames per video, in time order, chosen by ``(eval_seed, index)`` (the re-ID model's own
  validation).
* ``clip:L`` — L contiguous frames every ``p`` source frames (``clip:L/pP``) or resampled to F fps
  (``clip:L@Ffps``), starting where the DataModule's evaluation clip starts (a video model's samples are clips).

:meth:`Protocol.data_options` turns a protocol into :class:`~datamodules.EchoNetDataModule` arguments for real videos;
:meth:`Protocol.frames_of` picks the same frames from generated videos.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from datamodules.clips import frame_sample_indices

Kind = Literal["first_frame", "frames", "clip"]
_CLIP = re.compile(r"^clip:(\d+)(?:/p(\d+)|@([0-9.]+)fps)?$")
_SAMPLE_STREAM = 23  # the frames:N choice on generated videos


class ProtocolMismatchError(ValueError):
    """A τ calibrated under one protocol was about to be used under another."""


@dataclass(frozen=True)
class Protocol:
    """Which frames of each video are compared. ``length``: frames (``frames``) or clip length (``clip``);
    ``period`` / ``fps``: the clip's temporal sampling (``clip`` only; at most one of them)."""

    kind: Kind
    length: int = 1
    period: int = 1
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("first_frame", "frames", "clip"):
            raise ValueError(f"protocol kind must be first_frame, frames or clip, got {self.kind!r}")
        if self.length < 1 or self.period < 1 or (self.kind == "first_frame" and self.length != 1):
            raise ValueError(f"protocol {self.kind}: length and period must be ≥ 1 (first_frame: length 1), got "
                             f"{self.length}, {self.period}")
        if self.kind != "clip" and (self.period != 1 or self.fps is not None):
            raise ValueError(f"protocol {self.kind} takes no period or fps")
        if self.fps is not None and self.period != 1:
            raise ValueError("a clip protocol takes a period or an fps, not both")

    @property
    def name(self) -> str:
        if self.kind == "first_frame":
            return "first_frame"
        if self.kind == "frames":
            return f"frames:{self.length}"
        if self.fps is not None:
            return f"clip:{self.length}@{self.fps:g}fps"
        return f"clip:{self.length}" + (f"/p{self.period}" if self.period != 1 else "")

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str | Protocol) -> Protocol:
        """``first_frame`` (also ``paper``), ``frames:N``, ``clip:L``, ``clip:L/pP``, ``clip:L@Ffps``."""
        if isinstance(text, Protocol):
            return text
        text = text.strip()
        if text in ("first_frame", "paper"):
            return cls("first_frame")
        if text.startswith("frames:") and text[7:].isdigit():
            return cls("frames", int(text[7:]))
        match = _CLIP.match(text)
        if match:
            length, period, fps = match.groups()
            return cls("clip", int(length), int(period or 1), None if fps is None else float(fps))
        raise ValueError(f"unknown protocol {text!r}: use first_frame (or paper), frames:N, clip:L, clip:L/pP or "
                         "clip:L@Ffps")

    @classmethod
    def of_data(cls, hparams: Any) -> Protocol:
        """The protocol under which a DataModule with these hyperparameters serves evaluation items."""
        if hparams.get("sampling") == "frames":
            return cls("frames", int(hparams.get("num_frames", 2)))
        if hparams.get("sampling") != "clip":
            raise ValueError(f"no comparison protocol for data.sampling {hparams.get('sampling')!r}")
        length = int(hparams.get("clip_length", 16))
        if length == 1 and hparams.get("eval_start") == "first":
            return cls("first_frame")
        fps = hparams.get("fps")
        return cls("clip", length, 1 if fps is not None else int(hparams.get("period", 1)), fps)

    def data_options(self) -> dict[str, Any]:
        """:class:`~datamodules.EchoNetDataModule` arguments that serve real videos under this protocol."""
        if self.kind == "first_frame":
            return dict(sampling="clip", clip_length=1, period=1, fps=None, eval_start="first")
        if self.kind == "frames":
            return dict(sampling="frames", num_frames=self.length)
        return dict(sampling="clip", clip_length=self.length, period=self.period, fps=self.fps)

    def frames_of(self, videos: torch.Tensor, index: torch.Tensor, eval_seed: int = 0) -> torch.Tensor:
        """The compared frames of generated videos ``(B, T, …)`` → ``(B, F, …)``; ``index`` ``(B,)`` keys the
        ``frames:N`` choice as the DataModule keys it for real videos. A clip protocol needs ``T ≥ L`` and takes the
        first L frames (a generated clip is already at the model's frame rate)."""
        count = videos.shape[1]
        if self.kind == "first_frame":
            return videos[:, :1]
        if self.kind == "clip":
            if count < self.length:
                raise ValueError(f"protocol {self.name} compares {self.length} frames; the videos have {count}")
            return videos[:, :self.length]
        picks = [frame_sample_indices(count, self.length, np.random.default_rng((eval_seed, int(i), _SAMPLE_STREAM)))
                 for i in index.tolist()]
        return torch.stack([video[torch.as_tensor(pick, device=video.device)] for video, pick in zip(videos, picks)])

    def require(self, other: Protocol | str, what: str) -> None:
        """Refuse (:class:`ProtocolMismatchError`) to use ``what`` — a τ calibrated under ``other`` — here."""
        other = Protocol.parse(other)
        if other != self:
            raise ProtocolMismatchError(f"{what} was calibrated under protocol {other.name}, but videos are compared "
                                        f"under {self.name} here: a maximum over other frame pairs runs higher or "
                                        f"lower, so that τ does not hold. Calibrate τ for {self.name} "
                                        f"(`echo-lvdm calibrate --protocol {self.name}`)")
