"""Learning-rate schedules per optimizer step: a diffusers ``get_scheduler`` schedule, optionally with a linear decay to
zero over the last part of training (warmup–stable–decay, "WSD": Hu et al. 2024, MiniCPM; Hägele et al. 2024).

A constant rate keeps the last iterates as noisy as the middle ones (the EMA averages that noise, it does not remove
it); decaying only at the end keeps every step before the decay equal to the constant schedule's, so a run with the
decay and one without share their first ``(1 − fraction)`` of the steps bit for bit."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

__all__ = ["DECAYABLE_SCHEDULES", "check_decay_fraction", "decay_factor", "step_schedule"]

DECAYABLE_SCHEDULES = ("constant", "constant_with_warmup")


def check_decay_fraction(fraction: float, schedule: str) -> None:
    """Refuse a fraction outside [0, 1) and a decay on a schedule that decays already (cosine, linear, ...)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"lr_decay_fraction must be in [0, 1) (0: no decay), got {fraction}")
    if fraction > 0 and schedule not in DECAYABLE_SCHEDULES:
        raise ValueError(f"lr_decay_fraction decays a constant schedule ({', '.join(DECAYABLE_SCHEDULES)}); "
                         f"lr_scheduler {schedule!r} has its own decay: set lr_decay_fraction: 0")


def decay_factor(step: int, total_steps: int, fraction: float) -> float:
    """1 before the last ``round(fraction · total_steps)`` steps, then ``(total − step) / decay_steps``: linear from 1
    at the decay's first step to ``1 / decay_steps`` at the last step (``total − 1``), 0 after it."""
    decay_steps = round(fraction * total_steps)
    start = total_steps - decay_steps
    if decay_steps <= 0 or step < start:
        return 1.0
    return max(0.0, (total_steps - step) / decay_steps)


def step_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  decay_fraction: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """The diffusers schedule ``name`` over ``total_steps`` optimizer steps, times :func:`decay_factor` when
    ``decay_fraction > 0``. The decay is placed from ``total_steps`` (Lightning's ``estimated_stepping_batches``), so a
    run resumed with more epochs moves it, as it moves a cosine schedule's."""
    check_decay_fraction(decay_fraction, name)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if decay_fraction == 0:
        return schedule
    (base,) = schedule.lr_lambdas
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: base(step) * decay_factor(step, total_steps, decay_fraction))
