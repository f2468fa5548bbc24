"""Coverage and faithfulness measures in the re-ID embedding space (definitions: DESIGN.md, "Metrics").

Plain functions of embeddings and search results, exact and in bounded memory; the torchmetrics ``Metric`` classes
and the validation callback are built on them. Notation: ``R`` train embeddings, ``H`` held-out real, ``S``
synthetic; a video's search result is its best re-ID score over its frames and the training video that gives it
(:meth:`lightning_modules.reid.ReIDModule.video_search`).
"""

from __future__ import annotations

import torch

from lightning_modules.reid_search import pair_scores

__all__ = ["coverage_fraction", "coverage_curve", "memorization_rate", "density_and_coverage", "real_radii",
           "frechet_distance", "temporal_consistency", "hit_counts", "pair_video_scores"]


def coverage_fraction(best_index: torch.Tensor, bank_size: int) -> torch.Tensor:
    """Seed-paper coverage ("learned"): distinct best-matching training videos / min(|R|, |S|).

    ``best_index`` int ``(S,)``: for each synthetic (or held-out) video, the training video it matches best. float64
    scalar in [0, 1]; with ``H`` in place of ``S`` it is the reference coverage.
    """
    if best_index.ndim != 1 or len(best_index) == 0 or bank_size < 1:
        raise ValueError(f"need best_index (S,) with S ≥ 1 and bank_size ≥ 1, got {tuple(best_index.shape)}, "
                         f"{bank_size}")
    return torch.tensor(torch.unique(best_index).numel() / min(bank_size, len(best_index)), dtype=torch.float64)


def coverage_curve(best_index: torch.Tensor, bank_size: int) -> torch.Tensor:
    """Coverage of the first n videos for every n = 1 … S: float64 ``(S,)``, entry n − 1 =
    :func:`coverage_fraction` of ``best_index[:n]`` (coverage depends on |S|: compare sets at equal sizes)."""
    if best_index.ndim != 1 or len(best_index) == 0 or bank_size < 1:
        raise ValueError(f"need best_index (S,) with S ≥ 1 and bank_size ≥ 1, got {tuple(best_index.shape)}, "
                         f"{bank_size}")
    _, inverse = torch.unique(best_index, return_inverse=True)
    positions = torch.arange(len(best_index), device=best_index.device)
    first = torch.full((int(inverse.max()) + 1,), len(best_index), device=best_index.device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    is_first = torch.zeros(len(best_index), dtype=torch.float64, device=best_index.device)
    is_first[first] = 1.0
    sizes = (positions + 1).double()
    return is_first.cumsum(0) / sizes.clamp(max=float(bank_size))


def pair_video_scores(first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """Each video's score against its partner: ``first (N, F, D)`` and ``second (N, F', D)`` per-frame embeddings →
    float32 ``(N,)``, the head's best logit over the F × F' frame pairs of video i and video i."""
    if first.ndim != 3 or second.ndim != 3 or len(first) != len(second):
        raise ValueError(f"need (N, F, D) and (N, F', D) embeddings, got {tuple(first.shape)}, {tuple(second.shape)}")
    frames, partner_frames, dim = first.shape[1], second.shape[1], first.shape[2]
    left = first[:, :, None].expand(-1, -1, partner_frames, -1).reshape(-1, dim)
    right = second[:, None].expand(-1, frames, -1, -1).reshape(-1, dim)
    return pair_scores(left, right, weight, bias).float().view(len(first), -1).amax(dim=1)


def hit_counts(best_index: torch.Tensor, bank_size: int) -> torch.Tensor:
    """How often each training video is the best match: int64 ``(bank_size,)`` (the seed paper's long tail)."""
    return torch.bincount(best_index.long(), minlength=bank_size)


def memorization_rate(best_score: torch.Tensor, tau: float) -> torch.Tensor:
    """Fraction of videos whose best re-ID score against the training set exceeds τ (what the privacy filter
    removes). float64 scalar."""
    if best_score.ndim != 1 or len(best_score) == 0:
        raise ValueError(f"need best_score (S,) with S ≥ 1, got {tuple(best_score.shape)}")
    return (best_score.double() > tau).double().mean()


def _pairwise_chunks(first: torch.Tensor, second: torch.Tensor, max_elements: int):
    """Euclidean distances ``first (N, D)`` × ``second (M, D)`` in row blocks of at most ``max_elements`` entries."""
    rows = max(1, max_elements // max(1, len(second)))
    for start in range(0, len(first), rows):
        yield start, torch.cdist(first[start:start + rows], second)


def _kth_neighbour_radii(real: torch.Tensor, k: int, max_elements: int) -> torch.Tensor:
    # Distance of each real point to its k-th nearest other real point (the point itself is at distance 0).
    radii = torch.empty(len(real), dtype=real.dtype, device=real.device)
    for start, block in _pairwise_chunks(real, real, max_elements):
        radii[start:start + len(block)] = block.kthvalue(k + 1, dim=1).values
    return radii


def density_and_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5, *, max_elements: int = 2**24,
                         recall: bool = True, real_radii: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Precision, recall, density and coverage of Naeem et al. (2020) for features ``real (N, D)``, ``fake (M, D)``.

    Each real point gets the radius to its k-th nearest real neighbour. density = mean over fake points of the number
    of real balls containing them, / k; coverage = fraction of real balls containing at least one fake point;
    precision / recall (Kynkäänniemi et al.) = fraction of fake in any real ball / of real in any fake ball. The same
    quantities as the ``prdc`` package (strict ``<``), computed in float64 blocks of at most ``max_elements`` distances.

    Cost: O(N² + N·M) distances, plus O(M²) for recall alone (the fake points' own radii); ``recall=False`` leaves it
    out, so the cost grows linearly with M. ``real_radii`` (from :func:`real_radii`) skips the O(N²) part when the
    real set is fixed.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or len(real) <= k or len(fake) <= k:
        raise ValueError(f"need real (N, D), fake (M, D) with N, M > k={k}, got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    real, fake = real.double(), fake.double()
    if real_radii is None:
        real_radii = _kth_neighbour_radii(real, k, max_elements)
    fake_radii = _kth_neighbour_radii(fake, k, max_elements) if recall else None
    balls_per_fake = torch.zeros(len(fake), dtype=torch.float64, device=fake.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    recalled = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start, block in _pairwise_chunks(real, fake, max_elements):  # (rows of real, M)
        inside = block < real_radii[start:start + len(block), None]
        balls_per_fake += inside.sum(dim=0)
        covered[start:start + len(block)] = inside.any(dim=1)
        if recall:
            recalled[start:start + len(block)] = (block < fake_radii[None]).any(dim=1)
    result = {"precision": (balls_per_fake > 0).double().mean(), "density": balls_per_fake.mean() / k,
              "coverage": covered.double().mean()}
    if recall:
        result["recall"] = recalled.double().mean()
    return result


def real_radii(real: torch.Tensor, k: int = 5, *, max_elements: int = 2**24) -> torch.Tensor:
    """Each real point's distance to its k-th nearest other real point, float64 ``(N,)``: the balls of
    :func:`density_and_coverage`, computed once for a fixed real set."""
    return _kth_neighbour_radii(real.double(), k, max_elements)


def _covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (len(features) - 1)


def frechet_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to ``first (N, D)`` and ``second (M, D)`` (FID's formula, here in the
    re-ID embedding space): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), float64.

    Tr (Σ₁Σ₂)^½ is computed as Σ √λ of the symmetric Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues), which stays real and stable
    where a general matrix square root needs its imaginary round-off discarded.
    """
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1] or min(len(first), len(second)) < 2:
        raise ValueError(f"need (N, D) and (M, D) features with N, M ≥ 2, got {tuple(first.shape)}, "
                         f"{tuple(second.shape)}")
    mean1, cov1 = _covariance(first)
    mean2, cov2 = _covariance(second)
    values, vectors = torch.linalg.eigh(cov1)
    root1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root


def temporal_consistency(embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Temporal identity consistency of each video: mean re-ID similarity (sigmoid of the head's logit) of frame 0
    with frames 1 … T−1. ``embeddings (B, T, D)`` with T ≥ 2 → float32 ``(B,)`` in (0, 1)."""
    if embeddings.ndim != 3 or embeddings.shape[1] < 2:
        raise ValueError(f"need per-frame embeddings (B, T ≥ 2, D), got {tuple(embeddings.shape)}")
    first = embeddings[:, :1].expand(-1, embeddings.shape[1] - 1, -1)
    logits = pair_scores(first.reshape(-1, embeddings.shape[2]), embeddings[:, 1:].reshape(-1, embeddings.shape[2]),
                         weight, bias)
    return torch.sigmoid(logits.float()).view(embeddings.shape[0], -1).mean(dim=1)
