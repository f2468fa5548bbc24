"""The echo-lvdm console script: help, config stacking, --print_config, a real fit and a resumed fit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[1]
# configs/pipeline/* order whole runs of these configs (tests/test_pipeline.py resolves each of their stages)
CONFIGS = sorted(path for path in (REPO / "configs").rglob("*.yaml") if path.parent.name != "pipeline")


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).with_name("echo-lvdm")
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_console_script_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("fit", "validate", "test", "predict", "phantom", "inspect", "export-vae"):
        assert f"\n  {command} " in result.stdout


def test_plain_command_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["phantom", "--help"])
    assert exited.value.code == 0
    assert "--videos-per-patient" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """main() is called with its own argv here; pytest's command line must not look like the CLI's."""
    monkeypatch.setattr(sys, "argv", ["echo-lvdm"])


def print_config(capsys, *args: str, subcommand: str = "fit") -> dict:
    with pytest.raises(SystemExit) as exited:
        main([subcommand, *args, "--print_config"])
    assert exited.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_resolves(capsys, config):
    content = yaml.safe_load(config.read_text())
    args = ["--config", str(config)]
    if "model" not in content and "data" not in content:  # configs/logger/*: stacked after a model config
        args = ["--config", str(REPO / "configs/vae_quickstart.yaml"), *args]
    elif "model" not in content:  # data-only configs are stacked under a model config
        args += ["--model", "tests.toy_models.MeanBrightnessEF"]
    subcommand = "predict" if "return_predictions" in content else "fit"
    resolved = print_config(capsys, *args, subcommand=subcommand)
    assert resolved["data"]["root"]
    assert resolved["model"]["class_path"]


def test_configs_stack_left_to_right(capsys, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  clip_length: 4\n  root: elsewhere\n")
    resolved = print_config(capsys, "--config", str(REPO / "configs/data/phantom.yaml"), "--config", str(override),
                            "--model", "tests.toy_models.MeanBrightnessEF", "--data.batch_size", "3")
    assert (resolved["data"]["clip_length"], resolved["data"]["root"], resolved["data"]["batch_size"]) == (4, "elsewhere", 3)
    assert resolved["data"]["pad"] == "reflect"  # untouched keys come from the first config
    assert resolved["model"]["class_path"] == "tests.toy_models.MeanBrightnessEF"


def fit(counter_folder: Path, out: Path, *args: str) -> dict:
    """`echo-lvdm fit` with the toy model; returns the last checkpoint."""
    result = run_cli(
        "fit", "--config", str(REPO / "configs/data/phantom.yaml"), "--data.root", str(counter_folder),
        "--data.clip_length", "4", "--data.batch_size", "2", "--data.num_workers", "0",
        "--model", "tests.toy_models.MeanBrightnessEF", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(out), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={out}", "--seed_everything", "0", *args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(max(out.glob("*.ckpt"), key=lambda p: p.stat().st_mtime), weights_only=True, map_location="cpu")


def test_resumed_fit_equals_uninterrupted_fit(counter_folder, tmp_path):
    straight = fit(counter_folder, tmp_path / "straight", "--trainer.max_epochs", "3")
    first = fit(counter_folder, tmp_path / "resumed", "--trainer.max_epochs", "1")
    assert (first["epoch"], first["global_step"]) == (0, 2)  # 4 training videos, batch 2
    checkpoint = next((tmp_path / "resumed").glob("*.ckpt"))
    resumed = fit(counter_folder, tmp_path / "resumed", "--trainer.max_epochs", "3", "--ckpt_path", str(checkpoint))
    assert (resumed["epoch"], resumed["global_step"]) == (straight["epoch"], straight["global_step"]) == (2, 6)
    assert not torch.equal(resumed["state_dict"]["linear.weight"], first["state_dict"]["linear.weight"])
    for name, weight in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], weight, rtol=0, atol=0)
