"""Clips per second: EchoNetDataModule vs EchoNet-Dynamic's reference loading, same clips, one run.

The reference (``echonet.utils.loadvideo`` + ``echonet.datasets.Echo.__getitem__``) opens each AVI with OpenCV, reads
*every* frame as RGB into memory, converts the whole video to float and only then slices the clip. The DataModule
decodes with PyAV up to the clip's last frame and converts only the clip. Both produce float32 clips in the same
layout; the script checks they hold the same pixels (up to JPEG decoder rounding) before it reports the ratio.

    python benchmarks/load_clips.py                       # a 30-patient × 2-video phantom at 112 px
    python benchmarks/load_clips.py --root /data/EchoNet-Dynamic --split val
Needs opencv-python-headless (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def reference_clip(path: Path, indices: np.ndarray, gray: bool) -> torch.Tensor:
    """EchoNet-Dynamic's way: read the whole video with OpenCV, convert all of it, then slice the clip."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    height, width = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    video = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        ok, frame = capture.read()
        if not ok:
            raise ValueError(f"failed to load frame {i} of {path}")
        video[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    capture.release()
    if gray:
        video = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in video])[..., None]
    video = video.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(video[indices]).permute(0, 3, 1, 2)


def time_per_clip(load, keys, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for key in keys:
            load(key)
        best = min(best, time.perf_counter() - start)
    return best / len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="EchoNet-layout folder (default: make a phantom)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--clip-length", type=int, default=32)
    parser.add_argument("--period", type=int, default=2)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--max-videos", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from datamodules.datamodule import EchoNetDataModule

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from datamodules.phantom import generate_phantom

            root = generate_phantom(Path(tmp) / "phantom", patients=30, videos_per_patient=2, seed=0, frames=(96, 128))
        dm = EchoNetDataModule(root, clip_length=args.clip_length, period=args.period, channels=args.channels,
                               pad="zeros")
        dm.setup({"train": "fit", "val": "validate", "test": "test"}[args.split])
        dataset = dm.datasets[args.split]
        keys = list(range(min(args.max_videos, len(dataset))))
        plans = {key: dataset.frame_plan(key)[0] for key in keys}
        if any((plan < 0).any() for plan in plans.values()):
            keys = [key for key in keys if (plans[key] >= 0).all()]  # the reference has no padding rule to compare
        gray = args.channels == 1

        # Same clips, same pixels (two JPEG decoders may round differently by a grey level).
        for key in keys[:5]:
            ours = dataset[key]["video"]
            theirs = reference_clip(dataset.records[key].path, plans[key], gray)
            assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
            mae = (ours - theirs).abs().mean().item() * 127.5
            assert mae < 2.0, f"clips differ by {mae:.2f} grey levels"

        ours = time_per_clip(lambda key: dataset[key], keys, args.repeats)
        reference = time_per_clip(lambda key: reference_clip(dataset.records[key].path, plans[key], gray), keys,
                                  args.repeats)
        frames = np.mean([dataset.records[key].num_frames for key in keys])
        print(f"{len(keys)} clips of {args.clip_length} frames (period {args.period}, {args.channels} channel(s)) "
              f"from videos of {frames:.0f} frames on average")
        print(f"EchoNetDataModule (PyAV, decode up to the clip): {1 / ours:8.1f} clips/s")
        print(f"reference (OpenCV, whole video, then slice):     {1 / reference:8.1f} clips/s")
        print(f"ratio: {reference / ours:.2f}x")


if __name__ == "__main__":
    main()
