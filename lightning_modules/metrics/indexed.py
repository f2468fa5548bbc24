"""torchmetrics building blocks shared by the modules and the coverage callback."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class IndexedCat(Metric):
    """Concatenates per-item tensors across batches and ranks, keyed by the batch contract's ``index``.

    ``update(index, name=tensor, …)`` with tensors whose first dimension is the batch; ``compute()`` returns
    ``{"index": (N,), name: (N, …)}`` sorted by index with duplicates dropped — DistributedSampler pads the last
    batch of a rank with items another rank also sees, and those must count once. Every rank gets the same result.
    """

    full_state_update = False

    def __init__(self, keys: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if "index" in keys:
            raise ValueError("'index' is always collected; do not list it in keys")
        self.keys = tuple(keys)
        for key in ("index", *self.keys):
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, index: torch.Tensor, **tensors: torch.Tensor) -> None:
        if set(tensors) != set(self.keys):
            raise ValueError(f"IndexedCat.update expects {sorted(self.keys)}, got {sorted(tensors)}")
        self.index.append(index.detach().reshape(-1).long())
        for key, tensor in tensors.items():
            if tensor.shape[0] != index.numel():
                raise ValueError(f"{key} has {tensor.shape[0]} rows for {index.numel()} indices")
            getattr(self, key).append(tensor.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.index, list) and not self.index:
            raise RuntimeError("IndexedCat.compute() before any update()")
        index = dim_zero_cat(self.index)
        order = torch.argsort(index, stable=True)
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = index[order][1:] != index[order][:-1]
        chosen = order[keep]
        result = {"index": index[chosen]}
        for key in self.keys:
            result[key] = dim_zero_cat(getattr(self, key))[chosen]
        return result
