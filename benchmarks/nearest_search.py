"""Exact best-match search under the re-ID head: chunked search vs the naive all-pairs head evaluation.

Default: 100,000 query embeddings against a bank of 7,465 (EchoNet-Dynamic's training videos), 128-d. The naive way
materialises |q − r| for every pair and applies the head; for all 100 k queries at once that is 382 GB, so it is timed
on a slice of queries (all at once, the naive way) and extrapolated linearly, its peak memory measured on that slice
and scaled to the full run. Both run in fresh processes so each peak RSS is its own. One run, prints the ratios.

    python benchmarks/nearest_search.py [--queries 100000] [--bank 7465] [--dim 128] [--naive-queries 256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

_CHECKED = 64  # leading queries both methods must agree on


def _inputs(queries: int, bank: int, dim: int):
    """The same bank, head and leading queries whatever ``queries`` is (separate generators)."""
    import torch

    def rand(seed: int, *shape: int):
        return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))

    leading = min(queries, _CHECKED)
    q = torch.cat([rand(1, leading, dim), rand(2, queries - leading, dim)])
    return q, rand(3, bank, dim), rand(4, dim) * 2 - 1, rand(5, 1)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_chunked(queries: int, bank: int, dim: int, result) -> None:
    from lightning_modules.reid_search import max_scores

    q, r, w, b = _inputs(queries, bank, dim)
    baseline = _peak_mib()
    start = time.perf_counter()
    values, indices = max_scores(q, r, w, b)
    result.put((time.perf_counter() - start, _peak_mib() - baseline, values[:_CHECKED].tolist(), indices[:_CHECKED].tolist()))


def run_naive(queries: int, bank: int, dim: int, result) -> None:
    q, r, w, b = _inputs(queries, bank, dim)
    baseline = _peak_mib()
    start = time.perf_counter()
    scores = (q[:, None, :] - r[None]).abs() @ w + b  # every pair at once
    values, indices = scores.max(dim=1)
    result.put((time.perf_counter() - start, _peak_mib() - baseline, values[:_CHECKED].tolist(), indices[:_CHECKED].tolist()))


def in_fresh_process(target, *args):
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    process = context.Process(target=target, args=(*args, result))
    process.start()
    output = result.get()
    process.join()
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--bank", type=int, default=7_465)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--naive-queries", type=int, default=256, help="queries the naive evaluation really runs")
    args = parser.parse_args()

    chunked_s, chunked_mib, values, indices = in_fresh_process(run_chunked, args.queries, args.bank, args.dim)
    naive_s, naive_mib, naive_values, naive_indices = in_fresh_process(run_naive, args.naive_queries, args.bank,
                                                                       args.dim)
    checked = min(_CHECKED, args.naive_queries)
    assert indices[:checked] == naive_indices[:checked], "the two searches disagree"
    scale = args.queries / args.naive_queries
    print(f"{args.queries:,} queries × {args.bank:,} bank × {args.dim}-d, exact head scores")
    print(f"chunked search (reid_search.max_scores):      {chunked_s:8.1f} s, peak +{chunked_mib:,.0f} MiB")
    print(f"naive all pairs, {args.naive_queries} queries measured:            {naive_s:8.1f} s, "
          f"peak +{naive_mib:,.0f} MiB")
    print(f"naive all pairs, extrapolated to {args.queries:,} queries: {naive_s * scale:8.1f} s, "
          f"peak +{naive_mib * scale / 1024:,.0f} GiB")
    memory_ratio = naive_mib * scale / max(chunked_mib, 1)
    print(f"ratio: {naive_s * scale / chunked_s:.1f}x faster, {memory_ratio:,.0f}x less memory")


if __name__ == "__main__":
    main()
