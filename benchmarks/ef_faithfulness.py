"""EF faithfulness of the video model — how EF enters the UNet, guidance, sampler and steps: one table that chooses
the defaults of configs/lvdm*.yaml and the pipelines' writer.

On the artifacts of a pipeline run (``configs/pipeline/phantom_study.yaml`` run at least through its anatomy stage:
real phantom data and its latent cache, the VAE, the EF regressor and the anatomy model), the benchmark

1. checks the instrument on ground truth: the run's EF regressor reads the real test split's 16-frame clips at
   12.5 fps (the protocol of generated videos) as pixels, and after the VAE round trip every generated video goes
   through (cached latents decoded and quantised to 8 bits) — the ceiling of any generator's faithfulness; and, as the
   test split's EFs are the run's phantom's (about normal(55, 12) unless its data stage passed ``--ef-range``)
   while requests are uniform over ``--ef-range``, on ``--ground-truth-patients`` fresh phantom patients (another
   seed, the default EF distribution) stratified to uniform over that range;
2. trains the video stage's model (``configs/lvdm.yaml`` + ``configs/lvdm_quickstart.yaml`` through ``echo-lvdm
   fit``) once per EF embedding — ``token`` (cross-attention, the SVD UNet's ``encoder_hidden_states``), ``time``
   (an added time id beside fps: SVD's ``added_time_ids``, added to every ResNet block's time embedding), ``both``,
   and, asked for by ``--embeddings``, ``time+film`` / ``both+film`` (that time embedding as a FiLM scale and shift
   of every ResNet block's normalised features, ``time_embedding_norm: scale_shift``) — for the same number of steps
   on the same data and seed;
3. samples fully synthetic videos as the synthetic dataset writer does — request i asks for EF uniform in
   ``--ef-range`` (``GenerationRequests``' draws), its reference frame is the anatomy model's sample at that EF — and
   reads them back with the regressor: R² and MAE of read against requested EF, one sample per request. First every
   embedding at each guidance scale (DDIM, ``--base-steps``); then, for the best embedding and guidance, DDIM,
   DPM-Solver++ and Euler at each of ``--steps`` (the lowest count whose R² is within 0.02 of that sampler's best is
   its default); then, labelled apart, best-of-N as EchoDiffusion reports it (N videos per request from other noise, on the same
   reference frame; the one whose read EF is closest to the request is kept — the instrument chooses, so it flatters).

Sampler steps are denoising steps; with guidance ≠ 1 each costs two UNet passes. Seconds per video are this
machine's wall time for sampling, decoding and reading one video (no timing assertion anywhere).

    echo-lvdm pipeline --config configs/pipeline/phantom_study.yaml --out study --stop-after anatomy
    python benchmarks/ef_faithfulness.py --run study                 # writes study/benchmarks/ef_faithfulness/
    python benchmarks/ef_faithfulness.py --run study --train-steps 600 --requests 64 --embeddings token time

Trained models are kept under ``OUT/train/<embedding>/``; a rerun with the same ``--train-steps`` reuses them.
``--objective flow_matching`` trains them with flow matching instead (``OUT/train/<embedding>-flow/``); a flow model
has no DDIM, so its grid runs on Euler and its sweep on Euler and DPM-Solver++ (so does ``--video-stage``'s).
``--video-stage`` measures the run's own video-stage model instead (a run through its video stage; its embedding
only, at its training length) — the guidance, sampler and best-of-N rows of the model the run ships:

    python benchmarks/ef_faithfulness.py --run study --video-stage --guidance 1 3 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# "+film": the time embedding that carries EF scales and shifts every ResNet block (time_embedding_norm: scale_shift)
EMBEDDINGS = ("token", "time", "both", "time+film", "both+film")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a pipeline run folder (through its anatomy stage)")
    parser.add_argument("--out", type=Path, help="default: RUN/benchmarks/ef_faithfulness (with --video-stage: "
                        "RUN/benchmarks/ef_faithfulness_video_stage)")
    parser.add_argument("--video-config", nargs="+", default=["configs/lvdm.yaml", "configs/lvdm_quickstart.yaml"])
    parser.add_argument("--train-steps", type=int, default=315,
                        help="video-model training steps per EF embedding (315: the study's video stage, 5 epochs of 63)")
    parser.add_argument("--embeddings", nargs="+", choices=EMBEDDINGS, default=["token", "time", "both"])
    parser.add_argument("--objective", choices=["diffusion", "flow_matching"], default="diffusion",
                        help="the trained models' objective (flow_matching: sampled with euler and dpm++ only)")
    parser.add_argument("--video-stage", action="store_true",
                        help="measure the run's own video-stage model (RUN/video/DONE.json) instead of training one "
                             "per embedding: guidance, samplers, steps and best-of-N at the run's training length")
    parser.add_argument("--requests", type=int, default=48, help="generated videos per configuration")
    parser.add_argument("--request-seed", type=int, default=0)
    parser.add_argument("--ef-range", type=float, nargs=2, default=[20.0, 85.0], metavar=("LOW", "HIGH"),
                        help="requested EF, uniform (default: the study's writer — the span of the phantom's "
                             "training EFs, 22–84 %%, where real videos exist to check the instrument on)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--base-steps", type=int, default=10, help="DDIM steps of the embedding × guidance grid")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm++", "euler"])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--best-of", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--ground-truth-patients", type=int, default=720,
                        help="fresh phantom patients (seed --ground-truth-seed; refused if it renders the run's "
                             "videos) read by the regressor, then stratified to uniform over --ef-range: its "
                             "ceiling on the requests' distribution (0: skip)")
    parser.add_argument("--ground-truth-seed", type=int, default=21)
    parser.add_argument("--per-bin", type=int, default=5, help="fresh videos kept per 5-point EF bin")
    parser.add_argument("--ef-size", type=int, default=48, help="frame size the EF regressor reads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- artifacts
def artifacts(run: Path) -> dict[str, str]:
    """What the benchmark reads from the run's DONE.json files (a clear error naming the missing stage)."""
    wanted = {"data": "root", "encode": "latent_dir", "export": "vae", "ef": "checkpoint", "anatomy": "checkpoint"}
    found = {}
    for stage, key in wanted.items():
        done = run / stage / "DONE.json"
        if not done.is_file():
            raise SystemExit(f"ef_faithfulness: {done} is missing: run the pipeline through its anatomy stage "
                             f"(echo-lvdm pipeline --config ... --out {run} --stop-after anatomy)")
        record = json.loads(done.read_text())
        found[stage] = record["artifacts"][key] if "artifacts" in record else record[key]
        if stage == "ef":
            found["ef_test"] = record.get("metrics", {})
    return found


def train(args: argparse.Namespace, found: dict, embedding: str) -> tuple[Path, float]:
    """The video model with ``embedding``, trained by ``echo-lvdm fit`` for ``--train-steps`` (kept and reused)."""
    folder = args.out / "train" / (embedding + ("-flow" if args.objective == "flow_matching" else ""))
    done = folder / "DONE.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record["train_steps"] == args.train_steps:
            return Path(record["checkpoint"]), record["seconds"]
    base, film = embedding.removesuffix("+film"), embedding.endswith("+film")
    overlay = {"model": {"init_args": {"ef_embedding": base, "objective": args.objective,
                                       "time_embedding_norm": "scale_shift" if film else "default"}},
               "trainer": {"default_root_dir": str(folder), "max_steps": args.train_steps, "max_epochs": -1,
                           "callbacks": [], "enable_progress_bar": False},
               "data": {"root": found["data"], "latent_dir": found["encode"], "num_workers": 0}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "benchmark.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    command = [sys.executable, "-m", "echo_lvdm", "fit",
               *sum((["--config", str(REPO / c)] for c in args.video_config), []),
               "--config", str(folder / "benchmark.yaml")]
    start = time.perf_counter()
    with open(folder / "fit.log", "w") as log:
        subprocess.run(command, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    checkpoint = max(folder.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    done.write_text(json.dumps({"checkpoint": str(checkpoint), "train_steps": args.train_steps,
                                "seconds": round(seconds, 1)}))
    return checkpoint, seconds


def video_stage(run: Path) -> tuple[str, str, tuple[Path, float], int]:
    """The run's video-stage model: its EF embedding, objective, (checkpoint, fit seconds), optimizer steps."""
    from lightning_modules.checkpoints import check_checkpoint_file

    done = run / "video" / "DONE.json"
    if not done.is_file():
        raise SystemExit(f"ef_faithfulness: --video-stage: {done} is missing: run the pipeline through its video stage")
    record = json.loads(done.read_text())
    checkpoint = check_checkpoint_file(record["checkpoint"])
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    embedding = saved["hyper_parameters"].get("ef_embedding", "token")
    embedding += "+film" if saved["hyper_parameters"].get("time_embedding_norm") == "scale_shift" else ""
    objective = saved["hyper_parameters"].get("objective", "diffusion")
    seconds = float(record.get("fit_seconds", record["seconds"]))
    return embedding, objective, (checkpoint, seconds), int(saved["global_step"])


# -------------------------------------------------------------------------------------------------- measuring
def r2_mae(read: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    residual = ((read - target) ** 2).sum()
    total = ((target - target.mean()) ** 2).sum()
    return float(1.0 - residual / total), float(np.abs(read - target).mean())


class Instrument:
    """The run's EF regressor reading videos as the coverage callback and ``evaluate`` read generated ones."""

    def __init__(self, found: dict, ef_size: int) -> None:
        from lightning_modules.checkpoints import load_module
        from lightning_modules.ef_regressor import EFRegressorModule
        from lightning_modules.vae_utils import load_frozen_vae

        self.vae = load_frozen_vae(found["export"])
        self.regressor = load_module(EFRegressorModule, found["ef"]).eval()
        self.ef_size = ef_size

    def as_written(self, latents: torch.Tensor) -> torch.Tensor:
        from lightning_modules.vae_utils import decode_as_written

        return decode_as_written(self.vae, latents)

    def read(self, pixels: torch.Tensor) -> np.ndarray:
        return self.regressor.read_ef(pixels, self.ef_size).numpy()


def read_test_split(instrument: Instrument, frames: int, fps: float, space: str = "pixel", transform=None,
                    **data: str) -> tuple[np.ndarray, np.ndarray]:
    """EF read from, and the FileList EF of, every test video's clip (``space="latent"``: through the VAE round trip;
    ``transform``: applied to the pixels before they are read); ``data``: the EchoNetDataModule's ``root`` and
    ``latent_dir``."""
    from datamodules import EchoNetDataModule

    module = EchoNetDataModule(space=space, sampling="clip", clip_length=frames, fps=fps, batch_size=16, num_workers=0,
                               **({"latent_posterior": "mean"} if space == "latent" else {}), **data)
    module.setup("test")
    read, target = [], []
    for batch in module.test_dataloader():
        video = batch["video"] if space == "pixel" else instrument.as_written(batch["video"])
        read.append(instrument.read(video if transform is None else transform(video)))
        target.append(batch["ef"].float().numpy())
    return np.concatenate(read), np.concatenate(target)


def ground_truth(found: dict, instrument: Instrument, frames: int, fps: float) -> list[dict]:
    """The regressor on the real test split's clips: as pixels, and after the VAE round trip."""
    rows = []
    for space in ("pixel", "latent"):
        read, target = read_test_split(instrument, frames, fps, space, root=found["data"], latent_dir=found["encode"])
        r2, mae = r2_mae(read, target)
        rows.append({"what": "real test clips" + (" after the VAE round trip" if space == "latent" else ""),
                     "videos": len(target), "r2": r2, "mae": mae})
    return rows


def request_range_truth(args: argparse.Namespace, found: dict, instrument: Instrument, fps: float) -> list[dict]:
    """The regressor on fresh phantom patients, all of them and stratified to uniform over ``--ef-range`` (up to
    ``--per-bin`` per 5-point bin): the instrument checked on the distribution the requests come from. The run's
    test split holds its phantom's EFs (about normal(55, 12) by default), too few near the range's ends to check
    them."""
    import csv

    from datamodules.phantom.generate import generate_phantom

    if args.ground_truth_patients < 1:
        return []
    with open(Path(found["data"]) / "FileList.csv", newline="") as handle:
        run_rows = list(csv.DictReader(handle))
    root = args.out / f"ground_truth_phantom_{args.ground_truth_seed}_{args.ground_truth_patients}"
    if not (root / "FileList.csv").is_file():
        frames = [int(row["NumberOfFrames"]) for row in run_rows]
        rates = [float(row["FPS"]) for row in run_rows]
        generate_phantom(root, patients=args.ground_truth_patients, videos_per_patient=1, seed=args.ground_truth_seed,
                         fps=(min(rates), max(rates)), frames=(min(frames), max(frames)),
                         split_fractions=(0.0, 0.0, 1.0), workers=2, overwrite=True)
    with open(root / "FileList.csv", newline="") as handle:
        fresh = {row["FileName"] for row in csv.DictReader(handle)}
    if fresh & {row["FileName"] for row in run_rows}:
        raise SystemExit(f"ef_faithfulness: --ground-truth-seed {args.ground_truth_seed} renders videos of the run's "
                         "phantom (the same file names): choose another seed")
    read, target = read_test_split(instrument, args.frames, fps, root=str(root))
    low, high = args.ef_range
    rng = np.random.default_rng(0)
    bins = [np.flatnonzero((target >= lo) & (target < min(lo + 5.0, high))) for lo in np.arange(low, high, 5.0)]
    picks = [rng.choice(members, min(args.per_bin, len(members)), replace=False) for members in bins if len(members)]
    kept = np.concatenate(picks)
    rows = []
    for what, chosen in ((f"{len(target)} fresh phantom patients (seed {args.ground_truth_seed})", slice(None)),
                         (f"the same, stratified uniform over {low:g}–{high:g} % (≤ {args.per_bin} per 5-point "
                          f"bin, {len(picks)} bins)", kept)):
        r2, mae = r2_mae(read[chosen], target[chosen])
        rows.append({"what": what, "videos": int(len(target[chosen])), "r2": r2, "mae": mae})
    return rows


class Requests:
    """Request i: EF and noise seed of ``GenerationRequests`` (uniform in ``ef_range``), its anatomy reference frame."""

    def __init__(self, count: int, seed: int, anatomy, ef_range: tuple[float, float] = (20.0, 85.0)) -> None:
        from datamodules import GenerationRequests
        from lightning_modules.diffusion_sampling import anatomy_references

        requests = GenerationRequests(attempts=count, distribution="uniform", ef_range=tuple(ef_range), seed=seed)
        self.ef = torch.tensor([requests.ef(i) for i in range(count)])
        self.seeds = [requests.noise_seed(i) for i in range(count)]
        with torch.no_grad():
            self.reference = anatomy_references(anatomy, self.ef, self.seeds)


def sample_and_read(model, requests: Requests, instrument: Instrument, args: argparse.Namespace, sampler: str,
                    steps: int, guidance: float, draw: int = 0) -> tuple[np.ndarray, float]:
    """EF read from one video per request (noise seed + ``draw``), and the seconds per video."""
    read = []
    start = time.perf_counter()
    for lo in range(0, len(requests.ef), args.batch_size):
        rows = slice(lo, lo + args.batch_size)
        generators = [torch.Generator().manual_seed((seed + draw * 1_000_003) % 2**62) for seed in requests.seeds[rows]]
        with torch.no_grad():
            latents = model.sample(ef=requests.ef[rows], reference=requests.reference[rows], num_frames=args.frames,
                                   steps=steps, scheduler=sampler, guidance_scale=guidance, generator=generators)
            read.append(instrument.read(instrument.as_written(latents)))
    return np.concatenate(read), (time.perf_counter() - start) / len(requests.ef)


# ------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run = args.run.resolve()
    default = "ef_faithfulness_video_stage" if args.video_stage else "ef_faithfulness"  # rows of other models
    args.out = (args.out or args.run / "benchmarks" / default).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    found = artifacts(args.run)

    from lightning_modules.diffusion import load_diffusion

    if args.video_stage:
        embedding, args.objective, model, args.train_steps = video_stage(args.run)
        args.embeddings, trained = [embedding], {embedding: model}
    else:
        trained = {embedding: train(args, found, embedding) for embedding in args.embeddings}
    instrument = Instrument(found, args.ef_size)
    models = {embedding: load_diffusion(checkpoint, mode="video").eval()
              for embedding, (checkpoint, _) in trained.items()}
    fps = float(next(iter(models.values())).train_fps)
    truth = ground_truth(found, instrument, args.frames, fps) + request_range_truth(args, found, instrument, fps)
    requests = Requests(args.requests, args.request_seed, load_diffusion(found["anatomy"], mode="image").eval(),
                        args.ef_range)
    target = requests.ef.numpy()
    # A flow-matching model has no DDIM: its grid runs on Euler, and its sweep on the flow samplers.
    flow = args.objective == "flow_matching"
    base_sampler, samplers = ("euler", [s for s in args.samplers if s in ("euler", "dpm++")]) if flow else \
        ("ddim", args.samplers)

    results: list[dict] = []
    # Measured rows are kept (OUT/rows.jsonl, keyed by everything that determines them): a rerun measures only
    # what is new.
    cache_path = args.out / "rows.jsonl"
    cache = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            row = json.loads(line)
            cache[row["key"]] = row

    def measure(embedding: str, sampler: str, steps: int, guidance: float, stage: str) -> dict:
        key = json.dumps([args.train_steps, args.requests, args.request_seed, args.frames, embedding, sampler, steps,
                          guidance, *args.ef_range] + (["flow_matching"] if flow else []))
        if key in cache:
            row = dict(cache[key], stage=stage)
        else:
            read, seconds = sample_and_read(models[embedding], requests, instrument, args, sampler, steps, guidance)
            r2, mae = r2_mae(read, target)
            row = {"key": key, "stage": stage, "embedding": embedding, "guidance": guidance, "sampler": sampler,
                   "steps": steps, "r2": r2, "mae": mae, "seconds_per_video": seconds}
            with open(cache_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        results.append(row)
        print(f"  {stage}: {embedding:5s} g={guidance:g} {sampler:5s} {steps:2d} steps  R² {row['r2']:6.3f}  "
              f"MAE {row['mae']:5.2f}  {row['seconds_per_video']:.2f} s/video{' (measured earlier)' * (key in cache)}",
              flush=True)
        return row

    print("grid 1: EF embedding × guidance", flush=True)
    grid = [measure(e, base_sampler, args.base_steps, g, "embedding × guidance") for e in args.embeddings
            for g in args.guidance]
    best = max(grid, key=lambda row: row["r2"])
    print(f"grid 2: samplers × steps ({best['embedding']}, guidance {best['guidance']:g})", flush=True)
    chosen_steps = {}
    for sampler in samplers:
        rows = [measure(best["embedding"], sampler, s, best["guidance"], "sampler × steps") for s in args.steps]
        top = max(row["r2"] for row in rows)
        chosen_steps[sampler] = min(row["steps"] for row in rows if row["r2"] >= top - 0.02)
    sweep = [row for row in results if row["stage"] == "sampler × steps"]
    winner = max(sweep, key=lambda row: (round(row["r2"], 2), -row["steps"]))  # the best R², then the fewest steps
    sampler = winner["sampler"]
    steps = chosen_steps[sampler]
    print(f"best-of-{args.best_of}: {best['embedding']}, guidance {best['guidance']:g}, {sampler} {steps} steps",
          flush=True)
    draws = [sample_and_read(models[best["embedding"]], requests, instrument, args, sampler, steps, best["guidance"],
                             draw)[0] for draw in range(args.best_of)]
    draws = np.stack(draws)
    kept = draws[np.abs(draws - target).argmin(axis=0), np.arange(len(target))]
    single = r2_mae(draws[0], target)
    best_of = r2_mae(kept, target)
    spread = [r2_mae(d, target)[0] for d in draws]

    report = {
        "run": str(args.run), "objective": args.objective, "train_steps": args.train_steps, "requests": args.requests,
        "ef_range": args.ef_range,
        "ef_regressor_test": found["ef_test"], "ground_truth": truth,
        "training_seconds": {e: round(s, 1) for e, (_, s) in trained.items()},
        "results": results,
        "best_of": {"n": args.best_of, "embedding": best["embedding"], "guidance": best["guidance"],
                    "sampler": sampler, "steps": steps, "single_r2": single[0], "single_mae": single[1],
                    "single_r2_per_draw": spread, "best_of_r2": best_of[0], "best_of_mae": best_of[1]},
        "chosen": {"ef_embedding": best["embedding"], "guidance_scale": best["guidance"], "sampler": sampler,
                   "steps": steps, "steps_per_sampler": chosen_steps},
    }
    write_atomic(args.out / "results.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_atomic(args.out / "table.md", table)
    print(table)


def markdown(report: dict) -> str:
    low, high = report.get("ef_range", (10.0, 90.0))
    lines = [f"EF faithfulness, {report['requests']} requests (EF uniform {low:g}–{high:g} %, anatomy reference "
             "frames), "
             f"video models trained {report['train_steps']} steps ({', '.join(f'{e}: {s:.0f} s' for e, s in report['training_seconds'].items())})",
             "", "| instrument on ground truth | videos | R² | MAE |", "|---|---|---|---|"]
    lines += [f"| {row['what']} | {row['videos']} | {row['r2']:.3f} | {row['mae']:.2f} |" for row in report["ground_truth"]]
    lines += ["", "| stage | EF embedding | guidance | sampler | steps | R² (one sample) | MAE | s / video |",
              "|---|---|---|---|---|---|---|---|"]
    flow = " (flow matching)" if report.get("objective") == "flow_matching" else ""
    lines += [f"| {r['stage']} | {r['embedding']}{flow} | {r['guidance']:g} | {r['sampler']} | {r['steps']} | "
              f"{r['r2']:.3f} | "
              f"{r['mae']:.2f} | {r['seconds_per_video']:.2f} |" for r in report["results"]]
    b = report["best_of"]
    lines += ["", f"best-of-{b['n']} (EchoDiffusion's protocol; the regressor picks, so it flatters): {b['embedding']}, "
              f"guidance {b['guidance']:g}, {b['sampler']} {b['steps']} steps: R² {b['best_of_r2']:.3f}, MAE "
              f"{b['best_of_mae']:.2f}; one sample per request: R² {b['single_r2']:.3f} (draws: "
              f"{', '.join(f'{x:.3f}' for x in b['single_r2_per_draw'])}), MAE {b['single_mae']:.2f}"]
    c = report["chosen"]
    lines += ["", f"chosen: ef_embedding {c['ef_embedding']}, guidance {c['guidance_scale']:g}, {c['sampler']} "
              f"{c['steps']} steps (fewest steps within 0.02 R² of each sampler's best: {c['steps_per_sampler']})"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


if __name__ == "__main__":
    main()
