"""The re-identification pair head with negative weights (``ReIDModule(head="negative")``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NegativeHead(nn.Module):
    """The pair head ``w · |a − b| + c`` with every ``w = −softplus(v) < 0``: identical embeddings score highest and a
    score never rises as two embeddings move apart in any dimension, so a copy cannot score below a look-alike of
    another patient. ``weight`` ``(1, D)`` and ``bias`` ``(1,)`` read like ``nn.Linear``'s."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # softplus(v) = 1/√D at start: the scale of nn.Linear's initial weights
        self.raw_weight = nn.Parameter(torch.full((1, dim), math.log(math.expm1(1.0 / math.sqrt(dim)))))
        self.bias = nn.Parameter(torch.zeros(1))

    @property
    def weight(self) -> torch.Tensor:
        return -F.softplus(self.raw_weight)
