"""PatchGAN discriminator and hinge losses for adversarial autoencoder training.

The architecture follows pix2pix's PatchGAN as used by taming-transformers and the Stable Diffusion autoencoder
(``NLayerDiscriminator``): strided 4×4 convolutions, BatchNorm, LeakyReLU(0.2), one logit per receptive-field patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images ``(N, C, H, W)`` in [-1, 1] → patch logits ``(N, 1, h, w)`` (real > 0 > fake).

    ``num_layers`` strided convolutions halve the resolution each (channel width doubling up to 8 × ``channels``),
    followed by two stride-1 4×4 convolutions, each shrinking the map by one pixel; so the input must be at least
    ``2 ** num_layers × 3`` pixels on a side (24 px for ``num_layers=3``; 70×70-pixel patches at that depth).
    """

    def __init__(self, in_channels: int = 1, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1, got {num_layers}")
        self.num_layers = num_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, num_layers + 1):
            # The last widening layer keeps the resolution (stride 1), as in pix2pix.
            out = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            # No conv bias before BatchNorm: the norm's shift makes it redundant.
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def min_size(self) -> int:
        """Smallest input side that still yields at least one patch logit."""
        return 2**self.num_layers * 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) < self.min_size:
            raise ValueError(f"the discriminator ({self.num_layers} layers) needs images of at least "
                             f"{self.min_size} px, got {tuple(images.shape[-2:])}; lower disc_layers")
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation, which taming/SD keep: N(0, 0.02) convolutions, N(1, 0.02) norm scales.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))``: 0 once it separates by a margin."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN, ``−mean D(x̂)``: lower when reconstructions look real to the discriminator."""
    return -logits_fake.mean()
