"""Writing a phantom dataset folder in the EchoNet-Dynamic layout (the ``echo-lvdm phantom`` command runs it).

``out/Videos/<FileName>.avi`` (grayscale MJPEG), then ``out/VolumeTracings.csv`` (ES frame first, ED frame last, as
``echonet.datasets.Echo`` expects: it takes the last listed frame as the large/diastolic one), then
``out/FileList.csv``, whose EF/ESV/EDV are computed from exactly the tracing rows written, by the method of disks at
:func:`~datamodules.phantom.anatomy.cm_per_pixel` (0.14 cm/px at 112 px). Every random draw comes from a Generator
keyed by ``(seed, stream, patient, video)``, so the folder is the same whatever ``workers`` is.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.filelist import SPLITS
from datamodules.phantom.anatomy import (
    EF_LIMITS,
    HeartGeometry,
    PatientAnatomy,
    VideoMotion,
    cm_per_pixel,
    heart_geometry,
    sample_patient,
    sample_video,
)
from datamodules.phantom.render import render_video
from datamodules.phantom.tracings import TRACING_COLUMNS, ef_from_tracings, format_rows, geometry_volumes, lv_tracing
from datamodules.video_io import atomic_output, write_video

FILELIST_COLUMNS = ("FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split",
                    "PatientID")
_ANATOMY, _MOTION, _SPECKLE, _SPLIT = range(1, 5)  # RNG stream tags


def _rng(seed: int, stream: int, patient: int = 0, video: int = 0) -> np.random.Generator:
    """The Generator of one stream. Keys end in a constant 1 because SeedSequence drops trailing zeros: without it
    ``(seed, stream, 0, 0)`` would be the same generator as ``(seed, stream)``."""
    return np.random.default_rng((seed, stream, patient, video, 1))


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that decides a phantom's content (``out``, ``workers`` and ``overwrite`` do not)."""

    patients: int = 30
    videos_per_patient: int = 2
    seed: int = 0
    size: int = 112
    fps: tuple[float, float] = (50.0, 50.0)
    frames: tuple[int, int] = (48, 80)
    split_fractions: tuple[float, float, float] = (0.75, 0.125, 0.125)
    device_fingerprint: bool = True
    ef_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.ef_range is not None:  # a list from YAML or JSON: a tuple, so the config stays hashable
            object.__setattr__(self, "ef_range", tuple(float(value) for value in self.ef_range))
        problems = []
        if self.patients < 1 or self.videos_per_patient < 1:
            problems.append(f"patients and videos_per_patient must be ≥ 1, got {self.patients}, "
                            f"{self.videos_per_patient}")
        if self.seed < 0:
            problems.append(f"seed must be ≥ 0, got {self.seed}")
        if self.size < 32:
            problems.append(f"size must be ≥ 32 px, got {self.size}")
        if len(self.fps) != 2 or not 0 < self.fps[0] <= self.fps[1]:
            problems.append(f"fps must be (min, max) with 0 < min ≤ max, got {self.fps}")
        if len(self.frames) != 2 or not 2 <= self.frames[0] <= self.frames[1]:
            problems.append(f"frames must be (min, max) with 2 ≤ min ≤ max, got {self.frames}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or sum(self.split_fractions) <= 0:
            problems.append(f"split_fractions must be 3 non-negative numbers (TRAIN VAL TEST), "
                            f"got {self.split_fractions}")
        if self.ef_range is not None and (len(self.ef_range) != 2
                                          or not EF_LIMITS[0] <= self.ef_range[0] < self.ef_range[1] <= EF_LIMITS[1]):
            problems.append(f"ef_range must be (min, max) with {EF_LIMITS[0]:g} ≤ min < max ≤ {EF_LIMITS[1]:g} "
                            f"(EF %), got {self.ef_range}")
        if problems:
            raise ValueError("phantom: " + "; ".join(problems))


def video_file_name(seed: int, patient: int, video: int) -> str:
    """EchoNet-style name ``0X`` + 16 uppercase hex digits, a hash of ``(seed, patient, video)``."""
    digest = hashlib.blake2b(f"echo-lvdm-phantom:{seed}:{patient}:{video}".encode(), digest_size=8).hexdigest()
    return "0X" + digest.upper()


def patient_name(patient: int) -> str:
    """``P0007`` for patient 7."""
    return f"P{patient:04d}"


def assign_splits(patients: int, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split of each patient (index → ``TRAIN``/``VAL``/``TEST``), whole patients only.

    Counts follow the fractions by largest remainder, with ties served together so that equal fractions get equal
    counts (12 patients at 0.75/0.125/0.125 → 8/2/2, not 9/2/1; the excess comes off the largest split). A split
    with a positive fraction gets at least one patient when there are enough patients. Which patients go where is a
    seeded permutation.
    """
    weights = np.asarray(fractions, dtype=np.float64) / sum(fractions)
    counts = np.floor(weights * patients).astype(int)
    remainders = weights * patients - counts
    while counts.sum() < patients:
        tied = np.flatnonzero(remainders >= remainders.max() - 1e-9)
        counts[tied] += 1
        remainders[tied] = -1.0
    while counts.sum() > patients:
        counts[int(np.argmax(counts))] -= 1
    for i in np.flatnonzero((weights > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    order = _rng(seed, _SPLIT).permutation(patients)
    labels = np.repeat(np.array(SPLITS), counts)
    splits = [""] * patients
    for patient, label in zip(order, labels):
        splits[int(patient)] = str(label)
    return splits


@dataclass(frozen=True)
class _Rendered:
    file_name: str
    patient: int
    fps: float
    num_frames: int
    rows: list[tuple[str, ...]]


@functools.lru_cache(maxsize=4)  # a patient's videos are rendered one after another: draw its anatomy once
def _patient(seed: int, patient: int, size: int, device_fingerprint: bool,
             ef_range: tuple[float, float] | None) -> PatientAnatomy:
    return sample_patient(_rng(seed, _ANATOMY, patient), patient, size, device_fingerprint, ef_range)


def describe_video(
    config: PhantomConfig, patient: int, video: int
) -> tuple[PatientAnatomy, VideoMotion, HeartGeometry]:
    """The ground truth behind video ``video`` of ``patient`` in the phantom ``config`` describes: the patient's
    anatomy, the video's motion (target EF, heart rate, jitter, …) and the per-frame heart geometry."""
    anatomy = _patient(config.seed, patient, config.size, config.device_fingerprint, config.ef_range)
    motion = sample_video(_rng(config.seed, _MOTION, patient, video), anatomy, video, config.fps, config.frames)
    return anatomy, motion, heart_geometry(anatomy, motion)


def _render_one(config: PhantomConfig, patient: int, video: int, videos_dir: Path) -> _Rendered:
    """Render and write one video; return its metadata and formatted tracing rows (ES frame, then ED frame)."""
    seed, size = config.seed, config.size
    anatomy, motion, geo = describe_video(config, patient, video)
    frames = render_video(anatomy, motion, geo, _rng(seed, _SPECKLE, patient, video))
    name = video_file_name(seed, patient, video)
    write_video(videos_dir / f"{name}.avi", frames, motion.fps)
    volumes = geometry_volumes(geo, cm_per_pixel(size))
    ed, es = int(np.argmax(volumes)), int(np.argmin(volumes))
    if es == ed:  # a clip held still (e.g. 2 frames in diastasis): still two traced frames, EF 0
        es = (ed + 1) % len(volumes)
    rows = format_rows(f"{name}.avi", es, lv_tracing(geo, es)) + format_rows(f"{name}.avi", ed, lv_tracing(geo, ed))
    return _Rendered(name, patient, motion.fps, motion.num_frames, rows)


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` unless ``overwrite``; with it, remove what an earlier phantom left (its CSVs and
    ``Videos/*.avi``) so no stale video survives. Returns ``out/Videos``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise FileExistsError(f"{out}: directory is not empty ({len(entries)} entries: {shown}); "
                              "pass overwrite=True (--overwrite) to write the phantom over it")
    videos = out / "Videos"
    for stale in [out / "FileList.csv", out / "VolumeTracings.csv", *sorted(videos.glob("*.avi"))]:
        stale.unlink(missing_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    return videos


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    with atomic_output(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def generate_phantom(
    out: str | Path,
    *,
    patients: int = 30,
    videos_per_patient: int = 2,
    seed: int = 0,
    size: int = 112,
    fps: float | tuple[float, float] = (50.0, 50.0),
    frames: int | tuple[int, int] = (48, 80),
    split_fractions: tuple[float, float, float] = (0.75, 0.125, 0.125),
    device_fingerprint: bool = True,
    ef_range: tuple[float, float] | None = None,
    workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a phantom dataset to ``out`` and return ``out``.

    ``patients`` × ``videos_per_patient`` grayscale ``size`` × ``size`` AVIs; per video an fps uniform in ``fps``
    (Hz, rounded to 0.01) and a frame count uniform in ``frames`` (inclusive); a single number fixes either.
    Each patient's baseline EF is drawn from normal(55, 12) clipped to 15–80 % (EchoNet-Dynamic-like: few videos
    under 30 %), or uniformly from ``ef_range`` (min, max) when given; a video's EF is its patient's ± normal(0, 3).
    Patients go whole to TRAIN/VAL/TEST by ``split_fractions``. ``workers`` > 0 renders in a process pool; the
    output is byte-identical either way.
    Raises ``FileExistsError`` for a non-empty ``out`` unless ``overwrite``, ``ValueError`` for bad arguments.
    """
    fps = (fps, fps) if isinstance(fps, (int, float)) else tuple(fps)
    frames = (frames, frames) if isinstance(frames, int) else tuple(frames)
    config = PhantomConfig(patients, videos_per_patient, seed, size, fps, frames, tuple(split_fractions),
                           device_fingerprint, ef_range)
    out = Path(out)
    videos_dir = _prepare_output(out, overwrite)
    tasks = [(config, p, v, videos_dir) for p in range(patients) for v in range(videos_per_patient)]
    if workers > 0:
        # spawn, not fork: the caller may hold threads (torch, a DataLoader) that fork would copy mid-lock
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            rendered = pool.starmap(_render_one, tasks, chunksize=1)
    else:
        rendered = [_render_one(*task) for task in tasks]
    if len({r.file_name for r in rendered}) != len(rendered):
        raise RuntimeError(f"phantom: FileName hash collision for seed {seed}; choose another seed")

    tracing_rows = [row for r in rendered for row in r.rows]
    labels = ef_from_tracings(tracing_rows, cm_per_pixel=cm_per_pixel(size))
    splits = assign_splits(patients, config.split_fractions, seed)
    filelist = []
    for r in rendered:
        ef, esv, edv = labels[r.file_name]
        filelist.append((r.file_name, f"{ef:.4f}", f"{esv:.4f}", f"{edv:.4f}", str(size), str(size), f"{r.fps:g}",
                         str(r.num_frames), splits[r.patient], patient_name(r.patient)))
    _write_csv(out / "VolumeTracings.csv", TRACING_COLUMNS, tracing_rows)
    _write_csv(out / "FileList.csv", FILELIST_COLUMNS, filelist)
    return out
