"""The project's metrics, all torchmetrics ``Metric`` classes whose per-video states are gathered across DDP ranks and
de-duplicated by the batch contract's ``index`` (DistributedSampler padding counts once), and the plain functions
they reduce with. Definitions: DESIGN.md, "Metrics".

* :class:`IndexedCat` (``indexed``): the per-video state every metric here is built on.
* :class:`EFRegressionMetrics` (``ef``): EF MAE, RMSE and R² over videos — the EF regressor's metrics and EF
  faithfulness.
* :class:`CoverageMetric`, :class:`EmbeddingDistributionMetrics`, :class:`MeanPerVideo` (``coverage``): coverage,
  memorisation, density / PRDC coverage, Fréchet distance and temporal consistency in the re-ID space.
* ``generative``: FID, IS and FVD with the field's TorchScript Inception and I3D (torchmetrics' FID state, summed
  across ranks; every sample fed counts, as the samples generated on each rank are distinct), loaded from paths the
  user gives; imported where used (``lightning_modules.metrics.generative``).
* ``functional``: the exact, bounded-memory functions behind them (coverage fraction, memorisation rate, PRDC,
  Fréchet distance, temporal consistency, hit counts).
"""

from lightning_modules.metrics.coverage import CoverageMetric, EmbeddingDistributionMetrics, MeanPerVideo
from lightning_modules.metrics.ef import EFRegressionMetrics
from lightning_modules.metrics.indexed import IndexedCat

__all__ = ["CoverageMetric", "EFRegressionMetrics", "EmbeddingDistributionMetrics", "IndexedCat", "MeanPerVideo"]
