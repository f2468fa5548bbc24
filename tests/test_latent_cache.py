"""The latent cache: encode once, skip what is up to date, re-encode what changed, never a partial entry, and a
latent-space DataModule that serves the same videos and clip positions as pixel space."""

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.latent_cache import LatentCacheWriter
from datamodules.datamodule import EchoNetDataModule
from datamodules.filelist import DataValidationError
from datamodules.latents import entry_path, read_frames, read_meta
from lightning_modules.vae import VAEModule
from lightning_modules.vae_utils import checksum_of_weights
from tests.helpers.cli import REPO
from tests.helpers.models import TINY_VAE, save_cli_checkpoint
from tests.helpers.processes import kill_when

@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    from datamodules.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("latent") / "data", patients=6, videos_per_patient=2, seed=5,
                            size=32, frames=(20, 28))


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    module = VAEModule(**TINY_VAE)
    module.scaling_factor.fill_(0.8)
    return module


def encode(root: Path, cache: Path, vae: VAEModule, **writer_kwargs) -> LatentCacheWriter:
    writer = LatentCacheWriter(cache, **writer_kwargs)
    dm = EchoNetDataModule(root, sampling="video", batch_size=1, predict_split="all")
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    trainer.predict(vae, datamodule=dm, return_predictions=False)
    return writer


def all_names(root: Path) -> list[str]:
    dm = EchoNetDataModule(root)
    dm.setup()
    return sorted(r.file_name for split in ("train", "val", "test") for r in dm.datasets[split].records)


def test_encode_skip_and_reencode_only_what_changed(small_phantom, vae, tmp_path):
    cache = tmp_path / "latents"
    first = encode(small_phantom, cache, vae)
    names = all_names(small_phantom)
    assert sorted(first.encoded) == names and first.up_to_date == []

    # Entries hold the posterior of every frame, written by this VAE, with the source's signature.
    dm = EchoNetDataModule(small_phantom, sampling="video", batch_size=1, predict_split="all")
    dm.setup("predict")
    record = dm.datasets["all"].records[3]
    meta = read_meta(entry_path(cache, record))
    assert meta.vae_checksum == checksum_of_weights(vae.vae) and meta.scaling_factor == pytest.approx(0.8)
    assert (meta.num_frames, meta.fps) == (record.num_frames, record.fps)
    mean, logvar = vae.encode_frames(dm.datasets["all"][3]["video"])
    cached_mean, cached_logvar = read_frames(entry_path(cache, record), np.arange(record.num_frames))
    torch.testing.assert_close(cached_mean, mean, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached_logvar, logvar, atol=2e-2, rtol=2e-3)

    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = encode(small_phantom, cache, vae)
    assert second.encoded == [] and sorted(second.up_to_date) == names
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps

    touched = record.path
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))
    third = encode(small_phantom, cache, vae)
    assert third.encoded == [record.file_name]

    with torch.no_grad():
        other = VAEModule(**TINY_VAE)
    fourth = encode(small_phantom, cache, other)
    assert sorted(fourth.encoded) == names  # another VAE: every entry is stale


def test_latent_batches_match_pixel_batches(small_phantom, vae, tmp_path):
    cache = tmp_path / "latents"
    encode(small_phantom, cache, vae)
    settings = dict(clip_length=6, period=2, batch_size=3)
    pixel = EchoNetDataModule(small_phantom, **settings)
    latent = EchoNetDataModule(small_phantom, space="latent", latent_dir=cache, latent_posterior="mean",
                               latent_scaled=False, **settings)
    for dm in (pixel, latent):
        dm.setup("fit")
    assert latent.datasets["train"].scaling_factor == pytest.approx(0.8)
    for split in ("train", "val"):
        assert [r.file_name for r in pixel.datasets[split].records] == [r.file_name for r in latent.datasets[split].records]
        for key in [0, 1, (1, 7, 3)]:
            np.testing.assert_array_equal(pixel.datasets[split].frame_plan(key)[0],
                                          latent.datasets[split].frame_plan(key)[0])
    L.seed_everything(3)
    pixel_batches = list(pixel.train_dataloader())
    latent_batches = list(latent.train_dataloader())
    for p_batch, l_batch in zip(pixel_batches, latent_batches, strict=True):
        for key in ("ef", "index", "patient", "fps"):
            assert torch.equal(p_batch[key], l_batch[key])
        mean, _ = vae.encode_frames(p_batch["video"].flatten(0, 1))
        assert l_batch["video"].shape == (len(p_batch["index"]), 6, 4, 16, 16)
        torch.testing.assert_close(l_batch["video"].flatten(0, 1), mean, atol=2e-3, rtol=2e-3)


def test_posterior_sampling_is_reproducible_and_scaled(small_phantom, vae, tmp_path):
    cache = tmp_path / "latents"
    encode(small_phantom, cache, vae)

    def item(**kwargs):
        dm = EchoNetDataModule(small_phantom, space="latent", latent_dir=cache, clip_length=4, **kwargs)
        dm.setup("validate")
        return dm.datasets["val"][0]["video"]

    mean = item(latent_posterior="mean", latent_scaled=False)
    sample = item(latent_posterior="sample", latent_scaled=False)
    assert not torch.allclose(sample, mean) and torch.equal(sample, item(latent_posterior="sample", latent_scaled=False))
    torch.testing.assert_close(item(latent_posterior="sample"), sample * 0.8)


def test_missing_or_stale_cache_is_a_clear_error(small_phantom, vae, tmp_path):
    cache = tmp_path / "latents"
    with pytest.raises(DataValidationError, match=r"(?s)no latent cache entry.*echo-lvdm predict --config "
                                                  r"configs/data/<dataset>\.yaml --config configs/vae_encode\.yaml"):
        EchoNetDataModule(small_phantom, space="latent", latent_dir=cache).setup("fit")
    encode(small_phantom, cache, vae)
    with pytest.raises(DataValidationError, match="encoded by another VAE"):
        EchoNetDataModule(small_phantom, space="latent", latent_dir=cache, vae_checksum="0" * 64).setup("fit")


def test_killed_encode_leaves_no_partial_entry_and_resumes(small_phantom, tmp_path):
    """SIGKILL the real CLI mid-encode: every entry under its final name is whole, and a re-run encodes the rest."""
    torch.manual_seed(0)
    slow = VAEModule(block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=32, sample_size=32)
    checkpoint = save_cli_checkpoint(slow, tmp_path / "vae.ckpt")
    cache = tmp_path / "latents"
    repo = REPO
    command = [str(Path(sys.executable).with_name("echo-lvdm")), "predict", "--config",
               str(repo / "configs/vae_encode.yaml"), "--data.root", str(small_phantom), "--data.num_workers", "0",
               "--trainer.callbacks.cache_dir", str(cache), "--trainer.default_root_dir", str(cache),
               "--trainer.accelerator", "cpu",
               "--trainer.enable_progress_bar", "false", "--ckpt_path", str(checkpoint)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: cache.exists() and any(cache.glob("*.safetensors")))
    names = all_names(small_phantom)
    written = sorted(cache.glob("*.safetensors"))
    assert 0 < len(written) < len(names), "the encode was not interrupted mid-way"
    for path in written:
        meta = read_meta(path)
        assert meta is not None
        mean, logvar = read_frames(path, np.arange(meta.num_frames))
        assert torch.isfinite(mean).all() and mean.shape[0] == meta.num_frames
    resumed = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(names) - len(written)} video(s) to encode, {len(written)} up to date" in resumed.stderr
    assert len(list(cache.glob("*.safetensors"))) == len(names)


def test_ddp_encode_shards_without_duplicates_or_losses(small_phantom, tmp_path):
    """Two CPU processes through the real CLI: the per-rank counts add up to the video count and every entry exists."""
    torch.manual_seed(0)
    vae = VAEModule(**TINY_VAE)
    checkpoint = save_cli_checkpoint(vae, tmp_path / "vae.ckpt")
    cache = tmp_path / "latents"
    repo = REPO
    result = subprocess.run(
        [str(Path(sys.executable).with_name("echo-lvdm")), "predict", "--config", str(repo / "configs/vae_encode.yaml"),
         "--data.root", str(small_phantom), "--data.latent_dir", str(cache), "--data.num_workers", "0",
         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false", "--ckpt_path", str(checkpoint)],
        cwd=repo, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = all_names(small_phantom)
    assert f"encoded {len(names)} video(s) (per rank: {len(names) // 2}, {len(names) // 2})" in result.stderr
    assert sorted(p.stem for p in cache.glob("*.safetensors")) == sorted(Path(n).stem for n in names)


def test_inspect_latent_space_and_export_vae_commands(small_phantom, vae, tmp_path, caplog, monkeypatch):
    import logging

    from diffusers import AutoencoderKL

    from echo_lvdm.main import main

    monkeypatch.setattr(sys, "argv", ["echo-lvdm"])
    cache = tmp_path / "latents"
    with pytest.raises(DataValidationError, match="no latent cache entry"):
        main(["inspect", "--root", str(small_phantom), "--space", "latent", "--latent-dir", str(cache)])
    encode(small_phantom, cache, vae)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["inspect", "--root", str(small_phantom), "--space", "latent", "--latent-dir", str(cache),
                     "--clip-length", "4"]) == 0
    assert "batch['video']: float32 (4, 4, 4, 16, 16)" in caplog.text

    checkpoint = tmp_path / "vae.ckpt"
    torch.save({"state_dict": vae.state_dict(), "pytorch-lightning_version": L.__version__,
                "hyper_parameters": dict(vae.hparams)}, checkpoint)
    assert main(["export-vae", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    exported = AutoencoderKL.from_pretrained(tmp_path / "exported")
    assert exported.config.scaling_factor == pytest.approx(0.8)
    frames = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(frames).latent_dist.mean, vae.encode_frames(frames)[0], atol=1e-5,
                                   rtol=1e-5)
    assert main(["export-vae", "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 1


def test_the_cli_stamps_entries_with_the_vae_its_ckpt_path_loads(small_phantom, tmp_path):
    """`predict --ckpt_path` loads the weights after the callbacks' setup, where the cache is checked: the entries must
    carry the checksum of the checkpoint's VAE (not of the freshly built one), be left alone when re-encoding with it,
    and be re-encoded for another trained VAE."""
    from echo_lvdm.main import main

    cache = tmp_path / "latents"
    checkpoints, checksums = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        module = VAEModule(**TINY_VAE)
        checkpoints.append(save_cli_checkpoint(module, tmp_path / f"vae{seed}.ckpt"))
        checksums.append(checksum_of_weights(module))

    def encode_with(checkpoint: Path) -> dict[str, tuple[str, int]]:
        main(["predict", "--config", str(REPO / "configs/vae_encode.yaml"), "--data.root", str(small_phantom),
              "--data.latent_dir", str(cache), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false",
              "--ckpt_path", str(checkpoint)])
        return {path.name: (read_meta(path).vae_checksum, path.stat().st_mtime_ns) for path in cache.glob("*.safetensors")}

    first = encode_with(checkpoints[0])
    assert len(first) == len(all_names(small_phantom)) and {c for c, _ in first.values()} == {checksums[0]}
    assert encode_with(checkpoints[0]) == first  # up to date: not one entry rewritten
    other = encode_with(checkpoints[1])
    assert {c for c, _ in other.values()} == {checksums[1]}
    assert all(other[name][1] != first[name][1] for name in first)
