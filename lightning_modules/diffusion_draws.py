"""The per-item random draws of :class:`~lightning_modules.diffusion.VideoDiffusionModule`: one generator per item,
seeded by its index (evaluation) or by (seed, epoch, index) (training), so an item's draws do not depend on the batch
it is in, the rank that holds it or whether the run was resumed."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.sampler import global_seed

__all__ = ["eval_noise", "train_draws"]

# SeedSequence tag of the training draws: apart from the dataset's (seed, epoch, index, 1, stream) streams, and from
# the small integer seeds of the evaluation noise.
_TRAIN_DRAWS_STREAM = 4


def eval_noise(index: torch.Tensor, shape: torch.Size, eval_seed: int, num_timesteps: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``(B, *shape)`` and timesteps ``(B,)`` of validation/test items, on the CPU."""
    noise, timesteps = [], []
    for key in index.tolist():
        generator = torch.Generator().manual_seed(eval_seed * 1_000_003 + key)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise), torch.cat(timesteps)


def train_draws(index: torch.Tensor, shape: torch.Size, frames: int, epoch: int, num_timesteps: int
                ) -> tuple[torch.Tensor, ...]:
    """Noise ``(B, *shape)``, timesteps, reference-frame positions, EF-dropout and reference-dropout coins ``(B,)`` of
    training items in ``epoch`` under ``seed_everything``'s seed, on the CPU."""
    seed = global_seed()
    noise, integers, coins = [], [], []
    for key in index.tolist():
        state = np.random.SeedSequence((seed, epoch, key, _TRAIN_DRAWS_STREAM)).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        integers.append(torch.cat([torch.randint(0, num_timesteps, (1,), generator=generator),
                                   torch.randint(0, frames, (1,), generator=generator)]))
        coins.append(torch.rand(2, generator=generator))  # EF dropout, reference dropout: independent
        noise.append(torch.randn(shape, generator=generator))
    integers, coins = torch.stack(integers), torch.stack(coins)
    return torch.stack(noise), integers[:, 0], integers[:, 1], coins[:, 0], coins[:, 1]
