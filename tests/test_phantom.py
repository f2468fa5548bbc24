"""The echo phantom against its own ground truth: labels from tracings, tracings from the pixels, identity, splits,
determinism and the output-folder guard."""

from __future__ import annotations

import argparse
import csv
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from datamodules.phantom import PhantomConfig, cm_per_pixel, describe_video, ef_from_tracings, generate_phantom
from datamodules.phantom.anatomy import DEVICES, NEUTRAL_DEVICE
from datamodules.phantom.generate import assign_splits, video_file_name
from echo_lvdm import phantom as phantom_command
from datamodules.phantom.render import sector_fields
from datamodules.phantom.tracings import read_tracings
from datamodules.video_io import probe_video, read_video

SETTINGS = dict(patients=8, videos_per_patient=2, seed=11, size=64, fps=(40.0, 60.0), frames=(32, 40))


def _read_filelist(root: Path) -> list[dict[str, str]]:
    with (root / "FileList.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _traced_frames(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """FileName (no suffix) → frame → ``(21, 4)`` lines, from VolumeTracings.csv."""
    traced: dict[str, dict[int, list]] = {}
    for name, *coords, frame in read_tracings(root / "VolumeTracings.csv"):
        traced.setdefault(name.removesuffix(".avi"), {}).setdefault(int(frame), []).append([float(c) for c in coords])
    return {name: {f: np.array(lines) for f, lines in frames.items()} for name, frames in traced.items()}


def _lv_region(lines: np.ndarray, size: int, apical_fraction: float = 1.0, grow: float = 0.0) -> np.ndarray:
    """Pixels ``(size, size)`` bool inside the traced LV (chord half-widths interpolated along the axis), limited to
    the apical ``apical_fraction`` of the long axis and widened by ``grow`` px."""
    apex, base = lines[0, :2], lines[0, 2:]
    length = np.linalg.norm(base - apex)
    u = (base - apex) / length
    v = np.array([-u[1], u[0]])
    centres = 0.5 * (lines[1:, :2] + lines[1:, 2:])
    along = (centres - apex) @ u
    half = 0.5 * np.linalg.norm(lines[1:, 2:] - lines[1:, :2], axis=1)
    y, x = np.mgrid[0:size, 0:size]
    rel = np.stack([x - apex[0], y - apex[1]], axis=-1)
    s, q = rel @ u, rel @ v
    width = np.interp(s, along, half, left=0.0, right=0.0) + grow
    return (s >= 0) & (s <= apical_fraction * length) & (np.abs(q) <= width)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom") / "data", **SETTINGS)


def test_filelist_labels_equal_method_of_disks_on_the_written_tracings(phantom: Path) -> None:
    """EF, ESV and EDV recomputed from VolumeTracings.csv by ``ef_from_tracings`` match FileList.csv within 0.05
    (EF points, mL): the CSV holds 4 decimals, so only rounding separates them. Layout checks ride along."""
    rows = _read_filelist(phantom)
    recomputed = ef_from_tracings(phantom / "VolumeTracings.csv", cm_per_pixel=cm_per_pixel(SETTINGS["size"]))
    assert len(rows) == SETTINGS["patients"] * SETTINGS["videos_per_patient"] == len(recomputed)
    with (phantom / "FileList.csv").open() as handle:
        header = handle.readline().strip()
    assert header == "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split,PatientID"
    for row in rows:
        assert re.fullmatch(r"0X[0-9A-F]{16}", row["FileName"]), row["FileName"]
        ef, esv, edv = recomputed[row["FileName"]]
        assert abs(ef - float(row["EF"])) < 0.05 and abs(esv - float(row["ESV"])) < 0.05
        assert abs(edv - float(row["EDV"])) < 0.05
    traced = _traced_frames(phantom)
    for frames in traced.values():
        assert len(frames) == 2 and all(lines.shape == (21, 4) for lines in frames.values())


def test_ef_from_tracings_is_the_method_of_disks() -> None:
    """Oracle: a cylinder of length 10 px and diameter 4 px is pi * 4 * 10 px³; order of frames and row types do not
    matter; a video with a single traced frame is left out."""
    def frame(name: str, number: int, diameter: float) -> list:
        axis = [name, 0.0, 0.0, 0.0, 10.0, number]
        chords = [[name, -diameter / 2, y, diameter / 2, y, number] for y in np.arange(20) * 0.5 + 0.25]
        return [axis, *chords]

    rows = frame("A.avi", 7, 2.0) + frame("A.avi", 3, 4.0) + frame("B.avi", 1, 4.0)
    as_dicts = [dict(zip(("FileName", "X1", "Y1", "X2", "Y2", "Frame"), map(str, row))) for row in rows]
    for source in (rows, as_dicts):
        result = ef_from_tracings(source, cm_per_pixel=1.0)
        assert set(result) == {"A"}
        ef, esv, edv = result["A"]
        assert edv == pytest.approx(np.pi * 4 * 10) and esv == pytest.approx(np.pi * 10) and ef == pytest.approx(75.0)


def test_achieved_ef_tracks_the_target(phantom: Path) -> None:
    """The geometry solve works: the EF traced at the sampled ED/ES frames misses the target by < 1 point on average
    (frames only sample the contraction peak) and < 3 points at worst."""
    config = PhantomConfig(**SETTINGS)
    labels = {row["FileName"]: float(row["EF"]) for row in _read_filelist(phantom)}
    errors = []
    for patient in range(config.patients):
        for video in range(config.videos_per_patient):
            target = describe_video(config, patient, video)[1].target_ef
            errors.append(labels[video_file_name(config.seed, patient, video)] - target)
    assert np.mean(np.abs(errors)) < 1.0 and np.max(np.abs(errors)) < 3.0
    assert np.ptp(list(labels.values())) > 20  # the targets really vary, so tracking them means something


def test_labels_agree_with_the_pixels(phantom: Path) -> None:
    """From the decoded videos: the dark area inside the apical 70 % of the ED LV shrinks from ED to ES in every
    video, and its fractional change correlates with FileList EF (Pearson r > 0.8)."""
    traced, size = _traced_frames(phantom), SETTINGS["size"]
    efs, changes = [], []
    for row in _read_filelist(phantom):
        frames = traced[row["FileName"]]
        (ed, ed_lines), (es, _) = sorted(frames.items(), key=lambda kv: -np.linalg.norm(kv[1][1:, 2:] - kv[1][1:, :2]))
        region = _lv_region(ed_lines, size, apical_fraction=0.7)
        video = read_video(phantom / "Videos" / f"{row['FileName']}.avi", indices=[ed, es]).astype(np.float32)
        smooth = sum(np.roll(video, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
        dark = (smooth < 40.0) & region
        area_ed, area_es = int(dark[0].sum()), int(dark[1].sum())
        assert area_ed > area_es, row["FileName"]
        efs.append(float(row["EF"]))
        changes.append(1.0 - area_es / area_ed)
    assert len(efs) >= 12 and np.corrcoef(efs, changes)[0, 1] > 0.8


def test_frames_look_like_an_echo(phantom: Path) -> None:
    """Black outside the sector (≥ 2 px outside the widest device sector: mean < 0.5, max ≤ 12 after MJPEG), lit
    inside, and the traced LV cavity at least 3× darker than the myocardium ring just outside it."""
    size = SETTINGS["size"]
    devices = [*DEVICES, NEUTRAL_DEVICE]
    widest = max(devices, key=lambda d: d.half_angle_deg)
    _, radius, angle = sector_fields(size, widest)
    beyond_edge = (np.abs(angle) - np.deg2rad(widest.half_angle_deg)) * radius
    outside = np.maximum(radius - max(d.depth for d in devices) * size, beyond_edge) > 2.0
    inside = sector_fields(size, min(devices, key=lambda d: d.half_angle_deg))[0] > 0.99
    traced = _traced_frames(phantom)
    for row in _read_filelist(phantom):
        video = read_video(phantom / "Videos" / f"{row['FileName']}.avi").astype(np.float32)
        assert video[:, outside].mean() < 0.5 and video[:, outside].max() <= 12
        assert video[:, inside].mean() > 25
        for frame, lines in traced[row["FileName"]].items():
            cavity = _lv_region(lines, size, apical_fraction=0.85, grow=-1.5)
            ring = _lv_region(lines, size, apical_fraction=0.85, grow=4.0) & ~_lv_region(lines, size, 0.85, grow=1.5)
            assert video[frame][cavity].mean() * 3 < video[frame][ring].mean(), (row["FileName"], frame)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    """Seed → byte-identical CSVs and identical decoded frames, in-process or with 2 worker processes; another seed
    → other labels and other frames."""
    small = dict(patients=3, videos_per_patient=2, size=48, frames=(24, 24))
    a = generate_phantom(tmp_path / "a", seed=5, workers=0, **small)
    b = generate_phantom(tmp_path / "b", seed=5, workers=2, **small)
    c = generate_phantom(tmp_path / "c", seed=6, workers=0, **small)
    for name in ("FileList.csv", "VolumeTracings.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    for row_a, row_c in zip(_read_filelist(a), _read_filelist(c)):
        frames_a = read_video(a / "Videos" / f"{row_a['FileName']}.avi")
        np.testing.assert_array_equal(frames_a, read_video(b / "Videos" / f"{row_a['FileName']}.avi"))
        assert not np.array_equal(frames_a, read_video(c / "Videos" / f"{row_c['FileName']}.avi"))


def test_patient_level_split_and_filelist_matches_the_files(phantom: Path) -> None:
    """No patient in two splits; split sizes follow the fractions (within 1.5 patients, none empty);
    FrameHeight/Width, FPS and NumberOfFrames are what the video files hold."""
    rows = _read_filelist(phantom)
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["PatientID"], set()).add(row["Split"])
        info = probe_video(phantom / "Videos" / f"{row['FileName']}.avi")
        assert (info.num_frames, info.height, info.width) == (int(row["NumberOfFrames"]), int(row["FrameHeight"]),
                                                              int(row["FrameWidth"]))
        assert info.fps == pytest.approx(float(row["FPS"]), abs=0.01) and 40.0 <= info.fps <= 60.0
        assert 32 <= info.num_frames <= 40
    assert all(len(splits) == 1 for splits in split_of.values())
    counts = {s: sum(1 for splits in split_of.values() if s in splits) for s in ("TRAIN", "VAL", "TEST")}
    assert counts == {"TRAIN": 6, "VAL": 1, "TEST": 1}
    for patients in (3, 4, 10, 12, 101):
        splits = assign_splits(patients, (0.75, 0.125, 0.125), seed=0)
        for name, fraction in zip(("TRAIN", "VAL", "TEST"), (0.75, 0.125, 0.125)):
            assert splits.count(name) >= 1 and abs(splits.count(name) - fraction * patients) < 1.5
        assert splits.count("VAL") == splits.count("TEST")  # equal fractions, equal shares


def test_identity_is_learnable_from_mean_frames(phantom: Path) -> None:
    """The nearest neighbour (Pearson correlation of time-averaged frames) of most videos is the other video of the
    same patient: patient anatomy and texture survive the per-video jitter, heart rate and EF."""
    rows = _read_filelist(phantom)
    means = np.stack([read_video(phantom / "Videos" / f"{r['FileName']}.avi").mean(axis=0).ravel() for r in rows])
    corr = np.corrcoef(means)
    np.fill_diagonal(corr, -np.inf)
    patients = np.array([r["PatientID"] for r in rows])
    hits = patients[corr.argmax(axis=1)] == patients
    assert hits.mean() >= 0.8


def test_output_guard_and_cli(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A non-empty --out is refused with an error naming it; --overwrite replaces an earlier phantom (no stale video
    survives); the CLI parses ranges and logs one summary line."""
    out = tmp_path / "out"
    (out / "Videos").mkdir(parents=True)
    (out / "Videos" / "STALE.avi").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite"):
        generate_phantom(out, patients=1, videos_per_patient=1, size=32, frames=(8, 8))
    parser = argparse.ArgumentParser()
    phantom_command.add_arguments(parser)
    argv = ["--out", str(out), "--patients", "3", "--videos-per-patient", "1", "--size", "32", "--frames", "8", "12",
            "--fps", "30", "--no-device-fingerprint"]
    with caplog.at_level(logging.INFO):
        assert phantom_command.run(parser.parse_args(argv)) == 1
        assert "not empty" in caplog.text and str(out) in caplog.text
        caplog.clear()
        assert phantom_command.run(parser.parse_args([*argv, "--overwrite"])) == 0
    assert "3 videos of 3 patients" in caplog.text and len(caplog.records) == 1
    written = sorted(f"{r['FileName']}.avi" for r in _read_filelist(out))
    assert sorted(p.name for p in (out / "Videos").iterdir()) == written
    assert {r["FPS"] for r in _read_filelist(out)} == {"30"}


def test_ef_range_spreads_the_targets_uniformly_and_shifts_no_other_draw() -> None:
    """``ef_range`` turns the patients' EFs from EchoNet-Dynamic-like (normal around 55, a few % under 30) into
    uniform over the range: every decile of 400 targets within 4 points of uniform's; the same draw is mapped, so
    every other part of a patient and a video is what the default draws."""
    default = PhantomConfig(patients=400, videos_per_patient=1, seed=3, size=64)
    spread = PhantomConfig(patients=400, videos_per_patient=1, seed=3, size=64, ef_range=(20.0, 85.0))
    base = [describe_video(default, p, 0) for p in range(default.patients)]
    wide = [describe_video(spread, p, 0) for p in range(spread.patients)]
    base_ef = np.array([motion.target_ef for _, motion, _ in base])
    wide_ef = np.array([motion.target_ef for _, motion, _ in wide])
    assert np.mean(base_ef < 30.0) < 0.05 and np.mean(wide_ef < 30.0) > 0.1
    deciles = np.percentile(wide_ef, np.arange(10, 100, 10))
    np.testing.assert_allclose(deciles, 20.0 + 6.5 * np.arange(1, 10), atol=4.0)
    assert wide_ef.min() >= 12.0 and wide_ef.max() <= 85.0
    for (anatomy_a, motion_a, _), (anatomy_b, motion_b, _) in zip(base, wide):
        assert anatomy_a.lv_length == anatomy_b.lv_length and anatomy_a.axis_deg == anatomy_b.axis_deg
        assert motion_a.heart_rate_bpm == motion_b.heart_rate_bpm and motion_a.phase0 == motion_b.phase0
        if 12.0 < motion_a.target_ef < 85.0:  # the video's own EF draw is the same: only its patient's baseline moved
            noise = motion_a.target_ef - anatomy_a.ef_baseline
            assert motion_b.target_ef == pytest.approx(np.clip(anatomy_b.ef_baseline + noise, 12.0, 85.0))


def test_ef_range_renders_its_extremes_and_is_checked(tmp_path: Path) -> None:
    """The geometry solve holds at the ends of a wide range: traced EF within 3 points of each target from
    ~15 to 85 %. A range outside the phantom's 12–85 % or upside down is refused naming ``ef_range``; the CLI takes
    ``--ef-range MIN MAX``."""
    settings = dict(SETTINGS, videos_per_patient=1, ef_range=(15.0, 85.0))
    root = generate_phantom(tmp_path / "wide", **settings)
    config = PhantomConfig(**settings)
    labels = {row["FileName"]: float(row["EF"]) for row in _read_filelist(root)}
    targets = {video_file_name(config.seed, p, 0): describe_video(config, p, 0)[1].target_ef
               for p in range(config.patients)}
    assert max(abs(labels[name] - target) for name, target in targets.items()) < 3.0
    assert min(targets.values()) < 30.0 and max(targets.values()) > 70.0
    for bad in [(10.0, 50.0), (60.0, 40.0), (20.0, 90.0)]:
        with pytest.raises(ValueError, match=r"ef_range must be \(min, max\) with 12 ≤ min < max ≤ 85"):
            PhantomConfig(ef_range=bad)
    parser = argparse.ArgumentParser()
    phantom_command.add_arguments(parser)
    assert parser.parse_args(["--out", "x", "--ef-range", "20", "85"]).ef_range == [20.0, 85.0]
    assert parser.parse_args(["--out", "x"]).ef_range is None
    listed = PhantomConfig(patients=1, ef_range=[20, 85])  # as YAML or JSON gives it: still a hashable config
    assert listed.ef_range == (20.0, 85.0) and describe_video(listed, 0, 0)[1].target_ef >= 12.0
