"""Coverage and faithfulness measures against their oracles: the prdc package, scipy's sqrtm, and brute force over
every pair of a small set."""

from __future__ import annotations

import numpy as np
import prdc
import pytest
import scipy.linalg
import torch

from lightning_modules.metrics.functional import (
    coverage_fraction,
    density_and_coverage,
    frechet_distance,
    hit_counts,
    memorization_rate,
    real_radii,
    temporal_consistency,
)
from lightning_modules.reid_search import max_scores


@pytest.mark.parametrize("max_elements", [50, 2**24])  # distance blocks of a few rows, and all at once
def test_density_and_coverage_equal_the_prdc_package(max_elements):
    generator = np.random.default_rng(0)
    real = generator.normal(size=(120, 16))
    fake = generator.normal(loc=0.3, scale=1.2, size=(90, 16))
    expected = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    found = density_and_coverage(torch.from_numpy(real), torch.from_numpy(fake), k=5, max_elements=max_elements)
    for name in ("precision", "recall", "density", "coverage"):
        assert float(found[name]) == pytest.approx(float(expected[name]), abs=1e-12), name
    assert 0 < float(found["coverage"]) < 1 and float(found["density"]) > 0  # a non-trivial case
    # Without recall (no fake × fake distances) and with the real radii computed once: the same numbers.
    radii = real_radii(torch.from_numpy(real), k=5)
    linear = density_and_coverage(torch.from_numpy(real), torch.from_numpy(fake), k=5, max_elements=max_elements,
                                  recall=False, real_radii=radii)
    assert "recall" not in linear
    for name in ("precision", "density", "coverage"):
        assert float(linear[name]) == pytest.approx(float(expected[name]), abs=1e-12), name


def test_frechet_distance_equals_scipy_sqrtm():
    generator = np.random.default_rng(1)
    first = generator.normal(size=(200, 12)) @ generator.normal(size=(12, 12))
    second = generator.normal(loc=0.5, size=(150, 12)) @ generator.normal(size=(12, 12))
    mu1, mu2 = first.mean(0), second.mean(0)
    sigma1, sigma2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    found = float(frechet_distance(torch.from_numpy(first), torch.from_numpy(second)))
    assert found == pytest.approx(expected, rel=1e-8)
    assert float(frechet_distance(torch.from_numpy(first), torch.from_numpy(first))) == pytest.approx(0, abs=1e-8)


def test_coverage_and_memorization_equal_brute_force():
    """Synthetic videos: exact copies of training videos 1, 1 and 4 (a memorised pair of frames scores the head's
    bias) and new ones. Every metric recomputed from the head applied to every (synthetic frame, train frame) pair."""
    generator = torch.Generator().manual_seed(2)
    train = torch.rand(8, 3, 6, generator=generator, dtype=torch.float64)  # 8 videos × 3 frames × 6-d embeddings
    new = torch.rand(4, 3, 6, generator=generator, dtype=torch.float64)
    synthetic = torch.cat([train[[1, 1, 4]], new])
    weight = -torch.rand(6, generator=generator, dtype=torch.float64) - 0.5  # similar embeddings score high
    bias = torch.tensor([2.0], dtype=torch.float64)

    def brute(video: torch.Tensor) -> tuple[float, int]:
        scores = [(float((f - r).abs() @ weight + bias), v) for f in video for v in range(8) for r in train[v]]
        return max(scores)

    oracle = [brute(video) for video in synthetic]
    values, rows = max_scores(synthetic.flatten(0, 1), train.flatten(0, 1), weight, bias, max_elements=40)
    values, best_frame = values.view(7, 3).max(dim=1)
    best_video = rows.view(7, 3).gather(1, best_frame[:, None]).squeeze(1) // 3
    assert best_video.tolist() == [video for _, video in oracle]
    torch.testing.assert_close(values, torch.tensor([score for score, _ in oracle], dtype=torch.float64))

    tau = 1.999  # just below the bias: only exact copies exceed it
    assert float(memorization_rate(values, tau)) == pytest.approx(3 / 7)
    assert torch.nonzero(values > tau).flatten().tolist() == [0, 1, 2]  # the copies are the ones flagged
    distinct = len({video for _, video in oracle})
    assert float(coverage_fraction(best_video, 8)) == pytest.approx(distinct / 7)
    assert hit_counts(best_video, 8).tolist() == [sum(v == i for _, v in oracle) for i in range(8)]
    # A collapsed generator (one video repeated) covers one training video.
    assert float(coverage_fraction(best_video.new_full((7,), 3), 8)) == pytest.approx(1 / 7)
    with pytest.raises(ValueError):
        coverage_fraction(best_video[:0], 8)


def test_temporal_consistency_equals_brute_force():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.rand(4, 5, 6, generator=generator)
    weight, bias = -torch.rand(6, generator=generator), torch.tensor([1.0])
    expected = [np.mean([torch.sigmoid((video[0] - video[t]).abs() @ weight + bias).item() for t in range(1, 5)])
                for video in embeddings]
    found = temporal_consistency(embeddings, weight, bias)
    torch.testing.assert_close(found, torch.tensor(expected, dtype=torch.float32))
    still = embeddings[:, :1].expand(-1, 5, -1)  # a frozen video is perfectly consistent: sigmoid(bias)
    torch.testing.assert_close(temporal_consistency(still, weight, bias), torch.sigmoid(bias).expand(4))


def test_metric_classes_count_each_video_once():
    """Batches as two DDP ranks would see 7 videos: padded to 8 with a repeat of video 0 — the torchmetrics classes
    equal the functions on the 7 distinct videos."""
    from lightning_modules.metrics.coverage import CoverageMetric, EmbeddingDistributionMetrics, MeanPerVideo

    generator = torch.Generator().manual_seed(4)
    score, match = torch.randn(7, generator=generator), torch.tensor([3, 3, 1, 0, 5, 3, 2])
    embedding, value = torch.randn(7, 6, generator=generator, dtype=torch.float64), torch.rand(7, generator=generator)
    reference = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    coverage, distribution = CoverageMetric(bank_size=10, tau=0.1), EmbeddingDistributionMetrics(reference)
    mean = MeanPerVideo()
    for rows in ([0, 2, 4, 6], [1, 3, 5, 0]):  # rank 0's and rank 1's shards; 0 is the sampler's padding
        rows = torch.tensor(rows)
        coverage.update(rows, score=score[rows], match=match[rows])
        distribution.update(rows, embedding=embedding[rows])
        mean.update(rows, value=value[rows])
    found = coverage.compute()
    assert float(found["coverage"]) == pytest.approx(float(coverage_fraction(match, 10)))  # 4 distinct of 7
    assert float(found["memorization_rate"]) == pytest.approx(float(memorization_rate(score, 0.1)))
    expected = density_and_coverage(reference, embedding)
    found = distribution.compute()
    assert float(found["density"]) == pytest.approx(float(expected["density"]))
    assert float(found["prdc_coverage"]) == pytest.approx(float(expected["coverage"]))
    assert float(found["fd"]) == pytest.approx(float(frechet_distance(reference, embedding)))
    assert float(mean.compute()) == pytest.approx(float(value.double().mean()))
