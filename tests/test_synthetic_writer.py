"""SyntheticDatasetWriter: the privacy filter drops planted copies of training videos and the audit shows them,
`evaluate` agrees with the filter's scores, τ is of the filter's protocol (stored, or calibrated on the validation
videos) and recorded with it, the writer refuses without a re-ID model, a killed generation resumes to exactly N
videos with a consistent FileList (the same dataset as an uninterrupted run), and 2 DDP processes write the N
distinct videos of 1 process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from callbacks.synthetic_layout import FILELIST_COLUMNS, UNFILTERED_NOTE
from callbacks.synthetic_writer import SyntheticDatasetWriter
from datamodules.datamodule import EchoNetDataModule
from datamodules.dataset import to_model_range
from datamodules.requests import GenerationRequests
from datamodules.video_io import read_video
from echo_lvdm.main import main
from lightning_modules.diffusion import VideoDiffusionModule, load_diffusion
from lightning_modules.diffusion_sampling import generate_requested
from lightning_modules.calibration import Calibration, calibrations_path, store_calibration
from lightning_modules.reid import load_reid
from lightning_modules.reid_embeddings import EncodedReID
from lightning_modules.vae_utils import decode_frames, load_frozen_vae
from tests.helpers.cli import REPO
from tests.helpers.data import PLANTED_CLIP, read_filelist
from tests.helpers.echonet_loaders import (TRACINGS_HEADER, echonet_dynamic_rows, echosyn_dynamic_rows,
                                          echosyn_echo_rows)
from tests.helpers.models import TINY_DIFFUSION, save_cli_checkpoint
from tests.helpers.processes import kill_when

COPIES = {2: 0, 5: 1, 9: 2, 14: 3}  # attempt → training video it reproduces


class PlantedGenerator(L.LightningModule):
    """A stand-in generator in pixel space: at the planted attempts it returns a training video (a copy), elsewhere a
    video of a patient the training set does not hold."""

    def __init__(self, sources: dict[int, Path]) -> None:
        super().__init__()
        self.sources = sources
        self.train_fps, self.train_num_frames = 50.0, PLANTED_CLIP

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor] | None:
        todo = batch["valid"] & batch["todo"]
        if not bool(todo.any()):
            return None
        videos = [to_model_range(read_video(self.sources[i])[:PLANTED_CLIP]) for i in batch["index"][todo].tolist()]
        return {"pixels": torch.stack(videos)}


def planted_sources(planted: SimpleNamespace, attempts: int) -> dict[int, Path]:
    new = [planted.new / "Videos" / f"{row['FileName']}.avi" for row in read_filelist(planted.new)]
    train = [planted.real / "Videos" / f"{row['FileName']}.avi" for row in planted.train]
    return {i: train[COPIES[i]] if i in COPIES else new[i % len(new)] for i in range(attempts)}


def generate(planted: SimpleNamespace, out: Path, num_videos: int, attempts: int, **writer_args) -> SyntheticDatasetWriter:
    writer_args.setdefault("audit", "off")  # the distance re-ID fails the audit (test_privacy_audit.py)
    writer = SyntheticDatasetWriter(out, num_videos, vae=str(planted.out / "vae"), cache_dir=str(planted.out / "cache"),
                                    **writer_args)
    datamodule = EchoNetDataModule(planted.real, predict_split="requests", batch_size=4,
                                   requests=GenerationRequests(attempts=attempts, seed=3))
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        default_root_dir=out.parent)
    trainer.predict(PlantedGenerator(planted_sources(planted, attempts)), datamodule=datamodule,
                    return_predictions=False)
    return writer


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_filter_drops_planted_copies_and_evaluate_agrees(planted, tmp_path):
    out = tmp_path / "synthetic"
    generate(planted, out, num_videos=11, attempts=20, reid=str(planted.reid))
    audit = {int(row["Attempt"]): row for row in read_rows(out / "audit.csv")}
    tau = planted.tau  # stored beside the checkpoint for protocol clip:16, the filter's here
    assert {row["Tau"] for row in audit.values()} == {str(round(tau, 6))}
    assert {row["TauProtocol"] for row in audit.values()} == {f"clip:{PLANTED_CLIP}"}
    # Every copy scores above τ and is dropped; every new patient scores below and passes.
    assert {i for i, row in audit.items() if row["Decision"] == "dropped"} == set(COPIES)
    assert all(float(audit[i]["Score"]) > tau for i in COPIES)
    assert all(float(row["Score"]) <= tau for i, row in audit.items() if i not in COPIES)
    # Kept: the first 11 passing attempts; a pass later in the last batch (round) is surplus and leaves no file, and
    # no attempt is generated after that batch.
    passing = [i for i in range(20) if i not in COPIES]
    kept = passing[:11]
    assert [i for i, row in audit.items() if row["Decision"] == "kept"] == kept
    assert [i for i, row in audit.items() if row["Decision"] == "surplus"] == [15] and sorted(audit) == list(range(16))
    filelist = read_filelist(out)
    names = [row["FileName"] for row in filelist]
    assert names == [f"synthetic_{i:06d}" for i in kept]
    assert sorted(p.stem for p in (out / "Videos").glob("*.avi")) == names
    # Metadata describes the files: frame size and count, fps, requested EF, splits by the fractions (8.25/1.4/1.4).
    for row in filelist:
        frames = read_video(out / "Videos" / f"{row['FileName']}.avi")
        assert (int(row["NumberOfFrames"]), int(row["FrameHeight"]), int(row["FrameWidth"])) == frames.shape
        assert float(row["FPS"]) == 50.0 and 10.0 <= float(row["EF"]) <= 90.0
    splits = [row["Split"] for row in filelist]
    assert splits.count("TRAIN") == 8 and sorted(splits.count(s) for s in ("VAL", "TEST")) == [1, 2]
    meta = json.loads((out / "dataset.json").read_text())
    assert (meta["privacy_filtered"], meta["complete"], meta["kept"], meta["dropped"]) == (True, True, 11, 4)
    assert (meta["privacy_threshold"]["tau"], meta["privacy_threshold"]["protocol"]) == (tau, f"clip:{PLANTED_CLIP}")
    assert (meta["setup"]["tau"], meta["setup"]["tau_protocol"]) == (tau, f"clip:{PLANTED_CLIP}")
    assert not (out / UNFILTERED_NOTE).exists()
    # The dataset loads through the DataModule, and `evaluate` scores it as the filter did: nothing memorised.
    assert main(["evaluate", "--real", str(planted.real), "--synthetic", str(out), "--reid", str(planted.reid),
                 "--vae", str(planted.out / "vae"), "--out", str(tmp_path / "report"), "--clip-length",
                 str(PLANTED_CLIP), "--k", "3", "--cache-dir", str(planted.out / "cache")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["memorization_rate"] == 0.0 and metrics["synthetic_videos"] == 11
    scores = {row["FileName"]: float(row["BestScore"]) for row in read_rows(tmp_path / "report" / "synthetic_scores.csv")}
    for i in kept:
        assert scores[f"synthetic_{i:06d}"] == pytest.approx(float(audit[i]["Score"]), abs=1e-5)


def test_without_a_stored_tau_the_filter_calibrates_its_own_protocol_on_the_validation_videos(planted, tmp_path):
    """The same re-ID without a stored calibration: τ = the quantile (1.0 here) of the real validation videos' best
    scores against the training videos, 16-frame clips through the VAE as the filter compares, and so it is lower
    than the stored τ of validation and test together."""
    fresh = save_cli_checkpoint(load_reid(planted.reid), tmp_path / "fresh.ckpt")
    assert not calibrations_path(fresh).exists()
    writer = generate(planted, tmp_path / "synthetic", num_videos=4, attempts=8, reid=str(fresh))
    model = EncodedReID(load_reid(fresh), load_frozen_vae(planted.out / "vae"))
    real = EchoNetDataModule(planted.real, clip_length=PLANTED_CLIP, batch_size=8)
    real.setup("fit")
    with torch.no_grad():
        bank, val = (torch.cat([model.embed_videos(b["video"]) for b in real.eval_dataloader(split)])
                     for split in ("train", "val"))
    flat = bank.flatten(0, 1).double()
    weight, bias = model.reid.head.weight.double().reshape(-1), float(model.reid.head.bias)
    best = [float(((v.double()[:, None] - flat[None]).abs() @ weight).max() + bias) for v in val]
    assert writer.tau == pytest.approx(max(best), abs=1e-5) and writer.tau <= planted.tau
    assert (writer.calibration.heldout, writer.calibration.heldout_videos) == ("val", len(best))
    audit = read_rows(tmp_path / "synthetic" / "audit.csv")
    assert {row["TauProtocol"] for row in audit} == {f"clip:{PLANTED_CLIP}"}


def test_writer_records_the_audit_of_its_filter_and_refuses_below_the_floors(planted, tmp_path):
    # The distance re-ID misses shifted copies: by default nothing is written.
    with pytest.raises(RuntimeError, match="failed its audit"):
        generate(planted, tmp_path / "refused", num_videos=4, attempts=8, reid=str(planted.reid), audit="refuse",
                 audit_sources=3)
    assert not list((tmp_path / "refused").glob("**/*.avi")) and not (tmp_path / "refused" / "dataset.json").exists()
    # Told to write anyway, the dataset carries the failed audit; with floors it meets, a passed one.
    generate(planted, tmp_path / "recorded", num_videos=4, attempts=8, reid=str(planted.reid), audit="record",
             audit_sources=3)
    recorded = json.loads((tmp_path / "recorded" / "dataset.json").read_text())["privacy_audit"]
    assert recorded["audited"] and not recorded["passed"] and recorded["sources"] == 3
    assert recorded["recall"]["exact"]["recall"] == 1.0 and recorded["tau"] == planted.tau
    assert recorded["heldout_false_flags"]["videos"] == 0  # τ came from VAL and TEST together: none left to count
    lenient = {"floor": 0.0, "combined_floor": 0.0, "max_false_flags": 1.0}
    generate(planted, tmp_path / "lenient", num_videos=4, attempts=8, reid=str(planted.reid), audit_sources=3,
             audit="refuse", audit_floors=lenient)
    passed = json.loads((tmp_path / "lenient" / "dataset.json").read_text())["privacy_audit"]
    assert passed["passed"] and passed["recall"] == recorded["recall"]
    off = generate(planted, tmp_path / "off", num_videos=4, attempts=8, reid=str(planted.reid), audit="off")
    assert off.audit_summary == {"audited": False}
    with pytest.raises(ValueError, match="audit must be"):
        SyntheticDatasetWriter(tmp_path / "x", 4, reid=str(planted.reid), audit="maybe")


def test_writer_refuses_without_reid_and_marks_unfiltered_datasets(planted, tmp_path):
    with pytest.raises(ValueError, match="no re-ID model, so no privacy filter"):
        SyntheticDatasetWriter(tmp_path / "none", 4)
    out = tmp_path / "unfiltered"
    generate(planted, out, num_videos=8, attempts=8, unfiltered=True)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["privacy_filtered"] is False and meta["kept"] == 8 and (out / UNFILTERED_NOTE).is_file()
    assert [row["Decision"] for row in read_rows(out / "audit.csv")] == ["kept"] * 8  # copies too: no filter


def test_cap_on_attempts_stops_with_a_clear_error_and_a_consistent_folder(planted, tmp_path):
    out = tmp_path / "capped"
    with pytest.raises(RuntimeError, match=r"9 of 12 videos kept after 12 attempts \(3 dropped above τ\).*cap"):
        generate(planted, out, num_videos=12, attempts=12, reid=str(planted.reid))
    assert json.loads((out / "dataset.json").read_text())["complete"] is False
    assert sorted(p.stem for p in (out / "Videos").glob("*.avi")) == [r["FileName"] for r in read_filelist(out)]
    # Raising the cap continues the same dataset: only the new attempts are generated.
    generate(planted, out, num_videos=12, attempts=20, reid=str(planted.reid))
    assert len(read_filelist(out)) == 12 and json.loads((out / "dataset.json").read_text())["complete"] is True
    with pytest.raises(ValueError, match="another setup.*num_videos"):
        generate(planted, out, num_videos=10, attempts=20, reid=str(planted.reid))


# ------------------------------------------------------------------------------ the real CLI: resume and DDP
FRAMES, STEPS = 4, 4


@pytest.fixture(scope="module")
def cli_world(planted, tmp_path_factory) -> SimpleNamespace:
    """A tiny untrained video model (latents 4 × 16 × 16, as the planted VAE makes of 32 px frames) and anatomy model,
    and a copy of the planted re-ID whose τ splits the untrained model's samples about in half, so that the filter
    drops some of every batch."""
    out = tmp_path_factory.mktemp("generate")
    torch.manual_seed(1)
    video = VideoDiffusionModule(**TINY_DIFFUSION, ema_decay=None, reference_dropout=0.1)
    anatomy = VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False, ema_decay=None)
    for module, frames in ((video, FRAMES), (anatomy, 1)):
        module.train_num_frames.fill_(frames)
        module.train_fps.fill_(12.5)
        module.latent_shape.copy_(torch.tensor([4, 16, 16]))
    world = SimpleNamespace(out=out, real=planted.real, vae=planted.out / "vae",
                            video=save_cli_checkpoint(video, out / "video.ckpt"),
                            anatomy=save_cli_checkpoint(anatomy, out / "anatomy.ckpt"), reid=planted.reid)
    first = run_generate(world, out / "unsplit", devices=1, num_videos=24, attempts=24)
    assert first.returncode == 0, first.stderr[-3000:]
    scores = np.sort([float(row["Score"]) for row in read_rows(out / "unsplit" / "audit.csv")])
    middle = len(scores) // 2
    world.reid = save_cli_checkpoint(load_reid(planted.reid), out / "reid_half.ckpt")
    model = EncodedReID(load_reid(world.reid), load_frozen_vae(world.vae))
    store_calibration(world.reid, Calibration(  # as `echo-lvdm calibrate` would store it, for the writer's protocol
        tau=float(scores[middle - 1] + scores[middle]) / 2, protocol=f"clip:{FRAMES}", quantile=1.0, heldout="val",
        heldout_videos=10, bank_videos=20, weights_checksum=model.weights_checksum(), data=str(planted.real.resolve())))
    return world


def run_generate(world: SimpleNamespace, out: Path, *, devices: int, num_videos: int, attempts: int,
                 background: bool = False, writer: dict | None = None):
    config = {
        "model": {"class_path": "lightning_modules.diffusion.VideoDiffusionModule"},
        "data": {"root": str(world.real), "predict_split": "requests", "batch_size": 2, "num_workers": 0,
                 "requests": {"attempts": attempts, "seed": 7}},
        "return_predictions": False,
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                    "logger": False, "enable_progress_bar": False, "default_root_dir": str(out.parent / "logs"),
                    "callbacks": [{"class_path": "callbacks.synthetic_writer.SyntheticDatasetWriter", "init_args": {
                        "out": str(out), "num_videos": num_videos, "reid": str(world.reid), "vae": str(world.vae),
                        "anatomy": str(world.anatomy), "steps": STEPS, "cache_dir": str(world.out / "cache"),
                        "audit": "record", "audit_sources": 2, **(writer or {})}}]},  # rank 0 audits, all record
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "echo_lvdm", "predict", "--config", str(path),
               "--ckpt_path", str(world.video)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def dataset(out: Path) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, np.ndarray]]:
    filelist, audit = read_filelist(out), read_rows(out / "audit.csv")
    videos = {path.stem: read_video(path) for path in sorted((out / "Videos").glob("*.avi"))}
    return filelist, audit, videos


def test_joint_sampling_writes_the_videos_of_joint_samples(cli_world, tmp_path):
    """``joint: {every: 2}``: each kept video is its request's joint sample — the anatomy model (the image model by
    default) taking every 2nd step — not the video model's alone; the setup records the schedule."""
    out = tmp_path / "joint"
    result = run_generate(cli_world, out, devices=1, num_videos=3, attempts=12, writer={"joint": {"every": 2}})
    assert result.returncode == 0, result.stderr[-3000:]
    setup = json.loads((out / "dataset.json").read_text())["setup"]
    assert setup["sampling"]["joint"] == "every=2" and setup["joint_image_model"] is not None
    video, anatomy = load_diffusion(cli_world.video), load_diffusion(cli_world.anatomy, mode="image")
    kept = [row for row in read_rows(out / "audit.csv") if row["Decision"] == "kept"]
    requests = GenerationRequests(attempts=12, seed=7)
    ef = torch.tensor([requests.ef(int(row["Attempt"])) for row in kept])
    seeds = [requests.noise_seed(int(row["Attempt"])) for row in kept]
    assert seeds == [int(row["Seed"]) for row in kept]
    vae = load_frozen_vae(cli_world.vae)
    options = dict(steps=STEPS, num_frames=FRAMES)
    joint = decode_frames(vae, generate_requested(video, anatomy, ef, seeds, **options, image_model=anatomy,
                                                  joint="every=2")).clamp(-1, 1)
    plain = decode_frames(vae, generate_requested(video, anatomy, ef, seeds, **options)).clamp(-1, 1)
    for row, expected, alone in zip(kept, joint, plain):
        written = torch.from_numpy(read_video(out / "Videos" / f"{row['FileName']}.avi").astype("float32"))
        error = (written - (expected[:, 0] + 1) * 127.5).abs().mean()
        assert error < 3.0 and error < 0.5 * (written - (alone[:, 0] + 1) * 127.5).abs().mean()


def test_the_fields_loaders_read_the_written_folder(cli_world, tmp_path):
    """The row filters of EchoNet-Dynamic's ``Echo``, of the fork EchoNet-Synthetic evaluates with, and of
    EchoNet-Synthetic's ``Dynamic`` (re-implemented in tests/helpers/echonet_loaders.py) on a folder the writer wrote."""
    out = cli_world.out / "unsplit"
    filelist = read_filelist(out)
    assert list(filelist[0]) == list(FILELIST_COLUMNS) and all(row["ESV"] == row["EDV"] == "" for row in filelist)
    by_split = {label: sorted(row["FileName"] + ".avi" for row in filelist if row["Split"] == label)
                for label in ("TRAIN", "VAL", "TEST")}
    assert all(by_split.values()) and sum(map(len, by_split.values())) == len(filelist) == 24
    for label, names in by_split.items():
        assert sorted(echosyn_echo_rows(out, label.lower())) == names  # every video, its split in any case
        # Dynamic keeps videos longer than its clip: these 4 frames at 12.5 fps (0.32 s) against 3 frames at 12 fps
        # (0.25 s), not against its configs' 64 frames at 32 fps (2 s).
        assert sorted(echosyn_dynamic_rows(out, [label], target_nframes=3, target_fps=12)) == names
        assert echosyn_dynamic_rows(out, [label]) == []
    # EchoNet-Dynamic's own Echo needs traced volumes (VolumeTracings.csv, 2 frames per video), which a synthetic
    # video does not have. A header alone would not help: both Echo variants would then keep no video at all.
    with pytest.raises(FileNotFoundError, match="VolumeTracings.csv"):
        echonet_dynamic_rows(out, "train")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "VolumeTracings.csv").write_text(",".join(TRACINGS_HEADER) + "\n")
    assert echonet_dynamic_rows(copy, "train") == []
    with pytest.raises(AssertionError, match="No videos found"):
        echosyn_echo_rows(copy, "train")


def test_split_labels_are_upper_case_whatever_the_config_says(tmp_path):
    writer = SyntheticDatasetWriter(tmp_path / "out", 4, unfiltered=True,
                                    splits={"train": 0.5, "Val": 0.25, "test": 0.25})
    assert writer.splits == {"TRAIN": 0.5, "VAL": 0.25, "TEST": 0.25}
    for bad in ({"train": 0.5, "TRAIN": 0.5}, {"TRAIN": 0.5, "holdout": 0.5}):
        with pytest.raises(ValueError, match="keyed by TRAIN, VAL, TEST"):
            SyntheticDatasetWriter(tmp_path / "out", 4, unfiltered=True, splits=bad)
    with pytest.raises(ValueError, match="plain name"):  # EchoNet-Synthetic cuts the FileName at its first '.'
        SyntheticDatasetWriter(tmp_path / "out", 4, unfiltered=True, prefix="synthetic.v1")


@pytest.fixture(scope="module")
def straight(cli_world, tmp_path_factory) -> tuple:
    """The uninterrupted 1-process generation of 10 videos (40 attempts): what a resumed and a 2-process generation
    must write."""
    out = tmp_path_factory.mktemp("straight") / "synthetic"
    result = run_generate(cli_world, out, devices=1, num_videos=10, attempts=40)
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset(out)


@pytest.mark.slow
def test_killed_generation_resumes_to_the_uninterrupted_dataset(cli_world, straight, tmp_path):
    out = tmp_path / "killed"
    process = run_generate(cli_world, out, devices=1, num_videos=10, attempts=40, background=True)
    kill_when(process, lambda: len(list((out / "Videos").glob("*.avi"))) >= 4 if (out / "Videos").is_dir() else False)
    listed = [row["FileName"] for row in read_filelist(out)]
    assert 0 < len(listed) < 10, "the generation was not interrupted mid-way"
    assert set(listed) <= {p.stem for p in (out / "Videos").glob("*.avi")}  # FileList never lists a missing video
    (out / "Videos" / "synthetic_999999.avi").write_bytes(b"half")  # as if killed between the AVI and the FileList
    resumed = run_generate(cli_world, out, devices=1, num_videos=10, attempts=40)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    filelist, audit, videos = dataset(out)
    assert len(filelist) == 10 and sorted(videos) == sorted(row["FileName"] for row in filelist)
    assert filelist == straight[0] and audit == straight[1]
    for name, frames in videos.items():
        np.testing.assert_array_equal(frames, straight[2][name])


@pytest.mark.slow
def test_ddp_generation_writes_the_n_distinct_videos_of_one_process(cli_world, straight, tmp_path):
    result = run_generate(cli_world, tmp_path / "devices2", devices=2, num_videos=10, attempts=40)
    assert result.returncode == 0, result.stderr[-3000:]
    (filelist, audit, videos), (filelist2, audit2, videos2) = straight, dataset(tmp_path / "devices2")
    assert len(filelist2) == 10 == len({row["FileName"] for row in filelist2}) == len(videos2)
    assert any(row["Decision"] == "dropped" for row in audit2)  # the filter acted on both ranks' videos
    assert [row["FileName"] for row in filelist2] == [row["FileName"] for row in filelist]
    # Same decisions; 2 ranks generate 4 attempts a round where 1 rank generates 2, so the last round may add surplus.
    decisions = [(r["Attempt"], r["Decision"], r["Split"]) for r in audit]
    assert [(r["Attempt"], r["Decision"], r["Split"]) for r in audit2[:len(audit)]] == decisions
    assert all(r["Decision"] == "surplus" for r in audit2[len(audit):])
    for one, two in zip(audit, audit2):
        assert float(two["Score"]) == pytest.approx(float(one["Score"]), abs=1e-4)
        assert float(two["EF"]) == float(one["EF"])
    for name, frames in videos.items():  # batches differ between the runs: pixels agree up to rounding
        assert np.abs(frames.astype(int) - videos2[name].astype(int)).max() <= 2
