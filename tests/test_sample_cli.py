"""``echo-lvdm sample``: one mp4 per requested video, a CSV of requested EFs and the EF a regressor reads back, equal
to sampling, decoding and regressing by hand with the same seed."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from lightning_modules.vae_utils import decode_frames, load_frozen_vae
from datamodules.errors import UserInputError
from datamodules.video_io import probe_video
from echo_lvdm.main import main
from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.ef_regressor import EFRegressorModule
from tests.helpers.models import TINY_DIFFUSION, save_cli_checkpoint
from tests.helpers.video import FRAMES, LATENT, PIXELS


def test_sample_writes_videos_and_reads_ef_back(vae_folder, tmp_path, caplog):  # noqa: F811
    torch.manual_seed(0)
    diffusion = VideoDiffusionModule(**TINY_DIFFUSION, reference_dropout=1.0)
    diffusion.train_num_frames.fill_(FRAMES)
    diffusion.train_fps.fill_(12.5)
    diffusion.latent_shape.copy_(torch.tensor([4, LATENT, LATENT]))
    save_cli_checkpoint(diffusion, tmp_path / "lvdm.ckpt")
    regressor = EFRegressorModule(layers=[1, 1], width=8, stem_kernel=3, spatial_strides=[1, 2],
                                  temporal_strides=[1, 2])
    with torch.no_grad():
        regressor.network.fc.weight.normal_(0.0, 20.0)  # EFs that differ from video to video
        regressor.network.fc.bias.fill_(50.0)
    regressor.train_clip_length.fill_(FRAMES)
    save_cli_checkpoint(regressor, tmp_path / "ef.ckpt")

    out = tmp_path / "samples"
    with caplog.at_level(logging.INFO):
        assert main(["sample", "--checkpoint", str(tmp_path / "lvdm.ckpt"), "--vae", str(vae_folder),
                     "--ef", "20", "80", "--per-ef", "2", "--steps", "3", "--seed", "5", "--batch-size", "3",
                     "--ef-regressor", str(tmp_path / "ef.ckpt"), "--out", str(out)]) == 0
    with (out / "samples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["RequestedEF"]) for row in rows] == [20.0, 20.0, 80.0, 80.0]
    for row in rows:
        info = probe_video(out / row["FileName"])
        assert (info.num_frames, info.height, info.width) == (FRAMES, PIXELS, PIXELS)

    # By hand: the same two batches (3 + 1 videos) from the same generator, decoded, regressed.
    generator = torch.Generator().manual_seed(5)
    latents = torch.cat([diffusion.sample(ef=[20.0, 20.0, 80.0], steps=3, generator=generator),
                         diffusion.sample(ef=[80.0], steps=3, generator=generator)])
    pixels = decode_frames(load_frozen_vae(vae_folder), latents).clamp(-1, 1)
    expected = [float(regressor.predict_video_ef(video, FRAMES)) for video in pixels]
    assert [float(row["ReadEF"]) for row in rows] == pytest.approx(expected, abs=2e-3)
    assert len(set(expected)) == 4
    assert "R²" in caplog.text and "MAE" in caplog.text


def test_sample_takes_reference_frames_from_the_anatomy_model(vae_folder, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    diffusion = VideoDiffusionModule(**TINY_DIFFUSION)  # always trained with a reference: it needs one
    anatomy = VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False)
    for module, frames in ((diffusion, FRAMES), (anatomy, 1)):
        module.train_num_frames.fill_(frames)
        module.train_fps.fill_(12.5)
        module.latent_shape.copy_(torch.tensor([4, LATENT, LATENT]))
    save_cli_checkpoint(diffusion, tmp_path / "lvdm.ckpt")
    save_cli_checkpoint(anatomy, tmp_path / "lidm.ckpt")
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(tmp_path / "lvdm.ckpt"), "--vae", str(vae_folder), "--anatomy",
                 str(tmp_path / "lidm.ckpt"), "--ef", "30", "70", "--steps", "2", "--seed", "1", "--out", str(out)]) == 0
    # By hand: anatomy frames at the requested EFs first, then the videos from those references, one generator.
    generator = torch.Generator().manual_seed(1)
    references = anatomy.sample(ef=[30.0, 70.0], generator=generator)[:, 0]
    latents = diffusion.sample(ef=[30.0, 70.0], reference=references, steps=2, generator=generator)
    expected = decode_frames(load_frozen_vae(vae_folder), latents).clamp(-1, 1)
    from datamodules.video_io import read_video

    for video, name in zip(expected, ["sample_00000_ef30.mp4", "sample_00001_ef70.mp4"]):
        written = torch.from_numpy(read_video(out / name).astype("float32"))
        assert (written - ((video[:, 0] + 1) * 127.5)).abs().mean() < 4.0  # H.264 of the same frames

    # Joint sampling (JVID): every 2nd step by the image model, which defaults to --anatomy.
    joint_out = tmp_path / "joint"
    assert main(["sample", "--checkpoint", str(tmp_path / "lvdm.ckpt"), "--vae", str(vae_folder), "--anatomy",
                 str(tmp_path / "lidm.ckpt"), "--ef", "30", "70", "--steps", "2", "--seed", "1", "--joint", "every=2",
                 "--out", str(joint_out)]) == 0
    generator = torch.Generator().manual_seed(1)
    references = anatomy.sample(ef=[30.0, 70.0], generator=generator)[:, 0]
    latents = diffusion.sample(ef=[30.0, 70.0], reference=references, steps=2, generator=generator,
                               image_model=anatomy, joint="every=2")
    joint = (decode_frames(load_frozen_vae(vae_folder), latents).clamp(-1, 1)[:, :, 0] + 1) * 127.5
    for video, plain, name in zip(joint, expected, ["sample_00000_ef30.mp4", "sample_00001_ef70.mp4"]):
        written = torch.from_numpy(read_video(joint_out / name).astype("float32"))
        error = (written - video).abs().mean()
        assert error < 4.0 and error < 0.5 * (written - (plain[:, 0] + 1) * 127.5).abs().mean()
    with pytest.raises(UserInputError, match="--joint needs an image model"):
        main(["sample", "--checkpoint", str(tmp_path / "lvdm.ckpt"), "--vae", str(vae_folder), "--ef", "30",
              "--joint", "every=2", "--out", str(tmp_path / "none")])


def test_sample_refuses_an_anatomy_model_as_video_model(vae_folder, tmp_path):  # noqa: F811
    anatomy = VideoDiffusionModule(**TINY_DIFFUSION, mode="image", reference_conditioning=False)
    save_cli_checkpoint(anatomy, tmp_path / "lidm.ckpt")
    assert main(["sample", "--checkpoint", str(tmp_path / "lidm.ckpt"), "--vae", str(vae_folder), "--ef", "50",
                 "--out", str(tmp_path / "out")]) == 1
