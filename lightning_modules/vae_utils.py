"""Helpers of :mod:`lightning_modules.vae` without Lightning in them: latent statistics, the weights checksum, and the
exported (diffusers) VAE that samplers, callbacks and commands decode and encode with."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # diffusers is imported where a VAE is loaded: the re-ID and EF modules do not need it
    from diffusers import AutoencoderKL


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


def load_frozen_vae(path: str | Path) -> AutoencoderKL:
    """The exported autoencoder at ``path`` (an ``echo-lvdm export-vae`` folder), frozen: eval, no gradients.

    Raises FileNotFoundError naming the folder when it is missing or not a diffusers folder, and ValueError when its
    ``config.json`` has no ``scaling_factor`` (diffusers would silently fill in SD's 0.18215).
    """
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"VAE folder {path} {'has no config.json' if path.is_dir() else 'not found'}"
                                "; write one with `echo-lvdm export-vae --checkpoint <vae.ckpt> --out <folder>`")
    if "scaling_factor" not in json.loads(config.read_text()):
        raise ValueError(f"{config} has no scaling_factor; export the VAE with `echo-lvdm export-vae`, "
                         "which records the factor its latents were scaled by")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)  # no accelerate needed
    vae.eval().requires_grad_(False)
    return vae


def frames_per_call(device: torch.device | str) -> int:
    """Frames per VAE encode or decode call where the caller does not choose: 8 on the CPU, 64 on an accelerator.

    On the CPU the activations of a few 112² frames stay in cache: on 2 cores the quickstart's VAE encodes 1.85× and
    decodes 1.34× faster 8 frames at a time than 64 and 32 at a time (``benchmarks/vae_chunks.py``). The outputs are
    equal up to float rounding (a chunk of one frame takes another convolution path, whatever the chunk size). An
    accelerator is filled by larger batches."""
    return 8 if torch.device(device).type == "cpu" else 64


@torch.no_grad()
def encode_means(vae: AutoencoderKL, frames: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Pixel frames ``(N, C, H, W)`` in [-1, 1] → the posterior means ``(N, latent, h, w)`` (unscaled, in the VAE's
    dtype, on its device), ``chunk_size`` frames at a time (default :func:`frames_per_call`)."""
    frames = frames.to(vae.device, vae.dtype)
    return torch.cat([vae.encode(chunk).latent_dist.mean
                      for chunk in frames.split(chunk_size or frames_per_call(vae.device))])


@torch.no_grad()
def decode_frames(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Scaled latents ``(B, T, C, h, w)`` (as the diffusion model samples them) → float32 pixels ``(B, T, C', H, W)``
    in the model range (about [-1, 1], not clamped), ``chunk_size`` frames at a time (default
    :func:`frames_per_call`) on the VAE's device."""
    batch, time = latents.shape[:2]
    scale = float(vae.config.scaling_factor)
    chunks = [vae.decode(chunk.to(vae.device, vae.dtype) / scale).sample.float()
              for chunk in latents.flatten(0, 1).split(chunk_size or frames_per_call(vae.device))]
    return torch.cat(chunks).unflatten(0, (batch, time))


def decode_as_written(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents as a written video file holds them: decoded, quantised to 8 bits and read back into [-1, 1]
    (as ``datamodules.dataset.to_model_range`` reads files)."""
    from lightning_modules.image_logging import to_uint8

    return to_uint8(decode_frames(vae, latents)).float() * (1 / 127.5) - 1.0
