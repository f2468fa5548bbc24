"""``echo-lvdm phantom``: write an echo phantom (:func:`datamodules.phantom.generate_phantom`) from the command line."""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

from datamodules.filelist import SPLITS
from datamodules.phantom import generate_phantom

log = logging.getLogger(__name__)


class _OneOrTwo(argparse.Action):
    """``--fps 50`` → (50, 50); ``--fps 30 60`` → (30, 60)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (1, 2):
            parser.error(f"{option_string} takes one value or a range MIN MAX, got {len(values)} values")
        setattr(namespace, self.dest, (values[0], values[-1]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``echo-lvdm phantom`` (see :func:`generate_phantom` for their meaning)."""
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (EchoNet layout)")
    parser.add_argument("--patients", type=int, default=30, metavar="N")
    parser.add_argument("--videos-per-patient", type=int, default=2, metavar="K")
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--size", type=int, default=112, metavar="PX", help="frame height and width")
    parser.add_argument("--fps", type=float, nargs="+", action=_OneOrTwo, default=(50.0, 50.0), metavar="F",
                        help="frame rate, or a range F F_MAX drawn uniformly per video")
    parser.add_argument("--frames", type=int, nargs="+", action=_OneOrTwo, default=(48, 80), metavar="N",
                        help="frames per video, or a range N N_MAX drawn uniformly per video")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.75, 0.125, 0.125),
                        metavar=("TRAIN", "VAL", "TEST"), help="patient fractions per split")
    parser.add_argument("--no-device-fingerprint", dest="device_fingerprint", action="store_false",
                        help="one neutral scanner for every video (no per-device sector, ticks, speckle grain)")
    parser.add_argument("--ef-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="draw each patient's EF (%%) uniformly in MIN–MAX instead of normal(55, 12) "
                             "clipped to 15–80 (the EchoNet-Dynamic-like default, few videos under 30 %%)")
    parser.add_argument("--workers", type=int, default=0, metavar="W", help="render processes (0: in-process)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def run(args: argparse.Namespace) -> int:
    """Generate the phantom ``args`` describe and log a one-line summary. Returns 0, or 1 after logging an error."""
    start = time.perf_counter()
    try:
        out = generate_phantom(
            args.out, patients=args.patients, videos_per_patient=args.videos_per_patient, seed=args.seed,
            size=args.size, fps=tuple(args.fps), frames=tuple(args.frames), split_fractions=tuple(args.split_fractions),
            device_fingerprint=args.device_fingerprint, ef_range=args.ef_range, workers=args.workers,
            overwrite=args.overwrite,
        )
    except (FileExistsError, NotADirectoryError, ValueError) as err:
        message = str(err)
        log.error("echo-lvdm phantom: %s", message.removeprefix("phantom: "))  # the library's errors say "phantom:"
        return 1
    with (out / "FileList.csv").open(newline="") as handle:
        splits = [row["Split"] for row in csv.DictReader(handle)]
    counts = "/".join(str(splits.count(name)) for name in SPLITS)
    log.info("phantom: %d videos of %d patients (train/val/test %s) at %d px, seed %d, in %.1f s → %s",
             len(splits), args.patients, counts, args.size, args.seed, time.perf_counter() - start, out)
    return 0
