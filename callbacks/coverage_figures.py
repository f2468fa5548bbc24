"""Figures of the coverage measures, rendered off-screen by matplotlib into uint8 RGB arrays that
:func:`lightning_modules.image_logging.log_image` logs and the ``evaluate`` report saves as PNG.

Matplotlib's object API with the Agg canvas is used directly (no ``pyplot``): no global figure state, no GUI backend,
safe in DDP workers and on headless clusters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["render", "score_histogram", "coverage_curves", "ef_scatter", "hit_count_plot", "image_pairs"]


def _numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def render(figure: Figure) -> np.ndarray:
    """Draw ``figure`` and return its pixels, uint8 ``(H, W, 3)``."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def score_histogram(scores: Mapping[str, torch.Tensor | np.ndarray], tau: float, *,
                    title: str = "best re-ID score against the training set") -> np.ndarray:
    """Overlaid histograms of each set's best re-ID scores (logits) against the training set, τ as a vertical line:
    samples to the right of τ are what the privacy filter removes. ``scores``: name → ``(N,)``."""
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    arrays = {name: _numpy(values) for name, values in scores.items() if len(values)}
    everything = np.concatenate([*arrays.values(), [tau]])
    bins = np.linspace(everything.min(), everything.max(), 41) if np.ptp(everything) > 0 else 10
    for name, values in arrays.items():
        axes.hist(values, bins=bins, alpha=0.55, density=True, label=f"{name} (n={len(values)})")
    axes.axvline(tau, color="black", linestyle="--", label=f"τ = {tau:.3g}")
    axes.set_xlabel("re-ID logit s(x, r*)")
    axes.set_ylabel("density")
    axes.set_title(title)
    axes.legend(fontsize="small")
    return render(figure)


def coverage_curves(curves: Mapping[str, torch.Tensor | np.ndarray], bank_size: int, *,
                    title: str = "coverage against the number of videos") -> np.ndarray:
    """Coverage of the first n videos of each set against n (coverage depends on |S|: read sets at equal n), with
    |R| marked. ``curves``: name → ``(N,)`` as :func:`~lightning_modules.metrics.functional.coverage_curve` gives."""
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for name, values in curves.items():
        values = _numpy(values)
        axes.plot(np.arange(1, len(values) + 1), values, label=f"{name} (n={len(values)})")
    axes.axvline(bank_size, color="black", linestyle=":", label=f"|R| = {bank_size}")
    axes.set_xscale("log")
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("videos compared, n")
    axes.set_ylabel("coverage (distinct best matches / min(|R|, n))")
    axes.set_title(title)
    axes.legend(fontsize="small")
    return render(figure)


def ef_scatter(requested: torch.Tensor | np.ndarray, read: torch.Tensor | np.ndarray, *, r2: float | None = None,
               mae: float | None = None) -> np.ndarray:
    """EF requested (x) against EF read back by the regressor (y), with the identity line."""
    requested, read = _numpy(requested), _numpy(read)
    figure = Figure(figsize=(4.2, 4.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(requested, read, s=12, alpha=0.7)
    low, high = min(requested.min(), read.min(), 0.0), max(requested.max(), read.max(), 100.0)
    axes.plot([low, high], [low, high], color="black", linewidth=1)
    axes.set_xlabel("requested EF (%)")
    axes.set_ylabel("EF read by the regressor (%)")
    stats = [f"R² {r2:.3f}" if r2 is not None else "", f"MAE {mae:.2f}" if mae is not None else ""]
    axes.set_title("EF faithfulness" + (": " + ", ".join(s for s in stats if s) if any(stats) else ""))
    return render(figure)


def hit_count_plot(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    """How often each training video is the best match, sorted in decreasing order (the long tail): the x-axis
    is the rank of the training video, the y-axis its number of hits; the share never hit is in the title."""
    counts = np.sort(_numpy(counts))[::-1]
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.bar(np.arange(len(counts)), counts, width=1.0)
    axes.set_xlabel("training videos, most matched first")
    axes.set_ylabel("times best match")
    never = float((counts == 0).mean()) if len(counts) else 0.0
    axes.set_title(f"hits per training video ({100 * never:.1f} % never matched)")
    return render(figure)


def image_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]]) -> np.ndarray:
    """Side-by-side pairs of uint8 frames ``(H, W)`` or ``(H, W, 3)`` — e.g. a synthetic frame and the training
    frame it matches — one row per pair, captioned."""
    rows = max(1, len(pairs))
    figure = Figure(figsize=(4.0, 2.0 * rows), dpi=100, layout="constrained")
    for row, (left, right, caption) in enumerate(pairs):
        for column, (frame, name) in enumerate(((left, "synthetic"), (right, "training"))):
            axes = figure.add_subplot(rows, 2, 2 * row + column + 1)
            axes.imshow(frame, cmap="gray" if frame.ndim == 2 else None, vmin=0, vmax=255)
            axes.set_axis_off()
            axes.set_title(f"{name}: {caption}" if column == 0 else name, fontsize="small")
    return render(figure)
