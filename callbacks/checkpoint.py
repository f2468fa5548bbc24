"""``Checkpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` really is the last validated state."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with the pre-2.6 meaning of ``save_last=True``: ``last.ckpt`` is rewritten at every save
    point (each epoch, or each validation), whether or not the monitored metric improved.

    Since Lightning 2.6 ``last.ckpt`` is written only when a top-k checkpoint is saved at the same step, so with a
    monitor it silently becomes a copy of the best checkpoint and ``--ckpt_path last.ckpt`` resumes from the past.
    Every other argument and behaviour is ``ModelCheckpoint``'s.
    """

    _last_saved_step: int | None = None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missing(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missing(trainer)

    def _save_last_if_missing(self, trainer: L.Trainer) -> None:
        if self.save_last and self._last_saved_step != trainer.global_step and \
                not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
