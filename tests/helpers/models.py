"""Tiny configurations of the project's models (channels 8–64, a few hundred thousand parameters at most), a re-ID
whose scores are known in closed form, a tiny diffusers VAE, and checkpoints saved as ``echo-lvdm fit`` saves them."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
                sample_size=32)  # VAEModule: 32 px → 4 × 16 × 16
TINY_DIFFUSION = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32, cross_attention_dim=32,
                      addition_time_embed_dim=8, warmup_steps=0, lr=1e-3)  # VideoDiffusionModule
TINY_EF = dict(layers=[1, 1], width=8, stem_kernel=3, stem_stride=2, spatial_strides=[1, 2], temporal_strides=[1, 2],
               optimizer="adamw", lr=3e-3, weight_decay=0.0, lr_step_period=None)  # EFRegressorModule (+ in_channels)
TINY_REID = dict(in_channels=1, layers=[1, 1], block="basic", width=8, stem="small", embedding_dim=16)  # ReIDModule


def distance_reid(seed: int = 0, in_channels: int = 4, quantile: float = 0.95):
    """A small re-ID (latent by default) whose head scores −mean |a − b| (so an identical video scores highest)."""
    from lightning_modules import ReIDModule

    torch.manual_seed(seed)
    module = ReIDModule(in_channels=in_channels, layers=[1], block="basic", width=8, embedding_dim=16, layout_grid=4,
                        quantile=quantile)
    with torch.no_grad():
        module.head.weight.fill_(-1.0 / 16)
        module.head.bias.zero_()
    return module.eval()


def tiny_diffusers_vae(sample_size: int, scaling_factor: float):
    """A random 2-level diffusers ``AutoencoderKL`` (1 channel ↔ 4 latent channels, /2), with the scaling factor an
    exported VAE records."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        norm_num_groups=8, mid_block_add_attention=False, sample_size=sample_size)
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def save_cli_checkpoint(module, path: Path) -> Path:
    """Save ``module`` as ``echo-lvdm fit`` would: weights, its own extra state (``on_save_checkpoint``: EMA, …) and
    hyperparameters with the class path LightningCLI records, so ``validate/test --ckpt_path`` can rebuild it."""
    import lightning as L

    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__,
                  "hyper_parameters": {**module.hparams,
                                       "_class_path": f"{type(module).__module__}.{type(module).__qualname__}"}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return Path(path)


def conformal_quantile(values, quantile: float) -> float:
    """The ⌈(n + 1)·q⌉-th smallest of n values (capped at n): the conformal τ, computed the plain way."""
    import math

    ordered = sorted(float(v) for v in values)
    return ordered[min(len(ordered), math.ceil((len(ordered) + 1) * quantile - 1e-9)) - 1]
