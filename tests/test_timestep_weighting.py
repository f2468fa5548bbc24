"""Where training spends its gradient over the noise schedule. Min-SNR-γ loss weights: every prediction type's
weighted loss equals min(SNR, γ) times the x₀ error of the same prediction, a zero-terminal-SNR schedule stays finite,
the module's training loss is the weighted mean of each video's loss (evaluation unweighted), a weighted fit's loss
falls. Timestep bias: the asked density over the schedule, the module's draws mapped from its unbiased ones
(evaluation uniform). Bad options are refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from datamodules.datamodule import EchoNetDataModule
from datamodules.phantom import generate_phantom
from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.diffusion_draws import biased_timestep_map
from lightning_modules.snr_weighting import min_snr_weights
from tests.helpers.data import encode_tiny_latents
from tests.helpers.models import TINY_DIFFUSION


@pytest.fixture(autouse=True)
def pinned_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_weighted_loss_is_min_snr_gamma_times_the_x0_error(prediction_type, gamma):
    """A prediction x̂₀ of the clean latents, re-expressed as the ε / v / x₀ the UNet would output at the same noisy
    input: its loss under ``prediction_type`` times the weight is ``min(SNR, γ) · ‖x̂₀ − x₀‖²`` at every timestep."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([0, 10, 100, 300, 500, 700, 999])
    x0, noise = (torch.randn(len(timesteps), 4, 3, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    a = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_hat = (noisy - a.sqrt() * x0_hat) / (1 - a).sqrt()
    prediction, target = {"epsilon": (eps_hat, noise), "sample": (x0_hat, x0),
                          "v_prediction": (a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat,
                                           a.sqrt() * noise - (1 - a).sqrt() * x0)}[prediction_type]
    loss = ((prediction - target) ** 2).flatten(1).mean(1)
    x0_error = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    ratio = (a / (1 - a)).flatten()
    torch.testing.assert_close(compute_snr(scheduler, timesteps).double(), ratio, rtol=1e-5, atol=0)
    weighted = min_snr_weights(scheduler, timesteps, gamma).double() * loss
    torch.testing.assert_close(weighted, ratio.clamp(max=gamma) * x0_error, rtol=1e-5, atol=0)
    assert ratio[0] > gamma > ratio[-1]  # both sides of the clip are exercised


def test_zero_terminal_snr_keeps_finite_weights():
    for prediction_type, last in (("epsilon", 1.0), ("v_prediction", 0.0), ("sample", 0.0)):
        scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
        weights = min_snr_weights(scheduler, torch.tensor([0, 999]), 5.0)
        assert bool(torch.isfinite(weights).all()) and float(weights[1]) == last, prediction_type


def test_training_loss_is_the_weighted_mean_and_evaluation_is_unweighted():
    torch.manual_seed(0)
    plain = VideoDiffusionModule(**TINY_DIFFUSION)
    weighted = VideoDiffusionModule(**TINY_DIFFUSION, snr_gamma=5.0)
    weighted.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(0)
    batch = {"video": torch.randn(6, 3, 4, 8, 8, generator=generator), "ef": torch.linspace(10.0, 90.0, 6),
             "fps": torch.full((6,), 12.5), "index": torch.arange(6), "patient": torch.arange(6)}
    # The training draws of a video depend on its index only, so each video's loss and timestep can be had alone.
    alone = torch.stack([plain._shared_step({k: v[i:i + 1] for k, v in batch.items()}, "train") for i in range(6)])
    timesteps = plain._train_draws(batch["index"], batch["video"].shape[1:])[1]
    w = min_snr_weights(plain.noise_scheduler, timesteps, 5.0)
    assert len(set(w.tolist())) > 1 and bool((w <= 1).all())  # v-prediction: min(SNR, γ) / (SNR + 1) ≤ 1
    torch.testing.assert_close(weighted._shared_step(batch, "train"), (w * alone).mean(), rtol=1e-5, atol=1e-7)
    weighted._shared_step(batch, "val"), plain._shared_step(batch, "val")
    torch.testing.assert_close(weighted.val_losses.compute()["loss"], plain.val_losses.compute()["loss"])


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_a_weighted_fit_learns(tmp_path):
    root = generate_phantom(tmp_path / "data", patients=6, videos_per_patient=1, seed=2, size=32, frames=(16, 20))
    cache = encode_tiny_latents(root, tmp_path / "latents")
    data = EchoNetDataModule(root, space="latent", latent_dir=str(cache), latent_posterior="mean", clip_length=4,
                             period=2, batch_size=2, seed=0)
    torch.manual_seed(0)
    module = VideoDiffusionModule(**TINY_DIFFUSION, ema_decay=None, snr_gamma=5.0)
    recorder = LossRecorder()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, max_steps=60, overfit_batches=1, callbacks=[recorder],
              enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, data)
    losses = torch.tensor(recorder.losses)
    assert len(losses) == 60 and losses[-20:].mean() < 0.75 * losses[:20].mean(), losses


@pytest.mark.parametrize("bias, multiplier, portion", [("later", 3.0, 0.25), ("earlier", 2.0, 0.4), ("later", 0.5, 0.5)])
def test_biased_timesteps_have_the_asked_density(bias, multiplier, portion):
    """Uniform draws of t through the map: the biased end of the schedule is drawn ``multiplier`` times as often per
    timestep as the rest, and the map is monotone (a biased run keeps the order of its items' draws)."""
    steps = 1000
    mapped = biased_timestep_map(steps, bias, multiplier, portion)
    assert mapped.shape == (steps,) and int(mapped.min()) == 0 and int(mapped.max()) == steps - 1
    assert bool((mapped[1:] >= mapped[:-1]).all())
    counts = torch.bincount(mapped, minlength=steps).double()
    edge = round(portion * steps)
    biased, rest = (counts[-edge:], counts[:-edge]) if bias == "later" else (counts[:edge], counts[edge:])
    share = multiplier * portion / (multiplier * portion + 1 - portion)
    assert float(biased.sum()) / steps == pytest.approx(share, abs=2 / steps)
    assert float(biased.mean() / rest.mean()) == pytest.approx(multiplier, rel=0.02)
    assert biased_timestep_map(steps, "none", multiplier, portion) is None


def test_a_biased_module_maps_its_own_draws_and_evaluates_uniformly():
    plain = VideoDiffusionModule(**TINY_DIFFUSION)
    biased = VideoDiffusionModule(**TINY_DIFFUSION, timestep_bias="later", timestep_bias_multiplier=4.0)
    index, shape = torch.arange(64), torch.Size([3, 4, 2, 2])
    draws, biased_draws = plain._train_draws(index, shape), biased._train_draws(index, shape)
    torch.testing.assert_close(biased_draws[1], biased.timestep_map[draws[1]])
    for name, a, b in zip(("noise", "reference frame", "EF coin", "reference coin"), (draws[0], *draws[2:]),
                          (biased_draws[0], *biased_draws[2:])):
        torch.testing.assert_close(a, b, msg=name)
    assert float((biased_draws[1] >= 750).float().mean()) > float((draws[1] >= 750).float().mean())
    for a, b in zip(plain._eval_noise(index, shape), biased._eval_noise(index, shape)):
        torch.testing.assert_close(a, b)


def test_bad_options_are_refused():
    for gamma in (0.0, -1.0):
        with pytest.raises(ValueError, match="snr_gamma must be > 0"):
            VideoDiffusionModule(**TINY_DIFFUSION, snr_gamma=gamma)
    with pytest.raises(ValueError, match="timestep_bias must be 'none', 'later' or 'earlier', got 'range'"):
        VideoDiffusionModule(**TINY_DIFFUSION, timestep_bias="range")
    for options in ({"timestep_bias_multiplier": 0.0}, {"timestep_bias_portion": 1.0}):
        with pytest.raises(ValueError, match="timestep_bias_multiplier must be > 0 and timestep_bias_portion in"):
            VideoDiffusionModule(**TINY_DIFFUSION, timestep_bias="later", **options)
