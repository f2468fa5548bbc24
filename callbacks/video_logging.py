"""``VideoLogger``: at validation, a few samples of a :class:`~lightning_modules.diffusion.VideoDiffusionModule`
decoded by the exported VAE, written as mp4 (PyAV) and logged to wandb by path, or kept next to TensorBoard/CSV logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.video_io import write_video
from lightning_modules.diffusion_sampling import SAMPLERS
from lightning_modules.image_logging import image_grid, log_folder, log_image, to_uint8
from lightning_modules.vae_utils import decode_frames, load_frozen_vae

__all__ = ["VideoLogger", "video_array"]


def video_array(pixels: torch.Tensor):
    """``(T, C, H, W)`` in [-1, 1] → uint8 numpy ``(T, H, W)`` (C = 1) or ``(T, H, W, 3)``, as write_video takes."""
    frames = to_uint8(pixels).cpu()
    return frames[:, 0].numpy() if frames.shape[1] == 1 else frames.permute(0, 2, 3, 1).numpy()


class VideoLogger(L.Callback):
    """Every ``every_n_validations``-th validation of a fit (never the sanity check), samples one video per EF in
    ``ef_values`` with the EMA weights, decodes it with the frozen VAE at ``vae`` and logs it.

    Outputs, on global rank 0 only, at step = ``trainer.global_step``:

    * video models: ``<log_dir>/videos/val_ef<EF>_step<step>.mp4`` (H.264, at ``fps``, default the training clips'
      mean fps, which the model is also conditioned on); a wandb logger gets them as ``wandb.Video`` under
      ``val/samples`` (by path: no moviepy), other loggers (TensorBoard, CSV, none) keep the files and their paths are
      printed. ``<log_dir>`` is the first logger's, as for :func:`~lightning_modules.image_logging.log_image`.
    * ``val/sample_frames``, a picture through :func:`~lightning_modules.image_logging.log_image` (TensorBoard image,
      wandb image or PNG): one row per EF with ``strip_frames`` evenly spaced frames.
    * image-mode (anatomy) models: only a ``val/samples`` picture, one frame per EF in a row — a one-frame mp4 shows
      nothing a PNG does not.

    Video models that condition on a reference frame get frame 0 of the first videos of the first validation batch
    of the run (dataloader 0; cycled when the batch has fewer videos than ``ef_values``): the reference the module's
    own validation uses. It is kept for the whole run, and the noise comes from ``torch.Generator`` seeded with
    ``seed`` each time, so the videos of successive validations differ only by the weights.

    The VAE stays outside the LightningModule (not in its checkpoint, EMA or optimizer). Sampling involves no
    collective, so only rank 0 samples and the other ranks return at once.

    Args:
        vae: exported ``AutoencoderKL`` folder (``echo-lvdm export-vae``) whose ``scaling_factor`` scaled the latents.
        ef_values: EF (percent) of each sample. num_frames: video length (None: the training clip length; longer
            videos are generated in windows). steps, sampler, guidance_scale: passed to ``sample`` (None: the
            module's defaults). every_n_validations: log at validations n, 2n, … of a run. seed: noise seed.
        fps: frame rate of the files and of the conditioning (None: the module's ``train_fps``).
        strip_frames: frames per EF in the picture.
    """

    def __init__(self, vae: str, ef_values: Sequence[float] = (25.0, 50.0, 75.0), num_frames: int | None = None,
                 steps: int = 25, sampler: str | None = None, guidance_scale: float | None = None,
                 every_n_validations: int = 1, seed: int = 0, fps: float | None = None, strip_frames: int = 8) -> None:
        if not ef_values:
            raise ValueError("VideoLogger: ef_values is empty")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"VideoLogger: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        for name, value in (("every_n_validations", every_n_validations), ("steps", steps),
                            ("strip_frames", strip_frames)):
            if value < 1:
                raise ValueError(f"VideoLogger: {name} must be ≥ 1, got {value}")
        self.vae_path = Path(vae)
        self.ef_values = [float(ef) for ef in ef_values]
        self.num_frames, self.steps, self.sampler, self.guidance_scale = num_frames, steps, sampler, guidance_scale
        self.every_n_validations, self.seed, self.fps, self.strip_frames = every_n_validations, seed, fps, strip_frames
        self.vae: AutoencoderKL | None = None
        self.reference: torch.Tensor | None = None
        self.validations = 0  # finished validations of this run, sanity check excluded (saved with the checkpoint)
        self.written: list[Path] = []  # mp4 and PNG files of the last logging

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        hp = pl_module.hparams
        if hp.get("mode") == "image" and self.num_frames not in (None, 1):
            raise ValueError(f"VideoLogger: num_frames={self.num_frames} for an image-mode (anatomy) model, which "
                             "generates single frames; leave num_frames unset")
        if self.vae is None:
            self.vae = load_frozen_vae(self.vae_path)
            found, expected = self.vae.config.latent_channels, hp.get("latent_channels")
            if expected is not None and found != expected:
                raise ValueError(f"VideoLogger: VAE {self.vae_path} has {found} latent channels, the diffusion model "
                                 f"{expected}")
        # setup() runs before the strategy moves the module: its root device is where the module will be.
        self.vae.to(trainer.strategy.root_device)
        self.reference = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(vae=str(self.vae_path), ef_values=self.ef_values, seed=self.seed)

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = int(state_dict["validations"])

    # --------------------------------------------------------------------------------------- reference frames
    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if (self.reference is None and batch_idx == 0 and dataloader_idx == 0 and trainer.is_global_zero
                and pl_module.hparams.get("reference_conditioning")):
            first_frames = batch["video"][:, 0]
            pick = torch.arange(len(self.ef_values), device=first_frames.device) % len(first_frames)
            self.reference = first_frames[pick].detach().clone()

    # ------------------------------------------------------------------------------------------------ logging
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the module's own on_validation_epoch_end, so the EMA weights it swapped in are in place.
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return  # nothing below is a collective: the other ranks need not wait for rank 0
        if int(pl_module.train_num_frames) == 0:
            rank_zero_warn("VideoLogger: the model has not been trained yet (no clip length); no samples logged")
            return
        if pl_module.hparams.reference_conditioning and self.reference is None:
            rank_zero_warn("VideoLogger: no reference frame was captured (dataloader 0 gave no batch); skipped")
            return
        self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Sample, decode, write and log once (rank 0); returns the files written."""
        fps = float(self.fps or pl_module.train_fps)
        latents = pl_module.sample(
            ef=self.ef_values, reference=self.reference, num_frames=self.num_frames, steps=self.steps,
            scheduler=self.sampler, guidance_scale=self.guidance_scale,
            generator=torch.Generator().manual_seed(self.seed), fps=self.fps)
        pixels = decode_frames(self.vae.to(pl_module.device), latents)  # (B, T, C, H, W)
        step = trainer.global_step
        if pl_module.hparams.mode == "image":
            self.written = log_image(trainer, "val/samples", image_grid([pixels[:, 0]]), step=step)
            return self.written
        length = pixels.shape[1]
        shown = torch.linspace(0, length - 1, min(self.strip_frames, length)).round().long()
        # Its own key: wandb gives each key one panel type, and val/samples holds the videos.
        self.written = log_image(trainer, "val/sample_frames", image_grid(list(pixels[:, shown])), step=step)
        folder = log_folder(trainer.logger, trainer).with_name("videos")
        videos = [write_video(folder / f"val_ef{ef:g}_step{step:08d}.mp4", video_array(video), fps)
                  for ef, video in zip(self.ef_values, pixels)]
        self.written += videos
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for logger in wandb_loggers:
            # Through Lightning's wandb logger, not experiment.log(step=…): it plots against trainer/global_step,
            # and wandb drops entries whose explicit step is below its own counter.
            logger.log_video("val/samples", videos=[str(path) for path in videos], step=step,
                             caption=[f"EF {ef:g}" for ef in self.ef_values], format=["mp4"] * len(videos))
        if not wandb_loggers:
            rank_zero_info(f"VideoLogger: step {step}: " + ", ".join(str(path) for path in videos))
        return self.written
