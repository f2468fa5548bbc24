"""Broken datasets: every bad entry is named (file, line, problem) in one error at setup, or skipped and counted."""

import csv
import re

import numpy as np
import pytest

from datamodules.datamodule import EchoNetDataModule
from datamodules.filelist import DataValidationError
from datamodules.video_io import write_video
from tests.helpers.cli import run_cli
from tests.helpers.data import counter_video, cut_avi, make_counter_folder, read_filelist, write_filelist


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
    """A FileList that overstates the length of a whole video: setup serves the video's own length, with one warning
    (verify 'count', the default, and 'decode'); with verify='open' the loader re-plans."""
    root = make_counter_folder(tmp_path, [("VAL", 10, 50.0, "A")])
    rows = list(csv.DictReader((root / "FileList.csv").open()))
    rows[0]["NumberOfFrames"] = "30"
    write_filelist(root, rows)
    for verify in ("count", "decode"):
        exact = EchoNetDataModule(root, verify=verify, clip_length=4)
        with pytest.warns(UserWarning, match=r"(?s)1 FileList row\(s\) give a NumberOfFrames .*line 2 \(FileName=V000"
                                             r"\.mkv\): NumberOfFrames 30, the video has 10"):
            exact.setup("validate")
        assert exact.datasets["val"].records[0].num_frames == 10
    trusting = EchoNetDataModule(root, clip_length=16, verify="open")  # a 16-frame clip planned on 30 frames passes 9
    trusting.setup("validate")
    with pytest.warns(UserWarning, match=r"V000\.mkv: frame \d+ requested but the video decodes to 10 frames"):
        item = trusting.datasets["val"][0]
    assert item["video"].shape[0] == 16 and trusting.datasets["val"].records[0].num_frames == 10


def test_truncated_avi_is_caught_by_the_default_verification(tmp_path):
    """A half-written AVI still decodes its first frame: verify='open' lets it through; counting its packets (the
    default) and decoding it name it."""
    frames = np.repeat(counter_video(40, 32)[..., None], 3, axis=-1)
    path = write_video(tmp_path / "Videos" / "cut.avi", frames, 50)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    write_filelist(tmp_path, [{"FileName": "cut", "EF": 40, "Split": "VAL", "FPS": 50, "NumberOfFrames": 40}])
    EchoNetDataModule(tmp_path, verify="open").setup("validate")
    for verify in ("count", "decode"):
        with pytest.raises(DataValidationError, match=r"line 2 \(FileName=cut\): truncated video: its last frame"):
            EchoNetDataModule(tmp_path, verify=verify).setup("validate")


@pytest.fixture
def cut_folder(tmp_path):
    """5 AVIs: line 2 cut cleanly after 14 of its 43 frames, line 3 cut inside a frame, line 4 a whole 64-frame video
    listed as 8 frames (as EchoNet-Synthetic's released writer lists its batch size), two good ones."""
    root = make_counter_folder(tmp_path / "data", [("TRAIN", 43, 50.0, "A"), ("TRAIN", 43, 50.0, "B"),
                                                   ("TRAIN", 64, 50.0, "C"), ("TRAIN", 40, 50.0, "D"),
                                                   ("VAL", 40, 50.0, "E")], suffix=".avi")
    cut_avi(root / "Videos" / "V000.avi", frames=14)
    cut_avi(root / "Videos" / "V001.avi", fraction=0.5)
    rows = read_filelist(root)
    rows[2]["NumberOfFrames"] = "8"
    write_filelist(root, rows)
    return root


def test_truncated_videos_stop_the_cli_at_setup_in_one_line_per_video(cut_folder, tmp_path):
    """Before: `fit` served the clean cut at 14 frames and crashed inside a worker on the other. Now setup names both
    and the command exits 1 without a traceback; with on_bad=skip it trains on the rest, the lying row corrected."""
    toy = ["fit", "--data.root", str(cut_folder), "--model", "tests.helpers.toy_models.MeanBrightnessEF",
           "--data.clip_length", "4", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
           "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(tmp_path / "run")]
    refused = run_cli(*toy)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    message = refused.stderr[refused.stderr.index("echo-lvdm: "):].splitlines()
    assert message[0] == "echo-lvdm: 2 bad entries in the dataset:"
    assert message[1].endswith("line 2 (FileName=V000.avi): truncated video: 14 frames, its header records 43")
    assert re.search(r"line 3 \(FileName=V001\.avi\): truncated video: its last frame is cut \(\d+ frames, 1 damaged\)$",
                     message[2]), message
    skipped = run_cli(*toy, "--data.on_bad", "skip")  # (run_cli silences warnings: the next test reads them)
    assert skipped.returncode == 0, skipped.stderr[-3000:]


def test_a_64_frame_video_listed_as_8_yields_clips_from_all_64_frames(cut_folder):
    datamodule = EchoNetDataModule(cut_folder, on_bad="skip", clip_length=4)
    with pytest.warns(UserWarning) as warned:
        datamodule.setup("fit")
    messages = [str(warning.message) for warning in warned]
    assert any(m.startswith("skipped 2 of 5 FileList rows (2 truncated video)") for m in messages), messages
    assert any(m.startswith("1 FileList row(s) give a NumberOfFrames") and
               m.endswith("line 4 (FileName=V002.avi): NumberOfFrames 8, the video has 64") for m in messages), messages
    dataset = datamodule.datasets["train"]
    index = next(i for i, record in enumerate(dataset.records) if record.file_name == "V002.avi")
    assert dataset.records[index].num_frames == 64
    last = []
    for epoch in range(30):
        pixel = (dataset[(index, 0, epoch)]["video"][-1].mean() + 1) * 127.5  # counter value 2 + 3 t
        last.append(round((float(pixel) - 2) / 3))
    assert max(last) > 32 and min(last) < 32  # clip ends spread over the whole video, not its first 8 frames
