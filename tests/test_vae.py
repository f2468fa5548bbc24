"""VAEModule: training improves reconstructions, the discriminator schedule, the scaling factor, export and decoding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_modules.image_logging import log_image
from datamodules.datamodule import EchoNetDataModule
from lightning_modules.vae import VAEModule, checksum_of_weights, export_vae
from lightning_modules.vae_utils import decode_frames, encode_means, frames_per_call, scale_from_stats
from tests.helpers.cli import REPO, run_cli
from tests.helpers.models import TINY_VAE

SIZE = 32
TINY = {**TINY_VAE, "sample_size": SIZE, "lr": 1e-3}


@pytest.fixture(scope="module")
def vae_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datamodules.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("vae") / "phantom", patients=6, videos_per_patient=2, seed=1,
                            size=64, frames=(24, 32))


def frames_datamodule(root: Path) -> EchoNetDataModule:
    """4 random frames of each video, resized to SIZE: 16 frames per batch of 4 videos."""
    # str, as the CLI passes it: a Path in the DataModule's hyperparameters breaks weights_only checkpoint loading.
    return EchoNetDataModule(str(root), sampling="frames", num_frames=4, size=SIZE, batch_size=4)


def cpu_trainer(root: Path, **kwargs) -> L.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(accelerator="cpu", default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                     log_every_n_steps=1, **kwargs)


class StepRecorder(Callback):
    """After every training batch: the logged reconstruction loss and how often each optimizer has stepped."""

    def __init__(self) -> None:
        self.rec_losses: list[float] = []
        self.optimizer_steps: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rec_losses.append(float(trainer.callback_metrics["train/rec_loss"]))
        self.optimizer_steps.append([max((int(s["step"]) for s in opt.state.values()), default=0)
                                     for opt in trainer.optimizers])


@pytest.fixture(scope="module")
def trained(vae_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    L.seed_everything(0)
    root = tmp_path_factory.mktemp("vae_run")
    datamodule, module, recorder = frames_datamodule(vae_phantom), VAEModule(**TINY), StepRecorder()
    trainer = cpu_trainer(root, max_epochs=12, callbacks=[recorder])
    before = trainer.validate(module, datamodule, verbose=False)[0]
    trainer.fit(module, datamodule)
    after = trainer.validate(module, datamodule, verbose=False)[0]
    return SimpleNamespace(module=module, datamodule=datamodule, trainer=trainer, root=root, before=before,
                           after=after, recorder=recorder)


def test_training_improves_reconstruction(trained):
    assert trained.after["val/psnr"] >= trained.before["val/psnr"] + 3.0, (trained.before, trained.after)
    assert trained.after["val/ssim"] > trained.before["val/ssim"] + 0.1
    losses = trained.recorder.rec_losses
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    assert len(trained.trainer.optimizers) == 1 and trained.module.discriminator is None
    # One reconstruction picture per validation epoch (none from the sanity check: it runs before any step).
    pictures = sorted((trained.root / "images").glob("val_reconstructions_step*.png"))
    steps = {int(path.stem.rsplit("step", 1)[1]) for path in pictures}
    assert steps == set(range(0, trained.trainer.global_step + 1, 2))
    picture = np.asarray(Image.open(pictures[-1]))
    assert picture.shape == (2 * SIZE, 8 * SIZE) and picture.dtype == np.uint8


def test_scaling_factor_is_one_over_latent_std_of_training_frames(trained, tmp_path):
    module = trained.module
    factor = float(module.scaling_factor)
    torch.manual_seed(0)
    estimate = module.estimate_scaling_factor(trained.datamodule.train_dataloader(), update=False)
    assert factor == pytest.approx(estimate, rel=0.05)
    assert abs(factor - 1.0) > 0.05  # really estimated, not the initial value
    # An oracle from the posterior directly: all training videos, every 4th frame.
    frames = torch.cat([trained.datamodule.datasets["train"][i]["video"] for i in range(8)])
    mean, logvar = module.encode_frames(frames)
    samples = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    assert factor == pytest.approx(1 / samples.std().item(), rel=0.06)
    trained.trainer.save_checkpoint(tmp_path / "vae.ckpt")
    state = torch.load(tmp_path / "vae.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert float(state["scaling_factor"]) == factor


def assert_same_autoencoder(module: VAEModule, loaded: AutoencoderKL, frames: torch.Tensor) -> None:
    assert loaded.config.scaling_factor == pytest.approx(float(module.scaling_factor), rel=1e-7)
    mean, _ = module.encode_frames(frames)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(frames).latent_dist.mean, mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded.decode(mean).sample, module.vae.decode(mean).sample, rtol=0, atol=1e-5)
    assert checksum_of_weights(loaded) == checksum_of_weights(module)


def test_save_pretrained_round_trip(trained, tmp_path):
    module, frames = trained.module, next(iter(trained.datamodule.val_dataloader()))["video"].flatten(0, 1)
    loaded = AutoencoderKL.from_pretrained(module.save_pretrained(tmp_path / "vae"))
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert_same_autoencoder(module, loaded, frames)
    assert checksum_of_weights(module.state_dict()) == checksum_of_weights(module)  # Lightning state dict: vae.* only


def test_checkpoint_at_first_validation_carries_factor_and_exports(vae_phantom, tmp_path):
    """Validation after 1 of the epoch's 2 batches (before on_train_epoch_end): its checkpoint has the factor."""
    L.seed_everything(1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{step}")
    trainer = cpu_trainer(tmp_path, max_steps=1, val_check_interval=1, num_sanity_val_steps=0,
                          enable_checkpointing=True, callbacks=[checkpoint])
    module = VAEModule(**TINY)
    trainer.fit(module, frames_datamodule(vae_phantom))
    path = tmp_path / "ckpt" / "step=1.ckpt"
    assert float(torch.load(path, weights_only=True)["state_dict"]["scaling_factor"]) != 1.0
    loaded = AutoencoderKL.from_pretrained(export_vae(path, tmp_path / "exported"))
    assert_same_autoencoder(module, loaded, torch.rand(3, 1, SIZE, SIZE) * 2 - 1)
    assert checksum_of_weights(torch.load(path, weights_only=True)["state_dict"]) == checksum_of_weights(loaded)


def test_discriminator_steps_only_after_start(vae_phantom, tmp_path):
    L.seed_everything(0)
    recorder = StepRecorder()
    module = VAEModule(**TINY, disc_start_step=3, disc_channels=16, disc_layers=2)
    trainer = cpu_trainer(tmp_path, max_epochs=3, callbacks=[recorder], num_sanity_val_steps=0)
    trainer.fit(module, frames_datamodule(vae_phantom))  # 8 training videos: 2 batches per epoch
    assert len(trainer.optimizers) == 2 and not module.automatic_optimization
    autoencoder_steps, discriminator_steps = zip(*recorder.optimizer_steps, strict=True)
    assert autoencoder_steps == (1, 2, 3, 4, 5, 6)
    assert discriminator_steps == (0, 0, 0, 1, 2, 3)
    assert trainer.global_step == 3 + 2 * 3  # Lightning counts both optimizers' steps once both step
    assert "train/d_loss" in trainer.callback_metrics and "train/g_loss" in trainer.callback_metrics
    vae_params = {id(p) for p in module.vae.parameters()}
    assert not vae_params & {id(p) for p in module.discriminator.parameters()}
    assert {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]} == vae_params


def test_decode_latents_in_chunks_equals_all_at_once(trained):
    module = trained.module
    torch.manual_seed(0)
    latents = torch.randn(2, 5, 4, SIZE // 2, SIZE // 2)
    chunked = module.decode_latents(latents, chunk_size=2)
    whole = module.decode_latents(latents, chunk_size=64)
    assert chunked.dtype == torch.uint8 and chunked.shape == (2, 5, SIZE, SIZE)
    assert torch.equal(chunked, whole)
    # scaled=True divides by the factor first: the same pixels as decoding the unscaled latents by hand.
    with torch.no_grad():
        by_hand = module.vae.decode((latents / module.scaling_factor).flatten(0, 1)).sample
    expected = ((by_hand.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(2, 5, SIZE, SIZE)
    assert (chunked.int() - expected.int()).abs().max() <= 1  # float reassociation may flip a rounding
    assert not torch.equal(module.decode_latents(latents, scaled=False), chunked)


def test_default_chunks_give_what_any_chunking_gives(trained):
    """Encoding and decoding without a chunk size (8 frames per call on the CPU, 64 on an accelerator) give the
    frames-at-once result: chunking is a speed setting only (benchmarks/vae_chunks.py)."""
    module, vae = trained.module, trained.module.vae.eval()
    assert frames_per_call("cpu") == 8 and frames_per_call(torch.device("cuda", 0)) == 64
    torch.manual_seed(0)
    frames = torch.rand(19, 1, SIZE, SIZE) * 2 - 1  # 2 full chunks of 8 and a partial one
    latents = torch.randn(2, 10, 4, SIZE // 2, SIZE // 2)
    with torch.no_grad():
        whole_mean = vae.encode(frames).latent_dist.mean
        whole_pixels = vae.decode(latents.flatten(0, 1) / vae.config.scaling_factor).sample.unflatten(0, (2, 10))
        torch.testing.assert_close(encode_means(vae, frames), whole_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.encode_frames(frames)[0], whole_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode_frames(vae, latents), whole_pixels, rtol=1e-5, atol=1e-5)


def test_predict_returns_unscaled_posterior_per_frame(trained):
    module, datamodule = trained.module, trained.datamodule
    outputs = cpu_trainer(trained.root).predict(module, datamodule)
    batch = next(iter(datamodule.predict_dataloader()))
    first = outputs[0]
    assert torch.equal(first["index"], batch["index"])
    assert first["mean"].dtype == first["logvar"].dtype == torch.float16
    mean, logvar = module.encode_frames(batch["video"].flatten(0, 1), chunk_size=5)
    torch.testing.assert_close(first["mean"].float(), mean.unflatten(0, batch["video"].shape[:2]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(first["logvar"].float(), logvar.unflatten(0, batch["video"].shape[:2]), rtol=1e-3,
                               atol=1e-2)


def test_log_image_writes_png_without_tensorboard_or_wandb(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), default_root_dir=tmp_path)
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    (gray_path,) = log_image(trainer, "val/reconstructions", gray, step=7)
    (rgb_path,) = log_image(trainer, "samples", rgb, step=8)
    assert gray_path.parent == Path(trainer.logger.log_dir) / "images"
    assert np.array_equal(np.asarray(Image.open(gray_path)), gray)
    assert np.array_equal(np.asarray(Image.open(rgb_path)), rgb)
    with pytest.raises(ValueError, match="uint8"):
        log_image(trainer, "bad", gray.astype(np.float32), step=0)


class DumpLatentStats(Callback):
    """For the DDP test: each rank saves its own (un-reduced) last-epoch latent sums and its scaling factor."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"sums": pl_module._latent_sums.cpu(), "factor": float(pl_module.scaling_factor)}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_scaling_factor_pools_every_rank(vae_phantom, tmp_path):
    """Two CPU ranks through the real CLI, discriminator on: both ranks store 1/std of the frames of both."""
    result = run_cli(
        "fit", "--config", str(REPO / "configs/vae.yaml"), "--config", str(REPO / "configs/vae_quickstart.yaml"),
        "--data.root", str(vae_phantom),
        "--data.size", str(SIZE), "--data.num_workers", "0", "--model.block_out_channels", "[32, 32]",
        "--model.sample_size", str(SIZE), "--model.disc_start_step", "1", "--model.disc_layers", "2",
        "--model.disc_channels", "16", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp_find_unused_parameters_true", "--trainer.max_epochs", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "null",
        "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.callbacks+=tests.test_vae.DumpLatentStats", f"--trainer.callbacks.out={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["factor"] == ranks[1]["factor"]
    assert not torch.equal(ranks[0]["sums"], ranks[1]["sums"])  # each rank saw its own frames
    assert ranks[0]["factor"] == pytest.approx(scale_from_stats(ranks[0]["sums"] + ranks[1]["sums"]), rel=1e-6)
