"""Evaluation time and peak memory of the coverage metrics as the synthetic set grows, against a fixed training bank.

For each size S (default 1 k → 100 k synthetic videos against 7,465 training videos, EchoNet-Dynamic's training
split, 128-d embeddings), a fresh process times the evaluation a user runs: the exact best-match search under the
re-ID head (``ReIDModule.video_search`` → ``reid_search.max_scores``), ``CoverageMetric`` (coverage, memorisation
rate) with ``hit_counts``, and ``EmbeddingDistributionMetrics`` (density, PRDC coverage, Fréchet distance). Peak RSS
is measured above a baseline taken once the inputs exist. Prints one line per size with the breakdown, then the
growth ratios and log-log slopes (1 = linear, 2 = quadratic) between the smallest and largest size, same run.
Density and coverage need only the training set's k-NN radii (computed once per metric) and the S × R distances; the
S × S distances PRDC's recall needs are not computed (recall is not reported), which kept 100 k at ~11 minutes.

    python benchmarks/coverage_scaling.py [--sizes 1000 3000 10000 30000 100000] [--bank 7465] [--dim 128]
                                          [--frames 1] [--k 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from types import SimpleNamespace

from nearest_search import in_fresh_process  # benchmarks/ is on sys.path when a script here runs

_PHASES = ("search", "coverage", "prdc_fd")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_size(size: int, bank_size: int, dim: int, frames: int, k: int, threads: int, result) -> None:
    """Time one evaluation of ``size`` synthetic videos; puts ``({phase: seconds}, peak MiB above baseline)``."""
    import torch

    from lightning_modules.metrics.functional import hit_counts
    from lightning_modules.metrics.coverage import CoverageMetric, EmbeddingDistributionMetrics
    from lightning_modules.reid import ReIDModule
    from lightning_modules.reid_search import max_scores

    torch.set_num_threads(threads)

    def rand(seed: int, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))

    synthetic, bank = rand(1, size, frames, dim), rand(2, bank_size, frames, dim)  # sigmoid outputs: in (0, 1)
    weight, bias = rand(3, dim) * 2 - 1, rand(4, 1)
    model = SimpleNamespace(search=lambda queries, rows: max_scores(queries, rows, weight, bias))
    index = torch.arange(size)
    baseline = _peak_mib()

    seconds = {}
    start = time.perf_counter()
    score, match = ReIDModule.video_search(model, synthetic, bank)
    seconds["search"] = time.perf_counter() - start

    start = time.perf_counter()
    coverage = CoverageMetric(bank_size, tau=float(bias))  # any τ: the cost does not depend on it
    coverage.update(index, score=score, match=match)
    coverage.compute()
    hit_counts(match, bank_size)
    seconds["coverage"] = time.perf_counter() - start

    start = time.perf_counter()
    distribution = EmbeddingDistributionMetrics(reference=bank.mean(dim=1), k=k)  # one embedding per video
    distribution.update(index, embedding=synthetic.mean(dim=1))
    distribution.compute()
    seconds["prdc_fd"] = time.perf_counter() - start
    result.put((seconds, _peak_mib() - baseline))


def loglog_slope(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    x = [math.log(s) for s in sizes]
    y = [math.log(max(v, 1e-9)) for v in values]
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sum((a - mean_x) ** 2 for a in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 3_000, 10_000, 30_000, 100_000],
                        help="synthetic videos per measurement")
    parser.add_argument("--bank", type=int, default=7_465, help="training videos")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--frames", type=int, default=1, help="frame embeddings per video; the search is over frames")
    parser.add_argument("--k", type=int, default=5, help="neighbours of density and coverage")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a machine shared with jobs)")
    args = parser.parse_args()
    sizes = sorted(args.sizes)

    print(f"synthetic videos vs {args.bank:,} training videos × {args.frames} frame(s), {args.dim}-d, "
          f"{args.threads} thread(s)")
    print(f"{'size':>9} {'total s':>9} {'search s':>9} {'coverage s':>11} {'PRDC+FD s':>10} {'peak MiB':>9}")
    totals, peaks, phases = [], [], {phase: [] for phase in _PHASES}
    for size in sizes:
        seconds, peak = in_fresh_process(run_size, size, args.bank, args.dim, args.frames, args.k, args.threads)
        totals.append(sum(seconds.values()))
        peaks.append(peak)
        for phase in _PHASES:
            phases[phase].append(seconds[phase])
        print(f"{size:>9,} {totals[-1]:>9.2f} {seconds['search']:>9.2f} {seconds['coverage']:>11.3f} "
              f"{seconds['prdc_fd']:>10.2f} {peak:>+9.0f}", flush=True)

    if len(sizes) < 2:
        return
    size_ratio = sizes[-1] / sizes[0]
    growth = f"for {size_ratio:.3g}× more samples (linear: {size_ratio:.3g}×)"
    print(f"\n{sizes[0]:,} → {sizes[-1]:,} synthetic videos; log-log slope 1 = linear, 2 = quadratic")
    for name, values in (("total time", totals), *((f"  {phase} time", phases[phase]) for phase in _PHASES)):
        print(f"{name:<16} grew {values[-1] / values[0]:>7,.1f}× {growth}, "
              f"log-log slope {loglog_slope(sizes, values):.2f}")
    print(f"{'peak memory':<16} grew {max(peaks[-1], 1) / max(peaks[0], 1):>7,.1f}× {growth} "
          f"({peaks[0]:+,.0f} → {peaks[-1]:+,.0f} MiB above baseline), "
          f"log-log slope {loglog_slope(sizes, [max(p, 1) for p in peaks]):.2f}")
    prdc_slope = loglog_slope(sizes[-2:], phases["prdc_fd"][-2:])
    if prdc_slope > 1.5:
        print(f"note: PRDC+FD grows with slope {prdc_slope:.2f} between the two largest sizes (quadratic)")


if __name__ == "__main__":
    main()
