"""A 2D ResNet encoder (He et al. 2016) for single frames: pixels (1–3 channels) or VAE latents (4 channels).

Written in torch because torchvision is not usable beside CPU torch here; layer names follow torchvision's ``resnet*``
(``conv1``, ``bn1``, ``layer1``…``layer4``, ``downsample``), so its weights load into ``ResNetEncoder.backbone`` when
the geometry matches (3 input channels, ``stem="imagenet"``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

BlockKind = Literal["basic", "bottleneck"]
StemKind = Literal["imagenet", "small"]
NormKind = Literal["batch", "group"]


def norm_layer(kind: NormKind, channels: int) -> nn.Module:
    """BatchNorm (torchvision's choice) or GroupNorm with up to 32 groups of ≥ 4 channels (batch-independent)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: NormKind = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: NormKind = "batch") -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3×3, as torchvision (v1.5)
        self.bn2 = norm_layer(norm, planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = norm_layer(norm, out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, out_planes, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_planes: int, out_planes: int, stride: int, norm: NormKind) -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), norm_layer(norm, out_planes))


class ResNetEncoder(nn.Module):
    """Frames ``(N, C, H, W)`` → embeddings ``(N, embedding_dim)`` (pre-activation; the re-ID model applies sigmoid).

    Args:
        in_channels: 4 for VAE latents, 1–3 for pixels.
        layers: blocks per stage; ``(3, 4, 6, 3)`` with ``block="bottleneck"`` and ``width=64`` is ResNet-50.
        width: channels of the first stage (doubling per stage).
        stem: ``"imagenet"`` (7×7 stride-2 conv + max-pool: 112 px → 28 px) for pixels; ``"small"`` (3×3 stride-1
            conv, no pool) for 14×14 latents, which the ImageNet stem would shrink to 4×4 before the first stage.
        norm: ``"batch"`` (torchvision) or ``"group"``. Re-ID batches are grouped by patient, so batch statistics
            differ from the running ones used in evaluation; on the phantom BatchNorm made held-out AUC collapse
            after a few epochs (0.90 → 0.47) where GroupNorm stayed stable.
    """

    def __init__(self, in_channels: int = 4, *, layers: tuple[int, ...] | list[int] = (3, 4, 6, 3),
                 block: BlockKind = "bottleneck", width: int = 64, stem: StemKind = "small",
                 embedding_dim: int = 128, norm: NormKind = "group") -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if not layers or min(layers) < 1:
            raise ValueError(f"layers needs at least one stage of ≥ 1 block, got {list(layers)}")
        block_class = Bottleneck if block == "bottleneck" else BasicBlock
        backbone = nn.Module()
        if stem == "imagenet":
            backbone.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            backbone.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            backbone.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            backbone.maxpool = nn.Identity()
        backbone.bn1 = norm_layer(norm, width)
        in_planes = width
        for stage, blocks in enumerate(layers):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for position in range(blocks):
                stage_blocks.append(block_class(in_planes, planes, stride if position == 0 else 1, norm))
                in_planes = planes * block_class.expansion
            setattr(backbone, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.backbone = backbone
        self.num_stages = len(layers)
        self.fc = nn.Linear(in_planes, embedding_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.maxpool(torch.relu(net.bn1(net.conv1(frames))))
        for stage in range(self.num_stages):
            x = getattr(net, f"layer{stage + 1}")(x)
        return self.fc(x.mean(dim=(-2, -1)))
