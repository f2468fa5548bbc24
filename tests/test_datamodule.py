"""EchoNetDataModule honours the batch contract of DESIGN.md and returns exactly the frames it says it does."""

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.clips import clip_indices, max_clip_start
from datamodules.datamodule import EchoNetDataModule
from datamodules.dataset import patient_id
from datamodules.errors import UserInputError
from datamodules.filelist import DataValidationError
from datamodules.video_io import write_video
from tests.helpers.data import make_counter_folder, write_filelist


def filelist(root: Path) -> dict[str, dict[str, str]]:
    with (root / "FileList.csv").open() as handle:
        return {row["FileName"]: row for row in csv.DictReader(handle)}


def source_frames(batch_video: torch.Tensor, row: int) -> list[int]:
    """Invert the counter video's pixel value (row + 3 t) back to the source frame t."""
    values = torch.round((batch_video[:, 0, 0, 0] + 1) * 127.5).long().tolist()
    return [((v - row) % 256) // 3 for v in values]


@pytest.mark.parametrize("sampling", ["clip", "frames"])
def test_batch_contract_on_the_phantom(phantom_root, sampling):
    rows = filelist(phantom_root)
    dm = EchoNetDataModule(phantom_root, sampling=sampling, clip_length=8, num_frames=3, period=2, batch_size=4)
    dm.setup()
    for split in ("train", "val", "test"):
        dataset = dm.datasets[split]
        assert {rows[r.file_name]["Split"] for r in dataset.records} == {split.upper()}
        batch = next(iter(getattr(dm, f"{split}_dataloader")()))
        assert set(batch) == {"video", "ef", "index", "patient", "fps"}
        frames = 8 if sampling == "clip" else 3
        assert batch["video"].shape == (4, frames, 1, 64, 64) and batch["video"].dtype == torch.float32
        assert -1.0 <= batch["video"].min() < batch["video"].max() <= 1.0
        assert batch["ef"].dtype == torch.float32 and batch["ef"].shape == (4,)
        assert batch["index"].dtype == torch.int64 and batch["patient"].dtype == torch.int64
        assert batch["fps"].dtype == torch.float32
        for ef, index, patient, fps in zip(batch["ef"], batch["index"], batch["patient"], batch["fps"], strict=True):
            row = rows[dataset.records[index].file_name]
            assert ef.item() == np.float32(float(row["EF"]))
            assert patient.item() == patient_id(row["PatientID"])
            expected_fps = float(row["FPS"]) / (2 if sampling == "clip" else 1)
            assert fps.item() == pytest.approx(expected_fps)


@pytest.mark.parametrize(("period", "fps"), [(1, None), (2, None), (1, 25.0)])
def test_eval_clips_hold_the_planned_source_frames(counter_folder, period, fps):
    dm = EchoNetDataModule(counter_folder, clip_length=6, period=period, fps=fps, batch_size=1)
    dm.setup("validate")
    dataset = dm.datasets["val"]
    for batch in dm.val_dataloader():
        record = dataset.records[batch["index"].item()]
        row = int(record.file_name[1:4])
        plan, plan_fps = dataset.frame_plan(batch["index"].item())
        step = record.fps / fps if fps else period
        assert source_frames(batch["video"][0], row) == plan.tolist()
        starts = range(max_clip_start(record.num_frames, 6, step) + 1)
        assert any(clip_indices(record.num_frames, 6, step, s).tolist() == plan.tolist() for s in starts)
        assert batch["fps"].item() == pytest.approx(plan_fps) == pytest.approx(record.fps / step)


@pytest.mark.parametrize(("period", "fps"), [(1, None), (3, None), (1, 32.0)])
def test_video_sampling_returns_every_frame_at_the_step(counter_folder, period, fps):
    dm = EchoNetDataModule(counter_folder, sampling="video", period=period, fps=fps, batch_size=1)
    dm.setup("test")
    for batch in dm.test_dataloader():
        record = dm.datasets["test"].records[batch["index"].item()]
        step = record.fps / fps if fps else period
        expected = [t for t in (int(np.floor(i * step + 0.5)) for i in range(200)) if t < record.num_frames]
        assert source_frames(batch["video"][0], int(record.file_name[1:4])) == expected


def test_short_video_is_padded_by_reflection(counter_folder):
    dm = EchoNetDataModule(counter_folder, clip_length=12, batch_size=8)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    short = next(i for i, r in enumerate(dataset.records) if r.num_frames == 8)
    item = dataset[short]
    assert source_frames(item["video"], 2) == [0, 1, 2, 3, 4, 5, 6, 7, 6, 5, 4, 3]


def test_zero_padding_gives_black_frames(counter_folder):
    dm = EchoNetDataModule(counter_folder, clip_length=12, pad="zeros")
    dm.setup("fit")
    dataset = dm.datasets["train"]
    item = dataset[next(i for i, r in enumerate(dataset.records) if r.num_frames == 8)]
    assert torch.all(item["video"][8:] == -1.0) and torch.all(item["video"][:8] > -1.0)


def test_frame_sampling_takes_distinct_ordered_frames_of_one_video(counter_folder):
    dm = EchoNetDataModule(counter_folder, sampling="frames", num_frames=4, batch_size=4)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        for video, index in zip(batch["video"], batch["index"], strict=True):
            record = dm.datasets["train"].records[index]
            frames = source_frames(video, int(record.file_name[1:4]))
            assert frames == sorted(frames) and max(frames) < record.num_frames
            assert len(set(frames)) == min(4, record.num_frames)


def batches(loader):
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_eval_loader_is_identical_across_epochs(counter_folder):
    dm = EchoNetDataModule(counter_folder, clip_length=5, batch_size=2)
    dm.setup("validate")
    torch.manual_seed(1)
    first = batches(dm.val_dataloader())
    torch.manual_seed(2)
    assert_same(first, batches(dm.val_dataloader()))


def test_train_stream_depends_on_seed_and_epoch_only(counter_folder):
    def run(seed, workers=0, epoch=0):
        L.seed_everything(seed)
        torch.manual_seed(1234 + workers)  # any other RNG state must not matter
        dm = EchoNetDataModule(counter_folder, clip_length=5, batch_size=2, num_workers=workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return batches(loader)

    first = run(7)
    assert_same(first, run(7))
    assert_same(first, run(7, workers=2))
    for other in (run(8), run(7, epoch=1)):
        assert any(not torch.equal(a["video"], b["video"]) for a, b in zip(first, other, strict=True))
    assert sorted(torch.cat([b["index"] for b in first]).tolist()) == [0, 1, 2, 3]


def test_rgb_avi_is_converted_to_gray_or_kept_rgb(tmp_path):
    color = np.array([200, 60, 20], dtype=np.uint8)
    write_video(tmp_path / "Videos" / "RGB.avi", np.broadcast_to(color, (6, 16, 16, 3)).copy(), 50)
    write_filelist(tmp_path, [{"FileName": "RGB", "EF": 50, "Split": "val", "FPS": 50, "NumberOfFrames": 6}])
    gray = EchoNetDataModule(tmp_path, clip_length=4)
    gray.setup("validate")
    luma = ((gray.datasets["val"][0]["video"] + 1) * 127.5).mean().item()
    assert luma == pytest.approx(0.299 * 200 + 0.587 * 60 + 0.114 * 20, abs=3)
    rgb = EchoNetDataModule(tmp_path, clip_length=4, channels=3)
    rgb.setup("validate")
    video = (rgb.datasets["val"][0]["video"] + 1) * 127.5
    assert video.shape == (4, 3, 16, 16)
    assert video.mean(dim=(0, 2, 3)).tolist() == pytest.approx(color.tolist(), abs=4)


def test_resize_keeps_values(counter_folder):
    dm = EchoNetDataModule(counter_folder, clip_length=3, size=8)
    dm.setup("validate")
    item = dm.datasets["val"][0]
    assert item["video"].shape == (3, 1, 8, 8)
    assert source_frames(item["video"], 4) == dm.datasets["val"].frame_plan(0)[0].tolist()


def test_separate_roots_per_split(tmp_path):
    synthetic = make_counter_folder(tmp_path / "synthetic", [("TRAIN", 12, 50.0, "S1"), ("TRAIN", 12, 50.0, "S2")])
    real = make_counter_folder(tmp_path / "real", [("TRAIN", 12, 50.0, "R1"), ("VAL", 12, 50.0, "R2"),
                                                  ("TEST", 12, 50.0, "R3")])
    dm = EchoNetDataModule(train_root=synthetic, val_root=real, test_root=real, clip_length=4)
    dm.setup()
    assert {r.path.parent.parent for r in dm.datasets["train"].records} == {synthetic}
    assert {r.patient for r in dm.datasets["train"].records} == {"S1", "S2"}
    assert [r.patient for r in dm.datasets["val"].records] == ["R2"]
    assert [r.patient for r in dm.datasets["test"].records] == ["R3"]


def test_split_labels_in_any_case_and_extra_columns(tmp_path):
    root = make_counter_folder(tmp_path, [("train", 12, 50.0, "A"), ("Val", 12, 50.0, "B"), ("TeSt", 12, 50.0, "C")])
    rows = list(csv.DictReader((root / "FileList.csv").open()))
    for row in rows:
        row["Comment"] = "from another site"
    write_filelist(root, rows)
    dm = EchoNetDataModule(root, clip_length=4)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [1, 1, 1]


def test_without_patient_column_identity_is_the_file(tmp_path):
    root = make_counter_folder(tmp_path, [("VAL", 12, 50.0, "A"), ("VAL", 12, 50.0, "A")])
    rows = list(csv.DictReader((root / "FileList.csv").open()))
    write_filelist(root, rows, columns=[c for c in rows[0] if c != "PatientID"])
    dm = EchoNetDataModule(root, clip_length=4)
    dm.setup("validate")
    assert dm.datasets["val"].patient_ids == [patient_id("V000.mkv"), patient_id("V001.mkv")]


def test_checkpointed_hyperparameters_load_with_weights_only(counter_folder, tmp_path):
    dm = EchoNetDataModule(counter_folder, latent_dir=tmp_path / "latents")
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "state.ckpt")
    loaded = torch.load(tmp_path / "state.ckpt", weights_only=True)
    assert loaded["datamodule_hyper_parameters"]["root"] == str(counter_folder)


def test_train_videos_draws_the_same_training_subset_in_every_run(phantom_root):
    """`train_videos: n` trains on n of the TRAIN videos — the same n in every run, kept in FileList order — and
    leaves validation and test whole; more than the split holds is refused naming the FileList."""
    full = EchoNetDataModule(phantom_root, batch_size=2)
    full.setup("fit")
    names = [record.file_name for record in full.datasets["train"].records]
    subsets = []
    for _ in range(2):
        dm = EchoNetDataModule(phantom_root, batch_size=2, train_videos=3)
        dm.setup("fit")
        subsets.append([record.file_name for record in dm.datasets["train"].records])
        assert len(dm.datasets["val"]) == len(full.datasets["val"])
        assert sum(len(batch["index"]) for batch in dm.train_dataloader()) == 3
    assert subsets[0] == subsets[1] and len(set(subsets[0])) == 3
    assert subsets[0] == [name for name in names if name in subsets[0]]  # FileList order
    assert subsets[0] != names[:3] or len(names) == 3  # a draw, not the first rows
    with pytest.raises(DataValidationError, match=rf"FileList.csv: data.train_videos {len(names) + 1} .*\({len(names)} usable"):
        EchoNetDataModule(phantom_root, train_videos=len(names) + 1).setup("fit")
    with pytest.raises(UserInputError, match="train_videos must be ≥ 1"):
        EchoNetDataModule(phantom_root, train_videos=0)
