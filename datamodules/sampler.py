"""Training order and clip randomness as a pure function of (seed, epoch).

Lightning does not checkpoint RNG state, so a loader driven by the global RNG replays different clips after
``--ckpt_path`` than an uninterrupted run would have seen. This sampler yields keys ``(index, seed, epoch)`` instead of
bare indices; the dataset derives the clip start / frame choice from the key. Lightning calls ``set_epoch`` on it each
epoch, so a resumed run and a run with more workers see the same items.

Under DDP the sampler shards the epoch's order itself — rank r takes items r, r + W, … — and is a
``DistributedSampler``, so Lightning does not wrap it: Lightning's wrapper reshuffles a custom sampler's output on
every rank, which would break both the patient grouping and the rule that the k-th batches of W ranks with batch b are
together the k-th batch of one process with batch W·b.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

SampleKey = tuple[int, int, int]  # (index, seed, epoch)
_ORDER_STREAM = 3  # nonzero tag: SeedSequence ignores trailing zeros, so (seed, 0) would equal (seed,)


def global_seed() -> int:
    """The seed of ``seed_everything`` (identical on every rank), or 0 when the run was not seeded."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


class EpochSampler(DistributedSampler):
    """Yields ``(index, seed, epoch)`` for every item once per epoch, shuffled by ``(seed, epoch)`` when ``shuffle``.

    ``seed=None`` follows ``seed_everything`` (read when iteration starts, so the CLI's seed applies).

    ``groups`` (one label per item, e.g. the patient) makes items of a group adjacent — groups in shuffled order, items
    shuffled inside each — so a batch holds several videos of one patient, as the re-identification model needs for
    positive pairs across videos.

    Distributed (``num_replicas``/``rank`` default to the initialised process group): rank r takes items r, r + W, …
    of the epoch's order, padded by repeating its first items to a multiple of W (as ``DistributedSampler`` does);
    a grouped order is laid out so that each rank still receives whole groups, consecutively.
    """

    def __init__(self, num_items: int, *, shuffle: bool = True, seed: int | None = None,
                 groups: Sequence[int] | None = None, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        # DistributedSampler.__init__ is not called: it wants a dataset and an initialised process group.
        if groups is not None and len(groups) != num_items:
            raise ValueError(f"groups has {len(groups)} labels for {num_items} items")
        self.num_replicas = _world_size() if num_replicas is None else num_replicas
        self.rank = _rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside 0..{self.num_replicas - 1}")
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = False
        self.groups = None if groups is None else np.asarray(groups)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_items // self.num_replicas)

    def __iter__(self) -> Iterator[SampleKey]:
        seed = global_seed() if self.seed is None else self.seed
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng((seed, self.epoch, _ORDER_STREAM)).permutation(self.num_items)
        if self.groups is not None:
            order = interleave_for_ranks(group_order(order, self.groups), self.num_replicas)
        padding = len(self) * self.num_replicas - len(order)
        if padding:
            order = np.concatenate([order, np.resize(order, padding)])
        for index in order[self.rank::self.num_replicas].tolist():
            yield index, seed, self.epoch


def group_order(order: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``order`` rearranged so that items of a group are adjacent; groups appear in order of their first item."""
    labels = groups[order]
    _, first = np.unique(labels, return_index=True)
    rank_of_group = {label: rank for rank, label in enumerate(labels[np.sort(first)].tolist())}
    keys = np.array([rank_of_group[label] for label in labels.tolist()])
    return order[np.argsort(keys, kind="stable")]


def interleave_for_ranks(order: np.ndarray, world_size: int) -> np.ndarray:
    """Lay ``order`` out so that the round-robin deal ``result[r::world_size]`` is a contiguous piece of it."""
    if world_size <= 1:
        return order
    sizes = [len(range(rank, len(order), world_size)) for rank in range(world_size)]
    pieces = np.split(order, np.cumsum(sizes)[:-1])
    result = np.empty_like(order)
    for rank, piece in enumerate(pieces):
        result[rank::world_size] = piece
    return result


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
