"""``echo-lvdm sample``: videos from a trained :class:`~lightning_modules.diffusion.VideoDiffusionModule` at requested
EFs, decoded by the exported VAE and written as mp4 with a CSV of what was asked — and, given an EF regressor, what
EF the videos show (the EF-faithfulness check: R² and MAE between requested and read EF).

Reference frames (for a model conditioned on one) come from an anatomy model (``--anatomy``, image mode) or from real
videos (``--reference-root`` with its latent cache: frame 0 of the split's videos, in FileList order, cycled).
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="VideoDiffusionModule checkpoint (video mode)")
    parser.add_argument("--vae", type=Path, required=True, help="exported VAE folder (echo-lvdm export-vae)")
    parser.add_argument("--ef", type=float, nargs="+", required=True, help="EF values (percent) to request")
    parser.add_argument("--per-ef", type=int, default=1, help="videos per EF value (default 1)")
    parser.add_argument("--anatomy", type=Path, help="image-mode VideoDiffusionModule checkpoint for reference frames")
    parser.add_argument("--reference-root", type=Path, help="EchoNet folder whose videos give reference frames")
    parser.add_argument("--latent-dir", type=Path, help="latent cache of --reference-root")
    parser.add_argument("--split", default="TEST", help="split of --reference-root (default TEST)")
    parser.add_argument("--num-frames", type=int, help="frames per video (default: the training clip length)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's sampling_steps)")
    parser.add_argument("--sampler", choices=["ddim", "dpm++", "euler", "ddpm"], help="default: the model's")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--joint", metavar="SCHEDULE",
                        help="joint image-and-video sampling (JVID): the steps an image model takes, e.g. every=2, "
                             "start=0.3, end=0.2, probability=0.5,seed=1 (add guidance_scale=G for the image model's)")
    parser.add_argument("--image-model", type=Path,
                        help="image-mode checkpoint that takes the --joint steps (default: --anatomy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="videos sampled together")
    parser.add_argument("--ef-regressor", type=Path, help="EFRegressorModule checkpoint (pixel) to read EF back")
    parser.add_argument("--ef-size", type=int, help="frame size the regressor was trained on (default: decoded size)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (mp4 files and samples.csv)")


def reference_frames(args: argparse.Namespace, efs: list[float], generator: torch.Generator,
                     anatomy=None) -> torch.Tensor | None:
    """One scaled reference latent ``(C, h, w)`` per requested EF, stacked; None when neither source is given."""
    if anatomy is not None:
        # Each reference is an anatomy sample at the EF its video will be asked for.
        return torch.cat([anatomy.sample(ef=efs[i:i + args.batch_size], generator=generator)[:, 0]
                          for i in range(0, len(efs), args.batch_size)])
    if args.reference_root is None:
        return None
    from datamodules import EchoNetDataModule

    if args.latent_dir is None:
        raise ValueError("--reference-root needs --latent-dir (its latent cache)")
    split = args.split.lower()
    datamodule = EchoNetDataModule(args.reference_root, space="latent", latent_dir=args.latent_dir,
                                   latent_posterior="mean", sampling="clip", clip_length=1)
    datamodule.setup("test" if split == "test" else "fit")
    dataset = datamodule.datasets[split]
    return torch.stack([dataset[i % len(dataset)]["video"][0] for i in range(len(efs))])


def run(args: argparse.Namespace) -> int:
    from callbacks.video_logging import video_array
    from datamodules.video_io import atomic_output, write_video
    from lightning_modules.checkpoints import load_module
    from datamodules.errors import UserInputError
    from lightning_modules.diffusion import VideoDiffusionModule, load_diffusion
    from lightning_modules.joint_sampling import JointSchedule
    from lightning_modules.vae_utils import decode_frames, load_frozen_vae

    model = load_module(VideoDiffusionModule, args.checkpoint)
    if model.hparams.mode != "video":
        log.error("sample: %s is an image-mode (anatomy) model; pass it as --anatomy", args.checkpoint)
        return 1
    vae = load_frozen_vae(args.vae)
    anatomy = None if args.anatomy is None else load_diffusion(args.anatomy, mode="image")
    joint = {}
    if args.joint is not None or args.image_model is not None:
        if args.image_model is None and anatomy is None:
            raise UserInputError("sample: --joint needs an image model: --image-model <image-mode checkpoint> (or "
                                 "--anatomy, which it defaults to)")
        try:
            schedule = JointSchedule.parse(args.joint)
        except ValueError as error:
            raise UserInputError(f"sample: --joint {args.joint}: {error}") from None
        image_model = anatomy if args.image_model is None else load_diffusion(args.image_model, mode="image")
        joint = dict(image_model=image_model, joint=schedule)
    generator = torch.Generator().manual_seed(args.seed)
    plan = [ef for ef in args.ef for _ in range(args.per_ef)]
    count = len(plan)
    references = reference_frames(args, plan, generator, anatomy)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, count, args.batch_size):
        efs = plan[start:start + args.batch_size]
        latents = model.sample(ef=efs, reference=None if references is None else references[start:start + len(efs)],
                               num_frames=args.num_frames, steps=args.steps, scheduler=args.sampler,
                               guidance_scale=args.guidance_scale, generator=generator, **joint)
        pixels = decode_frames(vae, latents).clamp(-1, 1)
        for offset, (ef, video) in enumerate(zip(efs, pixels)):
            name = f"sample_{start + offset:05d}_ef{ef:g}.mp4"
            write_video(args.out / name, video_array(video), fps=float(model.train_fps))
            rows.append({"FileName": name, "RequestedEF": ef, "pixels": video})
    if args.ef_regressor is not None:
        read_back(rows, args)
    with atomic_output(args.out / "samples.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["FileName", "RequestedEF"] + (["ReadEF"] if args.ef_regressor else []))
        writer.writeheader()
        writer.writerows({key: value for key, value in row.items() if key != "pixels"} for row in rows)
    log.info("sample: %d videos → %s", count, args.out)
    return 0


def read_back(rows: list[dict], args: argparse.Namespace) -> None:
    """Add ``ReadEF`` to each row (the regressor's EF of its decoded video); log R² and MAE against RequestedEF."""
    from torchmetrics.functional import mean_absolute_error, r2_score

    from lightning_modules.checkpoints import load_module
    from lightning_modules.ef_regressor import EFRegressorModule

    regressor = load_module(EFRegressorModule, args.ef_regressor)
    for row in rows:
        row["ReadEF"] = round(float(regressor.read_ef(row["pixels"][None], args.ef_size)[0]), 3)
    requested = torch.tensor([row["RequestedEF"] for row in rows])
    read = torch.tensor([row["ReadEF"] for row in rows])
    log.info("sample: EF read back by %s: R² %.3f, MAE %.2f (requested vs read, %d videos)", args.ef_regressor,
             float(r2_score(read, requested)), float(mean_absolute_error(read, requested)), len(rows))
