"""VideoLogger: what it writes is what the model samples with its EMA weights, decoded by the exported VAE; never
during the sanity check, every n-th validation, wandb by path, image-mode models as a picture, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from callbacks.video_logging import VideoLogger
from datamodules.video_io import probe_video, read_video
from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.image_logging import to_uint8
from tests.helpers.models import TINY_DIFFUSION
from tests.helpers.video import FPS, FRAMES, PIXELS, SCALE, LatentClips

EF_VALUES = (25.0, 50.0, 75.0)
TINY = {**TINY_DIFFUSION, "lr": 1e-2}


def fit(root: Path, module: VideoDiffusionModule, callback: VideoLogger, max_epochs: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(root, name="run"), max_epochs=max_epochs,
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=1)
    trainer.fit(module, LatentClips())
    return trainer


def expected_frames(module: VideoDiffusionModule, vae_folder: Path, **sample_kwargs) -> torch.Tensor:
    """What the logger should show: module.sample with the logger's generator, decoded by hand → uint8 (B, T, H, W)."""
    latents = module.sample(ef=list(EF_VALUES), steps=2, generator=torch.Generator().manual_seed(0), **sample_kwargs)
    vae = AutoencoderKL.from_pretrained(vae_folder)
    with torch.no_grad():
        pixels = vae.decode(latents.flatten(0, 1) / SCALE).sample
    return to_uint8(pixels[:, 0]).unflatten(0, latents.shape[:2])


@pytest.fixture(scope="module")
def video_run(vae_folder, tmp_path_factory) -> SimpleNamespace:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("video_run")
    module = VideoDiffusionModule(**TINY)
    callback = VideoLogger(str(vae_folder), ef_values=EF_VALUES, steps=2, every_n_validations=2)
    trainer = fit(root, module, callback, max_epochs=2)  # one step per epoch: validations at steps 1 and 2
    return SimpleNamespace(module=module, callback=callback, trainer=trainer, log_dir=Path(trainer.logger.log_dir))


def test_videos_are_the_ema_samples_every_nth_validation_and_not_in_sanity_check(video_run, vae_folder):
    log_dir, module = video_run.log_dir, video_run.module
    # Validation 1 (step 1) is skipped, validation 2 (step 2) logs; counting the sanity check would log at step 1.
    videos = sorted(path.name for path in (log_dir / "videos").iterdir())
    assert videos == [f"val_ef{ef}_step00000002.mp4" for ef in (25, 50, 75)]
    assert [p.name for p in (log_dir / "images").iterdir()] == ["val_sample_frames_step00000002.png"]
    assert not any(param.requires_grad for param in video_run.callback.vae.parameters())
    assert not any("vae" in key for key in module.state_dict())

    # Reference frames: frame 0 of the first validation batch's 2 videos, cycled for 3 EFs.
    validation = LatentClips().videos[2:4, 0]
    torch.testing.assert_close(video_run.callback.reference, validation[[0, 1, 0]], rtol=0, atol=0)
    expected = expected_frames(module, vae_folder, reference=validation[[0, 1, 0]])  # (3, FRAMES, H, W)
    strip = np.asarray(Image.open(log_dir / "images" / "val_sample_frames_step00000002.png"))
    assert strip.shape == (3 * PIXELS, FRAMES * PIXELS)  # one row per EF, every frame (FRAMES < strip_frames)
    as_strip = expected.permute(0, 2, 1, 3).reshape(3 * PIXELS, FRAMES * PIXELS).numpy()
    assert np.abs(strip.astype(int) - as_strip).max() <= 1  # lossless PNG: equal up to float rounding

    for ef, frames in zip(EF_VALUES, expected):
        path = log_dir / "videos" / f"val_ef{ef:g}_step00000002.mp4"
        info = probe_video(path)
        assert (info.num_frames, info.height, info.width, info.fps) == (FRAMES, PIXELS, PIXELS, FPS)
        error = np.abs(read_video(path).astype(int) - frames.numpy()).mean()  # H.264 is lossy: near, not equal
        others = [np.abs(read_video(path).astype(int) - other.numpy()).mean() for other in expected
                  if not torch.equal(other, frames)]
        assert error < 5.0 and error < min(others) / 4, (error, others)  # ≈3 vs ≈35 at 16 px, crf 18

    # The raw (non-EMA) weights sample something else: the logger really used the EMA.
    ema, module.ema = module.ema, None
    try:
        raw = expected_frames(module, vae_folder, reference=validation[[0, 1, 0]])
    finally:
        module.ema = ema
    assert (raw.int() - expected.int()).abs().max() > 4


class RecordingWandb(WandbLogger):
    """A WandbLogger that records calls instead of starting a run."""

    def __init__(self, save_dir: Path) -> None:
        self._save_dir, self.calls = str(save_dir), []

    def log_video(self, key, videos, step=None, **kwargs) -> None:
        self.calls.append(("video", key, videos, step, kwargs))

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.calls.append(("image", key, len(images), step, kwargs))


def test_wandb_gets_mp4_paths_with_captions(video_run, tmp_path):
    logger = RecordingWandb(tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=logger, default_root_dir=tmp_path)
    written = video_run.callback.log_samples(trainer, video_run.module)
    videos = [tmp_path / "videos" / f"val_ef{ef}_step00000000.mp4" for ef in (25, 50, 75)]
    assert written == videos and all(path.is_file() for path in videos)
    (image_call, video_call) = logger.calls
    assert image_call == ("image", "val/sample_frames", 1, 0, {})
    assert video_call == ("video", "val/samples", [str(path) for path in videos], 0,
                          {"caption": ["EF 25", "EF 50", "EF 75"], "format": ["mp4"] * 3})


def test_image_model_logs_a_picture_of_single_frames(vae_folder, tmp_path):
    torch.manual_seed(0)
    module = VideoDiffusionModule(**TINY, mode="image", reference_conditioning=False)
    callback = VideoLogger(str(vae_folder), ef_values=EF_VALUES, steps=2)
    log_dir = Path(fit(tmp_path, module, callback, max_epochs=1).logger.log_dir)
    assert not (log_dir / "videos").exists() and callback.reference is None
    strip = np.asarray(Image.open(log_dir / "images" / "val_samples_step00000001.png"))
    expected = expected_frames(module, vae_folder)[:, 0]  # (3, H, W): one frame per EF
    assert strip.shape == (PIXELS, 3 * PIXELS)
    assert np.abs(strip.astype(int) - expected.permute(1, 0, 2).reshape(PIXELS, -1).numpy()).max() <= 1
    with pytest.raises(ValueError, match="single frames"):
        VideoLogger(str(vae_folder), num_frames=8).setup(L.Trainer(logger=False), module, "fit")


def test_missing_or_unscaled_vae_folder_is_named(vae_folder, tmp_path):
    module, trainer = VideoDiffusionModule(**TINY), L.Trainer(accelerator="cpu", logger=False)
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VideoLogger(str(missing)).setup(trainer, module, "fit")
    unscaled = tmp_path / "unscaled"
    unscaled.mkdir()
    config = json.loads((vae_folder / "config.json").read_text())
    del config["scaling_factor"]
    (unscaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no scaling_factor"):
        VideoLogger(str(unscaled)).setup(trainer, module, "fit")
