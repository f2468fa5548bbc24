"""The measures behind :class:`~callbacks.coverage.CoverageCallback` and ``echo-lvdm evaluate`` (DESIGN.md,
"Metrics"), as torchmetrics states keyed by the batch contract's ``index`` — gathered across DDP ranks, sampler
padding counted once; ``compute()`` is a collective (every rank calls it).

* :class:`CoverageMeasures` — fully synthetic samples (an anatomy model's frames, or videos animated from them)
  against the training split: coverage (also at several sample counts, and at the held-out set's size), reference
  coverage of held-out real videos, memorisation, memorised coverage, density / PRDC coverage, Fréchet distance,
  temporal consistency, EF faithfulness.
* :class:`IdentityMeasures` — videos animated from *real* held-out frames inherit their patient: how much of the
  source patient each keeps (its score against its source video; the share above τ), EF faithfulness, temporal
  consistency and Fréchet distance. Never coverage or memorisation: those would measure the held-out patients.

Both take τ as a :class:`~lightning_modules.calibration.Calibration` and refuse one of another protocol.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from lightning_modules.calibration import Calibration
from lightning_modules.metrics import CoverageMetric, EFRegressionMetrics, EmbeddingDistributionMetrics, MeanPerVideo
from lightning_modules.metrics.functional import (
    coverage_curve,
    hit_counts,
    pair_video_scores,
    temporal_consistency,
)
from lightning_modules.metrics.indexed import IndexedCat
from lightning_modules.protocols import Protocol

__all__ = ["CoverageMeasures", "IdentityMeasures", "METRIC_NAMES", "IDENTITY_METRIC_NAMES", "coverage_sizes"]

METRIC_NAMES = ("coverage", "filtered_coverage", "reference_coverage", "relative_coverage", "memorization_rate",
                "memorized_coverage", "ef_r2", "ef_mae", "density", "prdc_coverage", "fd_reid", "temporal_consistency",
                "tau")
IDENTITY_METRIC_NAMES = ("identity_score", "identity_above_tau", "ef_r2", "ef_mae", "fd_reid",
                         "temporal_consistency", "tau")


def coverage_sizes(bank_size: int, synthetic: int, reference: int) -> list[int]:
    """Sample counts coverage is reported at: ¼, ½, 1 and 2 × |R| and the held-out set's size, those ≤ |S|."""
    sizes = {max(1, bank_size // 4), max(1, bank_size // 2), bank_size, 2 * bank_size, reference, synthetic}
    return sorted(size for size in sizes if 0 < size <= synthetic)


class _SampleMeasures(torch.nn.Module):
    """What both kinds of measures share: τ of ``protocol`` (refusing one of another), the training bank, and the
    per-sample states every sample updates — distribution against the bank, temporal consistency, EF faithfulness."""

    def __init__(self, reid, bank, calibration: Calibration, protocol: Protocol | str, *, ef: bool, k: int) -> None:
        super().__init__()
        self.protocol = Protocol.parse(protocol)
        self.tau = calibration.holds_for(self.protocol, "the privacy threshold τ")
        self.reid, self.bank = reid, bank
        self.distribution = EmbeddingDistributionMetrics(bank.embedding.mean(dim=1).double(), k)
        self.temporal = MeanPerVideo()
        self.ef = EFRegressionMetrics() if ef else None

    def _update_sample(self, index: torch.Tensor, embedding: torch.Tensor, requested_ef: torch.Tensor | None,
                       read_ef: torch.Tensor | None) -> None:
        self.distribution.update(index, embedding=embedding.mean(dim=1).double())
        if embedding.shape[1] >= 2:
            self.temporal.update(index, value=temporal_consistency(embedding, self.reid.head.weight,
                                                                   self.reid.head.bias))
        if requested_ef is not None or read_ef is not None:
            self.update_ef(index, requested_ef, read_ef)

    def update_ef(self, index: torch.Tensor, requested_ef: torch.Tensor, read_ef: torch.Tensor) -> None:
        """The EF samples were asked for and the EF the regressor reads from them, ``(N,)`` each."""
        if self.ef is None:
            raise ValueError("the measures were built without EF faithfulness (ef=False)")
        if requested_ef is None or read_ef is None:
            raise ValueError("the measures were built with EF faithfulness: give requested_ef and read_ef")
        self.ef.update(index, preds=read_ef.float(), target=requested_ef.float())

    def _fill_empty_ranks(self) -> None:
        device = self.bank.embedding.device
        _fill_empty(self.distribution, device, embedding=self.bank.embedding.shape[-1])
        _fill_empty(self.temporal, device, value=0)
        _fill_empty(self.ef, device, preds=0, target=0)

    def _add_sample_values(self, values: dict, details: dict) -> None:
        """Temporal consistency and EF faithfulness into ``values`` (and the per-video EF into ``details``)."""
        if _anything(self.temporal):
            values["temporal_consistency"] = self.temporal.compute()
        if self.ef is not None:
            ef = self.ef.compute()
            values.update(ef_r2=ef["r2"], ef_mae=ef["mae"])
            details["ef_read"], details["ef_requested"] = self.ef.per_video()[1:]

    def reset(self) -> None:
        for metric in self.children():
            if isinstance(metric, IndexedCat):
                metric.reset()


class CoverageMeasures(_SampleMeasures):
    """Coverage measures of fully synthetic videos against a training bank.

    ``reid``: the re-ID model (its head scores); ``bank``: the training split's embeddings under ``protocol``
    (:class:`~lightning_modules.reid_embeddings.EmbeddedSplit`); ``calibration``: τ, which must be of ``protocol``.
    Update with per-frame embeddings ``(N, F, D)`` of samples (and, with ``ef``, the EF requested and read) and of
    held-out real videos; ``compute()`` → ``(values, details)`` or None when no rank saw a sample. ``values``: the
    names of ``METRIC_NAMES`` present plus ``coverage@n`` at :func:`coverage_sizes`; ``relative_coverage`` compares
    samples and held-out videos at equal counts (the first n: by index, or by ``sample_order``);
    ``filtered_coverage`` (and ``filtered_coverage@n``) is the coverage
    of the samples at or below τ — those a privacy-filtered dataset keeps, in sample order, so it can be read against
    the written dataset's coverage at equal counts. ``details``: per-video scores and matches, hits per training
    video, and the coverage curves (``synthetic_curve``, ``filtered_curve``, ``reference_curve``: coverage of the
    first n).
    """

    def __init__(self, reid, bank, calibration: Calibration, protocol: Protocol | str, *, ef: bool,
                 k: int = 5) -> None:
        super().__init__(reid, bank, calibration, protocol, ef=ef, k=k)
        self.synthetic = CoverageMetric(len(bank), self.tau)
        self.reference = CoverageMetric(len(bank), self.tau)
        self.sample_order: torch.Tensor | None = None  # rank of each sample index in the curves (None: by index)

    def update_synthetic(self, index: torch.Tensor, embedding: torch.Tensor, requested_ef: torch.Tensor | None = None,
                         read_ef: torch.Tensor | None = None) -> torch.Tensor:
        """Samples' per-frame embeddings ``(N, F, D)``; returns their best scores ``(N,)``."""
        score, match = self.reid.video_search(embedding, self.bank.embedding.to(embedding))
        self.synthetic.update(index, score=score, match=match)
        self._update_sample(index, embedding, requested_ef, read_ef)
        return score

    def update_reference(self, index: torch.Tensor, embedding: torch.Tensor) -> None:
        """Held-out real videos' per-frame embeddings ``(N, F, D)`` (the reference coverage)."""
        score, match = self.reid.video_search(embedding, self.bank.embedding.to(embedding))
        self.reference.update(index, score=score, match=match)

    def compute(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        device = self.bank.embedding.device
        _fill_empty(self.synthetic, device, score=0, match=0)
        _fill_empty(self.reference, device, score=0, match=0)
        self._fill_empty_ranks()
        if not _anything(self.synthetic):
            return None
        synthetic = self.synthetic.compute()
        values = {name: synthetic[name] for name in ("coverage", "memorization_rate", "memorized_coverage")}
        values["tau"] = torch.tensor(self.tau, dtype=torch.float64)
        ordered = self._in_sample_order(synthetic)
        curve = coverage_curve(ordered["match"], len(self.bank))
        details = {f"synthetic_{key}": synthetic[key] for key in ("index", "score", "match")}
        details.update(hits=hit_counts(synthetic["match"], len(self.bank)), synthetic_curve=curve)
        if len(synthetic["index"]) > self.distribution.k:  # the same count on every rank: all call compute or none
            distribution = self.distribution.compute()
            values.update(density=distribution["density"], prdc_coverage=distribution["prdc_coverage"],
                          fd_reid=distribution["fd"])
        else:
            rank_zero_warn(f"CoverageMeasures: density, PRDC coverage and Fréchet distance need more than "
                           f"k={self.distribution.k} synthetic videos, got {len(synthetic['index'])}; not computed")
        reference_size = 0
        if _anything(self.reference):
            reference = self.reference.compute()
            reference_curve = coverage_curve(reference["match"], len(self.bank))
            reference_size = len(reference_curve)
            equal = min(len(curve), reference_size)
            values.update(reference_coverage=reference["coverage"],
                          relative_coverage=curve[equal - 1] / reference_curve[equal - 1])
            details.update({f"reference_{key}": reference[key] for key in ("index", "score", "match")})
            details["reference_curve"] = reference_curve
        for size in coverage_sizes(len(self.bank), len(curve), reference_size):
            values[f"coverage@{size}"] = curve[size - 1]
        kept = ordered["score"].double() <= self.tau  # what the privacy filter would keep, in sample order
        if bool(kept.any()):
            kept_curve = coverage_curve(ordered["match"][kept], len(self.bank))
            values["filtered_coverage"] = kept_curve[-1]
            for size in coverage_sizes(len(self.bank), len(kept_curve), reference_size):
                values[f"filtered_coverage@{size}"] = kept_curve[size - 1]
            details["filtered_curve"] = kept_curve
        self._add_sample_values(values, details)
        return values, details


    def _in_sample_order(self, synthetic: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Samples in the order the coverage curves take them: by index, or by ``sample_order[index]`` (``evaluate``
        sets the FileList's row order, which for a written dataset is the order the filter kept them in)."""
        if self.sample_order is None:
            return synthetic
        rank = self.sample_order.to(synthetic["index"].device)[synthetic["index"]]
        order = torch.argsort(rank, stable=True)
        return {key: synthetic[key][order] for key in ("match", "score")}


class IdentityMeasures(_SampleMeasures):
    """What videos animated from real held-out frames keep of their source patient.

    Update with the samples' per-frame embeddings ``(N, F, D)``, their source videos' ``(N, F', D)`` (under
    ``protocol``, as τ), and the EF requested and read; ``compute()`` → ``(values, details)`` of
    ``IDENTITY_METRIC_NAMES`` (``identity_score``: mean score of a sample against its source video;
    ``identity_above_tau``: the share whose score exceeds τ — re-identified as their source patient), or None.
    """

    def __init__(self, reid, bank, calibration: Calibration, protocol: Protocol | str, *, ef: bool,
                 k: int = 5) -> None:
        super().__init__(reid, bank, calibration, protocol, ef=ef, k=k)
        self.identity = IndexedCat(("score",))

    def update(self, index: torch.Tensor, embedding: torch.Tensor, source: torch.Tensor,
               requested_ef: torch.Tensor | None = None, read_ef: torch.Tensor | None = None) -> None:
        self.identity.update(index, score=pair_video_scores(embedding, source.to(embedding), self.reid.head.weight,
                                                            self.reid.head.bias))
        self._update_sample(index, embedding, requested_ef, read_ef)

    def compute(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        _fill_empty(self.identity, self.bank.embedding.device, score=0)
        self._fill_empty_ranks()
        if not _anything(self.identity):
            return None
        identity = self.identity.compute()
        score = identity["score"].double()
        values = {"identity_score": score.mean(), "identity_above_tau": (score > self.tau).double().mean(),
                  "tau": torch.tensor(self.tau, dtype=torch.float64)}
        details = {"synthetic_index": identity["index"], "identity_score": identity["score"]}
        if len(identity["index"]) > self.distribution.k:
            values["fd_reid"] = self.distribution.compute()["fd"]
        self._add_sample_values(values, details)
        return values, details


def _fill_empty(metric, device: torch.device, **widths: int) -> None:
    """A rank that saw no video still joins the gathers, with empty states of the right dtypes and widths
    (0: one value per video; the integer-valued ``match`` and ``index`` are long)."""
    if metric is None or metric.update_count:
        return
    index = torch.zeros(0, dtype=torch.long, device=device)
    empty = {key: torch.zeros(0, dtype=torch.long, device=device) if key == "match" else
             torch.zeros((0, width) if width else 0, dtype=torch.float64 if width else torch.float32, device=device)
             for key, width in widths.items()}
    metric.update(index, **empty)


def _anything(metric) -> bool:
    """Whether any rank gave ``metric`` a row (a collective under DDP)."""
    count = torch.tensor(sum(len(part) for part in metric.index), device=metric.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    return bool(count > 0)
