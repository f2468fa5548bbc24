"""EF conditioning for the diffusion UNet: a learned embedding as a one-token cross-attention sequence, and a learned
null token that replaces it for classifier-free guidance; or the EF as an added time id (SVD's ``added_time_ids``
path, which adds its embedding to the timestep embedding of every ResNet block), with a null id for guidance."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

# The added time id of "no EF" (classifier-free guidance's unconditional branch): EF ids are 10 × EF in 0–1000, and
# the sinusoids of −1000 differ from every one of them (sine is odd).
NULL_EF_TIME_ID = -1000.0


class EFConditioner(nn.Module):
    """EF in percent ``(B,)`` → cross-attention sequence ``(B, 1, dim)``.

    The EF is embedded like a diffusion timestep (diffusers' sinusoidal :class:`Timesteps` of ``10 × EF``, so 0–100 %
    spans the 0–1000 range those frequencies were made for, then a :class:`TimestepEmbedding` MLP). Where ``drop`` is
    True, or for every sample when ``ef`` is None, the learned ``null`` token is used instead: that is the
    unconditional branch of classifier-free guidance (trained by dropping EF with some probability).

    Args:
        dim: the UNet's ``cross_attention_dim``.
        num_frequencies: sinusoidal channels before the MLP.
    """

    def __init__(self, dim: int, num_frequencies: int = 64) -> None:
        super().__init__()
        self.sinusoids = Timesteps(num_frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
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
        tokens = self.mlp(self.sinusoids(ef.float() * 10.0).to(self.null.dtype)).unsqueeze(1)
        if drop is None:
            return tokens
        return torch.where(drop.view(-1, 1, 1), self.null.expand_as(tokens), tokens)

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
