"""``benchmarks/ef_error_sources.py``: its split of a video model's EF error equals the parts it was built from, and
its reference swap recovers how much the read follows the request and how much the reference frame."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.helpers.cli import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from ef_error_sources import error_sources, reference_swap  # noqa: E402


def test_the_squared_error_splits_into_the_bias_reference_and_draw_parts_it_was_built_from():
    rng = np.random.default_rng(0)
    requested = np.linspace(20, 85, 6)
    bias = rng.normal(0, 4, 6)
    reference = rng.normal(0, 3, (6, 4))
    reference -= reference.mean(axis=1, keepdims=True)          # centred over references: a pure reference part
    draw = rng.normal(0, 2, (6, 4, 3))
    draw -= draw.mean(axis=2, keepdims=True)                    # centred over draws: a pure draw part
    draw[0, 1] += [20.0, 20.0, -40.0]                           # one reference whose draws go wrong twice
    reads = requested[:, None, None] + bias[:, None, None] + reference[:, :, None] + draw
    sources = error_sources(reads, requested, outlier=10.0)

    assert sources["bias"] == pytest.approx(np.mean(bias ** 2))
    assert sources["reference"] == pytest.approx(np.mean(reference ** 2))
    assert sources["draw"] == pytest.approx(np.mean(draw ** 2))
    assert sources["mse"] == pytest.approx(sources["bias"] + sources["reference"] + sources["draw"])
    error = reads - requested[:, None, None]
    assert sources["outliers"] == pytest.approx(np.mean(np.abs(error) > 10.0))
    assert sources["outliers"] > 0 and 0.0 < sources["outlier_cells_recurring"] <= 1.0
    target = np.repeat(requested, 4)
    for d, r2 in enumerate(sources["r2_per_draw"]):
        flat = reads[:, :, d].ravel()
        assert r2 == pytest.approx(1 - ((flat - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def test_the_reference_swap_recovers_a_read_that_half_follows_its_reference_frame():
    rng = np.random.default_rng(1)
    requested, reference_ef = rng.uniform(20, 85, (2, 200))
    read = 0.7 * requested + 0.3 * reference_ef + 2.0 + rng.normal(0, 0.5, 200)
    swap = reference_swap(read, requested, reference_ef)
    assert swap["alpha"] == pytest.approx(0.7, abs=0.02)
    assert swap["beta"] == pytest.approx(0.3, abs=0.02)
    follows_request = reference_swap(requested + rng.normal(0, 0.5, 200), requested, reference_ef)
    assert follows_request["beta"] == pytest.approx(0.0, abs=0.02)
    assert follows_request["r2_against_requested"] > 0.99
