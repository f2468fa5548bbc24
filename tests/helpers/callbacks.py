"""Callbacks that tests add to real CLI runs (``--trainer.callbacks+=tests.helpers.callbacks.KillAt``)."""

import json
import os
import signal

import lightning as L


def fit_batch(trainer) -> int:
    """The index of the current training batch counted over the whole fit (0-based; survives a resume)."""
    return trainer.fit_loop.epoch_loop.total_batch_idx


class KillAt(L.Callback):
    """SIGKILL the process — no cleanup, no checkpoint — as a preempted job dies: before training batch ``batch`` of the
    fit starts, or (``epoch``) when that epoch's training ends, after its last validation and before the epoch's end
    (epoch-interval schedulers and epoch-end checkpoints come later)."""

    def __init__(self, batch: int = -1, epoch: int = -1) -> None:
        self.batch, self.epoch = batch, epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if fit_batch(trainer) == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(L.Callback):
    """Append ``{"batch", "loss", "pid"}`` for every training batch to the JSON-lines file ``path`` (the step's returned loss,
    or its logged ``train/loss`` under manual optimisation)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            loss = trainer.callback_metrics["train/loss"]
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"batch": fit_batch(trainer), "loss": float(loss), "pid": os.getpid(),
                                     "items": batch["index"].tolist(), "step": trainer.global_step,
                                     "epoch": trainer.current_epoch}) + "\n")
