"""Joint image-and-video sampling (JVID) against the video model alone, on the models of one pipeline run.

Takes the folder ``echo-lvdm pipeline --config configs/pipeline/quickstart.yaml --out RUN`` wrote (its video and
anatomy models, re-ID model, VAE, EF regressor, phantom and latent cache) and samples the same requests — uniform EF
10–90 and noise seeds of ``GenerationRequests(seed=--request-seed)``, each on its anatomy reference frame, as
``generate`` makes them — once per schedule: the video model alone, the anatomy model taking some steps (JVID), and
the anatomy model taking all of them (every frame on its own). Each schedule's videos are measured as a written
dataset is: decoded by the VAE, quantised to 8 bits, encoded again for the re-ID model. Real TEST videos (new
patients), measured the same way, give each column its ground truth.

Columns:

* **FD frames**, **density** — per-frame quality: Fréchet distance and density (Naeem et al. 2020, k = 5) of the
  frames' re-ID embeddings against the TRAIN videos' frames (16-frame clips at the generator's 12.5 fps); a training
  frame's ball reaches its 5th nearest frame of another video (its own video's frames would fill it).
* **round trip dB** — VAE-space plausibility: PSNR of the decoded frames against their decode → encode → decode.
* **sharpness** — mean |Laplacian| of the decoded frames, relative to the decoded real TEST latents (1 = as sharp).
* **flicker** — mean |x(t+1) − 2 x(t) + x(t−1)| of the decoded frames (jitter, not motion), relative to real.
* **temporal id** — re-ID similarity of frame 0 with the later frames (sigmoid of the head; 1 = one patient).
* **EF R² / MAE** — EF read back by the pipeline's regressor from the decoded videos against the requested EF; the
  real row reads decoded TEST latents against their labels (the instrument's own accuracy through the same VAE).
* **identity** — re-ID similarity of each video's frames with its reference frame (real: with the video's frame 0;
  "another video" row: with another TEST video's frame 0).
* **s / video** — sampling time per video (decoding excluded), and its ratio to the video model alone, same run.

    python benchmarks/joint_sampling.py --run RUN [--num-videos 36] [--request-seed 0] [--steps 10] [--sampler ddim]
                                        [--guidance-scale 3] [--threads 2] [--out table.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCHEDULES = [None, "every=5", "every=2", "start=0.3", "end=0.3", "probability=0.3,seed=0",
             "every=2,guidance_scale=3", "every=1"]


def run_paths(run: Path) -> dict[str, Path]:
    paths = {"video": run / "video", "anatomy": run / "anatomy", "reid": run / "reid", "ef": run / "ef"}
    found = {name: folder / "version_0" / "checkpoints" / "last.ckpt" for name, folder in paths.items()}
    found.update(vae=run / "export" / "vae", data=run / "data", latents=run / "latents")
    missing = [str(path) for path in found.values() if not path.exists()]
    if missing:
        raise SystemExit(f"{run} is not a finished pipeline run: missing {', '.join(missing)}")
    return found


def real_clips(paths: dict[str, Path], split: str, frames: int, fps: float):
    """Latent clips of ``frames`` frames at ``fps`` from the start of each video of ``split`` (posterior mean, scaled)
    and their EFs."""
    import torch

    from datamodules import EchoNetDataModule

    datamodule = EchoNetDataModule(paths["data"], space="latent", latent_dir=str(paths["latents"]),
                                   latent_posterior="mean", sampling="clip", clip_length=frames, fps=fps,
                                   eval_start="first", num_workers=0)
    datamodule.setup("fit" if split in ("train", "val") else "test")
    dataset = datamodule.datasets[split]
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["video"] for item in items]), torch.tensor([float(item["ef"]) for item in items])


def measure(latents, pixels, references, ef_target, tools) -> dict[str, float]:
    """The columns of one row: generated (or real) latents ``(N, T, C, h, w)``, their decoded pixels, reference
    latents ``(N, C, h, w)`` (None: frame 0), target EFs."""
    import torch
    from torchmetrics.functional import mean_absolute_error, r2_score

    from lightning_modules.metrics.functional import density_and_coverage, frechet_distance, temporal_consistency

    reid, encoder, vae, regressor = tools["reid"], tools["encoder"], tools["vae"], tools["regressor"]
    written = quantised(pixels)
    relatent = encoder.latents(written)  # as the writer and evaluate see a written video
    embeddings = reid.embed_videos(relatent if tools["as_written"] else latents)
    flat = embeddings.flatten(0, 1).double()
    quality = density_and_coverage(tools["train_frames"], flat, k=5, recall=False,
                                   real_radii=tools["train_radii"])
    again = decode(vae, relatent)
    mse = (again - written).square().mean().clamp_min(1e-12)
    laplacian = (written[..., 1:-1, 2:] + written[..., 1:-1, :-2] + written[..., 2:, 1:-1] + written[..., :-2, 1:-1]
                 - 4 * written[..., 1:-1, 1:-1]).abs().mean()
    flicker = (written[:, 2:] - 2 * written[:, 1:-1] + written[:, :-2]).abs().mean()
    if references is None:
        reference_embedding = embeddings[:, :1]
    else:
        reference_embedding = reid.embed_videos(encoder.latents(quantised(decode(vae, references[:, None]))))
    pairs = reference_embedding.expand_as(embeddings[:, 1:]).flatten(0, 1)
    identity = torch.sigmoid(reid.score(pairs, embeddings[:, 1:].flatten(0, 1)).float()).mean()
    read = regressor.read_ef(written, tools["ef_size"]).float().cpu()
    return {"fd_frames": float(frechet_distance(flat, tools["train_frames"])), "density": float(quality["density"]),
            "round_trip_db": float(10 * torch.log10(4.0 / mse)), "laplacian": float(laplacian),
            "flicker": float(flicker), "temporal_id": float(temporal_consistency(embeddings, reid.head.weight,
                                                                                 reid.head.bias).mean()),
            "ef_r2": float(r2_score(read, ef_target)), "ef_mae": float(mean_absolute_error(read, ef_target)),
            "identity": float(identity)}


def other_video_radii(frames, per_video: int, k: int):
    """Each training frame's distance to its k-th nearest frame of *another* training video: the balls of density.
    (A frame's nearest frames are its own video's neighbours in time; balls of those would hold nothing else.)"""
    import torch

    distances = torch.cdist(frames, frames)
    video = torch.arange(len(frames)) // per_video
    distances[video[:, None] == video[None, :]] = float("inf")
    return distances.kthvalue(k, dim=1).values


def decode(vae, latents):
    from lightning_modules.vae_utils import decode_frames

    return decode_frames(vae, latents).clamp(-1, 1)


def quantised(pixels):
    return ((pixels + 1) * 127.5).round() / 127.5 - 1  # as a written 8-bit video reads back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished quickstart pipeline run folder")
    parser.add_argument("--num-videos", type=int, default=36)
    parser.add_argument("--request-seed", type=int, default=0, help="seed of the requests' EFs and noise")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="the video model's (generate's: 3)")
    parser.add_argument("--ef-size", type=int, default=48, help="frame size the EF regressor reads")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--schedules", nargs="+", help=f"joint schedules ('none': the video model alone); default "
                                                       f"{' '.join(s or 'none' for s in SCHEDULES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    import torch

    from datamodules.requests import GenerationRequests
    from lightning_modules.checkpoints import load_module
    from lightning_modules.diffusion import load_diffusion
    from lightning_modules.diffusion_sampling import anatomy_references
    from lightning_modules.ef_regressor import EFRegressorModule
    from lightning_modules.joint_sampling import JointSchedule
    from lightning_modules.reid import load_reid
    from lightning_modules.reid_embeddings import EncodedReID
    from lightning_modules.vae_utils import load_frozen_vae

    torch.set_num_threads(args.threads)
    paths = run_paths(args.run)
    video, anatomy = load_diffusion(paths["video"], mode="video"), load_diffusion(paths["anatomy"], mode="image")
    reid, vae = load_reid(paths["reid"]), load_frozen_vae(paths["vae"])
    regressor = load_module(EFRegressorModule, paths["ef"]).eval().requires_grad_(False)
    fps = float(video.train_fps)
    train, _ = real_clips(paths, "train", args.frames, fps)
    test, test_ef = real_clips(paths, "test", args.frames, fps)
    with torch.no_grad():
        train_frames = reid.embed_videos(train).flatten(0, 1).double()
        tools = dict(reid=reid, encoder=EncodedReID(reid, vae), vae=vae, regressor=regressor, ef_size=args.ef_size,
                     train_frames=train_frames, train_radii=other_video_radii(train_frames, args.frames, k=5),
                     as_written=True)
        rows = []
        real_pixels = decode(vae, test)
        real = measure(test, real_pixels, None, test_ef, tools | {"as_written": False})
        shuffled = torch.roll(test[:, 0], 1, dims=0)  # each video against another patient's frame 0
        another = measure(test, real_pixels, shuffled, test_ef, tools | {"as_written": False})
        requests = GenerationRequests(attempts=args.num_videos, seed=args.request_seed)
        ef = torch.tensor([requests.ef(i) for i in range(args.num_videos)])
        seeds = [requests.noise_seed(i) for i in range(args.num_videos)]
        references = anatomy_references(anatomy, ef, seeds)
        for schedule in args.schedules or SCHEDULES:
            schedule = None if schedule in (None, "none") else schedule
            latents, seconds = [], 0.0
            for start in range(0, args.num_videos, args.batch_size):
                chunk = slice(start, start + args.batch_size)
                generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
                began = time.perf_counter()
                latents.append(video.sample(ef=ef[chunk], reference=references[chunk], num_frames=args.frames,
                                            steps=args.steps, scheduler=args.sampler,
                                            guidance_scale=args.guidance_scale, generator=generators,
                                            **({} if schedule is None else dict(image_model=anatomy, joint=schedule))))
                seconds += time.perf_counter() - began
            latents = torch.cat(latents)
            row = measure(latents, decode(vae, latents), references, ef, tools)
            image_steps = 0 if schedule is None else sum(JointSchedule.parse(schedule).image_steps(args.steps))
            rows.append({"schedule": schedule or "video model alone", "image_steps": image_steps,
                         "seconds_per_video": seconds / args.num_videos, **row})
            print(f"done: {rows[-1]['schedule']} ({seconds:.1f} s)", flush=True)
    base = rows[0]["seconds_per_video"]
    print(f"\n{args.num_videos} requests (seed {args.request_seed}), {args.frames} frames, {args.sampler} "
          f"{args.steps} steps, video guidance {args.guidance_scale:g}; image model {paths['anatomy']} (guidance "
          f"{anatomy.hparams.guidance_scale:g} unless set); real: {len(test)} TEST videos; bank: {len(train)} TRAIN "
          "videos\n")
    print("| sampling | image steps | FD frames | density | round trip dB | sharpness | flicker | temporal id | "
          "EF R² | EF MAE | identity | s / video |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def line(name: str, steps: str, row: dict, cost: str) -> str:
        return (f"| {name} | {steps} | {row['fd_frames']:.3f} | {row['density']:.2f} | {row['round_trip_db']:.1f} | "
                f"{row['laplacian'] / real['laplacian']:.2f} | {row['flicker'] / real['flicker']:.2f} | "
                f"{row['temporal_id']:.3f} | {row['ef_r2']:.2f} | {row['ef_mae']:.1f} | {row['identity']:.3f} | "
                f"{cost} |")

    print(line("real TEST videos (ground truth)", "–", real, "–"))
    print(f"| real, against another video's frame 0 | – | | | | | | | | | {another['identity']:.3f} | – |")
    for row in rows:
        cost = f"{row['seconds_per_video']:.2f} ({row['seconds_per_video'] / base:.2f}×)"
        print(line(row["schedule"], f"{row['image_steps']} / {args.steps}", row, cost))
    if args.out is not None:
        args.out.write_text(json.dumps({"real": real, "another": another, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
