"""``LatentCacheWriter``: ``echo-lvdm predict --config configs/vae_encode.yaml`` fills the latent cache.

Every video of the predict split (``data.predict_split: all`` — every split) is encoded once by the VAE and written as
one safetensors entry (see :mod:`datamodules.latents`). Entries that are up to date — same VAE weights, unchanged
source video — are left alone and their videos are not even decoded; stale ones are re-encoded. Under DDP, rank 0
decides what is stale and broadcasts it, then each rank encodes its own shard (Lightning's predict sampler does not
pad, so no video is encoded twice or lost). Entries are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from datamodules.datamodule import EchoNetDataModule
from datamodules.latents import LatentEntryMeta, entry_path, entry_problem, source_signature, write_entry


class LatentCacheWriter(BasePredictionWriter):
    """Writes the VAE posterior (mean, log-variance; fp16) of each predicted video to ``cache_dir``.

    Expects a module with a ``vae`` (diffusers ``AutoencoderKL``), a ``scaling_factor`` and a ``predict_step``
    returning ``{"index", "mean", "logvar"}`` — :class:`~lightning_modules.vae.VAEModule` — and the
    :class:`~datamodules.EchoNetDataModule` in pixel space with ``sampling: video`` and ``batch_size: 1``.
    ``cache_dir`` defaults to the DataModule's ``latent_dir`` — where the data config says the cache is, and where
    latent-space runs read it. ``overwrite`` re-encodes every entry. After a run, ``encoded`` and ``up_to_date`` list
    FileNames (this rank's encodes; the up-to-date ones are the same on every rank).
    """

    def __init__(self, cache_dir: str | Path | None = None, *, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.overwrite = overwrite
        # The checkpoint `predict --ckpt_path` loads *after* the callbacks' setup, where entries are judged stale or
        # not: the CLI sets it so that the checksum is of the weights that will encode (not of the initial ones).
        self.ckpt_path: str | None = None
        self.encoded: list[str] = []
        self.up_to_date: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        from lightning_modules.vae_utils import checksum_of_weights

        datamodule = trainer.datamodule
        if not isinstance(datamodule, EchoNetDataModule):
            raise TypeError("LatentCacheWriter needs the EchoNetDataModule as the trainer's datamodule")
        hp = datamodule.hparams
        if hp.space != "pixel" or hp.sampling != "video" or hp.batch_size != 1:
            raise ValueError("the latent cache encodes whole pixel videos: set data.space=pixel, "
                             "data.sampling=video and data.batch_size=1 (configs/vae_encode.yaml does)")
        if self.cache_dir is None:
            if hp.latent_dir is None:
                raise ValueError("LatentCacheWriter: no cache folder: set data.latent_dir (configs/data/*.yaml do) or "
                                 "the callback's cache_dir")
            self.cache_dir = Path(hp.latent_dir)
        split = hp.predict_split
        dataset = datamodule.datasets[split]
        if self.ckpt_path is not None:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            self.checksum = checksum_of_weights(state["state_dict"])
        else:
            self.checksum = checksum_of_weights(pl_module.vae)
        stale = None
        if trainer.is_global_zero:
            stale = [i for i, record in enumerate(dataset.records)
                     if self.overwrite or entry_problem(self.cache_dir, record, self.checksum)]
        # Every rank must shard the same list; entries written by a fast rank must not shrink a slow rank's list.
        stale = trainer.strategy.broadcast(stale, src=0)
        keep = set(stale)
        self.up_to_date = [r.file_name for i, r in enumerate(dataset.records) if i not in keep]
        self.encoded = []
        datamodule.datasets[split] = dataset.with_records([dataset.records[i] for i in stale])
        self._records = datamodule.datasets[split].records
        rank_zero_info(f"latent cache {self.cache_dir}: {len(stale)} video(s) to encode, "
                       f"{len(self.up_to_date)} up to date (VAE {self.checksum[:12]}…)")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_modules.vae_utils import checksum_of_weights

        loaded = checksum_of_weights(pl_module.vae)
        if loaded != self.checksum:
            raise ValueError(f"LatentCacheWriter: the VAE that encodes ({loaded[:12]}…) is not the one the cache was "
                             f"checked against at setup ({self.checksum[:12]}…): a checkpoint given to "
                             "trainer.predict(ckpt_path=…) loads after setup — set the callback's ckpt_path to it "
                             "(echo-lvdm predict --ckpt_path does)")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        for index, mean, logvar, fps in zip(prediction["index"], prediction["mean"], prediction["logvar"],
                                            batch["fps"], strict=True):
            record = self._records[int(index)]
            size, mtime_ns = source_signature(record.path)
            meta = LatentEntryMeta(self.checksum, float(pl_module.scaling_factor), float(fps), int(mean.shape[0]),
                                   size, mtime_ns)
            write_entry(entry_path(self.cache_dir, record), mean, logvar, meta)
            self.encoded.append(record.file_name)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A collective: every rank reports how many it wrote, so the summary shows the shards add up.
        counts = trainer.strategy.all_gather(torch.tensor(len(self.encoded), device=pl_module.device))
        per_rank = ", ".join(str(int(c)) for c in counts.reshape(-1))
        rank_zero_info(f"latent cache {self.cache_dir}: encoded {int(counts.sum())} video(s) (per rank: {per_rank}), "
                       f"{len(self.up_to_date)} already up to date")
