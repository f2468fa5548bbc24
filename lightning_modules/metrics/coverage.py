"""torchmetrics ``Metric`` classes for coverage and faithfulness: per-video values are concatenated across DDP ranks
and de-duplicated by the batch contract's ``index`` (:class:`~lightning_modules.metrics.indexed.IndexedCat`), then
reduced by the functions of :mod:`lightning_modules.metrics.functional`. EF faithfulness is
:class:`~lightning_modules.metrics.ef.EFRegressionMetrics` with the regressor's reading as ``preds`` and the requested
EF as ``target``."""

from __future__ import annotations

import torch

from lightning_modules.metrics.functional import (
    coverage_fraction,
    density_and_coverage,
    frechet_distance,
    memorization_rate,
    real_radii,
)
from lightning_modules.metrics.indexed import IndexedCat


class CoverageMetric(IndexedCat):
    """Coverage ("learned") and memorisation rate of videos against a training bank of ``bank_size`` videos.

    ``update(index, score, match)``: each video's best re-ID score ``(N,)`` over the bank and the bank video that
    gives it ``(N,)`` (:meth:`~lightning_modules.reid.ReIDModule.video_search`). ``compute()`` →
    ``{"coverage", "memorization_rate", "memorized_coverage"}`` (memorisation: score > ``tau``; memorised coverage:
    the share of the bank's videos that some video matches above ``tau``, i.e. the training videos reproduced),
    float64 scalars, plus the per-video ``"index"``, ``"score"`` and ``"match"`` they come from (each video once,
    sorted by index).
    """

    higher_is_better = None

    def __init__(self, bank_size: int, tau: float, **kwargs) -> None:
        super().__init__(keys=("score", "match"), **kwargs)
        self.bank_size, self.tau = int(bank_size), float(tau)

    def compute(self) -> dict[str, torch.Tensor]:
        values = super().compute()
        memorised = values["score"].double() > self.tau
        return {"coverage": coverage_fraction(values["match"], self.bank_size),
                "memorization_rate": memorization_rate(values["score"], self.tau),
                "memorized_coverage": torch.tensor(torch.unique(values["match"][memorised]).numel() / self.bank_size,
                                                   dtype=torch.float64), **values}


class EmbeddingDistributionMetrics(IndexedCat):
    """Density and coverage (Naeem et al. 2020, ``k`` neighbours) and the Fréchet distance between the embeddings
    of the videos seen and a fixed ``reference`` set ``(M, D)`` (e.g. the training split), in the re-ID space.

    ``update(index, embedding)`` with one embedding per video ``(N, D)`` (e.g. the mean over its frames).
    ``compute()`` → ``{"density", "prdc_coverage", "fd"}``, float64 scalars.
    """

    higher_is_better = None

    def __init__(self, reference: torch.Tensor, k: int = 5, **kwargs) -> None:
        super().__init__(keys=("embedding",), **kwargs)
        if reference.ndim != 2 or len(reference) <= k:
            raise ValueError(f"reference must be (M, D) with M > k={k}, got {tuple(reference.shape)}")
        self.k = k
        self.register_buffer("reference", reference.detach().clone(), persistent=False)
        self._radii: torch.Tensor | None = None  # the reference's k-NN radii, computed once

    def compute(self) -> dict[str, torch.Tensor]:
        embedding = super().compute()["embedding"]
        if self._radii is None or self._radii.device != self.reference.device:
            self._radii = real_radii(self.reference, self.k)
        # Recall would need every sample's k-th neighbour among the samples: O(M²), and it is not reported.
        prdc = density_and_coverage(self.reference, embedding, self.k, recall=False, real_radii=self._radii)
        return {"density": prdc["density"], "prdc_coverage": prdc["coverage"],
                "fd": frechet_distance(self.reference, embedding)}


class MeanPerVideo(IndexedCat):
    """Mean of one value per video (e.g. temporal identity consistency), each video once across ranks.

    ``update(index, value)`` with ``value (N,)``; ``compute()`` → float64 scalar.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(keys=("value",), **kwargs)

    def compute(self) -> torch.Tensor:
        return super().compute()["value"].double().mean()
