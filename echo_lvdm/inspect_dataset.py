"""``echo-lvdm inspect``: load a dataset folder through the DataModule exactly as training would, and summarise it."""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from datamodules import EchoNetDataModule
from datamodules.clips import PAD_MODES

log = logging.getLogger(__name__)


def describe_split(datamodule: EchoNetDataModule, split: str) -> list[str]:
    """Lines describing one split: its table (videos, patients, EF, fps, lengths) and the first batch it serves."""
    dataset = datamodule.datasets[split]
    records = dataset.records
    ef = np.array([r.ef for r in records])
    fps = np.array([r.fps for r in records])
    frames = np.array([r.num_frames for r in records])
    lines = [
        f"{split}: {len(records)} videos, {len(set(dataset.patient_ids))} patients, "
        f"{len(datamodule.skipped.get(split, []))} skipped  ({datamodule.root_for(split)})",
        f"  EF {ef.mean():.1f} ± {ef.std():.1f} % (min {ef.min():.1f}, max {ef.max():.1f}); "
        f"FPS {fps.min():g}–{fps.max():g}; frames {frames.min()}–{frames.max()}",
    ]
    loader = getattr(datamodule, f"{split}_dataloader")()
    start = time.perf_counter()
    batch = next(iter(loader))
    elapsed = time.perf_counter() - start
    for key, value in batch.items():
        shown = f"range [{value.min().item():.4g}, {value.max().item():.4g}]"
        lines.append(f"  batch[{key!r}]: {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)} {shown}")
    lines.append(f"  first batch in {elapsed:.2f} s")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="EchoNet-layout folder (FileList.csv + Videos/)")
    parser.add_argument("--sampling", choices=("clip", "frames"), default="clip")
    parser.add_argument("--clip-length", type=int, default=16)
    parser.add_argument("--period", type=int, default=1)
    parser.add_argument("--fps", type=float, default=None, help="resample clips to this frame rate")
    parser.add_argument("--num-frames", type=int, default=2, help="frames per item with --sampling frames")
    parser.add_argument("--pad", choices=PAD_MODES, default="reflect")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--on-bad", choices=("error", "skip"), default="error")
    parser.add_argument("--verify", choices=("none", "open", "count", "decode"), default="count")
    parser.add_argument("--space", choices=("pixel", "latent"), default="pixel",
                        help="latent: serve clips from the latent cache in --latent-dir (checks it is complete)")
    parser.add_argument("--latent-dir", default=None)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    datamodule = EchoNetDataModule(
        args.root,
        sampling=args.sampling,
        clip_length=args.clip_length,
        period=args.period,
        fps=args.fps,
        num_frames=args.num_frames,
        pad=args.pad,
        size=args.size,
        batch_size=args.batch_size,
        on_bad=args.on_bad,
        verify=args.verify,
        space=args.space,
        latent_dir=args.latent_dir,
    )
    start = time.perf_counter()
    datamodule.setup()
    log.info("checked %s in %.1f s", args.root, time.perf_counter() - start)
    for split in ("train", "val", "test"):
        log.info("\n".join(describe_split(datamodule, split)))
    return 0
