"""``CalibratedCheckpoint``: a checkpoint callback that also writes the re-ID model's τ beside each checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L

from callbacks.checkpoint import Checkpoint
from datamodules.video_io import atomic_output


def calibration_path(checkpoint: str | Path) -> Path:
    """``…/name.ckpt`` → ``…/name.tau.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.tau.json")


class CalibratedCheckpoint(Checkpoint):
    """Every checkpoint it saves gets a ``<name>.tau.json`` next to it with τ, its quantile and the weights checksum
    (:meth:`lightning_modules.reid.ReIDModule.calibration`) — readable without loading the checkpoint, e.g. by a
    data-release review. τ is ``NaN`` (written as ``null``) when the model was not calibrated yet. The JSON goes
    away with its checkpoint. All ``ModelCheckpoint`` arguments apply (``last.ckpt`` as :class:`Checkpoint`)."""

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
