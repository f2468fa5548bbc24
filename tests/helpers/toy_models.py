"""A deliberately tiny LightningModule that exercises the CLI and the DataModule without the cost of a real model."""

import lightning as L
import torch
import torch.nn.functional as F


class MeanBrightnessEF(L.LightningModule):
    """EF (fraction) regressed from a clip's mean brightness by one linear unit. Input: the shared batch contract."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = torch.nn.Linear(1, 1)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        features = batch["video"].mean(dim=(1, 2, 3, 4)).unsqueeze(1)
        loss = F.mse_loss(self.linear(features).squeeze(1), batch["ef"] / 100)
        self.log(f"{stage}/loss", loss, batch_size=len(features), prog_bar=stage == "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
