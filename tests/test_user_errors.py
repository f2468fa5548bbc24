"""A user's bad input stops the console script early, with exit status 1 and one line naming the file, row or key —
no traceback, no Lightning usage text (``ECHO_LVDM_DEBUG=1`` shows the traceback)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from datamodules.video_io import read_video, write_video
from echo_lvdm.main import DEBUG_ENV, main
from tests.helpers.cli import REPO
from tests.helpers.data import make_counter_folder, read_filelist, write_filelist
from tests.helpers.models import TINY_VAE, distance_reid, save_cli_checkpoint

TOY = ["--model", "tests.helpers.toy_models.MeanBrightnessEF", "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """One of each bad input, beside a good dataset and a re-ID checkpoint."""
    from lightning_modules import VAEModule

    work = tmp_path_factory.mktemp("user_errors")
    data = make_counter_folder(work / "data", [("TRAIN", 12, 50.0, "A"), ("TRAIN", 12, 50.0, "B"),
                                               ("VAL", 12, 50.0, "C"), ("TEST", 12, 50.0, "D")])
    paths = {"data": data, "reid": save_cli_checkpoint(distance_reid(in_channels=1), work / "reid.ckpt"),
             "vae_ckpt": save_cli_checkpoint(VAEModule(**TINY_VAE), work / "vae.ckpt")}
    cut = work / "cut.ckpt"
    cut.write_bytes(paths["reid"].read_bytes()[:4000])
    paths["cut_ckpt"] = cut
    bad_yaml = work / "bad.yaml"
    bad_yaml.write_text("data:\n  root: x\n   batch_size: [1\n")
    paths["bad_yaml"] = bad_yaml
    header_only = work / "header_only"
    (header_only / "Videos").mkdir(parents=True)
    (header_only / "FileList.csv").write_text((data / "FileList.csv").read_text().splitlines()[0] + "\n")
    paths["header_only"] = header_only
    mp4 = work / "mp4"  # videos written as .mp4, FileNames without an extension (which means .avi)
    rows = read_filelist(data)
    for row in rows:
        frames = read_video(data / "Videos" / row["FileName"])
        row["FileName"] = Path(row["FileName"]).stem
        write_video(mp4 / "Videos" / f"{row['FileName']}.mp4", frames, 50)
    write_filelist(mp4, rows)
    paths["mp4"] = mp4
    no_ef = work / "no_ef"  # a synthetic folder whose FileList has no EF column
    write_filelist(no_ef, read_filelist(data), columns=[c for c in read_filelist(data)[0] if c != "EF"])
    (no_ef / "Videos").symlink_to(data / "Videos")
    paths["no_ef"] = no_ef
    pipeline = work / "pipeline.yaml"  # the quickstart with a typo in its last Lightning stage's args
    quickstart = (REPO / "configs/pipeline/quickstart.yaml").read_text()
    last_args = "--model.lr_step_period, 24, --data.period, 1"  # ef_synthetic's
    assert quickstart.count(last_args) == 1, "the quickstart's ef_synthetic args changed: update this typo"
    pipeline.write_text(quickstart.replace(last_args, last_args.replace("step_period", "step_perod")))
    paths["pipeline"] = pipeline
    typo = work / "typo.yaml"  # a config with a misspelt trainer key
    typo.write_text("trainer:\n  max_epoch: 3\n")
    paths["typo"] = typo
    return paths


CASES = {  # name → (argv with {placeholders}, the start of the one line)
    "truncated checkpoint": (["calibrate", "--reid", "{cut_ckpt}", "--real", "{data}"],
                             "echo-lvdm: {cut_ckpt}: not a complete checkpoint"),
    "VAE checkpoint as --reid": (["calibrate", "--reid", "{vae_ckpt}", "--real", "{data}"],
                                 "echo-lvdm: {vae_ckpt}: a VAEModule checkpoint (lightning_modules.vae.VAEModule), "
                                 "not a ReIDModule"),
    "truncated --ckpt_path": (["fit", "--data.root", "{data}", *TOY, "--ckpt_path", "{cut_ckpt}"],
                              "echo-lvdm: {cut_ckpt}: not a complete checkpoint"),
    "malformed YAML": (["fit", "--config", "{bad_yaml}", *TOY],
                       "echo-lvdm: {bad_yaml}, line 3, column 14: not valid YAML"),
    "FileList with only a header": (["inspect", "--root", "{header_only}"],
                                    "echo-lvdm: {header_only}/FileList.csv: a header and no rows"),
    "no data location": (["fit", *TOY], "echo-lvdm: EchoNetDataModule: no dataset folder"),
    "evaluate, synthetic FileList without EF": (
        ["evaluate", "--real", "{data}", "--synthetic", "{no_ef}", "--reid", "{reid}", "--out", "{work}/evaluation"],
        "echo-lvdm: {no_ef}/FileList.csv: missing required column(s) EF"),
    "pipeline, typo in the last stage": (["pipeline", "--config", "{pipeline}", "--out", "{work}/run"],
                                         "echo-lvdm: pipeline: stage ef_synthetic"),
    "unknown model argument": (["fit", "--data.root", "{data}", *TOY, "--model.bogus", "3"],
                               "echo-lvdm: fit: --model.bogus: tests.helpers.toy_models.MeanBrightnessEF has no "
                               "argument 'bogus'; echo-lvdm fit --model.help tests.helpers.toy_models.MeanBrightnessEF"),
    "a value of the wrong type": (["fit", "--data.root", "{data}", *TOY, "--trainer.max_epochs", "three"],
                                  "echo-lvdm: fit: --trainer.max_epochs: expected int or None, got 'three'"),
    "an unknown key in a config": (["fit", "--data.root", "{data}", *TOY, "--config", "{typo}"],
                                   "echo-lvdm: fit: {typo} sets 'trainer.max_epoch', which fit does not accept"),
    "an unknown flag": (["validate", "--data.root", "{data}", *TOY, "--bogus"],
                        "echo-lvdm: validate: unrecognized arguments: --bogus (echo-lvdm validate --help"),
}


def run_console(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``echo-lvdm <argv>`` as the console script runs it (``main()`` reading ``sys.argv``), in this process."""
    monkeypatch.setattr(sys, "argv", ["echo-lvdm", *argv])
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    code = main()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_and_exit_1(case, inputs, monkeypatch, capsys):
    argv, expected = CASES[case]
    values = {**{key: str(path) for key, path in inputs.items()}, "work": str(inputs["data"].parent)}
    code, err = run_console([arg.format(**values) for arg in argv], monkeypatch, capsys)
    assert code == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("echo-lvdm")]
    assert lines and lines[0].startswith(expected.format(**values)), err
    if case == "evaluate, synthetic FileList without EF":
        assert not (inputs["data"].parent / "evaluation" / "reid_cache").exists()  # refused before any embedding
    if case == "pipeline, typo in the last stage":
        assert not (inputs["data"].parent / "run").exists()  # refused before the first stage
        assert "--model.lr_step_perod: lightning_modules.ef_regressor.EFRegressorModule has no argument" in err, err
    assert len(err.strip().splitlines()) == 1 or case == "FileList with only a header", err


def test_videos_under_another_extension_get_a_hint(inputs, monkeypatch, capsys):
    code, err = run_console(["inspect", "--root", str(inputs["mp4"])], monkeypatch, capsys)
    assert code == 1
    assert err.splitlines()[0].startswith("echo-lvdm: 4 bad entries in the dataset:")
    assert "video missing: " in err and "(Videos/ has V000.mp4: a FileName without an extension means .avi" in err


def test_the_debug_switch_shows_the_traceback(inputs, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["echo-lvdm", "inspect", "--root", str(inputs["header_only"])])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="a header and no rows"):
        main()


def test_a_phantom_error_says_phantom_once(tmp_path, caplog):
    assert main(["phantom", "--out", str(tmp_path / "p"), "--patients", "0"]) == 1
    assert "echo-lvdm phantom: patients and videos_per_patient must be ≥ 1" in caplog.text
    assert "phantom: phantom:" not in caplog.text
