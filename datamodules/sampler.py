"""Training order and clip randomness as a pure function of (seed, epoch).

Lightning does not checkpoint RNG state, so a loader driven by the global RNG replays different clips after
``--ckpt_path`` than an uninterrupted run would have seen. This sampler yields keys ``(index, seed, epoch)`` instead of
bare indices; the dataset derives the clip start / frame choice from the key. Lightning calls ``set_epoch`` on it each
epoch, so a resumed run and a run with more workers see the same items.

A fit resumed from a checkpoint starts where the checkpoint left off: the DataModule saves :func:`resume_position` (the
epoch and the batches of it already trained) in every checkpoint, and on resume :meth:`EpochSampler.resume` makes the
sampler yield the rest of that epoch. The sampler must know this before the DataLoader iterator exists: workers
prefetch indices when the iterator is created, which a resumed Lightning fit does once, before ``set_epoch`` — and a
module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` makes Lightning build the loader
before the loops' counters are restored, so the counters cannot be read then; the DataModule's state is restored
earlier.

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
from torch.utils.data import DataLoader, DistributedSampler

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
        self._skip: tuple[int, int] | None = None  # (epoch, items of this rank already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, items: int) -> None:
        """Start at ``epoch``, leaving out the first ``items`` items of this rank's share of it (already trained).
        Later epochs are whole; ``len()`` stays the whole epoch's, as the trainer counts batches from where it was."""
        self.epoch = epoch
        self._skip = (epoch, items) if items > 0 else None

    @property
    def mid_epoch(self) -> bool:
        """Whether the next iteration continues an epoch a resumed fit had begun."""
        return self._skip is not None and self._skip[0] == self.epoch

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
        share = order[self.rank::self.num_replicas]
        if self.mid_epoch:
            share = share[self._skip[1]:]
        self._skip = None
        for index in share.tolist():
            yield index, seed, self.epoch


class ResumableLoader(DataLoader):
    """The training DataLoader. It tells Lightning that a fit can resume it mid-epoch (Lightning checks for
    ``state_dict``/``load_state_dict``); the position itself is the DataModule's state, restored before Lightning may
    first build this loader (see :meth:`~datamodules.EchoNetDataModule.state_dict`), so the loader keeps none."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def resume_position(trainer) -> tuple[int, int]:
    """``(epoch, batches)``: the epoch a fit is in and how many of its training batches it has trained, from the
    trainer's progress counters — what a checkpoint saved now must resume from.

    Saved after an epoch's last batch but before the epoch ended (validation by steps), it gives all of that epoch's
    batches: the sampler then yields nothing for it, and Lightning goes on to the next epoch.
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return 0, 0
    epochs = loop.epoch_progress.current
    epoch = epochs.processed
    unfinished = epochs.started > epochs.processed  # the epoch began and its training had not finished
    return epoch, loop.epoch_loop.batch_progress.current.processed if unfinished else 0


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
