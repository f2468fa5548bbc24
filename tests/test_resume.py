"""A fit killed anywhere and resumed with ``--ckpt_path last`` equals the uninterrupted fit — every module, through the
CLI, SIGKILLed like a preempted job — and resumes into the run folder it came from."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from echo_lvdm.main import main
from tests.helpers.cli import REPO
from tests.helpers.data import encode_tiny_latents
from tests.helpers.models import TINY_DIFFUSION, TINY_EF, TINY_REID, TINY_VAE

BATCHES_PER_EPOCH = 4  # 8 training videos, batch 2; validation every 2 batches → last.ckpt after batches 2, 4, 6, 8

_TRAINER = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true", "max_epochs": 2,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "limit_val_batches": 1, "log_every_n_steps": 1, "val_check_interval": 2, "check_val_every_n_epoch": None}
_LATENT = {"space": "latent", "latent_dir": "LATENTS", "latent_posterior": "mean"}
# model config, overrides of its init_args, data overrides; num_workers 1: workers prefetch, as in every real config
MODULES = {
    "vae": ("configs/vae.yaml", {**TINY_VAE, "disc_start_step": 2}, {"size": 32, "num_frames": 2}),
    "reid": ("configs/reid_latent.yaml", {**TINY_REID, "in_channels": 4}, {**_LATENT, "group_by_patient": False}),
    "ef": ("configs/ef_pixel.yaml", {**TINY_EF, "in_channels": 1, "lr_step_period": 1},
           {"size": 32, "clip_length": 4, "period": 1}),
    "anatomy": ("configs/lidm.yaml", {**TINY_DIFFUSION, "sampling_steps": 2}, {**_LATENT, "num_frames": 2}),
    "video": ("configs/lvdm.yaml", {**TINY_DIFFUSION, "sampling_steps": 2, "ema_decay": 0.9},
              {**_LATENT, "clip_length": 4, "fps": None, "period": 2}),
}


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory) -> tuple[Path, Path]:
    from datamodules.phantom import generate_phantom

    work = tmp_path_factory.mktemp("resume")
    root = generate_phantom(work / "data", patients=12, videos_per_patient=1, seed=5, size=32, frames=(12, 16),
                            split_fractions=(0.67, 0.17, 0.16))
    splits = [row["Split"] for row in csv.DictReader(open(root / "FileList.csv"))]
    assert splits.count("TRAIN") == 2 * BATCHES_PER_EPOCH and splits.count("VAL") >= 2
    return root, encode_tiny_latents(root, work / "latents")


def fit_args(out: Path, stack: list[Path], *args: str) -> list[str]:
    return ["fit", *sum((["--config", str(p)] for p in stack), []), "--seed_everything", "0",
            "--trainer.default_root_dir", str(out), "--trainer.callbacks+=tests.helpers.callbacks.RecordLosses",
            f"--trainer.callbacks.path={out}.losses", *args]


def fit(out: Path, stack: list[Path], *args: str) -> None:
    """``echo-lvdm fit`` in this process (no interpreter start-up: the runs that are not killed)."""
    assert main(fit_args(out, stack, *args)) == 0


def fit_killed(out: Path, stack: list[Path], *args: str) -> None:
    """``echo-lvdm fit`` as the console script, which a ``KillAt`` callback in ``args`` SIGKILLs."""
    result = subprocess.run([str(Path(sys.executable).with_name("echo-lvdm")), *fit_args(out, stack, *args)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    assert result.returncode == -9, result.stderr[-3000:]


def losses(out: Path) -> list[tuple[int, float, int]]:
    """(batch of the fit, loss, process id) per training step, in the order they ran."""
    return [(row["batch"], row["loss"], row["pid"]) for row in map(json.loads, open(f"{out}.losses"))]


def weights(out: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(out / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    tensors = dict(checkpoint["state_dict"])
    for i, shadow in enumerate(checkpoint.get("ema", {}).get("shadow_params", [])):
        tensors[f"ema.{i}"] = shadow
    tensors["global_step"] = torch.tensor(checkpoint["global_step"])
    return tensors


_UNINTERRUPTED: dict[tuple, Path] = {}


def killed_and_resumed(tmp_path: Path, stack: list[Path], kill: list[str], *args: str) -> tuple[Path, Path]:
    """An uninterrupted fit (run once per configuration), and one SIGKILLed at ``kill`` then resumed with
    ``--ckpt_path last``."""
    key = (*map(str, stack), *args)
    if key not in _UNINTERRUPTED:
        fit(tmp_path / "straight", stack, *args)
        _UNINTERRUPTED[key] = tmp_path / "straight"
    straight, resumed = _UNINTERRUPTED[key], tmp_path / "resumed"
    fit_killed(resumed, stack, *args, "--trainer.callbacks+=tests.helpers.callbacks.KillAt", *kill)
    fit(resumed, stack, *args, "--ckpt_path", "last")
    assert sorted(path.name for path in resumed.iterdir()) == ["version_0"]  # resumed into the same run folder
    return straight, resumed


def assert_same_fit(straight: Path, resumed: Path, resumed_from: int) -> None:
    """The resumed run trained exactly the batches after its checkpoint, with the losses and the end weights of the
    uninterrupted run, bit for bit."""
    uninterrupted, interrupted = losses(straight), losses(resumed)
    assert [batch for batch, _, _ in uninterrupted] == list(range(2 * BATCHES_PER_EPOCH))
    restart = next(i for i, entry in enumerate(interrupted) if entry[2] != interrupted[0][2])
    assert interrupted[restart][0] == resumed_from
    assert [entry[:2] for entry in interrupted[restart:]] == [entry[:2] for entry in uninterrupted[resumed_from:]]
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_a_killed_fit_resumes_as_if_never_stopped(name, resume_data, tmp_path):
    """Killed before the 8th batch: last.ckpt is from after the 6th, in the middle of epoch 1. The resumed fit trains
    epoch 1's last 2 batches — not the epoch's first ones again (what Lightning does with a plain loader), and with
    epoch 1's order (not epoch 0's, which prefetching DataLoader workers used to pick up)."""
    root, latents = resume_data
    config, model, data = MODULES[name]
    data = {key: str(latents) if value == "LATENTS" else value for key, value in data.items()}
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({
        "model": {"init_args": {key: list(value) if isinstance(value, tuple) else value for key, value in model.items()}},
        "trainer": {**_TRAINER, "callbacks": []},
        "data": {"root": str(root), "batch_size": 2, "num_workers": 1, "pin_memory": False, **data}}))
    straight, resumed = killed_and_resumed(tmp_path, [REPO / config, overlay], ["--trainer.callbacks.batch=7"])
    assert_same_fit(straight, resumed, resumed_from=6)


TOY = ["--model", "tests.helpers.toy_models.MeanBrightnessEF", "--trainer.accelerator", "cpu",
       "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--data.clip_length", "4",
       "--data.batch_size", "2", "--data.num_workers", "1"]


@pytest.mark.parametrize(("kill", "validation", "resumed_from"), [
    (["--trainer.callbacks.batch=5"], "epoch", 4),   # checkpoint at epoch 0's end, killed inside epoch 1
    (["--trainer.callbacks.epoch=0"], "steps", 4),   # checkpoint at the validation after epoch 0's last batch, killed
                                                     # before the epoch's end
], ids=["epoch-end checkpoint", "between validation and the epoch's end"])
def test_kill_points(kill, validation, resumed_from, resume_data, tmp_path):
    """Wherever the kill falls, the resumed toy fit trains the batches after its checkpoint, as an uninterrupted one.
    (A mid-epoch checkpoint is every module's test above.)"""
    root, _ = resume_data
    every = ["--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null"] if validation == "steps" \
        else []
    straight, resumed = killed_and_resumed(tmp_path, [], kill, "--data.root", str(root), *TOY, *every)
    assert_same_fit(straight, resumed, resumed_from)


def test_a_fit_that_ends_between_validations_leaves_last_ckpt_at_its_end(resume_data, tmp_path):
    """Validated every 2nd epoch, a 3-epoch fit ends with last.ckpt at its last step — Lightning alone leaves it at
    the last validation, an epoch short — and that checkpoint resumed with max_epochs 4 trains on as the 4-epoch fit
    did from the start: the same batches, losses and end weights."""
    root, _ = resume_data
    toy = ["--data.root", str(root), *TOY, "--trainer.check_val_every_n_epoch", "2"]
    fit(tmp_path / "short", [], *toy, "--trainer.max_epochs", "3")
    assert weights(tmp_path / "short")["global_step"] == 3 * BATCHES_PER_EPOCH
    fit(tmp_path / "short", [], *toy, "--trainer.max_epochs", "4", "--ckpt_path", "last")
    fit(tmp_path / "long", [], *toy, "--trainer.max_epochs", "4")
    extended, straight = losses(tmp_path / "short"), losses(tmp_path / "long")
    assert [batch for batch, _, _ in extended] == list(range(4 * BATCHES_PER_EPOCH))
    assert [entry[:2] for entry in extended] == [entry[:2] for entry in straight]
    a, b = weights(tmp_path / "short"), weights(tmp_path / "long")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("max_steps", [7, 8], ids=["inside an epoch", "at an epoch's end"])
def test_a_fit_stopped_by_max_steps_between_validations_says_where_last_ckpt_is(max_steps, resume_data, tmp_path):
    """max_steps 7 or 8 with validation every 3rd step: last.ckpt stays at step 6 (an epoch-end checkpoint of a
    step-stopped fit does not resume as the longer fit: Lightning counts the next batch into the stopped epoch), and
    the fit says so."""
    root, _ = resume_data
    with pytest.warns(UserWarning, match=f"last.ckpt holds step 6, not this fit's last step {max_steps}"):
        fit(tmp_path / "run", [], "--data.root", str(root), *TOY, "--trainer.val_check_interval", "3",
            "--trainer.check_val_every_n_epoch", "null", "--trainer.max_epochs", "-1", "--trainer.max_steps",
            str(max_steps))
    assert weights(tmp_path / "run")["global_step"] == 6


def test_resume_flags_are_checked_before_anything_is_written(resume_data, tmp_path, monkeypatch, capsys):
    """A ``--ckpt_path`` that is no file stops the console script with one line and exit status 1, before a run
    folder exists (it used to leave an empty ``version_<n>/config.yaml``)."""
    root, _ = resume_data
    for flag, message in (("last", f"--ckpt_path last: no {tmp_path / 'run'}/version_*/checkpoints/last.ckpt"),
                          (str(tmp_path / "nowhere.ckpt"), f"--ckpt_path {tmp_path / 'nowhere.ckpt'}: no such")):
        monkeypatch.setattr(sys, "argv", ["echo-lvdm", *fit_args(tmp_path / "run", [], "--data.root", str(root), *TOY,
                                                                 "--ckpt_path", flag)])
        assert main() == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f"echo-lvdm: {message}"), err
        assert "Traceback" not in err
        assert not (tmp_path / "run").exists()


def test_a_resumed_fit_says_which_model_arguments_the_checkpoint_replaced(resume_data, tmp_path):
    """LightningCLI parses a checkpoint's hyper_parameters over the configs and the command line: ``--model.init_args.lr
    0.05`` beside ``--ckpt_path`` runs at the checkpoint's lr. The command says so, naming the argument and both
    values, whether a config file or the command line set it; it says nothing of arguments nobody set (a config
    that names only the class, as configs/generate.yaml, takes the checkpoint's architecture) or set as the
    checkpoint has."""
    root, _ = resume_data
    out, toy = tmp_path / "run", ["--data.root", str(root), *TOY]
    fit(out, [], *toy, "--trainer.max_epochs", "1", "--model.init_args.lr", "0.2")
    overlay = tmp_path / "lr.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"lr": 0.1}}}))

    def resumed(*args: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(out, [], *toy, "--ckpt_path", "last", *args)
        return [str(w.message) for w in caught if "--ckpt_path" in str(w.message)]

    said = resumed("--model.init_args.lr", "0.05", "--trainer.max_epochs", "2")
    assert len(said) == 1 and "the checkpoint's model arguments replace" in said[0] and "lr 0.05 → 0.2" in said[0]
    checkpoint = torch.load(out / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["hyper_parameters"]["lr"] == 0.2  # what ran: the warning's truth
    said = resumed("--config", str(overlay), "--trainer.max_epochs", "3")
    assert len(said) == 1 and "lr 0.1 → 0.2" in said[0]
    assert resumed("--trainer.max_epochs", "4") == []  # the default lr, 0.05, was not set: nothing replaced
    assert resumed("--model.init_args.lr", "0.2", "--trainer.max_epochs", "5") == []
