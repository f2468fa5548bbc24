"""Joint image-and-video sampling (JVID): a schedule without image steps is plain sampling bit for bit, one of only
image steps is per-frame image sampling under the same noise, exactly the scheduled steps reach each model (with
windows, guidance and every sampler), seeded schedules repeat, and a pair of models that cannot share a loop is
refused."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.diffusion import VideoDiffusionModule
from diffusers import DPMSolverMultistepScheduler

from lightning_modules.diffusion_sampling import SAMPLERS, denoising_loop, make_sampler
from lightning_modules.joint_sampling import JointSchedule
from tests.helpers.models import TINY_DIFFUSION

SPACE = {"vae_checksum": "ab" * 32, "scaling_factor": 0.5}


def trained(module: VideoDiffusionModule, frames: int, seed: int) -> VideoDiffusionModule:
    """Random weights of a given seed (perturbed so that no layer is zero at init), with what training records."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    module.ema = None  # the EMA would hold the unperturbed weights
    module.train_num_frames.fill_(frames)
    module.train_fps.fill_(12.5)
    module.latent_shape.copy_(torch.tensor([4, 4, 4]))
    module.latent_space = dict(SPACE)
    return module.eval()


@pytest.fixture(scope="module")
def models() -> tuple[VideoDiffusionModule, VideoDiffusionModule]:
    torch.manual_seed(0)
    video = trained(VideoDiffusionModule(**TINY_DIFFUSION), frames=4, seed=1)
    image = trained(VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False,
                                         guidance_scale=2.0), frames=1, seed=2)
    return video, image


def seeded(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


REFERENCE = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_schedule_without_image_steps_is_plain_sampling_bit_for_bit(models, sampler):
    video, image = models
    options = dict(ef=[30.0, 70.0], reference=REFERENCE, num_frames=6, steps=3, scheduler=sampler, guidance_scale=2.0)
    plain = video.sample(**options, generator=seeded())
    for joint in (None, "start=0.1", JointSchedule(every=4)):  # 0.1 × 3 steps rounds to none; step 4 is past the end
        torch.testing.assert_close(video.sample(**options, image_model=image, joint=joint, generator=seeded()), plain,
                                   rtol=0, atol=0)
    assert not torch.equal(video.sample(**options, image_model=image, joint="every=2", generator=seeded()), plain)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_only_image_steps_equal_sampling_each_frame_with_the_image_model(models, sampler):
    """Every step to the image model: each frame is the image model's sample at its video's EF, under the noise the
    video's frame drew (one generator: a (2, 6, …) draw is the (12, 1, …) draw), in windows of 4 frames or not."""
    video, image = models
    joint = video.sample(ef=[30.0, 70.0], reference=REFERENCE, num_frames=6, steps=4, scheduler=sampler,
                         window=4, image_model=image, joint="every=1", generator=seeded())
    frames = image.sample(ef=torch.tensor([30.0] * 6 + [70.0] * 6), steps=4, scheduler=sampler, generator=seeded())
    torch.testing.assert_close(joint, frames[:, 0].unflatten(0, (2, 6)), rtol=1e-4, atol=1e-5)  # batch vs frame


@pytest.fixture(scope="module")
def stub_models() -> tuple[VideoDiffusionModule, VideoDiffusionModule]:
    """A video and an image model whose UNets the tests replace; the image model trained at another frame rate."""
    video = trained(VideoDiffusionModule(**TINY_DIFFUSION), frames=4, seed=1)
    image = trained(VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False), frames=1,
                    seed=2)
    image.train_fps.fill_(50.0)
    return video, image


def record_calls(module: VideoDiffusionModule, calls: list, name: str, value: float) -> None:
    """Replace the UNet by a constant prediction ``value`` per frame, recording who was called with what."""
    def denoise(noisy, timestep, tokens, reference, fps, ef_ids=None):
        calls.append((name, float(timestep), tuple(noisy.shape), reference is not None, float(fps[0])))
        return torch.full_like(noisy, value)
    module.denoise = denoise


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("joint", ["every=3", "start=0.5", "end=0.25", "probability=0.5,seed=1",
                                   "every=4,start=0.25"])
def test_exactly_the_scheduled_steps_reach_each_model(stub_models, sampler, joint):
    video, image = stub_models
    calls: list = []
    record_calls(video, calls, "video", 0.1)
    record_calls(image, calls, "image", -0.1)
    steps = 8
    video.sample(ef=[30.0, 70.0], reference=REFERENCE, num_frames=6, steps=steps, scheduler=sampler, window=4,
                 overlap=2, guidance_scale=1.0, image_model=image, joint=joint + ",guidance_scale=3",
                 generator=seeded())
    schedule = JointSchedule.parse(joint).image_steps(steps)
    timesteps = make_sampler(sampler, video.noise_scheduler.config)
    timesteps.set_timesteps(steps)
    expected = []
    for timestep, image_step in zip(timesteps.timesteps.tolist(), schedule):
        if image_step:  # windows of 4 and 2 frames, folded; guided (conditional, unconditional); no reference
            expected += [("image", timestep, (2 * 4, 1, 4, 4, 4), False, 50.0)] * 2
            expected += [("image", timestep, (2 * 2, 1, 4, 4, 4), False, 50.0)] * 2
        else:  # windows at frames 0–3 and 2–5, unguided, on the reference, at the video's fps
            expected += [("video", timestep, (2, 4, 4, 4, 4), True, 12.5)] * 2
    assert any(schedule) and not all(schedule)
    assert calls == expected


def test_dpm_solver_takes_a_first_order_step_where_the_model_changes():
    """DPM-Solver++(2M) never combines two models' predictions in one update: where the model changes it takes a
    first-order step (DPM-Solver++(1)), elsewhere its second-order one. Two linear toy denoisers make the difference
    visible."""
    config = VideoDiffusionModule(**TINY_DIFFUSION).noise_scheduler.config

    def video_output(x, t):
        return 0.3 * x + 0.1

    def image_output(x, t):
        return -0.2 * x + 0.05

    def run(order: int, image_steps: list[bool]) -> torch.Tensor:
        sampler = DPMSolverMultistepScheduler.from_config(config, timestep_spacing="trailing",
                                                          algorithm_type="dpmsolver++", solver_order=order)
        return denoising_loop(sampler, video_output, (2, 3, 4, 2, 2), 6, generator=seeded(),
                              image_output=image_output, image_steps=image_steps)

    alternating = JointSchedule(every=2).image_steps(6)
    torch.testing.assert_close(run(2, alternating), run(1, alternating), rtol=1e-6, atol=1e-6)
    assert (run(2, [False] * 6) - run(1, [False] * 6)).abs().max() > 1e-3  # without switches: second order
    # One switch (after step 3): steps 1 and 4 first order, steps 2–3 and 5–6 second order.
    halves = JointSchedule(end=0.5).image_steps(6)
    assert not torch.allclose(run(2, halves), run(1, halves), rtol=1e-4, atol=1e-4)


def test_seeded_schedules_and_joint_samples_repeat(models):
    video, image = models
    schedule = JointSchedule(probability=0.4, seed=3)
    assert schedule.image_steps(30) == JointSchedule(probability=0.4, seed=3).image_steps(30)
    assert schedule.image_steps(30) != JointSchedule(probability=0.4, seed=4).image_steps(30)
    assert 4 <= sum(schedule.image_steps(30)) <= 20
    options = dict(ef=[30.0, 70.0], reference=REFERENCE, steps=6, image_model=image, joint=schedule,
                   scheduler="ddpm")  # ancestral: the step noise comes from the generators too
    first = video.sample(**options, generator=[seeded(1), seeded(2)])
    torch.testing.assert_close(video.sample(**options, generator=[seeded(1), seeded(2)]), first, rtol=0, atol=0)


def test_schedules_parse_and_select_the_documented_steps():
    assert JointSchedule.parse("every=3").image_steps(7) == [False, False, True, False, False, True, False]
    assert JointSchedule.parse({"start": 0.3}).image_steps(10) == [True] * 3 + [False] * 7
    assert JointSchedule.parse("end=0.25").image_steps(8) == [False] * 6 + [True] * 2
    assert JointSchedule.parse("every=1").image_steps(3) == [True] * 3
    assert JointSchedule.parse("every=2,end=0.5,guidance_scale=2").describe() == "every=2,end=0.5,guidance_scale=2"
    assert JointSchedule.parse(None) is None
    for bad, message in [("every=0", "integer ≥ 1"), ("start=1.5", r"fraction in \[0, 1\]"),
                         ("often=2", "unknown key"), ("every", "key=value"), ({"every": 2, "bogus": 1}, "unknown key")]:
        with pytest.raises(ValueError, match=message):
            JointSchedule.parse(bad)


def test_models_that_cannot_share_a_loop_are_refused(models):
    video, image = models
    options = dict(ef=[30.0, 70.0], reference=REFERENCE, steps=2)
    with pytest.raises(ValueError, match="needs image_model"):
        video.sample(**options, joint="every=2")
    with pytest.raises(ValueError, match="must be an image-mode"):
        video.sample(**options, image_model=video, joint="every=2")
    with pytest.raises(ValueError, match="must be a video model"):
        image.sample(ef=[30.0], steps=2, image_model=image, joint="every=2")

    def variant(**overrides) -> VideoDiffusionModule:
        return trained(VideoDiffusionModule(**TINY_DIFFUSION | dict(mode="image", reference_conditioning=False)
                                            | overrides), frames=1, seed=2)

    other = variant()
    other.latent_shape.copy_(torch.tensor([4, 8, 8]))
    for candidate, message in [(other, r"latents \(4, 4, 4\), the image model \(4, 8, 8\)"),
                               (variant(beta_schedule="linear"), "beta_schedule 'scaled_linear' vs 'linear'"),
                               (variant(prediction_type="epsilon"), "prediction_type 'v_prediction' vs 'epsilon'"),
                               (variant(num_train_timesteps=500), "num_train_timesteps 1000 vs 500"),
                               (variant(objective="flow_matching"), "beta_schedule 'scaled_linear' vs None")]:
        with pytest.raises(ValueError, match=message):
            video.sample(**options, image_model=candidate, joint="every=2")
    other = variant()
    other.latent_space = {"vae_checksum": "cd" * 32, "scaling_factor": 0.5}
    with pytest.raises(ValueError, match="latents of VAE abababababab…, the image model on VAE cdcdcdcdcdcd…"):
        video.sample(**options, image_model=other, joint="every=2")
    other.latent_space = {"vae_checksum": "ab" * 32, "scaling_factor": 0.18}
    with pytest.raises(ValueError, match="scaled by 0.5, the image model's by 0.18"):
        video.sample(**options, image_model=other, joint="every=2")
    other.latent_space = None  # a checkpoint from before the record: sampled, with a warning
    with pytest.warns(UserWarning, match="cannot check"):
        video.sample(**options, image_model=other, joint="every=2")
