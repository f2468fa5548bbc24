"""Generation requests: what ``predict`` asks a generator for when it writes a synthetic dataset.

``EchoNetDataModule(predict_split="requests", requests=GenerationRequests(...))`` serves, instead of real videos,
one item per generation *attempt*: ``{"index": attempt, "ef": requested EF (percent), "seed": noise seed, "valid"}``.
An attempt's EF and seed are a function of ``(seed, attempt)`` only, so a resumed run, a run with another batch size
and a run on any number of DDP ranks ask for the same video at the same attempt. The stream is padded with invalid
items to a whole number of rounds (``batch_size × world_size``) so every rank runs the same number of batches — the
writer gathers results after each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

_EF_STREAM, _SEED_STREAM = 11, 12  # nonzero tags: SeedSequence ignores trailing zeros


@dataclass
class GenerationRequests:
    """What to generate.

    Args:
        attempts: the cap on generation attempts (kept + dropped by the privacy filter); the writer stops early once
            it has its number of videos.
        distribution: ``"uniform"`` draws EF uniformly from ``ef_range``; ``"train"`` resamples the training split's
            FileList EFs (the real distribution), clipped to ``ef_range``.
        ef_range: (low, high) EF in percent.
        seed: seeds EFs and noise.
    """

    attempts: int = 100
    distribution: Literal["uniform", "train"] = "uniform"
    ef_range: tuple[float, float] = (10.0, 90.0)
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.ef_range
        if self.attempts < 1:
            raise ValueError(f"requests.attempts must be ≥ 1, got {self.attempts}")
        if not 0.0 <= low <= high <= 100.0:
            raise ValueError(f"requests.ef_range must satisfy 0 ≤ low ≤ high ≤ 100 (percent), got {self.ef_range}")
        if self.distribution not in ("uniform", "train"):
            raise ValueError(f"requests.distribution must be 'uniform' or 'train', got {self.distribution!r}")

    def ef(self, attempt: int, train_ef: np.ndarray | None = None) -> float:
        rng = np.random.default_rng((self.seed, attempt, _EF_STREAM))
        low, high = self.ef_range
        if self.distribution == "uniform":
            return float(rng.uniform(low, high))
        if train_ef is None or len(train_ef) == 0:
            raise ValueError("requests.distribution 'train' needs the training split's EFs")
        return float(np.clip(train_ef[rng.integers(len(train_ef))], low, high))

    def noise_seed(self, attempt: int) -> int:
        return int(np.random.default_rng((self.seed, attempt, _SEED_STREAM)).integers(2**62))


class RequestDataset(Dataset):
    """Items ``{"index", "ef", "seed", "valid"}`` for attempts ``0 .. length-1``; those at or past
    ``requests.attempts`` are padding (``valid`` False)."""

    def __init__(self, requests: GenerationRequests, length: int, train_ef: np.ndarray | None = None) -> None:
        self.requests, self.length = requests, length
        self.train_ef = None if train_ef is None else np.asarray(train_ef, dtype=np.float64)
        if requests.distribution == "train" and (self.train_ef is None or len(self.train_ef) == 0):
            raise ValueError("requests.distribution 'train' needs a training split with EF values")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, attempt: int) -> dict[str, torch.Tensor]:
        valid = attempt < self.requests.attempts
        return {"index": torch.tensor(attempt, dtype=torch.long),
                "ef": torch.tensor(self.requests.ef(attempt, self.train_ef) if valid else 0.0, dtype=torch.float32),
                "seed": torch.tensor(self.requests.noise_seed(attempt), dtype=torch.long),
                "valid": torch.tensor(valid)}


def padded_length(attempts: int, batch_size: int, world_size: int) -> int:
    """``attempts`` rounded up to whole rounds of ``batch_size × world_size``."""
    round_size = batch_size * world_size
    return -(-attempts // round_size) * round_size
