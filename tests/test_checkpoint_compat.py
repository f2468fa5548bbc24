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
    latents = model.sample(ef=[30.0, 70.0], reference=expected["lvdm_reference"], steps=3,
                           generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(latents, expected["lvdm_sample"], rtol=1e-5, atol=1e-5)
