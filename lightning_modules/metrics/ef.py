"""EF regression metrics with one value per video, robust to DistributedSampler padding."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

from lightning_modules.metrics.indexed import IndexedCat


class EFRegressionMetrics(IndexedCat):
    """MAE, RMSE (EF points) and R² of EF predictions over the *videos* seen, each video counted once.

    ``update(index, preds, target)``: ``index`` int64 ``(N,)`` (the batch contract's row of the split's table),
    ``preds`` and ``target`` ``(N,)`` in percent. States are concatenated across DDP ranks and an index seen twice
    counts once (:class:`~lightning_modules.metrics.indexed.IndexedCat`): DistributedSampler pads a rank's last batch
    with items of the split another rank also evaluates. A video's several clips are averaged by the model before they get here
    (:meth:`~lightning_modules.ef_regressor.EFRegressorModule.predict_video_ef`).

    ``compute()`` → ``{"mae", "rmse", "r2"}`` float32 scalars; ``r2`` is NaN with fewer than two videos.
    """

    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(keys=("preds", "target"), **kwargs)

    def update(self, index: torch.Tensor, preds: torch.Tensor, target: torch.Tensor) -> None:
        if not index.shape == preds.shape == target.shape or index.ndim != 1:
            raise ValueError(f"index, preds and target must be (N,) alike, got {tuple(index.shape)}, "
                             f"{tuple(preds.shape)}, {tuple(target.shape)}")
        super().update(index, preds=preds.float(), target=target.float())

    def per_video(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, preds, target)`` with one entry per distinct index, sorted by index."""
        values = super().compute()
        return values["index"], values["preds"], values["target"]

    def compute(self) -> dict[str, torch.Tensor]:
        _, preds, target = self.per_video()
        r2 = r2_score(preds, target) if len(preds) >= 2 else torch.tensor(math.nan, device=preds.device)
        return {"mae": mean_absolute_error(preds, target),
                "rmse": mean_squared_error(preds, target, squared=False),
                "r2": r2}
