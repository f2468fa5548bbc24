"""Shared fixtures: tiny hand-made EchoNet folders (exact pixel values) and one small phantom per session."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from datamodules.video_io import write_video

PLANTED_SIZE, PLANTED_CLIP = 32, 16


def save_cli_checkpoint(module, path: Path) -> Path:
    """Save ``module`` as ``echo-lvdm fit`` would: weights, its own extra state (``on_save_checkpoint``: EMA, …) and
    hyperparameters with the class path LightningCLI records, so ``validate/test --ckpt_path`` can rebuild it."""
    import lightning as L
    import torch

    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__,
                  "hyper_parameters": {**module.hparams,
                                       "_class_path": f"{type(module).__module__}.{type(module).__qualname__}"}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return Path(path)


FILELIST_COLUMNS = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split",
                    "PatientID"]


def counter_video(num_frames: int, size: int = 16, offset: int = 0) -> np.ndarray:
    """Frame t is filled with the value ``offset + 3 t``: decoded values tell which source frame came back."""
    values = (offset + 3 * np.arange(num_frames)) % 256
    return np.broadcast_to(values[:, None, None], (num_frames, size, size)).astype(np.uint8).copy()


def write_filelist(root: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    columns = columns or list(rows[0])
    with (root / "FileList.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root / "FileList.csv"


def make_counter_folder(root: Path, specs: list[tuple[str, int, float, str]], *, suffix: str = ".mkv",
                        size: int = 16) -> Path:
    """A folder of lossless counter videos. ``specs``: (split, frames, fps, patient) per video; EF = 10 + 5 × row."""
    rows = []
    for i, (split, frames, fps, patient) in enumerate(specs):
        name = f"V{i:03d}{suffix}"
        write_video(root / "Videos" / name, counter_video(frames, size, offset=i), fps)
        rows.append({"FileName": name, "EF": 10 + 5 * i, "ESV": 30, "EDV": 90, "FrameHeight": size,
                     "FrameWidth": size, "FPS": fps, "NumberOfFrames": frames, "Split": split, "PatientID": patient})
    write_filelist(root, rows)
    return root


@pytest.fixture
def counter_folder(tmp_path: Path) -> Path:
    specs = [("TRAIN", 40, 50.0, "A"), ("TRAIN", 30, 40.0, "A"), ("TRAIN", 8, 50.0, "B"), ("TRAIN", 50, 38.0, "C"),
             ("VAL", 40, 50.0, "D"), ("VAL", 10, 50.0, "D"), ("TEST", 45, 44.0, "E"), ("TEST", 20, 50.0, "F")]
    return make_counter_folder(tmp_path / "counter", specs)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom shared by the whole session: 12 patients × 2 videos, 64 px, 24–40 frames."""
    from datamodules.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("phantom") / "data", patients=12, videos_per_patient=2, seed=3,
                            size=64, frames=(24, 40))


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds (fails if it exits first or ``timeout`` passes)."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, "the process finished before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill the process"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()


def encode_tiny_latents(root: Path, latent_dir: Path, size: int = 16) -> Path:
    """Encode every video of ``root`` at ``size`` px with a tiny random VAE (scaling factor 1) into ``latent_dir``:
    the latent cache a diffusion or latent re-ID test reads (latents 4 × size/2 × size/2)."""
    import lightning as L
    import torch

    from callbacks.latent_cache import LatentCacheWriter
    from datamodules.datamodule import EchoNetDataModule
    from lightning_modules.vae import VAEModule
    from tests.test_latent_cache import TINY_VAE

    torch.manual_seed(0)
    vae = VAEModule(**TINY_VAE)
    vae.scaling_factor.fill_(1.0)
    L.Trainer(accelerator="cpu", logger=False, callbacks=[LatentCacheWriter(latent_dir)],
              enable_progress_bar=False).predict(
        vae, datamodule=EchoNetDataModule(root, sampling="video", batch_size=1, predict_split="all", size=size),
        return_predictions=False)
    return latent_dir


def read_filelist(root: Path) -> list[dict[str, str]]:
    with open(root / "FileList.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 40-patient real phantom (20 train / 10 val / 10 test), 14 new phantom patients, a random tiny VAE and a
    distance re-ID calibrated on the 20 held-out videos (τ = their highest score; frames 32 px, clips of 16): the
    real and synthetic folders of ``evaluate`` and the privacy filter's tests."""
    import torch
    from diffusers import AutoencoderKL

    from datamodules.datamodule import EchoNetDataModule
    from datamodules.phantom import generate_phantom
    from lightning_modules.ef_regressor import EFRegressorModule
    from lightning_modules.evaluate_cli import EncodedReID
    from lightning_modules.reid_embeddings import embed_split
    from tests.test_coverage_callback import distance_reid
    from tests.test_ef_regressor import TINY as TINY_EF

    out = tmp_path_factory.mktemp("evaluate")
    real = generate_phantom(out / "real", patients=40, videos_per_patient=1, seed=21, size=PLANTED_SIZE, frames=(20, 24),
                            split_fractions=(0.5, 0.25, 0.25))
    new = generate_phantom(out / "new", patients=14, videos_per_patient=1, seed=22, size=PLANTED_SIZE, frames=(20, 24))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        norm_num_groups=8, mid_block_add_attention=False, sample_size=PLANTED_SIZE)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    # τ = the highest held-out score (quantile 1): at the default 0.95, 5 % of new patients would count as
    # memorised by construction, and the planted fractions would be off by that much.
    reid = distance_reid()
    model = EncodedReID(reid, vae.eval())
    datamodule = EchoNetDataModule(real, clip_length=PLANTED_CLIP, pad="reflect", batch_size=8)
    with torch.no_grad():
        bank = embed_split(model, datamodule, "train")
        heldout = [embed_split(model, datamodule, split) for split in ("val", "test")]
        best = torch.cat([reid.video_search(split.embedding, bank.embedding)[0] for split in heldout])
    reid.tau.fill_(float(best.max()))
    reid.tau_quantile.fill_(1.0)
    train = [row for row in read_filelist(real) if row["Split"] == "TRAIN"]
    regressor = EFRegressorModule(in_channels=1, **TINY_EF)
    with torch.no_grad():
        regressor.network.fc.bias.fill_(50.0)
    return SimpleNamespace(out=out, real=real, new=new, train=train, reid=save_cli_checkpoint(reid, out / "reid.ckpt"),
                           ef=save_cli_checkpoint(regressor, out / "ef.ckpt"))
