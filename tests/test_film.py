"""FiLM conditioning (``time_embedding_norm="scale_shift"``): every ResNet block of the SVD UNet scales and shifts its
normalised features by the time embedding, the temporal block computes exactly that, EF reaches the prediction
through it, and a checkpoint rebuilds the same network."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

from lightning_modules.diffusion import VideoDiffusionModule, load_diffusion
from lightning_modules.components.film import ScaleShiftTemporalResnetBlock, scale_shift_resnets
from tests.helpers.models import TINY_DIFFUSION, save_cli_checkpoint


def test_the_temporal_block_scales_and_shifts_its_normalised_features():
    torch.manual_seed(0)
    plain = TemporalResnetBlock(32, 64, temb_channels=8)
    film = ScaleShiftTemporalResnetBlock(32, 64, temb_channels=8)
    film.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("time_emb_proj")},
                         strict=False)
    x, temb = torch.randn(2, 32, 3, 5, 5), torch.randn(2, 3, 8)
    with torch.no_grad():
        film.time_emb_proj.weight.normal_()
        film.time_emb_proj.bias.normal_()
        scale, shift = film.time_emb_proj(torch.nn.functional.silu(temb)).chunk(2, dim=-1)
        # by hand, with scale and shift (B, T, C) per sample, frame and channel:
        # conv1(silu(norm1 x)) → norm2 → · (1 + scale) + shift → silu → conv2, plus the shortcut
        h = film.norm2(film.conv1(torch.nn.functional.silu(film.norm1(x))))
        h = h * (1 + scale.permute(0, 2, 1)[..., None, None]) + shift.permute(0, 2, 1)[..., None, None]
        expected = film.conv_shortcut(x) + film.conv2(torch.nn.functional.silu(h))
        torch.testing.assert_close(film(x, temb), expected)
        # a zero projection leaves the normalised features as they are: the plain block with its projection zeroed
        film.time_emb_proj.weight.zero_(), film.time_emb_proj.bias.zero_()
        plain.time_emb_proj.weight.zero_(), plain.time_emb_proj.bias.zero_()
        torch.testing.assert_close(film(x, temb), plain(x, temb))


def test_every_resnet_block_of_the_unet_takes_scale_and_shift():
    torch.manual_seed(0)
    module = VideoDiffusionModule(**TINY_DIFFUSION, ef_embedding="time", time_embedding_norm="scale_shift")
    spatial = [m for m in module.unet.modules() if isinstance(m, ResnetBlock2D)]
    temporal = [m for m in module.unet.modules() if isinstance(m, TemporalResnetBlock)]
    assert spatial and len(spatial) == len(temporal)
    assert all(m.time_embedding_norm == "scale_shift" and m.time_emb_proj.out_features == 2 * m.out_channels
               for m in spatial)
    assert all(type(m) is ScaleShiftTemporalResnetBlock and m.time_emb_proj.out_features == 2 * m.out_channels
               for m in temporal)
    assert scale_shift_resnets(module.unet) == 0  # already converted: nothing left to change
    # EMA tracks the new projections (it was built after the conversion)
    assert len(module.ema.shadow_params) == len(module.denoiser_parameters())

    # "time": the token is the null one, so EF reaches the prediction through the scales and shifts alone
    noisy, fps = torch.randn(2, 3, 4, 8, 8), torch.full((2,), 12.5)
    with torch.no_grad():
        low, high = (module.denoise(noisy, torch.tensor(500), tokens, None, fps, ef_ids=ids)
                     for tokens, ids in (module.condition(torch.full((2,), ef)) for ef in (20.0, 80.0)))
    assert (low - high).abs().max() > 1e-4
    with pytest.raises(ValueError, match="time_embedding_norm must be one of 'default', 'scale_shift'"):
        VideoDiffusionModule(**TINY_DIFFUSION, time_embedding_norm="ada_norm")


def test_a_scale_shift_checkpoint_loads_the_same_network(tmp_path):
    torch.manual_seed(0)
    module = VideoDiffusionModule(**TINY_DIFFUSION, ef_embedding="both", time_embedding_norm="scale_shift")
    module.train_num_frames.fill_(3), module.train_fps.fill_(12.5), module.latent_shape.copy_(torch.tensor([4, 8, 8]))
    loaded = load_diffusion(save_cli_checkpoint(module, tmp_path / "film.ckpt"), mode="video")
    assert loaded.hparams.time_embedding_norm == "scale_shift"
    draw = [torch.Generator().manual_seed(3)]
    first = module.sample(ef=[40.0], reference=torch.zeros(1, 4, 8, 8), steps=2, generator=draw)
    again = loaded.sample(ef=[40.0], reference=torch.zeros(1, 4, 8, 8), steps=2,
                          generator=[torch.Generator().manual_seed(3)])
    torch.testing.assert_close(first, again)
