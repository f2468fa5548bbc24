"""Sampling pieces of :mod:`lightning_modules.diffusion` without Lightning in them: diffusers samplers built from the
training schedule, overlapping-window blending for videos longer than the training window, the denoising loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules.flow_matching import DIFFUSION_SAMPLERS, flow_sampler, is_flow_schedule

SAMPLERS = DIFFUSION_SAMPLERS


def make_sampler(name: str, train_config) -> SchedulerMixin:
    """A diffusers sampler for the schedule a model was trained with (``train_config``: its DDPMScheduler's config).

    ``"ddim"`` (deterministic, eta 0), ``"dpm++"`` (DPM-Solver++ 2nd order, multistep), ``"euler"`` (Euler discrete)
    or ``"ddpm"`` (ancestral, the training scheduler itself). Timesteps are spaced ``"trailing"`` so the first step
    starts from pure noise at t = T − 1 even with few steps (Lin et al. 2024). A flow-matching model's schedule gets
    its own samplers (:func:`~lightning_modules.flow_matching.flow_sampler`: ``"euler"``, ``"dpm++"``).
    """
    if is_flow_schedule(train_config):
        return flow_sampler(name, train_config)
    if name == "ddim":
        return DDIMScheduler.from_config(train_config, timestep_spacing="trailing")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(train_config, timestep_spacing="trailing",
                                                       algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(train_config, timestep_spacing="trailing")
    if name == "ddpm":
        return DDPMScheduler.from_config(train_config, timestep_spacing="trailing")
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """First frames of the windows that cover ``length`` frames: ``window − overlap`` apart, the last one flush with
    the end (it may overlap its neighbour by more). One window at 0 when the video fits in one."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window ≥ 1 and 0 ≤ overlap < window, got window {window}, overlap {overlap}")
    if length <= window:
        return [0]
    return list(range(0, length - window, window - overlap)) + [length - window]


def window_weights(window: int, overlap: int) -> torch.Tensor:
    """float32 ``(window,)`` blending weights: a linear ramp ``1/(overlap+1) … 1`` over ``overlap`` frames at both
    ends, 1 in between. Where windows overlap, a frame's prediction is the weighted mean of theirs, so each window
    fades out where the next fades in (no seam); where only one window covers a frame, its prediction is taken as is.
    """
    position = torch.arange(window, dtype=torch.float32)
    return torch.minimum(torch.minimum(position + 1, window - position), torch.tensor(overlap + 1.0)) / (overlap + 1)


def blend_windows(denoise: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, window: int,
                  overlap: int) -> torch.Tensor:
    """Apply ``denoise`` (``(B, t, …) → (B, t, …)``, t ≤ window) to every window of ``latents`` ``(B, T, …)`` and blend
    the predictions with :func:`window_weights`. The network sees one window at a time, so its memory does not grow
    with T; the result equals ``denoise(latents)`` when ``T ≤ window``."""
    length = latents.shape[1]
    if length <= window:
        return denoise(latents)
    weights = window_weights(window, overlap).to(latents.device, latents.dtype)
    broadcast = (1, window) + (1,) * (latents.ndim - 2)
    blended = torch.zeros_like(latents)
    total = torch.zeros(length, device=latents.device, dtype=latents.dtype)
    for start in window_starts(length, window, overlap):
        frames = slice(start, start + window)
        blended[:, frames] += weights.view(broadcast) * denoise(latents[:, frames])
        total[frames] += weights
    return blended / total.view((1, length) + (1,) * (latents.ndim - 2))


def denoising_loop(sampler: SchedulerMixin, model_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   shape: tuple[int, ...], steps: int, *,
                   generator: torch.Generator | list[torch.Generator] | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   image_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   image_steps: Sequence[bool] | None = None) -> torch.Tensor:
    """Run ``sampler`` for ``steps`` steps from Gaussian noise of ``shape``: the standard diffusers loop
    (``init_noise_sigma``, ``scale_model_input``, ``step``); ``model_output(x, t)`` is the network's prediction in the
    sampler's ``prediction_type``. Noise comes from ``generator`` (reproducible on any device; a list gives each batch
    item its own).

    Joint sampling: where ``image_steps[i]`` is True, step i takes ``image_output(x, t)`` instead (another model's
    prediction under the same schedule). A multistep sampler (DPM-Solver++) takes a first-order step wherever the
    model changes, so no update mixes the two models' predictions (:mod:`lightning_modules.joint_sampling`).
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    sampler.set_timesteps(steps, device=device)
    schedule = [False] * len(sampler.timesteps) if image_steps is None else [bool(step) for step in image_steps]
    if len(schedule) != len(sampler.timesteps):
        raise ValueError(f"image_steps has {len(schedule)} entries for {len(sampler.timesteps)} sampling steps")
    if any(schedule) and image_output is None:
        raise ValueError("image_steps selects steps but no image_output was given")
    latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
    latents = latents * getattr(sampler, "init_noise_sigma", 1.0)  # flow matching starts from ε itself
    previous = schedule[0]
    for timestep, image_step in zip(sampler.timesteps, schedule):
        if image_step != previous and hasattr(sampler, "lower_order_nums"):
            sampler.lower_order_nums = 0  # the stored previous prediction is the other model's
        previous = image_step
        predict = image_output if image_step else model_output
        scaled = sampler.scale_model_input(latents, timestep) if hasattr(sampler, "scale_model_input") else latents
        prediction = predict(scaled, timestep)
        latents = sampler.step(prediction, timestep, latents, generator=generator).prev_sample
    return latents


def sample_inputs(model, ef, reference: torch.Tensor | None, num_frames: int | None, batch_size: int | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """``VideoDiffusionModule.sample``'s arguments checked against the model and made whole: EF as ``(count,)``
    on the model's device (or None), the reference on its device and dtype, the sample count and the frame count."""
    hp = model.hparams
    if int(model.train_num_frames) == 0:
        raise RuntimeError("sample() needs a trained model (train_num_frames and latent_shape are set by training)")
    if hp.mode == "image":
        if reference is not None or num_frames not in (None, 1):
            raise ValueError("an image-mode (anatomy) model generates single frames without a reference")
        num_frames = 1
    elif hp.reference_conditioning and reference is None and hp.reference_dropout == 0.0:
        raise ValueError("this model always saw a reference frame in training (reference_dropout 0): pass one")
    if ef is not None:
        ef = torch.as_tensor(ef, dtype=torch.float32, device=model.device).reshape(-1)
    count = batch_size or (len(reference) if reference is not None else None) or (len(ef) if ef is not None else 0)
    if not count:
        raise ValueError("give ef, reference or batch_size to set the number of samples")
    if ef is not None and len(ef) not in (1, count) or reference is not None and len(reference) != count:
        raise ValueError(f"{count} samples requested but ef has {len(ef) if ef is not None else '-'} values and "
                         f"reference {len(reference) if reference is not None else '-'} frames")
    if reference is not None:
        reference = reference.to(model.device, model.dtype)
    return (None if ef is None else ef.expand(count)), reference, count, num_frames or int(model.train_num_frames)


def guided_prediction(model, ef: torch.Tensor | None, reference: torch.Tensor | None, count: int, fps: float,
                      guidance: float, guide_reference: bool = False) -> Callable:
    """``prediction(t)(noisy)``: a :class:`~lightning_modules.diffusion.VideoDiffusionModule`'s prediction for
    ``count`` samples at EF ``ef`` (None: the null token) on ``reference`` frames at ``fps``, guided ``u + g (c − u)``
    with u the null-EF prediction (also without reference when ``guide_reference``) unless g = 1 or nothing is
    conditioned."""
    hp = model.hparams
    fps_tensor = torch.full((count,), fps, device=model.device)
    condition = model.condition(ef if hp.ef_conditioning else None, batch_size=count)
    null_condition = model.condition(None, batch_size=count)
    unguided_reference = None if guide_reference else reference
    use_guidance = guidance != 1.0 and (ef is not None and hp.ef_conditioning or guide_reference)

    def at(timestep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def predict(noisy: torch.Tensor) -> torch.Tensor:
            conditional = model.denoise(noisy, timestep, condition[0], reference, fps_tensor, ef_ids=condition[1])
            if not use_guidance:
                return conditional
            unconditional = model.denoise(noisy, timestep, null_condition[0], unguided_reference, fps_tensor,
                                          ef_ids=null_condition[1])
            return unconditional + guidance * (conditional - unconditional)
        return predict
    return at


_ANATOMY_STREAM = 0x5EED  # a reference frame's noise differs from its video's


def generate_requested(video_model, anatomy, ef: torch.Tensor, seeds: list[int], **options) -> torch.Tensor:
    """Fully synthetic latent videos for generation requests (:mod:`datamodules.requests`): request i's reference
    frame is ``anatomy``'s sample at ``ef[i]`` with noise seeded by ``seeds[i] ^ 0x5EED``, and its video is
    ``video_model``'s sample on that frame with noise seeded by ``seeds[i]`` — whatever batch or rank it is in, so the
    coverage callback measures the very videos the synthetic dataset writer generates for the same requests.
    ``anatomy`` None: the video model's no-reference mode. ``options``: the video model's
    :meth:`~lightning_modules.diffusion.VideoDiffusionModule.sample` options (steps, scheduler, …); the anatomy model
    samples with its own defaults, as the writer's does."""
    reference = None
    if anatomy is not None:
        reference = anatomy_references(anatomy, ef, seeds)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    return video_model.sample(ef=ef, reference=reference, generator=generators, **options)


def anatomy_references(anatomy, ef: torch.Tensor, seeds: list[int], **options) -> torch.Tensor:
    """Reference latent frames ``(N, C, h, w)`` from an image-mode (anatomy) model, one per request (see
    :func:`generate_requested`), sampled with the model's own defaults unless ``options`` say otherwise."""
    generators = [torch.Generator().manual_seed(int(seed) ^ _ANATOMY_STREAM) for seed in seeds]
    return anatomy.sample(ef=ef, generator=generators, **options)[:, 0]
