"""Shared fixtures: tiny hand-made EchoNet folders (exact pixel values), one small phantom per session, the planted
real/synthetic world of the privacy tests and an exported tiny VAE. Helpers they use live in ``tests/helpers/``."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.data import PLANTED_CLIP, PLANTED_SIZE, make_counter_folder, read_filelist
from tests.helpers.models import TINY_EF, distance_reid, save_cli_checkpoint, tiny_diffusers_vae
from tests.helpers.video import PIXELS, SCALE


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """Tests call ``main()`` with their own argv; pytest's command line must not look like the CLI's."""
    monkeypatch.setattr(sys, "argv", ["echo-lvdm"])


@pytest.fixture
def counter_folder(tmp_path: Path) -> Path:
    specs = [("TRAIN", 40, 50.0, "A"), ("TRAIN", 30, 40.0, "A"), ("TRAIN", 8, 50.0, "B"), ("TRAIN", 50, 38.0, "C"),
             ("VAL", 40, 50.0, "D"), ("VAL", 10, 50.0, "D"), ("TEST", 45, 44.0, "E"), ("TEST", 20, 50.0, "F")]
    return make_counter_folder(tmp_path / "counter", specs)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom shared by the whole session: 12 patients × 2 videos, 64 px, 24–40 frames."""
    from datamodules import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("phantom") / "data", patients=12, videos_per_patient=2, seed=3,
                            size=64, frames=(24, 40))


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported tiny random VAE (``PIXELS`` px ↔ 4 × ``PIXELS/2``², scaling factor ``SCALE``)."""
    folder = tmp_path_factory.mktemp("video_logging") / "vae"
    tiny_diffusers_vae(PIXELS, SCALE).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 40-patient real phantom (20 train / 10 val / 10 test), 14 new phantom patients, a random tiny VAE and a
    distance re-ID calibrated on the 20 held-out videos (τ = their highest score; frames 32 px, clips of 16; stored
    beside its checkpoint for protocol clip:16): the real and synthetic folders of ``evaluate`` and the privacy
    filter's tests."""
    import torch

    from datamodules import EchoNetDataModule, generate_phantom
    from lightning_modules import EFRegressorModule
    from lightning_modules.calibration import Calibration, store_calibration
    from lightning_modules.reid_embeddings import EncodedReID, embed_split

    out = tmp_path_factory.mktemp("evaluate")
    real = generate_phantom(out / "real", patients=40, videos_per_patient=1, seed=21, size=PLANTED_SIZE, frames=(20, 24),
                            split_fractions=(0.5, 0.25, 0.25))
    new = generate_phantom(out / "new", patients=14, videos_per_patient=1, seed=22, size=PLANTED_SIZE, frames=(20, 24))
    vae = tiny_diffusers_vae(PLANTED_SIZE, 0.5)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    # τ = the highest held-out score (quantile 1): at the default 0.95, 5 % of new patients would count as
    # memorised by construction, and the planted fractions would be off by that much. Stored for the protocol the
    # privacy tests compare under (clips of 16), as `echo-lvdm calibrate` stores it.
    reid = distance_reid(quantile=1.0)
    model = EncodedReID(reid, vae.eval())
    datamodule = EchoNetDataModule(real, clip_length=PLANTED_CLIP, pad="reflect", batch_size=8)
    with torch.no_grad():
        bank = embed_split(model, datamodule, "train")
        heldout = [embed_split(model, datamodule, split) for split in ("val", "test")]
        best = torch.cat([reid.video_search(split.embedding, bank.embedding)[0] for split in heldout])
    reid.tau.fill_(float(best.max()))
    reid.tau_quantile.fill_(1.0)
    reid.tau_protocol = f"clip:{PLANTED_CLIP}"
    reid_path = save_cli_checkpoint(reid, out / "reid.ckpt")
    store_calibration(reid_path, Calibration(
        tau=float(best.max()), protocol=f"clip:{PLANTED_CLIP}", quantile=1.0, heldout="val+test",
        heldout_videos=len(best), bank_videos=len(bank), weights_checksum=model.weights_checksum(),
        data=str(real.resolve())))
    train = [row for row in read_filelist(real) if row["Split"] == "TRAIN"]
    regressor = EFRegressorModule(in_channels=1, **TINY_EF)
    with torch.no_grad():
        regressor.network.fc.bias.fill_(50.0)
    return SimpleNamespace(out=out, real=real, new=new, train=train, reid=reid_path, tau=float(best.max()),
                           ef=save_cli_checkpoint(regressor, out / "ef.ckpt"))
