"""FiLM conditioning for the SVD UNet: its ResNet blocks take the time embedding — timestep, fps and, where
``ef_embedding`` puts it there, EF — as a scale and a shift of their normalised features instead of an added bias.

diffusers' :class:`ResnetBlock2D` has the option (``time_embedding_norm="scale_shift"``) but
:class:`UNetSpatioTemporalConditionModel` does not expose it, and its :class:`TemporalResnetBlock` only adds.
:func:`scale_shift_resnets` turns both kinds to scale-and-shift in a built UNet: each block's time projection is
rebuilt with twice the channels (fresh weights: call it before training, before an EMA copies the parameters)."""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock
from torch import nn

__all__ = ["ScaleShiftTemporalResnetBlock", "scale_shift_resnets"]


class ScaleShiftTemporalResnetBlock(TemporalResnetBlock):
    """:class:`TemporalResnetBlock` whose time embedding ``(B, T, E)`` scales and shifts its normalised features
    ``(B, C, T, h, w)`` — ``norm(x) · (1 + scale) + shift`` — as ``ResnetBlock2D(time_embedding_norm=
    "scale_shift")`` does, instead of adding to them before the norm."""

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int = 512,
                 eps: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, temb_channels, eps)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * self.out_channels)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        # (B, T, 2C) → two (B, C, T, 1, 1)
        scale, shift = self.time_emb_proj(self.nonlinearity(temb)).permute(0, 2, 1)[..., None, None].chunk(2, dim=1)
        hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


def scale_shift_resnets(unet: nn.Module) -> int:
    """Turn every ResNet block of ``unet`` (spatial and temporal) to scale-and-shift conditioning, in place; returns
    how many blocks changed. The rebuilt time projections (and temporal blocks) are freshly initialised."""
    changed = 0
    for parent in list(unet.modules()):
        for name, block in list(parent.named_children()):
            if isinstance(block, ResnetBlock2D) and block.time_emb_proj is not None \
                    and block.time_embedding_norm == "default":
                block.time_embedding_norm = "scale_shift"
                block.time_emb_proj = nn.Linear(block.time_emb_proj.in_features, 2 * block.out_channels)
                changed += 1
            elif type(block) is TemporalResnetBlock and block.time_emb_proj is not None:
                setattr(parent, name, ScaleShiftTemporalResnetBlock(
                    block.in_channels, block.out_channels, block.time_emb_proj.in_features, block.norm1.eps))
                changed += 1
    return changed
