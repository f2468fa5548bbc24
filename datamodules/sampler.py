"""Training order and clip randomness as a pure function of (seed, epoch).

Lightning does not checkpoint RNG state, so a loader driven by the global RNG replays different clips after
``--ckpt_path`` than an uninterrupted run would have seen. This sampler yields keys ``(index, seed, epoch)`` instead of
bare indices; the dataset derives the clip start / frame choice from the key. Lightning calls ``set_epoch`` on it each
epoch, also through the ``DistributedSamplerWrapper`` it adds under DDP, so a resumed run, a run with more workers and
a 2-process run all see the same items.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

SampleKey = tuple[int, int, int]  # (index, seed, epoch)
_ORDER_STREAM = 3  # nonzero tag: SeedSequence ignores trailing zeros, so (seed, 0) would equal (seed,)


def global_seed() -> int:
    """The seed of ``seed_everything`` (identical on every rank), or 0 when the run was not seeded."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


class EpochSampler(Sampler[SampleKey]):
    """Yields ``(index, seed, epoch)`` for every item once per epoch, shuffled by ``(seed, epoch)`` when ``shuffle``.

    ``seed=None`` follows ``seed_everything`` (read when iteration starts, so the CLI's seed applies).
    """

    def __init__(self, num_items: int, *, shuffle: bool = True, seed: int | None = None) -> None:
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[SampleKey]:
        seed = global_seed() if self.seed is None else self.seed
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng((seed, self.epoch, _ORDER_STREAM)).permutation(self.num_items)
        for index in order.tolist():
            yield index, seed, self.epoch
