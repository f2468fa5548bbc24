"""Frame transforms that keep the patient: the near-copies a memorising generator leaks — shifted, rotated,
rescaled, noisier, brighter or darker, blurrier versions of a training frame.

Three users: the privacy audit builds its canaries with them (:mod:`lightning_modules.privacy_audit`), the
DataModule's ``augment_frames`` serves randomly transformed copies of training frames as extra positives of the
re-identification model (:meth:`FrameTransform.random`), and the EF regressor's ``augment`` transforms its training
clips (none of the transforms changes the EF of the heart shown). Frames are float ``(N, C, H, W)`` in the model range
[-1, 1] (black = -1); noise σ is on the 0–255 scale of written videos.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Training augmentation draws each magnitude up to a little past the audit's largest default (4 px, 5°, ±5 %,
# σ 8, gain and gamma ±10 %, blur σ 1), so that the audit's canaries lie inside what the model was trained on.
RANDOM_LIMITS = dict(shift=4.5, rotate=6.0, scale=0.06, noise=10.0, gain=0.12, gamma=0.12, blur=1.2)
RANDOM_PROBABILITY = 0.5  # each kind of transform is drawn with this probability, independently


@dataclass(frozen=True)
class FrameTransform:
    """One transform of every frame of a video: an affine warp about the centre (``shift`` (x, y) pixels, ``rotate``
    degrees, ``scale``), a Gaussian ``blur`` (σ pixels), intensity ``gain`` and ``gamma`` on [0, 1], then additive
    Gaussian ``noise`` (σ on 0–255). The identity by default."""

    shift: tuple[float, float] = (0.0, 0.0)
    rotate: float = 0.0
    scale: float = 1.0
    blur: float = 0.0
    gain: float = 1.0
    gamma: float = 1.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.gain <= 0 or self.gamma <= 0 or self.blur < 0 or self.noise < 0:
            raise ValueError(f"FrameTransform: scale, gain and gamma must be > 0, blur and noise ≥ 0; got {self}")

    def as_dict(self) -> dict[str, float | list[float]]:
        values = asdict(self)
        values["shift"] = list(self.shift)
        return values

    @property
    def is_affine(self) -> bool:
        return self.shift != (0.0, 0.0) or self.rotate != 0.0 or self.scale != 1.0

    def apply(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``frames (N, C, H, W)`` in [-1, 1] → transformed frames, clamped to [-1, 1]. ``generator`` draws the
        noise (required when ``noise > 0``)."""
        if frames.ndim != 4:
            raise ValueError(f"frames must be (N, C, H, W), got {tuple(frames.shape)}")
        unit = (frames.float() + 1.0) / 2.0  # [0, 1], black = 0 (the warp pads with black)
        if self.is_affine:
            unit = warp(unit, self.shift, self.rotate, self.scale)
        if self.blur > 0:
            unit = gaussian_blur(unit, self.blur)
        if self.gain != 1.0 or self.gamma != 1.0:
            unit = (unit.clamp(0.0, 1.0) ** self.gamma) * self.gain
        out = unit * 2.0 - 1.0
        if self.noise > 0:
            if generator is None:
                raise ValueError("FrameTransform: noise needs a generator (a seeded torch.Generator)")
            out = out + torch.randn(out.shape, generator=generator) * (self.noise / 127.5)
        return out.clamp(-1.0, 1.0).to(frames.dtype)

    @classmethod
    def random(cls, rng: np.random.Generator, limits: dict[str, float] | None = None,
               probability: float = RANDOM_PROBABILITY) -> FrameTransform:
        """A random transform for training: each kind drawn with ``probability``, its magnitude uniform up to
        ``limits`` (default :data:`RANDOM_LIMITS`); shifts in both axes, gains, gammas and scales both ways."""
        limits = {**RANDOM_LIMITS, **(limits or {})}
        draws = rng.random(7) < probability
        values = rng.uniform(-1.0, 1.0, size=8)
        shift = (float(values[0] * limits["shift"]), float(values[1] * limits["shift"])) if draws[0] else (0.0, 0.0)
        return cls(shift=shift,
                   rotate=float(values[2] * limits["rotate"]) if draws[1] else 0.0,
                   scale=float(1.0 + values[3] * limits["scale"]) if draws[2] else 1.0,
                   blur=float(abs(values[4]) * limits["blur"]) if draws[3] else 0.0,
                   gain=float(1.0 + values[5] * limits["gain"]) if draws[4] else 1.0,
                   gamma=float(1.0 + values[6] * limits["gamma"]) if draws[5] else 1.0,
                   noise=float(abs(values[7]) * limits["noise"]) if draws[6] else 0.0)


def warp(frames: torch.Tensor, shift: tuple[float, float], rotate: float, scale: float) -> torch.Tensor:
    """Bilinear affine warp about the frame centre; content moves by ``shift`` (x right, y down) pixels, turns by
    ``rotate`` degrees and grows by ``scale``; outside the frame is 0."""
    height, width = frames.shape[-2:]
    angle = math.radians(rotate)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # affine_grid maps output to input coordinates in [-1, 1] (align_corners=False): the inverse of the motion.
    dx, dy = 2.0 * shift[0] / width, 2.0 * shift[1] / height
    theta = torch.tensor([[cos, sin, -(cos * dx + sin * dy)], [-sin, cos, -(-sin * dx + cos * dy)]],
                         dtype=frames.dtype)
    grid = F.affine_grid(theta.expand(len(frames), 2, 3), list(frames.shape), align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of σ pixels, reflecting at the borders."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=frames.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = frames.shape[1]
    padded = F.pad(frames, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)
