"""Checkpoints written by `echo-lvdm fit` before the layout move (tests/fixtures/checkpoints_8046e17) still load and
compute what they computed then."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.reid import load_reid

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_8046e17"


def test_reid_checkpoint_from_before_the_move_loads_and_embeds_the_same():
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    reid = load_reid(FIXTURES / "reid.ckpt")
    assert reid.calibrated and float(reid.tau) == float(expected["reid_tau"][0])
    torch.testing.assert_close(reid.embed_videos(expected["reid_inputs"]), expected["reid_embedding"],
                               rtol=1e-6, atol=1e-6)


def test_diffusion_checkpoint_from_before_the_move_loads_and_samples_the_same():
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    model = VideoDiffusionModule.load_from_checkpoint(FIXTURES / "lvdm.ckpt", map_location="cpu", weights_only=True)
    assert model.ema is not None and (int(model.train_num_frames), float(model.train_fps)) == (4, 50.0)
    options = dict(ef=[30.0, 70.0], reference=expected["lvdm_reference"], steps=3)
    # At 8046e17 sample() read its EF tokens from the trained conditioner (the EMA UNet, though): as then, here.
    trained_conditioner = {name: value.clone() for name, value in model.conditioner.state_dict().items()}
    with model.sampling_weights():
        model.conditioner.load_state_dict(trained_conditioner)
        latents = model.sample(**options, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(latents, expected["lvdm_sample"], rtol=1e-5, atol=1e-5)
    # Now the tokens come from the EMA too; for this one-epoch model the two differ only slightly.
    now = model.sample(**options, generator=torch.Generator().manual_seed(2))
    assert 0 < (now - latents).abs().max() < 1e-3
