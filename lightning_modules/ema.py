"""``DenoiserEMA``: the exponential moving average of a diffusion model's denoiser, as a LightningModule mixin.

The module provides ``self.ema`` (a diffusers :class:`~diffusers.training_utils.EMAModel`, or None for no EMA) and
``denoiser_named_parameters()`` (what is averaged: nothing frozen). The mixin updates the EMA once per optimizer step
(also with gradient accumulation, also when a loaded model is fine-tuned by a new Trainer), swaps it into the denoiser
on request — keeping the trained weights aside, with no host round trip — and keeps it in the checkpoint (``"ema"``);
a checkpoint saved while the EMA is swapped in still holds the trained weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class DenoiserEMA:
    """Mixin for a LightningModule with ``ema`` and ``denoiser_named_parameters()`` (see the module's docs). Call
    :meth:`swap_in_ema` / :meth:`swap_out_ema` around evaluation and sampling."""

    _raw_weights: list[torch.Tensor] | None = None  # the trained weights while the EMA is swapped in
    _ema_last_step = 0

    def denoiser_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for _, parameter in self.denoiser_named_parameters()]

    def on_train_start(self) -> None:
        # A new Trainer (fine-tuning a loaded model) restarts global_step; a resumed one restores it.
        self._ema_last_step = self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Once per optimizer step: with gradient accumulation global_step moves only on the stepping micro-batch.
        if self.ema is not None and self.trainer.global_step > self._ema_last_step:
            self._ema_last_step = self.trainer.global_step
            self.ema.to(device=self.device)
            self.ema.step(self.denoiser_parameters())

    def swap_in_ema(self) -> None:
        """Put the EMA weights into the denoiser (the trained ones are kept aside); no-op without EMA or if swapped."""
        if self.ema is not None and self._raw_weights is None:
            self.ema.to(device=self.device)
            parameters = self.denoiser_parameters()
            self._raw_weights = [p.detach().clone() for p in parameters]
            self.ema.copy_to(parameters)

    def swap_out_ema(self) -> None:
        """Give the denoiser its trained weights back."""
        if self._raw_weights is not None:
            with torch.no_grad():
                for parameter, raw in zip(self.denoiser_parameters(), self._raw_weights):
                    parameter.copy_(raw)
            self._raw_weights = None

    @contextmanager
    def sampling_weights(self):
        """Eval mode with the EMA weights swapped in, the previous state restored on exit (a callback may sample
        during validation, when they are already in)."""
        was_training, swapped_here = self.training, self._raw_weights is None
        self.eval()
        self.swap_in_ema()
        try:
            yield self
        finally:
            if swapped_here:
                self.swap_out_ema()
            self.train(was_training)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._raw_weights is not None:  # saved mid-validation (e.g. on an exception): keep the trained weights
            names = [name for name, _ in self.denoiser_named_parameters()]
            state = checkpoint["state_dict"]
            state.update({name: raw.to(state[name].device) for name, raw in zip(names, self._raw_weights)})
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
