"""``echo-lvdm evaluate --inception/--i3d``: FID, IS and FVD of the synthetic folder and of the held-out real split
(the ground-truth row), each against a real split, with the field's TorchScript extractors
(:mod:`lightning_modules.metrics.generative`), and their lines of the report."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("echo_lvdm.evaluate")


def generative_setup(args: argparse.Namespace) -> dict:
    """The extractors, metrics and sets of ``--inception``/``--i3d``, checked before anything is computed: the real
    ``--fid-real`` split (the reference), the synthetic folder and, as the ground-truth row, the held-out real split;
    clips of the longest FVD length from each video's first frame at ``--fid-fps``."""
    from datamodules import EchoNetDataModule
    from datamodules.errors import UserInputError
    from lightning_modules.metrics.generative import I3D, INCEPTION, GenerativeMetrics, load_extractor, long_enough

    try:
        lengths = tuple(int(part) for part in args.fvd_lengths.split(","))
    except ValueError:
        raise UserInputError(f"--fvd-lengths: expected comma-separated integers such as 16,128, got "
                             f"{args.fvd_lengths!r}") from None
    if args.fid_real == args.heldout:
        raise UserInputError(f"--fid-real {args.fid_real} is also --heldout: the held-out split is the ground-truth "
                             "row measured against the --fid-real split, so they must differ")
    inception = load_extractor(args.inception, INCEPTION, args.device) if args.inception is not None else None
    i3d = load_extractor(args.i3d, I3D, args.device) if args.i3d is not None else None
    metrics = GenerativeMetrics(inception, i3d, fvd_lengths=lengths, frame_size=(args.fid_size, args.fid_size))
    frames, fps = max(lengths), "native" if args.fid_fps is None else f"{args.fid_fps:g}"
    options = dict(sampling="clip", clip_length=frames, period=1, fps=args.fid_fps, eval_start="first",
                   channels=1, size=args.fid_size, batch_size=args.batch_size, num_workers=0)
    real = EchoNetDataModule(args.real, **options)
    real.setup()
    synthetic = EchoNetDataModule(args.synthetic, predict_split="all", **options)
    synthetic.setup("predict")
    sets = {args.fid_real: real.datasets[args.fid_real.lower()], "synthetic": synthetic.datasets["all"],
            args.heldout: real.datasets[args.heldout.lower()]}
    for name, dataset in sets.items():
        usable = len(long_enough(dataset, frames))
        if min(usable, args.fid_videos or usable) < 2:
            raise UserInputError(f"evaluate: FID/IS/FVD need at least 2 videos of {frames} frames at {fps} fps in the "
                                 f"{name} set, found {usable} ({len(dataset) - usable} too short); lower "
                                 "--fvd-lengths or --fid-fps")
    return {"metrics": metrics.to(args.device), "sets": sets, "lengths": lengths, "fps": fps}


def generative_values(args: argparse.Namespace, setup: dict) -> dict:
    """FID/IS/FVD of the synthetic set and, as their ground truth, of the held-out real split (``real_*``), each
    against the real ``--fid-real`` split (:func:`generative_setup`)."""
    from lightning_modules.metrics.generative import file_checksum, measure_dataset

    metrics, lengths = setup["metrics"], setup["lengths"]
    counts, values = {}, {}
    for name, dataset in setup["sets"].items():
        real = name == args.fid_real
        counts[name] = measure_dataset(metrics, dataset, real=real, limit=args.fid_videos,
                                       batch_size=args.batch_size, device=args.device)
        log.info("evaluate: FID/IS/FVD: %s, %d videos (%d too short for %d frames at %s fps)", name,
                 counts[name]["videos"], counts[name]["too_short"], max(lengths), setup["fps"])
        if not real:
            prefix = "" if name == "synthetic" else "real_"
            values.update({prefix + key: value for key, value in metrics.compute().items()})
            metrics.reset_synthetic()
    extractors = {name: {"path": str(path), "sha256": file_checksum(path)}
                  for name, path in (("inception", args.inception), ("i3d", args.i3d)) if path is not None}
    return {"values": values, "reference": args.fid_real, "ground_truth": args.heldout, "videos": counts,
            "fvd_lengths": list(lengths), "frames_per_video": max(lengths), "fps": args.fid_fps,
            "size": args.fid_size, "extractors": extractors}


def generative_table_rows(summary: dict) -> list[str]:
    """The report's table rows of FID/IS/FVD, each beside the held-out real split's value."""
    if "generative_metrics" not in summary:
        return []
    generative, lines = summary["generative_metrics"], []
    against = f"against real {generative['reference']}"
    field = {"fid": f"FID of frames {against} (Inception pool features)",
             "is": "Inception score of the frames (10 splits)", "is_std": "its standard deviation over splits",
             **{f"fvd{length}": f"FVD of {length}-frame clips {against} (I3D features)"
                for length in generative["fvd_lengths"]}}
    for name, text in field.items():
        if name in summary:
            truth = summary[f"real_{name}"]
            lines.append(f"| {name} | {summary[name]:.4g} | {text}; real {generative['ground_truth']}: "
                         f"{truth:.4g} |")
    return lines


def generative_counts(summary: dict) -> list[str]:
    """The report's paragraph on what FID/IS/FVD were computed from."""
    if "generative_metrics" not in summary:
        return []
    generative = summary["generative_metrics"]
    fps = "its native rate" if generative["fps"] is None else f"{generative['fps']:g} fps"
    sets = ", ".join(f"{name} {count['videos']} videos" + (f" ({count['too_short']} too short)"
                                                           if count["too_short"] else "")
                     for name, count in generative["videos"].items())
    return [f"FID/IS/FVD: the first {generative['frames_per_video']} frames of each video at {fps}, "
            f"{generative['size']}² px; {sets}. They depend on these counts: compare them only at equal counts and "
            "clip lengths.", ""]
