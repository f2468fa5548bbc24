"""Warmup–stable–decay: a constant schedule's last part decays linearly to zero, its earlier steps untouched, and a
schedule restored from its state continues as the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from diffusers.optimization import get_scheduler

from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.lr_schedules import decay_factor, step_schedule
from tests.helpers.models import TINY_DIFFUSION

LR, WARMUP, TOTAL = 1e-3, 4, 40


def rates(schedule: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The learning rate of each of the next ``steps`` optimizer steps (as Lightning steps a per-step schedule)."""
    out = []
    for _ in range(steps):
        out.append(schedule.optimizer.param_groups[0]["lr"])
        schedule.optimizer.step()
        schedule.step()
    return out


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)


@pytest.mark.parametrize("name", ["constant_with_warmup", "constant"])
def test_the_decay_keeps_the_constant_steps_and_falls_linearly_to_zero(name):
    constant = rates(get_scheduler(name, optimizer(), num_warmup_steps=WARMUP, num_training_steps=TOTAL), TOTAL)
    decayed = rates(step_schedule(name, optimizer(), WARMUP, TOTAL, decay_fraction=0.25), TOTAL)
    start = TOTAL - 10
    assert decayed[:start] == constant[:start]  # bit for bit: a run with the decay shares these steps
    assert constant[start:] == [LR] * 10
    assert decayed[start:] == pytest.approx([LR * (10 - i) / 10 for i in range(10)], rel=1e-12)
    assert decayed[-1] == pytest.approx(LR / 10) and all(a > b for a, b in zip(decayed[start:], decayed[start + 1:]))
    if name == "constant_with_warmup":
        assert decayed[:WARMUP] == pytest.approx([LR * i / WARMUP for i in range(WARMUP)])
    assert rates(step_schedule(name, optimizer(), WARMUP, TOTAL, 0.0), TOTAL) == constant


def test_a_restored_schedule_continues_as_the_uninterrupted_one():
    straight = rates(step_schedule("constant_with_warmup", optimizer(), WARMUP, TOTAL, 0.5), TOTAL)
    first = step_schedule("constant_with_warmup", optimizer(), WARMUP, TOTAL, 0.5)
    head = rates(first, 27)
    resumed = step_schedule("constant_with_warmup", optimizer(), WARMUP, TOTAL, 0.5)
    resumed.load_state_dict(first.state_dict())  # what Lightning does with the checkpoint's lr_schedulers
    resumed.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # the optimizer's state
    assert head + rates(resumed, TOTAL - 27) == straight


def test_decay_factor_edges():
    assert [decay_factor(s, 10, 0.3) for s in (0, 6, 7, 8, 9, 10, 11)] == pytest.approx(
        [1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    assert decay_factor(9, 10, 0.0) == 1.0 and decay_factor(9, 10, 0.01) == 1.0  # round(0.1) steps: no decay


@pytest.mark.parametrize("settings, message", [
    ({"lr_decay_fraction": 1.0}, r"lr_decay_fraction must be in \[0, 1\)"),
    ({"lr_decay_fraction": -0.1}, r"lr_decay_fraction must be in \[0, 1\)"),
    ({"lr_decay_fraction": 0.3, "lr_scheduler": "cosine"}, "lr_scheduler 'cosine' has its own decay"),
])
def test_a_decay_that_cannot_apply_is_refused_when_the_module_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        VideoDiffusionModule(**TINY_DIFFUSION, **settings)
