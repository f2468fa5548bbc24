"""``Checkpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` really is the fit's last state, and which
writes a re-ID model's privacy threshold τ beside every checkpoint it saves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.video_io import atomic_output


def calibration_path(checkpoint: str | Path) -> Path:
    """``…/name.ckpt`` → ``…/name.tau.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.tau.json")


def _max_epochs_end_with_this_one(trainer: L.Trainer) -> bool:
    """In ``on_train_epoch_end``: whether this epoch trained all its batches and is the fit's last by ``max_epochs``
    (``FitLoop.done``'s test: the epochs processed, which include this one), not cut short by ``max_steps``."""
    loop = trainer.fit_loop
    return (loop.max_epochs not in (None, -1) and loop.epoch_progress.current.processed >= loop.max_epochs
            and not (loop.max_steps not in (None, -1) and trainer.global_step >= loop.max_steps)
            and loop.epoch_loop.batch_progress.is_last_batch)


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with three additions; every other argument and behaviour is ``ModelCheckpoint``'s.

    * The pre-2.6 meaning of ``save_last=True``: ``last.ckpt`` is rewritten at every save point (each epoch, or each
      validation), whether or not the monitored metric improved. Since Lightning 2.6 ``last.ckpt`` is written only
      when a top-k checkpoint is saved at the same step, so with a monitor it silently becomes a copy of the best
      checkpoint and ``--ckpt_path last.ckpt`` resumes from the past.
    * ``last.ckpt`` also at the end of the fit's last epoch when that epoch did not validate: Lightning saves only at
      validations when they come every n > 1 epochs (``check_val_every_n_epoch``) or every k steps, so a fit of 12
      epochs validated every 5th would end with ``last.ckpt`` at epoch 10 and ship a model two epochs short. The
      extra checkpoint is the one Lightning writes at an epoch's end when there is no validation: ``--ckpt_path
      last`` with a larger ``max_epochs`` goes on from it as the longer fit would have; its metrics are the last
      validation's. A fit stopped by ``max_steps`` (or a callback) between validations gets no such checkpoint —
      one saved there does not resume as the longer fit (measured: Lightning counts the next batch into the stopped
      epoch while the sampler has begun the next one) — but a warning naming the step ``last.ckpt`` holds.
    * A module with a ``calibration()`` (the re-ID model: :meth:`lightning_modules.reid.ReIDModule.calibration`) gets
      a ``<name>.tau.json`` next to each checkpoint with τ, its quantile and the weights checksum — readable without
      loading the checkpoint, e.g. by a data-release review. τ is ``null`` while the model is not calibrated. The JSON
      goes away with its checkpoint.

    ``echo-lvdm fit`` adds one to every run, configured under ``checkpoint:`` (``save_last: true`` there).
    """

    _last_saved_step: int | None = None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer) or _max_epochs_end_with_this_one(trainer):
            self._save_last_if_missing(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missing(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_saved_step not in (None, trainer.global_step) and not trainer.fast_dev_run:
            rank_zero_warn(f"last.ckpt holds step {self._last_saved_step}, not this fit's last step "
                           f"{trainer.global_step}: the fit stopped between two validations by max_steps (or a "
                           f"callback), where a checkpoint would not resume as the longer fit; make max_steps a "
                           f"multiple of val_check_interval (in steps) to keep the last steps")

    def _save_last_if_missing(self, trainer: L.Trainer) -> None:
        if self.save_last and self._last_saved_step != trainer.global_step and \
                not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        module = trainer.lightning_module
        if trainer.is_global_zero and hasattr(module, "calibration"):
            info = module.calibration()
            info = {key: None if isinstance(value, float) and math.isnan(value) else value
                    for key, value in info.items()}
            info["checkpoint"] = Path(filepath).name
            info["epoch"], info["global_step"] = trainer.current_epoch, trainer.global_step
            with atomic_output(calibration_path(filepath)) as tmp:
                tmp.write_text(json.dumps(info, indent=2) + "\n")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            calibration_path(filepath).unlink(missing_ok=True)
