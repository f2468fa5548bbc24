"""EFRegressorModule: torchvision-compatible R(2+1)D, metrics against numpy, the one-clip and all-clips protocols,
train-on-A / test-on-B through the CLI, a fit whose loss falls, the output-bias initialisation and predict_ef."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from datamodules.datamodule import EchoNetDataModule
from echo_lvdm.main import main
from lightning_modules.metrics import EFRegressionMetrics
from lightning_modules.components.r2plus1d import R2Plus1D, load_torchvision_weights
from lightning_modules.ef_regressor import EFRegressorModule
from tests.helpers.cli import REPO, run_cli
from tests.helpers.data import make_counter_folder, write_filelist
from tests.helpers.models import TINY_EF, save_cli_checkpoint

# Two stages of one block (8 and 16 channels): a few epochs fit in the test budget on a CPU.
# ------------------------------------------------------------------------------------------------ the network
def torchvision_r2plus1d_18_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of torchvision's ``r2plus1d_18()`` (Kinetics head), written out from its source:
    stem ``Conv3d(3, 45, (1, 7, 7))``, ``Conv3d(45, 64, (3, 1, 1))``; BasicBlocks of Conv2Plus1D with the middle widths
    below; a 1×1×1 ``downsample`` where a stage starts with stride 2; ``fc = Linear(512, 400)``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(name: str, channels: int) -> None:
        for entry in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{entry}"] = (channels,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["stem.0.weight"] = (45, 3, 1, 7, 7)
    batch_norm("stem.1", 45)
    shapes["stem.3.weight"] = (64, 45, 3, 1, 1)
    batch_norm("stem.4", 64)
    # (block, in, out, middle width) — torchvision's midplanes = in·out·27 // (9·in + 3·out), shared by conv1/conv2.
    blocks = [("layer1.0", 64, 64, 144), ("layer1.1", 64, 64, 144), ("layer2.0", 64, 128, 230),
              ("layer2.1", 128, 128, 288), ("layer3.0", 128, 256, 460), ("layer3.1", 256, 256, 576),
              ("layer4.0", 256, 512, 921), ("layer4.1", 512, 512, 1152)]
    for block, cin, cout, mid in blocks:
        for conv, first_in in (("conv1", cin), ("conv2", cout)):
            shapes[f"{block}.{conv}.0.0.weight"] = (mid, first_in, 1, 3, 3)
            batch_norm(f"{block}.{conv}.0.1", mid)
            shapes[f"{block}.{conv}.0.3.weight"] = (cout, mid, 3, 1, 1)
            batch_norm(f"{block}.{conv}.1", cout)
        if cin != cout:
            shapes[f"{block}.downsample.0.weight"] = (cout, cin, 1, 1, 1)
            batch_norm(f"{block}.downsample.1", cout)
    shapes["fc.weight"], shapes["fc.bias"] = (400, 512), (400,)
    return shapes


def test_default_network_has_torchvision_r2plus1d_18_names_and_shapes():
    network = R2Plus1D(in_channels=3, num_outputs=400)
    expected = torchvision_r2plus1d_18_shapes()
    assert {name: tuple(t.shape) for name, t in network.state_dict().items()} == expected
    assert sum(p.numel() for p in network.parameters()) == 31_505_325  # torchvision's documented num_params


def test_torchvision_state_dict_loads_into_grayscale_regressor():
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) if shape else torch.tensor(7)
             for name, shape in torchvision_r2plus1d_18_shapes().items()}
    network = R2Plus1D(in_channels=1, num_outputs=1)
    assert load_torchvision_weights(network, state) == ["fc.weight", "fc.bias"]
    loaded = network.state_dict()
    torch.testing.assert_close(loaded["stem.0.weight"], state["stem.0.weight"].sum(1, keepdim=True))
    for name in ("layer4.1.conv2.0.3.weight", "layer2.0.downsample.1.running_var", "stem.4.bias"):
        assert torch.equal(loaded[name], state[name])
    with pytest.raises(ValueError, match="stem.0.weight"):
        load_torchvision_weights(R2Plus1D(in_channels=4, num_outputs=1), state)
    with pytest.raises(KeyError, match="not in the network"):
        load_torchvision_weights(R2Plus1D(in_channels=3, layers=(1, 1, 1, 1)), state)


# ------------------------------------------------------------------------------------------------ metrics
def numpy_metrics(preds: np.ndarray, target: np.ndarray) -> dict[str, float]:
    residual = preds - target
    r2 = 1 - np.sum(residual**2) / np.sum((target - target.mean()) ** 2)
    return {"mae": np.abs(residual).mean(), "rmse": np.sqrt((residual**2).mean()), "r2": r2}


def test_metrics_equal_numpy_and_ignore_distributed_padding():
    preds = np.array([52.0, 61.5, 38.0, 70.25, 45.0])
    target = np.array([55.0, 60.0, 35.5, 64.0, 50.0])
    metric = EFRegressionMetrics()
    # Two batches, the second padded (as DistributedSampler does) with a repeat of index 0.
    metric.update(torch.tensor([3, 0, 4]), torch.tensor(preds[[3, 0, 4]]), torch.tensor(target[[3, 0, 4]]))
    metric.update(torch.tensor([1, 2, 0]), torch.tensor(preds[[1, 2, 0]]), torch.tensor(target[[1, 2, 0]]))
    values = metric.compute()
    for name, expected in numpy_metrics(preds, target).items():
        assert float(values[name]) == pytest.approx(expected, rel=1e-6), name
    index, per_video, _ = metric.per_video()
    assert index.tolist() == [0, 1, 2, 3, 4] and np.allclose(per_video.numpy(), preds)
    # One video, one vote: a repeated index (the same clip evaluated twice) is not counted twice.
    metric.reset()
    metric.update(torch.tensor([7, 8, 7]), torch.tensor([40.0, 30.0, 40.0]), torch.tensor([45.0, 35.0, 45.0]))
    assert float(metric.compute()["mae"]) == pytest.approx((5 + 5) / 2)
    assert float(metric.compute()["rmse"]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"\(N,\) alike"):
        metric.update(torch.tensor([1, 2]), torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------------------- one-clip / all-clips protocols
class ClipMeanGray(nn.Module):
    """Stub network: the clip's mean gray level 0–255. On counter videos that is offset + 3 × mean source frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        return ((x.mean(dim=(1, 2, 3, 4)) + 1) * 127.5).unsqueeze(1)


def run_test(module: EFRegressorModule, datamodule: EchoNetDataModule, root: Path) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)
    return trainer.test(module, datamodule, verbose=False)[0]


def test_all_clips_protocol_averages_every_clip(counter_folder, tmp_path):
    """Test videos V006 (45 frames, offset 6, EF 40) and V007 (20 frames, offset 7, EF 45), every 2nd frame: 23 and
    10 frames. A model trained on 12-frame clips, stride 2: V006 has clips at 0, 2, …, 10 with mean frame s + 5.5
    (source 2s + 11); V007 is one reflect-padded clip 0…9, 8, 7 (mean index 5, source 10)."""
    module = EFRegressorModule(**TINY_EF, test_clip_stride=2, clip_batch_size=4)  # chunks of 4 clips: 4 + 2 for V006
    module.network = ClipMeanGray()
    module.train_clip_length.fill_(12)
    predictions = np.array([6 + 3 * np.mean([2 * s + 11 for s in range(0, 11, 2)]), 7 + 3 * 10.0])
    assert predictions.tolist() == [69.0, 37.0]
    whole_videos = EchoNetDataModule(str(counter_folder), sampling="video", period=2, batch_size=1)
    results = run_test(module, whole_videos, tmp_path)
    expected = numpy_metrics(predictions, np.array([40.0, 45.0]))
    for name in ("mae", "rmse", "r2"):
        assert results[f"test/{name}"] == pytest.approx(expected[name], rel=1e-5), name
    # The one-clip protocol: the DataModule's evaluation clip of 12 frames, predicted as it is.
    one_clip = EchoNetDataModule(str(counter_folder), sampling="clip", clip_length=12, period=2, batch_size=2)
    one_clip.setup("test")
    dataset = one_clip.datasets["test"]
    by_hand = [6 + i + 3 * dataset.frame_plan(i)[0].mean() for i in range(len(dataset))]  # offset + 3 × frame
    results = run_test(module, one_clip, tmp_path)
    expected = numpy_metrics(np.array(by_hand), np.array([40.0, 45.0]))
    assert results["test/mae"] == pytest.approx(expected["mae"], rel=1e-5)
    assert results["test/mae"] != pytest.approx(numpy_metrics(predictions, np.array([40.0, 45.0]))["mae"])


# -------------------------------------------------------------------------------------- train on A, test on B
def retarget_ef(root: Path, first_ef: float) -> list[float]:
    """Rewrite the EF column of ``root/FileList.csv`` to first_ef, first_ef + 3, …; returns the new values."""
    with (root / "FileList.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["EF"] = first_ef + 3 * i
    write_filelist(root, rows)
    return [float(row["EF"]) for row in rows]


def test_train_on_folder_a_validate_and_test_on_folder_b(tmp_path, monkeypatch):
    """Folder A holds only TRAIN rows, folder B only VAL and TEST rows with other EFs: the run can only work when each
    split comes from its own folder, and test/mae must be B's."""
    monkeypatch.setattr(sys, "argv", ["echo-lvdm"])
    folder_a = make_counter_folder(tmp_path / "A", [("TRAIN", 24, 50.0, p) for p in "ABCD"])
    folder_b = make_counter_folder(tmp_path / "B", [("VAL", 24, 50.0, "E"), ("VAL", 30, 50.0, "F"),
                                                    ("TEST", 26, 50.0, "G"), ("TEST", 20, 50.0, "H")])
    ef_a = retarget_ef(folder_a, 20.0)
    ef_b = retarget_ef(folder_b, 70.0)
    common = [
        "--config", str(REPO / "configs/data/synthetic_to_real.yaml"), "--config", str(REPO / "configs/ef_pixel.yaml"),
        "--config", str(REPO / "configs/ef_pixel_quickstart.yaml"),
        "--data.train_root", str(folder_a), "--data.root", str(folder_b), "--data.size", "16",
        "--data.clip_length", "4", "--data.period", "2", "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ]
    model = [f"--model.{key}={value}" for key, value in TINY_EF.items() if key != "lr_step_period"]
    assert main(["fit", *common, *model, "--trainer.max_epochs", "2"]) == 0
    checkpoint = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert float(state["train_ef_mean"]) == pytest.approx(np.mean(ef_a))  # trained on A
    assert main(["test", *common, "--ckpt_path", str(checkpoint)]) == 0
    logged = sorted((tmp_path / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    with logged.open() as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("test/mae"))
    # By hand: B's two test clips through the trained weights, against B's EF values.
    module = EFRegressorModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    datamodule = EchoNetDataModule(test_root=str(folder_b), size=16, clip_length=4, period=2, batch_size=2)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["ef"].tolist() == ef_b[2:]
    expected = numpy_metrics(module.predict_ef(batch["video"]).numpy(), np.array(ef_b[2:]))
    assert float(row["test/mae"]) == pytest.approx(expected["mae"], rel=1e-4)
    assert float(row["test/rmse"]) == pytest.approx(expected["rmse"], rel=1e-4)


@pytest.mark.slow
def test_ddp_test_counts_every_video_once(tmp_path):
    """Two CPU ranks through the real CLI on 3 test videos: DistributedSampler pads them to 4 (video 0 twice), yet
    test/mae, test/rmse and test/r2 equal one process's numbers."""
    folder = make_counter_folder(tmp_path / "data", [("TEST", 24, 50.0, "A"), ("TEST", 20, 50.0, "B"),
                                                     ("TEST", 30, 50.0, "C")])
    torch.manual_seed(0)
    module = EFRegressorModule(**TINY_EF)
    with torch.no_grad():
        module.network.fc.weight.normal_(0.0, 5.0)  # predictions that differ from video to video
    checkpoint = save_cli_checkpoint(module, tmp_path / "ef.ckpt")
    result = run_cli(
        "test", "--config", str(REPO / "configs/ef_pixel.yaml"), "--config", str(REPO / "configs/ef_pixel_quickstart.yaml"),
        "--data.root", str(folder),
        "--data.size", "16", "--data.clip_length", "4", "--data.batch_size", "1", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--ckpt_path", str(checkpoint),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with next((tmp_path / "logs").rglob("metrics.csv")).open() as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("test/mae"))
    datamodule = EchoNetDataModule(str(folder), size=16, clip_length=4, period=4, batch_size=3)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    preds, target = module.predict_ef(batch["video"]).numpy(), batch["ef"].numpy()
    expected, padded = numpy_metrics(preds, target), numpy_metrics(preds[[0, 1, 2, 0]], target[[0, 1, 2, 0]])
    for name in ("mae", "rmse", "r2"):
        assert float(row[f"test/{name}"]) == pytest.approx(expected[name], rel=1e-4), name
    assert float(row["test/mae"]) != pytest.approx(padded["mae"], rel=1e-3)


# ----------------------------------------------------------------------------------------------- training
class TrainRecorder(Callback):
    """The output bias when training starts and the training loss of every step."""

    def __init__(self) -> None:
        self.bias_at_start: float | None = None
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.bias_at_start = pl_module.network.fc.bias.item()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def phantom_datamodule(root: Path) -> EchoNetDataModule:
    return EchoNetDataModule(str(root), clip_length=8, period=4, size=32, batch_size=4, seed=0)


EPOCHS = 40


@pytest.fixture(scope="module")
def fitted(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """40 steps on one batch of 4 phantom videos (``overfit_batches=1``), checkpointed."""
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("ef_fit")
    recorder = TrainRecorder()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, overfit_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[recorder, checkpoint], num_sanity_val_steps=0, check_val_every_n_epoch=EPOCHS)
    module = EFRegressorModule(**{**TINY_EF, "lr": 3e-2})
    datamodule = phantom_datamodule(phantom_root)
    trainer.fit(module, datamodule)
    return SimpleNamespace(module=module, datamodule=datamodule, recorder=recorder, root=root, trainer=trainer)


def test_training_loss_falls(fitted):
    losses = fitted.recorder.losses
    assert len(losses) == EPOCHS
    assert np.mean(losses[-5:]) < 0.1 * np.mean(losses[:5]), losses
    # Each of the 4 videos is fitted, not only their mean EF: R² over the batch (last epoch's train metric).
    assert fitted.trainer.callback_metrics["train/r2"] > 0.8
    assert math.isfinite(fitted.trainer.callback_metrics["val/mae"])


def test_output_bias_starts_at_training_mean_ef_and_survives_resume(fitted, phantom_root, tmp_path):
    with (phantom_root / "FileList.csv").open(newline="") as handle:
        train_efs = [float(row["EF"]) for row in csv.DictReader(handle) if row["Split"] == "TRAIN"]
    assert fitted.recorder.bias_at_start == pytest.approx(np.mean(train_efs), rel=1e-6)
    assert float(fitted.module.train_ef_mean) == pytest.approx(np.mean(train_efs), rel=1e-6)
    trained_bias = fitted.module.network.fc.bias.item()
    assert trained_bias != pytest.approx(np.mean(train_efs), abs=1e-3)
    # Resuming restores the checkpoint's bias: setup's initialisation of a fresh module is overwritten, not kept.
    resumed = EFRegressorModule(**TINY_EF)
    trainer = L.Trainer(accelerator="cpu", max_epochs=EPOCHS, overfit_batches=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(resumed, phantom_datamodule(phantom_root), ckpt_path=fitted.root / "ckpt" / "last.ckpt")
    assert resumed.network.fc.bias.item() == trained_bias
    assert int(resumed.train_clip_length) == 8


def test_predict_ef_batches_in_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    # The latent layout: 4 × 14 × 14 latents, a stride-1 stem.
    module = EFRegressorModule(in_channels=4, layers=[1, 1], width=8, stem_kernel=3, stem_stride=1,
                               spatial_strides=[1, 2], temporal_strides=[1, 2])
    latents = torch.randn(5, 6, 4, 14, 14)
    with torch.no_grad():
        module.network.fc.weight.normal_(0, 5.0)  # make clip-to-clip differences visible in the output
        expected = module.eval()(latents)
    module.train()
    predicted = module.predict_ef(latents, chunk_size=2)
    assert module.training and all(m.training for m in module.modules())
    assert predicted.dtype == torch.float32 and not predicted.requires_grad
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-4)
    assert predicted.std() > 0.1  # the clips really differ, not just the bias
    with torch.no_grad():  # train-mode BatchNorm (batch statistics) would have given other numbers
        assert not torch.allclose(module(latents), expected, atol=1e-2)
    module.eval()
    module.predict_ef(latents[:1])
    assert not module.training
    with pytest.raises(ValueError, match="C=4"):
        module.predict_ef(torch.randn(2, 6, 1, 14, 14))


def test_augment_transforms_each_training_clip_as_a_whole_and_leaves_evaluation_alone(monkeypatch):
    module = EFRegressorModule(**TINY_EF, augment=1.0)
    module.train_metrics.update = module.val_metrics.update = lambda *args: None
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(module, "forward", lambda video: seen.append(video) or video.mean((1, 2, 3, 4)))
    # Four clips of one still frame each (a bright disc on black), every frame the same.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = torch.where((yy - 16) ** 2 + (xx - 16) ** 2 < 64, 0.8, -1.0)
    video = disc.expand(4, 6, 1, 32, 32).clone()
    batch = {"video": video, "ef": torch.full((4,), 50.0), "index": torch.arange(4)}

    torch.manual_seed(0)
    module._shared_step(batch, "train")
    torch.manual_seed(0)
    module._shared_step(batch, "train")
    module._shared_step(batch, "val")
    first, again, evaluated = seen
    assert first.shape == video.shape and first.abs().max() <= 1.0
    torch.testing.assert_close(first, again)  # drawn from torch's RNG: seed_everything fixes it
    assert torch.equal(evaluated, video)  # validation and test see the clips as they are
    for clip in first:
        assert (clip - video[0]).abs().mean() > 0.01  # each kind is drawn at probability 1
        # One warp, blur and intensity change for the whole clip; only the additive noise differs frame to frame.
        frame_means = clip.mean((1, 2, 3))
        assert frame_means.std() < 0.01 and (clip[0] - clip[1]).abs().mean() > 0.0
    assert not torch.allclose(first[0], first[1], atol=0.05)  # another transform per clip


def test_augment_is_a_probability_and_pixel_only():
    with pytest.raises(ValueError, match="probability"):
        EFRegressorModule(**TINY_EF, augment=1.5)
    with pytest.raises(ValueError, match="latent"):
        EFRegressorModule(**TINY_EF, in_channels=4, augment=0.5)
