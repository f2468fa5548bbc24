"""Where a video model's EF error comes from: bias by requested EF, the anatomy reference frame, the sampling noise —
and what the instrument reads when nothing moves.

``benchmarks/ef_faithfulness.py`` scores a model by one number, R² of read against requested EF over one sample per
request. This benchmark splits that error on a run's own video-stage model (a pipeline run through its video stage),
sampled as the writer samples:

1. **A balanced grid.** ``--efs`` requested EFs evenly over ``--ef-range``; at each, ``--references`` anatomy-model
   reference frames made at that EF (as the writer makes them); on each, ``--draws`` videos from other noise. Every
   video is decoded, quantised to 8 bits and read by the run's EF regressor. The mean squared error splits exactly
   into three parts (population variances, so they add up):

   - *bias*: mean over EFs of (mean read − requested)²;
   - *reference*: mean over EFs of the variance, over references, of each reference's mean read;
   - *draw*: mean over references of the variance of its draws' reads.

   Also: R² of each draw (one sample per grid cell, the protocol of faithfulness), the share of videos more than
   ``--outlier`` EF points off, and how often such an outlier recurs on another draw of the same reference.
2. **A reference swap.** ``--swap`` requests whose reference frame is the anatomy model's at one EF (uniform over the
   range) and whose requested EF is another, drawn independently: least squares ``read = α·requested + β·reference
   EF + c``. α near 1 and β near 0: the video follows the request, not its reference frame.
3. **The instrument's floor.** The real test split's clips through the VAE round trip, once as they are and once with
   their first frame repeated (a heart that does not move). A regressor trained on the phantom's EFs cannot read
   below what it gives the motionless clip, so requests under that floor read high whatever the generator does.

    python benchmarks/ef_error_sources.py --run study          # writes study/benchmarks/ef_error_sources/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import ef_faithfulness as faithfulness  # noqa: E402  (the run's artifacts, instrument and R²)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a pipeline run folder (through its video stage)")
    parser.add_argument("--out", type=Path, help="default: RUN/benchmarks/ef_error_sources")
    parser.add_argument("--ef-range", type=float, nargs=2, default=[20.0, 85.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--efs", type=int, default=14, help="requested EFs, evenly over --ef-range")
    parser.add_argument("--references", type=int, default=4, help="anatomy reference frames per requested EF")
    parser.add_argument("--draws", type=int, default=3, help="videos per reference frame, from other noise")
    parser.add_argument("--swap", type=int, default=64, help="requests of the reference swap (0: skip)")
    parser.add_argument("--outlier", type=float, default=10.0, help="EF points off that count as an outlier")
    parser.add_argument("--sampler", default="dpm++")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--ef-size", type=int, default=48, help="frame size the EF regressor reads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seeds the reference frames and the videos' noise")
    return parser.parse_args(argv)


def error_sources(reads: np.ndarray, requested: np.ndarray, outlier: float = 10.0) -> dict:
    """Split the squared error of ``reads`` ``(E, R, N)`` (E requested EFs ``requested`` ``(E,)``, R references, N
    draws) into bias, reference and draw parts that add up to the mean squared error, with R² per draw and outliers."""
    error = reads - requested[:, None, None]
    per_reference = reads.mean(axis=2)
    parts = {"mse": float((error ** 2).mean()),
             "bias": float((error.mean(axis=(1, 2)) ** 2).mean()),
             "reference": float(per_reference.var(axis=1).mean()),
             "draw": float(reads.var(axis=2).mean())}
    target = np.repeat(requested, reads.shape[1])
    r2_per_draw = [faithfulness.r2_mae(reads[:, :, d].ravel(), target)[0] for d in range(reads.shape[2])]
    off = np.abs(error) > outlier
    cells = off.any(axis=2)
    return {**parts, "r2_per_draw": r2_per_draw, "outliers": float(off.mean()),
            "outlier_cells_recurring": float((off.sum(axis=2)[cells] >= 2).mean()) if cells.any() else 0.0}


def reference_swap(read: np.ndarray, requested: np.ndarray, reference_ef: np.ndarray) -> dict:
    """Least squares ``read = α·requested + β·reference_ef + c``."""
    design = np.stack([requested, reference_ef, np.ones_like(requested)], axis=1)
    (alpha, beta, intercept), *_ = np.linalg.lstsq(design, read, rcond=None)
    return {"alpha": float(alpha), "beta": float(beta), "intercept": float(intercept),
            "r2_against_requested": faithfulness.r2_mae(read, requested)[0]}


def read_requests(model, instrument, ef: torch.Tensor, reference: torch.Tensor, seeds: list[int],
                  args: argparse.Namespace) -> np.ndarray:
    """EF read from one video per request (``ef``, ``reference``, noise ``seeds``), sampled as configured."""
    requests = argparse.Namespace(ef=ef, reference=reference, seeds=seeds)
    return faithfulness.sample_and_read(model, requests, instrument, args, args.sampler, args.steps, args.guidance)[0]


def instrument_floor(found: dict, instrument, frames: int, fps: float) -> dict:
    """The regressor on the real test split's clips through the VAE round trip, as they are and motionless."""
    data = {"root": found["data"], "latent_dir": found["encode"]}
    moving, target = faithfulness.read_test_split(instrument, frames, fps, space="latent", **data)
    still, _ = faithfulness.read_test_split(instrument, frames, fps, space="latent",
                                            transform=lambda pixels: pixels[:, :1].expand_as(pixels).contiguous(),
                                            **data)
    r2, mae = faithfulness.r2_mae(moving, target)
    return {"videos": len(target), "r2": r2, "mae": mae, "lowest_ef": float(target.min()),
            "motionless_mean": float(still.mean()), "motionless_sd": float(still.std())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run = args.run.resolve()
    args.out = (args.out or args.run / "benchmarks" / "ef_error_sources").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from lightning_modules.diffusion import load_diffusion
    from lightning_modules.diffusion_sampling import anatomy_references

    found = faithfulness.artifacts(args.run)
    embedding, objective, (checkpoint, _), train_steps = faithfulness.video_stage(args.run)
    model = load_diffusion(checkpoint, mode="video").eval()
    anatomy = load_diffusion(found["anatomy"], mode="image").eval()
    instrument = faithfulness.Instrument(found, args.ef_size)
    floor = instrument_floor(found, instrument, args.frames, float(model.train_fps))
    print(f"instrument: real test clips through the VAE R² {floor['r2']:.3f}; motionless clips read "
          f"{floor['motionless_mean']:.1f} ± {floor['motionless_sd']:.1f}", flush=True)

    requested = np.linspace(*args.ef_range, args.efs)
    cell_ef = torch.tensor(np.repeat(requested, args.references), dtype=torch.float32)
    base = args.seed * 1_000_003
    with torch.no_grad():
        references = anatomy_references(anatomy, cell_ef, [base + i for i in range(len(cell_ef))])
    draws = [read_requests(model, instrument, cell_ef, references,
                             [base + 7919 * (d + 1) + i for i in range(len(cell_ef))], args) for d in range(args.draws)]
    reads = np.stack(draws, axis=1).reshape(args.efs, args.references, args.draws)
    sources = error_sources(reads, requested, args.outlier)
    print(f"grid: R² per draw {', '.join(f'{r:.3f}' for r in sources['r2_per_draw'])}; squared error "
          f"{sources['mse']:.1f} = bias {sources['bias']:.1f} + reference {sources['reference']:.1f} + draw "
          f"{sources['draw']:.1f}", flush=True)

    swap = None
    if args.swap:
        rng = np.random.default_rng(args.seed)
        reference_ef, swap_ef = (torch.tensor(rng.uniform(*args.ef_range, args.swap), dtype=torch.float32)
                                 for _ in range(2))
        seeds = [base + 500_000 + i for i in range(args.swap)]
        with torch.no_grad():
            swap_references = anatomy_references(anatomy, reference_ef, seeds)
        swap = reference_swap(read_requests(model, instrument, swap_ef, swap_references, seeds, args),
                              swap_ef.numpy(), reference_ef.numpy())

    report = {"run": str(args.run), "embedding": embedding, "objective": objective, "train_steps": train_steps,
              "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "instrument": floor,
              "requested": requested.tolist(), "reads": reads.tolist(), "sources": sources, "swap": swap}
    faithfulness.write_atomic(args.out / "results.json", json.dumps(report, indent=2))
    table = markdown(report)
    faithfulness.write_atomic(args.out / "table.md", table)
    print(table)


def markdown(report: dict) -> str:
    s, reads, requested = report["sources"], np.array(report["reads"]), np.array(report["requested"])
    f = report["instrument"]
    lines = [f"EF error sources of {report['run']}'s video model ({report['train_steps']} steps), {report['sampler']} "
             f"{report['steps']} steps, guidance {report['guidance']:g}; grid of {reads.shape[0]} EFs × "
             f"{reads.shape[1]} references × {reads.shape[2]} draws", "",
             f"instrument: real test clips through the VAE R² {f['r2']:.3f} / MAE {f['mae']:.2f} ({f['videos']} videos, "
             f"lowest EF {f['lowest_ef']:.1f}); the same clips motionless read {f['motionless_mean']:.1f} ± "
             f"{f['motionless_sd']:.1f}", "",
             "| requested EF | mean read | bias | sd between references | sd between draws |", "|---|---|---|---|---|"]
    for ef, cell in zip(requested, reads):
        lines.append(f"| {ef:.1f} | {cell.mean():.1f} | {cell.mean() - ef:+.1f} | {cell.mean(axis=1).std():.1f} | "
                     f"{np.sqrt(cell.var(axis=1).mean()):.1f} |")
    share = {k: s[k] / s["mse"] for k in ("bias", "reference", "draw")}
    lines += ["", f"squared error {s['mse']:.1f} = bias {s['bias']:.1f} ({share['bias']:.0%}) + reference "
              f"{s['reference']:.1f} ({share['reference']:.0%}) + draw {s['draw']:.1f} ({share['draw']:.0%}); R² per "
              f"draw {', '.join(f'{r:.3f}' for r in s['r2_per_draw'])}; outliers {s['outliers']:.1%} of videos, "
              f"recurring on another draw of the same reference in {s['outlier_cells_recurring']:.0%} of their cells"]
    if report["swap"]:
        w = report["swap"]
        lines += ["", f"reference swap: read = {w['alpha']:.2f} · requested + {w['beta']:.2f} · reference EF + "
                  f"{w['intercept']:.1f} (R² against requested {w['r2_against_requested']:.3f})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
