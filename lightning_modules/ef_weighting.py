"""EF-rarity weights of the diffusion loss: a training video whose EF is rare in the training split counts more.

A generator asked for EFs its training split rarely holds (EchoNet-Dynamic, like the phantom, has few videos below
30 %) learns them from a handful of videos and reads back toward the mean. Weighting each video's loss by the inverse
frequency of its EF bin, capped, gives the tails more of the gradient without repeating videos in an epoch (each
item's training draws are keyed by (seed, epoch, index): a repeated index would see the same noise twice)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["ef_weight_table", "ef_weights", "empty_table", "num_bins", "training_split_table"]


def num_bins(bin_width: float) -> int:
    """Bins of ``bin_width`` percent covering EF 0–100 %."""
    if not 0.0 < bin_width <= 100.0:
        raise ValueError(f"ef_loss_weight_bin must be in (0, 100] percent, got {bin_width}")
    return math.ceil(100.0 / bin_width)


def _bin_of(ef: torch.Tensor, bin_width: float) -> torch.Tensor:
    return (ef.float() / bin_width).floor().long().clamp(0, num_bins(bin_width) - 1)


def ef_weight_table(train_ef: Sequence[float] | torch.Tensor, bin_width: float, cap: float) -> torch.Tensor:
    """Weight of each EF bin ``(num_bins,)``: ``N / (K · n_b)`` for a bin holding ``n_b`` of the ``N`` training EFs
    (``K`` bins occupied; 1 everywhere for a uniform split), clipped to at most ``cap``, then scaled so that the mean
    weight over the training videos is 1 (the loss keeps its scale). Empty bins weigh 1."""
    if cap < 1.0:
        raise ValueError(f"ef_loss_weight_cap must be ≥ 1 (1: no weighting), got {cap}")
    ef = torch.as_tensor(train_ef, dtype=torch.float64).flatten()
    if not len(ef) or not torch.isfinite(ef).all():
        raise ValueError("EF loss weighting needs the finite EFs of at least one training video")
    counts = torch.bincount(_bin_of(ef, bin_width), minlength=num_bins(bin_width)).double()
    occupied = counts > 0
    raw = torch.ones_like(counts)
    raw[occupied] = (len(ef) / (int(occupied.sum()) * counts[occupied])).clamp(max=cap)
    raw[occupied] /= (counts * raw).sum() / len(ef)
    return raw.float()


def empty_table(bin_width: float, cap: float) -> torch.Tensor:
    """Zeros of a table's shape (a module's buffer until counted or loaded), after checking both options."""
    ef_weight_table([50.0], bin_width, cap)
    return torch.zeros(num_bins(bin_width))


def ef_weights(table: torch.Tensor, ef: torch.Tensor, bin_width: float) -> torch.Tensor:
    """The weight of each EF ``(B,)`` percent under ``table`` (:func:`ef_weight_table`)."""
    if not bool(table.any()):
        raise RuntimeError("ef_loss_weight_cap is set but the EF weight table was never counted: train with "
                           "Trainer.fit and an EchoNetDataModule (on_fit_start counts the training EFs)")
    return table[_bin_of(ef, bin_width).to(table.device)]


def training_split_table(datamodule, bin_width: float, cap: float) -> torch.Tensor:
    """:func:`ef_weight_table` of the EFs of ``datamodule``'s training split (an :class:`EchoNetDataModule` set up
    for fit: its ``datasets["train"]``, after ``train_videos``), reported once per job."""
    train = getattr(datamodule, "datasets", {}).get("train")
    if train is None:
        raise RuntimeError("ef_loss_weight_cap counts the EFs of the training split: fit with an EchoNetDataModule "
                           "(the trainer's datamodule has no 'train' dataset)")
    ef = [record.ef for record in train.records]
    table = ef_weight_table(ef, bin_width, cap)
    occupied = torch.bincount(_bin_of(torch.tensor(ef), bin_width), minlength=len(table)) > 0
    rank_zero_info(f"EF loss weights of {len(ef)} training videos, per {bin_width:g} % bin: " + ", ".join(
        f"{i * bin_width:g}–{(i + 1) * bin_width:g} % {w:.2f}"
        for i, w in enumerate(table.tolist()) if occupied[i]))
    return table
