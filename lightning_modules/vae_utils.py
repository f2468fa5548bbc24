"""Helpers of :mod:`lightning_modules.vae` without Lightning in them: latent statistics and the weights checksum."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn


def latent_stats(latents: torch.Tensor) -> torch.Tensor:
    """float64 ``[sum, sum of squares, count]`` over every element of ``latents``: sums of these add up exactly."""
    values = latents.detach().double()
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    return torch.stack([values.sum(), values.square().sum(), count])


def scale_from_stats(stats: torch.Tensor) -> float:
    """1/std from summed :func:`latent_stats` (std about the mean, as SD's ``1 / z.flatten().std()``)."""
    total, squares, count = stats.tolist()
    mean = total / count
    variance = max(squares / count - mean * mean, 0.0) * count / (count - 1)
    if variance <= 0.0:
        raise ValueError(f"latents have zero variance over {count:.0f} elements; no scaling factor")
    return variance**-0.5


def checksum_of_weights(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of an ``AutoencoderKL``'s weights: parameter names and raw tensor bytes in sorted name order.

    Accepts a ``VAEModule`` (its ``.vae``), an ``AutoencoderKL``, its state dict, or a ``VAEModule`` state dict (keys
    ``vae.*``; the discriminator and buffers such as ``scaling_factor`` are left out), so a Lightning checkpoint, the
    live module and the exported diffusers folder give one checksum. The scaling factor is not part of it: cached
    latents are stored unscaled and stay valid when only the factor changes.
    """
    if isinstance(module_or_state_dict, nn.Module):
        network = getattr(module_or_state_dict, "vae", module_or_state_dict)
        state = network.state_dict()
    else:
        state = dict(module_or_state_dict)
        if any(name.startswith("vae.") for name in state):
            state = {name[len("vae."):]: tensor for name, tensor in state.items() if name.startswith("vae.")}
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
