"""EF conditioning for the diffusion UNet: a learned embedding as a one-token cross-attention sequence, and a learned
null token that replaces it for classifier-free guidance; or the EF as an added time id (SVD's ``added_time_ids``
path, which adds its embedding to the timestep embedding of every ResNet block), with a null id for guidance."""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

# The added time id of "no EF" (classifier-free guidance's unconditional branch): EF ids are 10 × EF in 0–1000, and
# the sinusoids of −1000 differ from every one of them (sine is odd).
NULL_EF_TIME_ID = -1000.0
ENCODINGS = ("timestep", "smooth")


class EFConditioner(nn.Module):
    """EF in percent ``(B,)`` → cross-attention sequence ``(B, 1, dim)``.

    ``encoding="timestep"`` (default) embeds the EF like a diffusion timestep (diffusers' sinusoidal :class:`Timesteps`
    of ``10 × EF``, so 0–100 % spans the 0–1000 range those frequencies were made for; the fastest have periods under
    one EF point, so the few hundred EFs of a training split can each get a token of their own). ``"smooth"`` keeps
    only slow sinusoids of EF / 100: ``num_frequencies / 2`` frequencies evenly up to ``max_cycles`` periods over
    0–100 % (default 4: no period under 25 EF points), so nearby EFs get nearby tokens. Then a
    :class:`TimestepEmbedding` MLP. Where ``drop`` is True, or for every sample when ``ef`` is None, the learned
    ``null`` token is used instead: that is the unconditional branch of classifier-free guidance (trained by dropping
    EF with some probability).

    Args:
        dim: the UNet's ``cross_attention_dim``.
        num_frequencies: sinusoidal channels before the MLP (even).
        encoding, max_cycles: the EF's sinusoids, above.
    """

    def __init__(self, dim: int, num_frequencies: int = 64, encoding: str = "timestep", max_cycles: float = 4.0
                 ) -> None:
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"EF encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if num_frequencies % 2 or not max_cycles > 0:
            raise ValueError(f"EFConditioner needs an even num_frequencies and max_cycles > 0, got {num_frequencies}, "
                             f"{max_cycles}")
        self.encoding = encoding
        self.sinusoids = Timesteps(num_frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        half = num_frequencies // 2  # not saved: older checkpoints load unchanged
        self.register_buffer("cycles", torch.arange(1, half + 1) * (max_cycles / half), persistent=False)
        self.mlp = TimestepEmbedding(num_frequencies, dim)
        # A small random start: a zero token would make the unconditional branch's attention keys all equal.
        self.null = nn.Parameter(torch.randn(1, 1, dim) * 0.02)

    def forward(self, ef: torch.Tensor | None, drop: torch.Tensor | None = None, batch_size: int | None = None
                ) -> torch.Tensor:
        """``ef`` float ``(B,)`` percent or None (all null; then ``batch_size`` is required); ``drop`` bool ``(B,)``."""
        if ef is None:
            if batch_size is None:
                raise ValueError("EFConditioner: batch_size is required when ef is None")
            return self.null.expand(batch_size, -1, -1)
        if ef.ndim != 1:
            raise ValueError(f"EFConditioner expects EF of shape (B,), got {tuple(ef.shape)}")
        tokens = self.mlp(self.encode(ef).to(self.null.dtype)).unsqueeze(1)
        if drop is None:
            return tokens
        return torch.where(drop.view(-1, 1, 1), self.null.expand_as(tokens), tokens)

    def encode(self, ef: torch.Tensor) -> torch.Tensor:
        """EF percent ``(B,)`` → the MLP's input ``(B, num_frequencies)``."""
        if self.encoding == "timestep":
            return self.sinusoids(ef.float() * 10.0)
        angles = 2 * math.pi * (ef.float() / 100.0).unsqueeze(1) * self.cycles.to(ef.device)
        return torch.cat([angles.cos(), angles.sin()], dim=1)

    @staticmethod
    def time_ids(ef: torch.Tensor | None, drop: torch.Tensor | None = None, batch_size: int | None = None
                 ) -> torch.Tensor:
        """EF as an added time id ``(B,)``: ``10 × EF`` (the token's scale), :data:`NULL_EF_TIME_ID` where ``drop`` is
        True or for every sample when ``ef`` is None (then ``batch_size`` is required)."""
        if ef is None:
            if batch_size is None:
                raise ValueError("EFConditioner.time_ids: batch_size is required when ef is None")
            return torch.full((batch_size,), NULL_EF_TIME_ID)
        if ef.ndim != 1:
            raise ValueError(f"EFConditioner expects EF of shape (B,), got {tuple(ef.shape)}")
        ids = ef.float() * 10.0
        if drop is None:
            return ids
        return torch.where(drop, torch.full_like(ids, NULL_EF_TIME_ID), ids)
