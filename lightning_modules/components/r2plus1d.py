"""R(2+1)D video ResNet (Tran et al. 2018) in plain torch, with torchvision's ``r2plus1d_18`` parameter names.

torchvision cannot be installed beside CPU torch here, so the network is written out; module names follow
``torchvision.models.video.resnet`` (``stem.0/1/3/4``, ``layerN.M.conv1.0.{0,1,3}``, ``conv1.1``, ``downsample.0/1``,
``fc``), so a torchvision ``r2plus1d_18`` state dict (e.g. Kinetics-400 weights) loads with
:func:`load_torchvision_weights`. The defaults *are* ``r2plus1d_18``; depth, width, strides and the stem are
configurable so the same network reads 4-channel 14² VAE latents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

# torchvision's R(2+1)D stem has 45 middle channels at width 64 (a fixed number, not its (2+1)D formula).
_STEM_MID_CHANNELS_AT_64 = 45


def mid_channels(in_channels: int, out_channels: int) -> int:
    """torchvision's (2+1)D middle width: as many parameters as a full 3×3×3 convolution from in to out."""
    return (in_channels * out_channels * 27) // (in_channels * 9 + 3 * out_channels)


class Conv2Plus1D(nn.Sequential):
    """(1, k, k) spatial conv → BN → ReLU → (k, 1, 1) temporal conv. Strides: ``spatial`` on H, W; ``temporal`` on T."""

    def __init__(self, in_channels: int, out_channels: int, mid: int, spatial: int = 1, temporal: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, mid, (1, 3, 3), stride=(1, spatial, spatial), padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_channels, (3, 1, 1), stride=(temporal, 1, 1), padding=(1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    """Two (2+1)D convolutions with a residual connection (a strided 1×1×1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, spatial: int = 1, temporal: int = 1) -> None:
        super().__init__()
        # torchvision computes one middle width from the block's input and reuses it for conv2.
        mid = mid_channels(in_channels, out_channels)
        self.conv1 = nn.Sequential(Conv2Plus1D(in_channels, out_channels, mid, spatial, temporal),
                                   nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv2Plus1D(out_channels, out_channels, mid), nn.BatchNorm3d(out_channels))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if spatial != 1 or temporal != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(temporal, spatial, spatial), bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class R2Plus1D(nn.Module):
    """Video ResNet of (2+1)D blocks: ``(B, C, T, H, W)`` → ``(B, num_outputs)``.

    Args:
        in_channels: input channels (1 grayscale, 3 RGB, 4 VAE latents).
        num_outputs: size of the final linear layer (``fc``).
        layers: residual blocks per stage (``(2, 2, 2, 2)`` = 18 layers); stage ``i`` has ``width × 2^i`` channels.
        width: channels of the stem and first stage (64 in ``r2plus1d_18``); the stem's middle width scales with it
            (45 at 64, torchvision's number).
        stem_kernel, stem_stride: spatial kernel and stride of the stem (7 and 2: 112² → 56²; for 14² latents use
            3 and 1). The stem never strides in time.
        spatial_strides, temporal_strides: stride of each stage's first block (``(1, 2, 2, 2)`` each: 112² → 7²
            after the stem's 2, 32 frames → 4). Every output has at least one frame and pixel (padding 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_outputs: int = 400,
        layers: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        spatial_strides: Sequence[int] = (1, 2, 2, 2),
        temporal_strides: Sequence[int] = (1, 2, 2, 2),
    ) -> None:
        super().__init__()
        if not len(layers) == len(spatial_strides) == len(temporal_strides):
            raise ValueError(f"layers {list(layers)}, spatial_strides {list(spatial_strides)} and temporal_strides "
                             f"{list(temporal_strides)} need one entry per stage")
        if stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd (same padding), got {stem_kernel}")
        if len(layers) > 4 or min(layers, default=0) < 1:
            raise ValueError(f"layers needs 1–4 stages (layer1..layer4) of ≥ 1 block each, got {list(layers)}")
        stem_mid = max(1, _STEM_MID_CHANNELS_AT_64 * width // 64)
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, stem_mid, (1, stem_kernel, stem_kernel), stride=(1, stem_stride, stem_stride),
                      padding=(0, stem_kernel // 2, stem_kernel // 2), bias=False),
            nn.BatchNorm3d(stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(stem_mid, width, (3, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
        channels = width
        for stage, (blocks, spatial, temporal) in enumerate(zip(layers, spatial_strides, temporal_strides), start=1):
            out = width * 2 ** (stage - 1)
            stack = [BasicBlock(channels, out, spatial, temporal)] + [BasicBlock(out, out) for _ in range(blocks - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*stack))
            channels = out
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(channels, num_outputs)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # torchvision's initialisation, so a from-scratch run here matches one with torchvision's network.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"R2Plus1D expects (B, C, T, H, W), got shape {tuple(x.shape)}")
        x = self.stem(x)
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def load_torchvision_weights(network: R2Plus1D, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a torchvision ``r2plus1d_18`` state dict (e.g. Kinetics-400 weights) into ``network``; returns skipped keys.

    Every key must exist in ``network`` (a torchvision-shaped network: default width, layers and kernels). Two shapes
    may differ and are adapted rather than refused: the RGB stem for a grayscale network (the three input filters are
    summed, as a gray frame is R = G = B) and ``fc`` (a 400-class head for a regressor: skipped, its name returned).
    """
    own = network.state_dict()
    unknown = sorted(set(state_dict) - set(own))
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) of the torchvision state dict are not in the network: {unknown[:5]}")
    adapted, skipped = {}, []
    for name, tensor in state_dict.items():
        if tensor.shape == own[name].shape:
            adapted[name] = tensor
        elif name == "stem.0.weight" and tensor.shape[1] == 3 and own[name].shape[1] == 1:
            adapted[name] = tensor.sum(dim=1, keepdim=True)
        elif name.startswith("fc."):
            skipped.append(name)
        else:
            raise ValueError(f"{name}: torchvision shape {tuple(tensor.shape)}, network {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(adapted) - set(skipped))
    if missing:
        raise KeyError(f"{len(missing)} network key(s) missing from the torchvision state dict: {missing[:5]}")
    network.load_state_dict(adapted, strict=False)
    return skipped
