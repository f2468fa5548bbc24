"""Hand-made EchoNet-layout folders with exact pixel values, FileList reading and writing, and latent caches encoded
by a tiny random VAE."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datamodules.video_io import write_video

FILELIST_COLUMNS = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split",
                    "PatientID"]
PLANTED_SIZE, PLANTED_CLIP = 32, 16  # the planted real/synthetic folders: frame size, frames compared


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


def read_filelist(root: Path) -> list[dict[str, str]]:
    with open(root / "FileList.csv", newline="") as handle:
        return list(csv.DictReader(handle))


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


def encode_tiny_latents(root: Path, latent_dir: Path, size: int = 16, export: Path | None = None) -> Path:
    """Encode every video of ``root`` at ``size`` px with a tiny random VAE (scaling factor 1) into ``latent_dir``:
    the latent cache a diffusion or latent re-ID test reads (latents 4 × size/2 × size/2). ``export``: also write
    that VAE there as ``echo-lvdm export-vae`` would."""
    import lightning as L
    import torch

    from callbacks.latent_cache import LatentCacheWriter
    from datamodules import EchoNetDataModule
    from lightning_modules import VAEModule
    from tests.helpers.models import TINY_VAE

    torch.manual_seed(0)
    vae = VAEModule(**TINY_VAE)
    vae.scaling_factor.fill_(1.0)
    L.Trainer(accelerator="cpu", logger=False, callbacks=[LatentCacheWriter(latent_dir)],
              enable_progress_bar=False).predict(
        vae, datamodule=EchoNetDataModule(root, sampling="video", batch_size=1, predict_split="all", size=size),
        return_predictions=False)
    if export is not None:
        vae.save_pretrained(export)
    return latent_dir


def cut_avi(path: Path, *, frames: int | None = None, fraction: float | None = None) -> Path:
    """Truncate an AVI in place as an interrupted copy does: after its first ``frames`` frame chunks (a clean cut at a
    frame boundary; the index at the end is lost), or at ``fraction`` of its bytes (most often inside a frame)."""
    data = path.read_bytes()
    if fraction is not None:
        path.write_bytes(data[: int(len(data) * fraction)])
        return path
    movi = data.index(b"movi") + 4
    offset, seen = movi, 0
    while seen < frames:  # RIFF chunks: 4-byte id, little-endian size, data padded to an even length
        size = int.from_bytes(data[offset + 4: offset + 8], "little")
        seen += data[offset + 2: offset + 4] in (b"dc", b"db")
        offset += 8 + size + size % 2
    path.write_bytes(data[:offset])
    return path
