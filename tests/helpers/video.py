"""The small latent world of the video-logging and sampling tests: random latent clips of the batch contract, and the
sizes a tiny diffusers VAE decodes them to (the ``vae_folder`` fixture of ``tests/conftest.py``)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

LATENT, PIXELS, FRAMES, FPS, SCALE = 8, 16, 4, 12.5, 0.7  # latent side, decoded side, frames, fps, scaling factor


class LatentClips(L.LightningDataModule):
    """Random latent clips of the batch contract: 2 training videos (one batch), 2 validation videos (one batch,
    fewer than three EF values, so a video logger cycles through them for reference frames)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.videos = torch.randn(4, FRAMES, 4, LATENT, LATENT, generator=generator)

    def _loader(self, rows: list[int]) -> DataLoader:
        items = [{"video": self.videos[i], "ef": torch.tensor(20.0 + 20 * i), "index": torch.tensor(i),
                  "patient": torch.tensor(i), "fps": torch.tensor(FPS)} for i in rows]
        return DataLoader(items, batch_size=2)

    def train_dataloader(self) -> DataLoader:
        return self._loader([0, 1])

    def val_dataloader(self) -> DataLoader:
        return self._loader([2, 3])
