"""The training objective of :class:`~lightning_modules.diffusion.VideoDiffusionModule`: denoising diffusion under a
diffusers :class:`DDPMScheduler` (``objective="diffusion"``), or flow matching (``"flow_matching"``: rectified flow,
Lipman et al. 2023, Liu et al. 2023 — the objective of SD3 and of EchoFlow).

Flow matching: a clip x₀ at noise level σ ∈ (0, 1] is ``x_σ = (1 − σ) x₀ + σ ε``, a straight line from the data
(σ = 0) to pure noise (σ = 1); the network, given ``x_σ`` at timestep ``σ·T``, predicts the velocity ``ε − x₀``. A
training draw t ∈ {0, …, T − 1} is the level ``σ = (t + 1) / T``, so the noisiest step is pure noise, as the first
sampling step is. Sampling integrates the velocity from σ = 1 to 0 with diffusers'
:class:`FlowMatchEulerDiscreteScheduler` (``"euler"``) or DPM-Solver++ on flow sigmas (``"dpm++"``,
``prediction_type="flow_prediction"``); both call the network at timesteps σ·T, as training did."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["FLOW_SAMPLERS", "OBJECTIVES", "default_sampler", "flow_sampler", "is_flow_schedule", "training_pair",
           "training_scheduler"]

OBJECTIVES = ("diffusion", "flow_matching")
FLOW_SAMPLERS = ("euler", "dpm++")
DIFFUSION_SAMPLERS = ("ddim", "dpm++", "euler", "ddpm")  # diffusion_sampling.SAMPLERS


def default_sampler(objective: str, sampler: str | None, snr_gamma: float | None, zero_snr: bool) -> str:
    """The sampler a model of ``objective`` uses when none is named (``sampler`` None: DDIM for diffusion, Euler for
    flow matching), after checking that the objective and the settings that go with it agree."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    flow = objective == "flow_matching"
    known = FLOW_SAMPLERS if flow else DIFFUSION_SAMPLERS
    if sampler is not None and sampler not in known:
        raise ValueError(f"sampler must be one of {', '.join(known)} for objective {objective!r}, got {sampler!r}")
    if flow and (snr_gamma is not None or zero_snr):
        raise ValueError("objective='flow_matching' has no DDPM noise schedule: snr_gamma and rescale_betas_zero_snr "
                         "do not apply to it (its last training step is pure noise already)")
    return sampler or ("euler" if flow else "ddim")


def is_flow_schedule(config) -> bool:
    """Whether a training scheduler's config is a flow-matching one (a DDPMScheduler's has betas, not a shift)."""
    return "shift" in config and "beta_schedule" not in config


def training_scheduler(objective: str, num_train_timesteps: int, **ddpm) -> SchedulerMixin:
    """The training schedule of ``objective``: a DDPMScheduler with the ``ddpm`` settings (beta schedule, prediction
    type, zero terminal SNR; no clipping, latents are unbounded), or flow matching's FlowMatchEulerDiscreteScheduler."""
    if objective == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False, **ddpm)


def flow_sampler(name: str, train_config) -> SchedulerMixin:
    """A sampler for a flow-matching model (``train_config``: its FlowMatchEulerDiscreteScheduler's config):
    ``"euler"`` (diffusers' flow-matching Euler, first step at σ = 1) or ``"dpm++"`` (DPM-Solver++ 2nd order,
    multistep, on the same flow sigmas; first step at σ = 1 − 1/T, spaced ``"trailing"``)."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(train_config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=train_config["num_train_timesteps"], prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=train_config["shift"], algorithm_type="dpmsolver++", solver_order=2,
            timestep_spacing="trailing")
    raise ValueError(f"a flow-matching model samples with {' or '.join(FLOW_SAMPLERS)}, not {name!r} (DDIM and "
                     "DDPM step a diffusion schedule)")


def training_pair(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy, target, model_timesteps)`` for clean ``latents`` ``(B, …)``, ``noise`` like them and training
    timestep draws ``(B,)`` in [0, T) under the training ``scheduler``: a DDPMScheduler's noised clip and its
    ``prediction_type`` target (ε, v or x₀) at the drawn timesteps, or the flow-matching pair (module docstring)."""
    if isinstance(scheduler, DDPMScheduler):
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            return noisy, scheduler.get_velocity(latents, noise, timesteps), timesteps
        return noisy, noise if prediction_type == "epsilon" else latents, timesteps
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"no training objective for a {type(scheduler).__name__}")
    steps = (timesteps + 1).to(torch.float32)
    sigma = (steps / scheduler.config.num_train_timesteps).to(latents.device, latents.dtype)
    sigma = sigma.view(-1, *(1,) * (latents.ndim - 1))
    return (1 - sigma) * latents + sigma * noise, noise - latents, steps.to(latents.device)
