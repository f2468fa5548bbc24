"""Broken datasets: every bad entry is named (file, line, problem) in one error at setup, or skipped and counted."""

import csv
import re

import numpy as np
import pytest

from datamodules.datamodule import EchoNetDataModule
from datamodules.filelist import DataValidationError
from datamodules.video_io import write_video
from tests.helpers.data import counter_video, make_counter_folder, write_filelist


@pytest.fixture
def broken_folder(tmp_path):
    """Three good videos plus one of every problem, all in TRAIN (lines are CSV line numbers, header = 1)."""
    root = make_counter_folder(tmp_path, [("TRAIN", 12, 50.0, f"P{i}") for i in range(9)] + [("VAL", 12, 50.0, "V")])
    rows = list(csv.DictReader((root / "FileList.csv").open()))
    rows[3]["EF"] = "nan"                                      # line 5
    rows[4]["EF"] = "120"                                      # line 6
    (root / "Videos" / rows[5]["FileName"]).unlink()           # line 7: row whose video is absent
    (root / "Videos" / rows[6]["FileName"]).write_bytes(b"this is not a video at all" * 20)  # line 8
    rows[7]["FPS"] = "0"                                       # line 9
    rows[8]["FileName"] = rows[0]["FileName"]                  # line 10 duplicates line 2
    write_filelist(root, rows)
    return root


EXPECTED = [
    (2, "duplicate FileName"),
    (5, "EF is 'nan', expected a number in [0, 100]"),
    (6, "EF is '120', expected a number in [0, 100]"),
    (7, "video missing"),
    (8, "undecodable video"),
    (9, "FPS is '0', expected a positive number"),
    (10, "duplicate FileName"),
]


def test_every_bad_entry_is_reported_together_with_file_and_line(broken_folder):
    dm = EchoNetDataModule(broken_folder)
    with pytest.raises(DataValidationError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert message.startswith("7 bad entries")
    for line, problem in EXPECTED:
        assert re.search(rf"FileList\.csv, line {line} \(FileName=V\d+\.mkv\): {re.escape(problem)}", message), (
            line, message)
    assert "on_bad='skip'" in message


def test_skip_drops_bad_entries_with_one_counted_warning(broken_folder):
    dm = EchoNetDataModule(broken_folder, on_bad="skip", clip_length=4)
    with pytest.warns(UserWarning, match=r"skipped 7 of 10 FileList rows \(2 duplicate FileName, 2 bad EF, 1 missing video, 1 undecodable video, 1 bad FPS\)") as warned:
        dm.setup("fit")
    assert len([w for w in warned if "skipped" in str(w.message)]) == 1
    assert [r.line for r in dm.datasets["train"].records] == [3, 4]
    assert len(dm.datasets["val"]) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape[0] == 2


def test_missing_required_column_is_an_error_even_with_skip(tmp_path):
    root = make_counter_folder(tmp_path, [("TRAIN", 12, 50.0, "A")])
    rows = list(csv.DictReader((root / "FileList.csv").open()))
    write_filelist(root, rows, columns=[c for c in rows[0] if c != "EF"])
    with pytest.raises(DataValidationError, match=r"FileList\.csv: missing required column\(s\) EF; found FileName"):
        EchoNetDataModule(root, on_bad="skip").setup("fit")


def test_missing_filelist_and_missing_split_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no FileList.csv"):
        EchoNetDataModule(tmp_path).setup("fit")
    root = make_counter_folder(tmp_path / "only_train", [("TRAIN", 12, 50.0, "A")])
    with pytest.raises(DataValidationError, match="no row has Split=VAL"):
        EchoNetDataModule(root).setup("fit")
    with pytest.raises(ValueError, match="no dataset folder for the train split"):
        EchoNetDataModule(val_root=root).setup("fit")


def test_video_shorter_than_its_filelist_says(tmp_path):
    """A FileList that overstates the length: verify='decode' corrects it at setup; otherwise the loader re-plans."""
    root = make_counter_folder(tmp_path, [("VAL", 10, 50.0, "A")])
    rows = list(csv.DictReader((root / "FileList.csv").open()))
    rows[0]["NumberOfFrames"] = "30"
    write_filelist(root, rows)
    exact = EchoNetDataModule(root, verify="decode", clip_length=4)
    exact.setup("validate")
    assert exact.datasets["val"].records[0].num_frames == 10
    trusting = EchoNetDataModule(root, clip_length=16)  # any 16-frame clip planned on 30 frames passes frame 9
    trusting.setup("validate")
    with pytest.warns(UserWarning, match=r"V000\.mkv: frame \d+ requested but the video decodes to 10 frames"):
        item = trusting.datasets["val"][0]
    assert item["video"].shape[0] == 16 and trusting.datasets["val"].records[0].num_frames == 10


def test_truncated_avi_is_caught_by_full_verification(tmp_path):
    """A half-written AVI still decodes its first frame: verify='open' lets it through, verify='decode' names it."""
    frames = np.repeat(counter_video(40, 32)[..., None], 3, axis=-1)
    path = write_video(tmp_path / "Videos" / "cut.avi", frames, 50)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    write_filelist(tmp_path, [{"FileName": "cut", "EF": 40, "Split": "VAL", "FPS": 50, "NumberOfFrames": 40}])
    EchoNetDataModule(tmp_path, verify="open").setup("validate")
    with pytest.raises(DataValidationError, match=r"line 2 \(FileName=cut\): undecodable video \(.*cut\.avi"):
        EchoNetDataModule(tmp_path, verify="decode").setup("validate")
