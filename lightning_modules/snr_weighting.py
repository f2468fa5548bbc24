"""Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"; the
``--snr_gamma`` of diffusers' training examples).

Every prediction type is a weighted x₀ error: with ``SNR = ᾱ_t / (1 − ᾱ_t)``, the ε error is SNR times the x₀ error,
the v error (SNR + 1) times it. Min-SNR-γ makes that factor ``min(SNR, γ)``: against plain v-prediction it cuts the
nearly clean steps most (factor γ instead of SNR + 1, SNR up to ~10³ here), and the noisiest steps too (SNR instead of
SNR + 1, → 0 at the last timestep), so the steps near SNR = γ carry most of the gradient."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

__all__ = ["check_snr_gamma", "min_snr_weights"]


def check_snr_gamma(gamma: float | None) -> None:
    """Refuse a γ that is not positive (None: no Min-SNR weighting)."""
    if gamma is not None and not gamma > 0:
        raise ValueError(f"snr_gamma must be > 0 (None: no Min-SNR weighting), got {gamma}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """The factor ``(B,)`` that turns each sample's loss under ``scheduler.config.prediction_type`` into
    ``min(SNR, γ) · ‖x̂₀ − x₀‖²``: ``min(SNR, γ) / SNR`` for epsilon (1 where SNR ≤ γ, SNR = 0 included),
    ``min(SNR, γ) / (SNR + 1)`` for v_prediction, ``min(SNR, γ)`` for sample."""
    check_snr_gamma(gamma)
    ratio = compute_snr(scheduler, timesteps)  # ᾱ / (1 − ᾱ); 0 at a zero-terminal-SNR schedule's last step
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (gamma / ratio).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return ratio.clamp(max=gamma) / (ratio + 1.0)
    if prediction_type == "sample":
        return ratio.clamp(max=gamma)
    raise ValueError(f"Min-SNR weighting knows epsilon, v_prediction and sample, not {prediction_type!r}")
