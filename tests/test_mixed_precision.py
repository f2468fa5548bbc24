"""Mixed precision — ``bf16-mixed``, what the full-size configs ask for — on CPU (Lightning's autocast to bfloat16):
each module fits 2 steps and validates from the same start as an fp32 run, with finite losses close to fp32's — the
VAE with its discriminator branch, the re-ID and EF models, the anatomy model, and the video model with the coverage
callback sampling — and the writer's predict writes the videos an fp32 predict writes, to 8-bit rounding."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.coverage import CoverageCallback
from callbacks.synthetic_writer import SyntheticDatasetWriter
from datamodules import EchoNetDataModule, GenerationRequests
from datamodules.video_io import read_video
from lightning_modules import EFRegressorModule, ReIDModule, VAEModule, VideoDiffusionModule
from tests.helpers.data import encode_tiny_latents
from tests.helpers.models import TINY_DIFFUSION, TINY_EF, TINY_VAE, distance_reid, save_cli_checkpoint
from tests.helpers.video import LATENT


@pytest.fixture(scope="module")
def latents(phantom_root: Path, tmp_path_factory) -> Path:
    return encode_tiny_latents(phantom_root, tmp_path_factory.mktemp("bf16") / "latents", size=16)


def untrained_anatomy(path: Path) -> str:
    torch.manual_seed(3)
    anatomy = VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False, ema_decay=None)
    anatomy.train_num_frames.fill_(1)
    anatomy.train_fps.fill_(12.5)
    anatomy.latent_shape.copy_(torch.tensor([4, 8, 8]))
    return str(save_cli_checkpoint(anatomy, path))


# name → (module, data options, the training and validation losses compared, callbacks)
def case(name: str, root: Path, latent_dir: Path, tmp: Path):
    latent = dict(space="latent", latent_dir=str(latent_dir), latent_posterior="mean")
    if name == "vae":  # the discriminator steps from the first step: its branch runs under autocast too
        return (VAEModule(**{**TINY_VAE, "lr": 1e-3}, disc_start_step=0, disc_channels=16, disc_layers=2),
                dict(sampling="frames", num_frames=4, size=32, batch_size=4), ("train/rec_loss", "val/rec_loss"), [])
    if name == "reid":
        return (ReIDModule(in_channels=1, layers=[1, 1], block="basic", width=16, stem="small", lr=3e-3),
                dict(sampling="frames", num_frames=3, size=32, batch_size=8), ("train/loss", "val/auc"), [])
    if name == "ef":
        return (EFRegressorModule(**TINY_EF), dict(clip_length=8, period=4, size=32, batch_size=4),
                ("train/loss", "val/loss"), [])
    if name == "anatomy":
        return (VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False),
                dict(**latent, sampling="frames", num_frames=4, batch_size=4), ("train/loss", "val/loss"), [])
    reid = save_cli_checkpoint(distance_reid(), tmp / "reid.ckpt")
    coverage = CoverageCallback(str(reid), anatomy=untrained_anatomy(tmp / "anatomy.ckpt"), num_samples=3,
                                batch_size=3, steps=2, k=2, cache_dir=str(tmp / "cache"))
    return (VideoDiffusionModule(**TINY_DIFFUSION), dict(**latent, clip_length=4, period=2, batch_size=4),
            ("train/loss", "val/loss"), [coverage])


class TrainingLosses(L.Callback):
    def __init__(self, key: str) -> None:
        self.key, self.values = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics[self.key]))


def fit_and_validate(name: str, precision: str, root: Path, latent_dir: Path, tmp: Path) -> tuple[list, dict]:
    L.seed_everything(0)
    module, data, (train_key, val_key), callbacks = case(name, root, latent_dir, tmp)
    recorder = TrainingLosses(train_key)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_epochs=1, limit_train_batches=2,
                        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                        callbacks=[recorder, *callbacks], log_every_n_steps=1)
    datamodule = EchoNetDataModule(str(root), seed=0, num_workers=0, **data)
    trainer.fit(module, datamodule)
    values = {key: float(value) for key, value in trainer.validate(module, datamodule, verbose=False)[0].items()}
    return recorder.values, {"val": values[val_key], **values}


@pytest.mark.parametrize("name", ["vae", "reid", "ef", "anatomy", "video"])
def test_each_module_fits_and_validates_under_bf16_as_in_fp32(name, phantom_root, latents, tmp_path):
    (tmp_path / "fp32").mkdir()
    (tmp_path / "bf16").mkdir()
    train32, val32 = fit_and_validate(name, "32-true", phantom_root, latents, tmp_path / "fp32")
    train16, val16 = fit_and_validate(name, "bf16-mixed", phantom_root, latents, tmp_path / "bf16")
    assert len(train16) == len(train32) == 2 and all(math.isfinite(v) for v in train16 + list(val16.values()))
    # Step 1 starts from the same weights and batch: only bfloat16 rounding differs (8 bits of mantissa, ~0.4 %
    # per operation). After two steps the weights differ by that rounding too.
    assert train16[0] == pytest.approx(train32[0], rel=0.05), (train16, train32)
    assert train16[0] != train32[0]  # autocast did run: bfloat16 rounding shows
    assert val16["val"] == pytest.approx(val32["val"], rel=0.1, abs=0.02), (val16, val32)
    if name == "video":  # the coverage callback sampled and measured in both runs
        assert {"val/coverage", "val/fd_reid", "val/temporal_consistency"} <= set(val16)
        assert val16["val/coverage"] == pytest.approx(val32["val/coverage"], abs=1 / 3 + 1e-6)


def test_the_writers_predict_under_bf16_writes_the_fp32_videos(phantom_root, vae_folder, tmp_path):
    torch.manual_seed(0)
    generator = VideoDiffusionModule(**TINY_DIFFUSION, reference_dropout=1.0, ema_decay=None)
    generator.train_num_frames.fill_(4)
    generator.train_fps.fill_(12.5)
    generator.latent_shape.copy_(torch.tensor([4, LATENT, LATENT]))
    written = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / precision
        writer = SyntheticDatasetWriter(out, 3, vae=str(vae_folder), unfiltered=True, steps=3, audit="off",
                                        splits={"TRAIN": 1.0})
        datamodule = EchoNetDataModule(str(phantom_root), predict_split="requests", batch_size=2,
                                       requests=GenerationRequests(attempts=3, seed=1))
        L.Trainer(accelerator="cpu", precision=precision, logger=False, callbacks=[writer], enable_progress_bar=False,
                  default_root_dir=tmp_path).predict(generator, datamodule=datamodule, return_predictions=False)
        written[precision] = [read_video(path).astype(np.float32) for path in sorted((out / "Videos").glob("*.avi"))]
    assert len(written["bf16-mixed"]) == len(written["32-true"]) == 3
    for half, full in zip(written["bf16-mixed"], written["32-true"]):
        assert half.shape == full.shape and np.abs(half - full).mean() < 2.0  # grey levels of 255
