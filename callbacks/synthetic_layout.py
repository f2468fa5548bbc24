"""The files of a synthetic dataset in EchoNet-Dynamic layout, as :class:`~callbacks.synthetic_writer.
SyntheticDatasetWriter` writes them, and what the field's loaders read of them.

Output folder::

    Videos/<prefix>_<attempt>.avi   the kept videos (MJPEG, as EchoNet-Dynamic)
    FileList.csv                    FileName (no extension), EF (requested), ESV and EDV (empty), FrameHeight,
                                    FrameWidth, FPS, NumberOfFrames, Split (TRAIN / VAL / TEST), PatientID — rewritten
                                    atomically after every batch, only rows whose video exists
    audit.csv                       every attempt: EF, seed, best score, τ and its protocol, decision (kept /
                                    dropped / surplus) —
                                    scores only, no training file names, so it can be published with the data
    dataset.json                    the setup (checksums of every model, τ, requests), the privacy threshold with
                                    its protocol and held-out set, the privacy audit of the filter (recall per
                                    near-copy transform, false flags on real TEST videos), counts, complete or not

The field's loaders (README, "Privacy-filtered synthetic datasets"; their row filters are re-implemented in
``tests/helpers/echonet_loaders.py``): ``FileList.csv`` has EchoNet-Dynamic's columns in its order, file names without
extension and ``Split`` in upper case, which EchoNet-Dynamic's ``Echo`` and its fork in EchoNet-Synthetic match
case-sensitively; EchoNet-Synthetic's ``Dynamic`` keeps only videos longer than its clip (:data:`ECHOSYN_MIN_SECONDS`
at its configs' settings). No ``VolumeTracings.csv`` is written: synthetic videos have no traced volumes, and a
header alone would make both ``Echo`` variants keep no video at all.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.video_io import atomic_output

AUDIT_COLUMNS = ("Attempt", "FileName", "Split", "EF", "Seed", "Score", "Tau", "TauProtocol", "Decision",
                 "FrameHeight", "FrameWidth", "NumberOfFrames")
# EchoNet-Dynamic's columns in its order (ESV and EDV empty: a synthetic video has an EF, no traced volumes), then ours.
FILELIST_COLUMNS = ("FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split",
                    "PatientID")
SPLIT_LABELS = ("TRAIN", "VAL", "TEST")
# EchoNet-Synthetic's loader keeps videos longer than its clip (64 frames at 32 fps in its configs).
ECHOSYN_MIN_SECONDS = 2.0
UNFILTERED_NOTE = "NOT_PRIVACY_FILTERED.txt"
DEFAULT_SPLITS = {"TRAIN": 0.75, "VAL": 0.125, "TEST": 0.125}


def split_fractions(splits: dict[str, float] | None) -> dict[str, float]:
    """The writer's ``splits`` with upper-case labels (the field's loaders match them case-sensitively), checked: keys
    TRAIN, VAL, TEST in any case, each once; fractions ≥ 0 summing to 1. None: :data:`DEFAULT_SPLITS`."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    labels = {str(name).upper() for name in splits}
    if not labels <= set(SPLIT_LABELS) or len(labels) != len(splits):
        raise ValueError(f"SyntheticDatasetWriter: splits are keyed by {', '.join(SPLIT_LABELS)} (any case, each "
                         f"once), got {sorted(splits)}")
    splits = {str(name).upper(): value for name, value in splits.items()}
    if any(value < 0 for value in splits.values()) or abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ValueError(f"SyntheticDatasetWriter: split fractions must be ≥ 0 and sum to 1, got {splits}")
    return splits


def split_plan(fractions: dict[str, float], count: int, seed: int) -> list[str]:
    """Split labels for ``count`` videos: largest-remainder counts of ``fractions``, in a seeded random order."""
    exact = {name: fraction * count for name, fraction in fractions.items()}
    sizes = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: sizes[n] - exact[n])[:count - sum(sizes.values())]:
        sizes[name] += 1
    labels = [name for name, size in sizes.items() for _ in range(size)]
    order = np.random.default_rng((seed, 13)).permutation(count)
    return [labels[i] for i in order]


def read_audit(path: Path) -> dict[int, dict[str, Any]]:
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {int(row["Attempt"]): {**row, "Attempt": int(row["Attempt"])} for row in csv.DictReader(handle)}


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def filelist_rows(kept: list[dict[str, Any]], fps: float) -> list[dict[str, Any]]:
    """``FileList.csv`` rows of the kept audit rows: their FPS, and each video its own patient (ESV, EDV empty)."""
    return [{**row, "FPS": round(fps, 4), "PatientID": row["FileName"]} for row in kept]


def mark_unfiltered(out: Path) -> None:
    """Write :data:`UNFILTERED_NOTE` beside the FileList of a dataset written without the privacy filter."""
    note = out / UNFILTERED_NOTE
    if not note.is_file():
        note.write_text("This synthetic dataset was written WITHOUT the re-identification privacy filter "
                        "(unfiltered: true). Videos may reproduce training patients. Do not share it as private.\n")


def check_folder(out: Path, signature: dict[str, Any]) -> None:
    """``out`` must hold nothing, or a dataset written with this very setup ``signature`` (then the run continues
    it)."""
    meta_path = out / "dataset.json"
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text()).get("setup", {})
        changed = sorted(key for key in set(previous) | set(signature) if previous.get(key) != signature.get(key))
        if changed:
            raise ValueError(f"SyntheticDatasetWriter: {out} holds a dataset written with another setup "
                             f"({', '.join(changed)} differ); use a new folder, or delete it to start over")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"SyntheticDatasetWriter: {out} exists and is not a synthetic dataset written by "
                         "echo-lvdm (no dataset.json); choose an empty or new folder")


def reconcile(out: Path) -> dict[int, dict[str, Any]]:
    """After a killed run, the attempts of ``audit.csv`` that ``Videos/`` agrees with: a kept attempt whose video is
    gone is left out (it is generated again), a video never listed (killed in between) is deleted. The caller
    rewrites the lists from the rows returned."""
    videos = out / "Videos"
    videos.mkdir(parents=True, exist_ok=True)
    rows = read_audit(out / "audit.csv")
    kept = {row["FileName"] for row in rows.values() if row["Decision"] == "kept"}
    missing = [attempt for attempt, row in rows.items() if row["Decision"] == "kept"
               and not (videos / f"{row['FileName']}.avi").is_file()]
    for attempt in missing:
        del rows[attempt]
    for path in videos.glob("*.avi"):
        if path.stem not in kept:
            path.unlink()
    return rows
