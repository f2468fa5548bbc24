"""Flow matching (``objective="flow_matching"``): training and sampling share one convention — the clip the network
is trained on at timestep σ·T is the one every flow sampler hands it at σ·T, so an exact velocity field integrates
back to the data — and the settings of a DDPM schedule are refused on a flow model, naming them."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.diffusion_sampling import denoising_loop, make_sampler
from lightning_modules.flow_matching import FLOW_SAMPLERS, training_pair
from tests.helpers.models import TINY_DIFFUSION


def test_training_pair_is_the_straight_path_to_noise_and_its_velocity():
    module = VideoDiffusionModule(**TINY_DIFFUSION, objective="flow_matching")
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 3, 4, 2, 2, generator=generator), torch.randn(4, 3, 4, 2, 2, generator=generator)
    draws = torch.tensor([0, 249, 749, 999])  # training draws t ∈ [0, T): levels σ = (t + 1) / T
    noisy, target, timesteps = training_pair(module.noise_scheduler, latents, noise, draws)
    sigma = torch.tensor([0.001, 0.25, 0.75, 1.0]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(timesteps, torch.tensor([1.0, 250.0, 750.0, 1000.0]))
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(noisy[-1], noise[-1])  # the noisiest step keeps nothing of the clip
    torch.testing.assert_close(target, noise - latents)
    # The diffusion objective is the DDPM scheduler's own noising and target.
    diffusion = VideoDiffusionModule(**TINY_DIFFUSION)
    noisy, target, timesteps = training_pair(diffusion.noise_scheduler, latents, noise, draws)
    torch.testing.assert_close(noisy, diffusion.noise_scheduler.add_noise(latents, noise, draws))
    torch.testing.assert_close(target, diffusion.noise_scheduler.get_velocity(latents, noise, draws))
    assert torch.equal(timesteps, draws)


@pytest.mark.parametrize("name", FLOW_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 5, 25])
def test_exact_velocity_integrates_back_to_the_data(name, steps):
    """For data that is one clip x₀, the exact velocity at x and timestep τ = σ·T is ``(x − x₀) / σ``; it is the
    training target wherever training puts x, and each flow sampler, calling it at its own timesteps, must land on x₀
    from any noise. A sampler that read its timesteps on another scale (a DDPM index, σ itself) would not."""
    module = VideoDiffusionModule(**TINY_DIFFUSION, objective="flow_matching")
    T = module.hparams.num_train_timesteps
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 4, 2, 2, generator=generator), torch.randn(2, 3, 4, 2, 2, generator=generator)

    def exact(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return (x - x0) / (float(timestep) / T)

    noisy, target, timesteps = training_pair(module.noise_scheduler, x0, noise, torch.tensor([99, 99]))
    torch.testing.assert_close(exact(noisy, timesteps[0]), target)
    sampled = denoising_loop(make_sampler(name, module.noise_scheduler.config), exact, tuple(x0.shape), steps,
                             generator=torch.Generator().manual_seed(2))
    # Euler is exact on a straight path; DPM-Solver++ starts at σ = 1 − 1/T, so pure noise is 0.1 % off its start.
    assert float((sampled - x0).abs().max()) < (1e-5 if name == "euler" else 2e-2), (name, steps)


def test_flow_model_samples_with_guidance_and_refuses_ddpm_settings():
    module = VideoDiffusionModule(**TINY_DIFFUSION, objective="flow_matching")
    assert module.default_sampler == "euler"
    module.train_num_frames.fill_(4)
    module.train_fps.fill_(12.5)
    module.latent_shape.copy_(torch.tensor([4, 2, 2]))
    for name in FLOW_SAMPLERS:
        video = module.sample(ef=[30.0, 70.0], reference=torch.randn(2, 4, 2, 2), steps=3, scheduler=name,
                              guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert video.shape == (2, 4, 4, 2, 2) and bool(torch.isfinite(video).all()), name
    with pytest.raises(ValueError, match="a flow-matching model samples with euler or dpm\\+\\+, not 'ddim'"):
        module.sample(ef=[30.0], reference=torch.randn(1, 4, 2, 2), steps=2, scheduler="ddim")
    for settings, message in [(dict(sampler="ddim"), "sampler must be one of euler, dpm\\+\\+ for objective"),
                              (dict(snr_gamma=5.0), "snr_gamma and rescale_betas_zero_snr do not apply"),
                              (dict(rescale_betas_zero_snr=True), "snr_gamma and rescale_betas_zero_snr")]:
        with pytest.raises(ValueError, match=message):
            VideoDiffusionModule(**TINY_DIFFUSION, objective="flow_matching", **settings)
    with pytest.raises(ValueError, match="objective must be one of diffusion, flow_matching, got 'rectified'"):
        VideoDiffusionModule(**TINY_DIFFUSION, objective="rectified")
