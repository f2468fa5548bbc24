"""Embedding whole dataset splits with a re-ID model, sharded over DDP ranks and cached on disk.

A cache file is keyed by the model's weights checksum and by everything that decides which frames are embedded (the
split's FileList, the DataModule's sampling options), so a new checkpoint or another data setup never reads stale
embeddings. Files are safetensors (no pickles), written atomically by rank 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from datamodules.video_io import atomic_output
from lightning_modules.metrics import IndexedCat
from lightning_modules.vae_utils import checksum_of_weights, encode_means

# DataModule options that change which frames are embedded and how they look (batching and workers do not).
_KEY_OPTIONS = ("sampling", "clip_length", "period", "fps", "num_frames", "pad", "channels", "size", "eval_seed",
                "eval_start", "space", "latent_dir", "latent_posterior", "latent_scaled", "vae_checksum")


@dataclass
class EmbeddedSplit:
    """Embeddings of a split, sorted by ``index`` (row of the split's table): ``embedding (N, F, D)`` — F frames per
    video, as the DataModule's ``num_frames`` picks them — and ``patient (N,)``."""

    index: torch.Tensor
    embedding: torch.Tensor
    patient: torch.Tensor

    def __len__(self) -> int:
        return len(self.index)


class EncodedReID(nn.Module):
    """A re-ID model that sees pixel videos through the VAE encoder when it works in latent space — the interface
    :func:`embed_split` needs (``embed_videos``, ``weights_checksum``). ``vae``: a diffusers ``AutoencoderKL`` (the
    exported VAE, :func:`~lightning_modules.vae_utils.load_frozen_vae`), or None for a re-ID model on pixels."""

    def __init__(self, reid, vae=None) -> None:
        super().__init__()
        self.reid, self.vae = reid, vae

    @property
    def device(self) -> torch.device:
        return self.reid.device

    def latents(self, video: torch.Tensor) -> torch.Tensor:
        """Pixel videos ``(B, T, C, H, W)`` → scaled latents (the VAE's posterior mean × its scaling factor)."""
        mean = encode_means(self.vae, video.flatten(0, 1))
        return (mean * float(self.vae.config.scaling_factor)).float().unflatten(0, video.shape[:2])

    def embed_videos(self, video: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            video = self.latents(video)
        return self.reid.embed_videos(video.to(self.reid.device, self.reid.dtype))

    def weights_checksum(self) -> str:
        vae = "" if self.vae is None else checksum_of_weights(self.vae) + f"@{float(self.vae.config.scaling_factor)}"
        return f"{self.reid.weights_checksum()}+{vae}"


def cache_key(module, datamodule: L.LightningDataModule, split: str) -> str:
    filelist = Path(datamodule.root_for(split)).resolve() / "FileList.csv"
    stat = filelist.stat()
    options = {name: str(datamodule.hparams.get(name)) for name in _KEY_OPTIONS}
    dataset = datamodule.datasets.get(split)
    parts = {"weights": module.weights_checksum(), "split": split, "filelist": str(filelist),
             "filelist_signature": [stat.st_size, stat.st_mtime_ns], "data": options,
             "scaling_factor": str(getattr(dataset, "scaling_factor", None))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def embed_split(module, datamodule: L.LightningDataModule, split: str, *,
                cache_dir: str | Path | None = None) -> EmbeddedSplit:
    """Embed every video of ``split`` the way evaluation sees it (frames fixed by the DataModule's ``eval_seed``).

    Call on every rank under DDP: each rank embeds its shard and the shards are gathered, so every rank returns the
    whole split. With ``cache_dir``, a cache file for this model and data setup is read instead when it exists
    (rank 0 decides and tells the others) and written when it does not.
    """
    rank, world_size = _rank_and_world_size()
    if split not in datamodule.datasets:
        datamodule.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"reid-{split}-{cache_key(module, datamodule, split)}.safetensors"
        if _from_rank_zero(path.is_file()):
            tensors = load_file(str(path), device=str(module.device))
            return EmbeddedSplit(tensors["index"], tensors["embedding"], tensors["patient"])
    collector = IndexedCat(["embedding", "patient"]).to(module.device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in datamodule.eval_dataloader(split, shard=(rank, world_size)):
                embedding = module.embed_videos(batch["video"].to(module.device))
                collector.update(batch["index"].to(module.device), embedding=embedding,
                                 patient=batch["patient"].to(module.device))
            result = collector.compute()
    finally:
        module.train(was_training)
    embedded = EmbeddedSplit(result["index"], result["embedding"], result["patient"])
    if path is not None and rank == 0:
        tensors = {"index": embedded.index, "embedding": embedded.embedding, "patient": embedded.patient}
        with atomic_output(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"split": split, "weights_checksum": module.weights_checksum()})
    return embedded


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank_zero(value: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
