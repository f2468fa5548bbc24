"""The per-item random draws of :class:`~lightning_modules.diffusion.VideoDiffusionModule`: one generator per item,
seeded by its index (evaluation) or by (seed, epoch, index) (training), so an item's draws do not depend on the batch
it is in, the rank that holds it or whether the run was resumed."""

from __future__ import annotations

import numpy as np
import torch

from datamodules.sampler import global_seed

__all__ = ["biased_timestep_map", "eval_noise", "train_draws"]

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


def train_draws(index: torch.Tensor, shape: torch.Size, frames: int, epoch: int, num_timesteps: int,
                timestep_map: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Noise ``(B, *shape)``, timesteps, reference-frame positions, EF-dropout and reference-dropout coins ``(B,)`` of
    training items in ``epoch`` under ``seed_everything``'s seed, on the CPU. ``timestep_map``: each uniform timestep
    draw ``t`` becomes ``timestep_map[t]`` (:func:`biased_timestep_map`)."""
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
    timesteps = integers[:, 0] if timestep_map is None else timestep_map[integers[:, 0]]
    return torch.stack(noise), timesteps, integers[:, 1], coins[:, 0], coins[:, 1]


def biased_timestep_map(num_timesteps: int, bias: str, multiplier: float, portion: float) -> torch.Tensor | None:
    """The timestep ``(T,)`` that each uniform training draw ``t`` becomes under a timestep bias (diffusers' SDXL
    ``--timestep_bias_strategy``): the ``portion`` of the schedule at its noisy end (``"later"``) or clean end
    (``"earlier"``) is drawn ``multiplier`` times as often as the rest. The map is the inverse CDF of that density at
    ``(t + ½) / T``, so it reuses each item's own draw (resumed and DDP runs draw alike) and is the identity for
    ``"none"`` (returned as None)."""
    if bias not in ("none", "later", "earlier"):
        raise ValueError(f"timestep_bias must be 'none', 'later' or 'earlier', got {bias!r}")
    if not (multiplier > 0 and 0.0 < portion < 1.0):
        raise ValueError(f"timestep_bias_multiplier must be > 0 and timestep_bias_portion in (0, 1), got "
                         f"{multiplier} and {portion}")
    if bias == "none":
        return None
    density = torch.ones(num_timesteps, dtype=torch.float64)
    count = max(1, round(portion * num_timesteps))
    if bias == "later":
        density[-count:] = multiplier
    else:
        density[:count] = multiplier
    cdf = density.cumsum(0) / density.sum()
    uniform = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) / num_timesteps
    return torch.searchsorted(cdf, uniform).clamp(max=num_timesteps - 1)
