"""CoverageCallback: the values it logs at validation equal an independent computation from the samples (brute-force
search, the prdc package, scipy's sqrtm, numpy), every validation of a fit is measured and draws the figure, a
2-process DDP validation logs the values of 1 process, and clear errors for models it cannot measure."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks.coverage import METRIC_NAMES, CoverageCallback
from datamodules.datamodule import EchoNetDataModule
from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.ef_regressor import EFRegressorModule
from lightning_modules.reid import NotCalibratedError, ReIDModule
from tests.helpers.cli import REPO
from tests.helpers.data import encode_tiny_latents
from tests.helpers.models import TINY_DIFFUSION, TINY_EF, distance_reid, save_cli_checkpoint

FRAMES, LATENT = 4, 8
STEPS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A 12-patient phantom encoded by a tiny VAE (latents 4 × 8 × 8), a calibrated re-ID, an EF regressor and an
    untrained tiny video diffusion model, all as checkpoints."""
    from datamodules.phantom import generate_phantom

    out = tmp_path_factory.mktemp("coverage")
    root = generate_phantom(out / "data", patients=12, videos_per_patient=1, seed=5, size=32, frames=(20, 24),
                            split_fractions=(0.5, 0.4, 0.1))
    encode_tiny_latents(root, out / "latents")
    data = dict(root=root, space="latent", latent_dir=str(out / "latents"), clip_length=FRAMES, batch_size=2)
    datamodule = EchoNetDataModule(**data)
    reid = distance_reid()
    reid.calibrate(datamodule)
    regressor = EFRegressorModule(in_channels=4, **TINY_EF)
    with torch.no_grad():
        regressor.network.fc.bias.fill_(50.0)
    torch.manual_seed(1)
    diffusion = VideoDiffusionModule(**TINY_DIFFUSION, ema_decay=None)
    diffusion.train_num_frames.fill_(FRAMES)
    diffusion.train_fps.fill_(12.5)
    diffusion.latent_shape.copy_(torch.tensor([4, LATENT, LATENT]))
    return SimpleNamespace(root=root, out=out, data=data, reid=reid, regressor=regressor, diffusion=diffusion,
                           reid_ckpt=save_cli_checkpoint(reid, out / "reid.ckpt"),
                           ef_ckpt=save_cli_checkpoint(regressor, out / "ef.ckpt"),
                           lvdm_ckpt=save_cli_checkpoint(diffusion, out / "lvdm.ckpt"))


def logged_rows(log_dir: Path) -> list[dict[str, str]]:
    return [row for row in csv.DictReader(open(next(Path(log_dir).rglob("metrics.csv")))) if row.get("val/coverage")]


def by_hand(world: SimpleNamespace, max_samples: int) -> dict[str, float]:
    """Every metric from the samples with independent code: per-video generators, the head applied to every pair."""
    from prdc import compute_prdc
    from scipy.linalg import sqrtm

    datamodule = EchoNetDataModule(**{**world.data, "batch_size": 64})
    datamodule.setup("fit")
    reid, regressor = world.reid, world.regressor
    train = next(iter(datamodule.eval_dataloader("train")))
    val = next(iter(datamodule.eval_dataloader("val")))
    chosen = val["index"] < max_samples
    real, ef, index = val["video"][chosen], val["ef"][chosen], val["index"][chosen]
    generators = [torch.Generator().manual_seed(int(i)) for i in index]  # seed 0: 0 · 1_000_003 + index
    synthetic = world.diffusion.sample(ef=ef, reference=real[:, 0], num_frames=FRAMES, steps=STEPS,
                                       generator=generators)
    with torch.no_grad():
        bank, fake, heldout = (reid.embed_videos(v).double() for v in (train["video"], synthetic, real))
        weight, bias = reid.head.weight.double().reshape(-1), float(reid.head.bias)

        def best(queries):  # every frame of every query against every frame of every training video
            scores = ((queries[:, :, None, None] - bank[None, None]).abs() @ weight) + bias  # (Q, F, R, F')
            flat = scores.flatten(2).max(dim=1).values  # (Q, R·F')
            value, column = flat.max(dim=1)
            return value.numpy(), (column // bank.shape[1]).numpy()

        fake_score, fake_match = best(fake)
        _, real_match = best(heldout)
        read = regressor.read_ef(synthetic).double().numpy()
    n_bank, n = len(bank), len(fake)
    coverage = len(set(fake_match.tolist())) / min(n_bank, n)
    reference = len(set(real_match.tolist())) / min(n_bank, n)
    prdc = compute_prdc(real_features=bank.mean(1).numpy(), fake_features=fake.mean(1).numpy(), nearest_k=2)
    mu1, mu2 = bank.mean(1).mean(0).numpy(), fake.mean(1).mean(0).numpy()
    cov1, cov2 = np.cov(bank.mean(1).numpy(), rowvar=False), np.cov(fake.mean(1).numpy(), rowvar=False)
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * np.real(sqrtm(cov1 @ cov2))))
    similarity = 1 / (1 + np.exp(-((np.abs((fake[:, :1] - fake[:, 1:]).numpy()) @ weight.numpy()) + bias)))
    requested = ef.double().numpy()
    return {"coverage": coverage, "reference_coverage": reference, "relative_coverage": coverage / reference,
            "memorization_rate": float((fake_score > float(reid.tau)).mean()),
            "memorized_coverage": len(set(fake_match[fake_score > float(reid.tau)].tolist())) / n_bank,
            "density": prdc["density"],
            "prdc_coverage": prdc["coverage"], "fd_reid": fd, "temporal_consistency": float(similarity.mean()),
            "ef_mae": float(np.abs(read - requested).mean()),
            "ef_r2": float(1 - ((read - requested) ** 2).sum() / ((requested - requested.mean()) ** 2).sum())}


def test_validation_logs_each_metric_equal_to_an_independent_computation(world, tmp_path):
    callback = CoverageCallback(str(world.reid_ckpt), ef_regressor=str(world.ef_ckpt), max_samples=4, steps=STEPS,
                                k=2, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    (row,) = logged_rows(trainer.logger.log_dir)
    expected = by_hand(world, max_samples=4)
    assert set(METRIC_NAMES) <= {key.removeprefix("val/") for key in row}
    for name in METRIC_NAMES:
        assert float(row[f"val/{name}"]) == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name
    assert callback.last["memorization_rate"] == pytest.approx(expected["memorization_rate"])
    # The training split was embedded once, into the cache; the figure is in the logs.
    assert len(list((tmp_path / "cache").glob("reid-train-*.safetensors"))) == 1
    assert len(list(Path(trainer.logger.log_dir, "images").glob("val_coverage_scores_step*.png"))) == 1


def test_every_validation_of_a_fit_is_measured_but_not_the_sanity_check(world, tmp_path):
    torch.manual_seed(0)
    module = VideoDiffusionModule(**TINY_DIFFUSION)
    callback = CoverageCallback(str(world.reid_ckpt), max_samples=3, steps=STEPS, k=2, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), callbacks=[callback],
                        max_epochs=2, limit_train_batches=2, num_sanity_val_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, EchoNetDataModule(**world.data))
    rows = logged_rows(trainer.logger.log_dir)
    assert [int(row["step"]) for row in rows] == [1, 3]  # 2 steps an epoch; the sanity check is not measured
    for row in rows:
        values = {name: float(row[f"val/{name}"]) for name in METRIC_NAMES if not name.startswith("ef_")}
        assert all(np.isfinite(list(values.values())))
        assert 0 < values["coverage"] <= 1 and 0 <= values["memorization_rate"] <= 1
    pictures = sorted(path.name for path in Path(trainer.logger.log_dir, "images").iterdir())
    assert pictures == ["val_coverage_scores_step00000002.png", "val_coverage_scores_step00000004.png"]
    assert callback.validations == 2 and not any(name.startswith("reid") for name in module.state_dict())


def test_refuses_models_it_cannot_measure(world, tmp_path):
    uncalibrated = save_cli_checkpoint(distance_reid(), tmp_path / "uncalibrated.ckpt")
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[CoverageCallback(str(uncalibrated))],
                        enable_progress_bar=False)
    with pytest.raises(NotCalibratedError, match="uncalibrated.ckpt has no privacy threshold"):
        trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    pixel = ReIDModule(in_channels=1, layers=[1], block="basic", width=8)
    pixel.tau.fill_(0.0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[CoverageCallback(str(save_cli_checkpoint(pixel, tmp_path / "pixel.ckpt")))])
    with pytest.raises(ValueError, match="takes 1-channel frames.*latent space"):
        trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[CoverageCallback(str(world.reid_ckpt), ef_regressor=str(
                            save_cli_checkpoint(EFRegressorModule(in_channels=1, **TINY_EF), tmp_path / "ef.ckpt")))])
    with pytest.raises(ValueError, match="reads pixels; give the VAE"):
        trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    with pytest.raises(FileNotFoundError, match="reid checkpoint missing.ckpt not found"):
        CoverageCallback("missing.ckpt")


@pytest.mark.slow
def test_ddp_validation_with_the_callback_logs_the_values_of_one_process(world, tmp_path):
    """`echo-lvdm validate` with the callback on 5 validation videos: 2 CPU processes (DistributedSampler pads to 6,
    each rank samples its own videos) log what 1 process logs."""
    config = tmp_path / "validate.yaml"
    config.write_text(
        "model:\n  class_path: lightning_modules.diffusion.VideoDiffusionModule\n"
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n    init_args:\n      save_dir: logs\n"
        "  callbacks:\n    - class_path: callbacks.coverage.CoverageCallback\n      init_args:\n"
        f"        reid: {world.reid_ckpt}\n        ef_regressor: {world.ef_ckpt}\n        steps: {STEPS}\n"
        "        max_samples: null\n        k: 2\n")
    logged = {}
    for devices in (1, 2):
        log_dir = tmp_path / f"devices{devices}"
        command = [str(Path(sys.executable).with_name("echo-lvdm")), "validate", "--config", str(config),
                   "--data.root", str(world.root), "--data.space", "latent", "--data.latent_dir",
                   world.data["latent_dir"], "--data.clip_length", str(FRAMES), "--data.batch_size", "2",
                   "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                   "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.enable_progress_bar", "false",
                   "--trainer.default_root_dir", str(log_dir), "--trainer.logger.init_args.save_dir", str(log_dir),
                   "--ckpt_path", str(world.lvdm_ckpt)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        (row,) = logged_rows(log_dir)
        logged[devices] = {name: float(row[f"val/{name}"]) for name in METRIC_NAMES}
    assert logged[2] == pytest.approx(logged[1], rel=1e-5, abs=1e-6)
    assert logged[1] == pytest.approx(by_hand(world, max_samples=10**6), rel=1e-4, abs=1e-5)
