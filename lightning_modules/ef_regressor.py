"""``EFRegressorModule``: ejection fraction from an echo clip (EchoNet-Dynamic's R(2+1)D regressor), in pixel or
latent space — the downstream task that judges synthetic data and the instrument that reads EF from generated videos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from datamodules.augment import RANDOM_LIMITS, FrameTransform
from datamodules.clips import clip_indices
from lightning_modules.metrics import EFRegressionMetrics
from lightning_modules.components.r2plus1d import R2Plus1D, load_torchvision_weights

__all__ = ["EFRegressorModule"]
STAGES = ("train", "val", "test")


class EFRegressorModule(L.LightningModule):
    """Regresses EF (percent) from a clip with an :class:`R2Plus1D` network and one output.

    Batches follow the shared contract: ``video`` float32 ``(B, T, C, H, W)`` — pixels in [-1, 1] (C = 1 or 3) or VAE
    latents (C = 4, as the DataModule serves them: scaled by the VAE's factor unless ``data.latent_scaled: false``) —
    and ``ef`` float32 ``(B,)`` percent. Loss: MSE (or L1) in EF points. Metrics MAE, RMSE, R² per stage
    (:class:`EFRegressionMetrics`, one value per video, DDP padding removed) logged as ``{stage}/mae`` etc. each epoch.

    Output bias: ``fc.bias`` starts at the training split's mean EF (EchoNet-Dynamic's trick: the first steps learn
    shape, not the offset), read from the DataModule's train FileList in ``setup("fit")`` and remembered in the
    ``train_ef_mean`` buffer. It is set once, on a fresh module: a resumed run or a module loaded from a checkpoint
    keeps its weights. ``output_bias`` fixes the value instead (for training without the EchoNet DataModule).

    Evaluation protocol: the clip length of training (``train_clip_length`` buffer, recorded at every training step)
    decides. A validation/test video of another length is cut into every clip of that length, ``test_clip_stride``
    frames apart, and the clip predictions are averaged (a shorter video is one clip, padded by reflection as the
    DataModule pads clips). With the DataModule's clip loader (``sampling: clip``) a video *is* one clip: EchoNet's
    one-clip protocol. With ``sampling: video`` and ``batch_size: 1`` (whole videos at the configured period/fps) it
    is EchoNet's all-clips protocol. The protocol follows the data, not a model argument, because ``--ckpt_path``
    replaces the command line's model arguments by the checkpoint's (LightningCLI ≥ 2.5.5).

    Args:
        in_channels … temporal_strides: the :class:`R2Plus1D` network (defaults: torchvision's ``r2plus1d_18`` on
            grayscale; for 14² latents use ``in_channels=4, stem_kernel=3, stem_stride=1``).
        loss: ``"mse"`` or ``"l1"``, in EF points.
        optimizer, lr, weight_decay, momentum: ``"sgd"`` (EchoNet-Dynamic: lr 1e-4, momentum 0.9, weight decay 1e-4)
            or ``"adamw"``. lr_step_period: epochs between ×0.1 learning-rate steps (EchoNet: 15); None keeps lr.
        output_bias: initial ``fc.bias``; None = the training split's mean EF.
        torchvision_weights: a torchvision ``r2plus1d_18`` state dict file (e.g. Kinetics-400) loaded at the start of
            a fresh fit (see :func:`load_torchvision_weights`; the 400-class head is skipped).
        test_clip_stride: frames between clip starts in the all-clips protocol (1 = every start, as EchoNet).
        clip_batch_size: clips per forward pass when a video is cut into clips.
        augment: pixel space only: each training clip is warped (shift, turn, rescale), blurred, brightened or
            darkened and made noisier by one random transform of all its frames (:meth:`FrameTransform.random`,
            each kind drawn with this probability; shifts and blur scale with the frame size, their limits being
            for 112 px). None of these changes the EF of the heart they show, so the regressor learns EF rather
            than the training videos. 0: off (EchoNet-Dynamic's setting). The transforms run on the CPU.
    """

    def __init__(
        self,
        in_channels: int = 1,
        layers: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        spatial_strides: Sequence[int] = (1, 2, 2, 2),
        temporal_strides: Sequence[int] = (1, 2, 2, 2),
        loss: Literal["mse", "l1"] = "mse",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        lr_step_period: int | None = 15,
        output_bias: float | None = None,
        torchvision_weights: str | None = None,
        test_clip_stride: int = 1,
        clip_batch_size: int = 16,
        augment: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if test_clip_stride < 1 or clip_batch_size < 1:
            raise ValueError(f"test_clip_stride ({test_clip_stride}) and clip_batch_size ({clip_batch_size}) "
                             "must be ≥ 1")
        if not 0.0 <= augment <= 1.0:
            raise ValueError(f"augment is a probability in [0, 1], got {augment}")
        if augment > 0 and in_channels == 4:
            raise ValueError("augment transforms pixels; a latent-space regressor (in_channels=4) takes augment=0")
        self.network = R2Plus1D(in_channels, 1, layers, width, stem_kernel, stem_stride, spatial_strides,
                                temporal_strides)
        self.register_buffer("train_ef_mean", torch.tensor(float("nan")))
        self.register_buffer("train_clip_length", torch.tensor(0))
        # One metric object per stage (a ModuleDict cannot have the key "train": nn.Module.train exists).
        self.train_metrics, self.val_metrics, self.test_metrics = (EFRegressionMetrics() for _ in STAGES)

    # ------------------------------------------------------------------------------------------ initialisation
    def setup(self, stage: str) -> None:
        # Runs before Lightning restores a --ckpt_path checkpoint, which then overwrites all of this on resume.
        if stage == "fit" and torch.isnan(self.train_ef_mean):
            self._initialise_for_fit()

    def _initialise_for_fit(self) -> None:
        hp = self.hparams
        if hp.torchvision_weights is not None:
            state = torch.load(hp.torchvision_weights, map_location="cpu", weights_only=True)
            load_torchvision_weights(self.network, state)
            rank_zero_info(f"EFRegressorModule: r2plus1d_18 weights from {hp.torchvision_weights} (fc not loaded)")
        mean = hp.output_bias if hp.output_bias is not None else self._train_split_mean_ef()
        self.train_ef_mean.fill_(mean)
        with torch.no_grad():
            self.network.fc.bias.fill_(mean)

    def _train_split_mean_ef(self) -> float:
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "datasets", {}).get("train")
        if dataset is None or not getattr(dataset, "records", None):
            raise ValueError("EFRegressorModule: no training split to take the mean EF from (the EchoNetDataModule's "
                             "train FileList rows); pass model.output_bias to set the initial output instead")
        efs = [record.ef for record in dataset.records]
        return sum(efs) / len(efs)

    # ------------------------------------------------------------------------------------------------ network
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` clips → EF ``(B,)`` percent (in the module's current train/eval mode)."""
        channels = self.hparams.in_channels
        if video.ndim != 5 or video.shape[2] != channels:
            raise ValueError(f"EFRegressorModule expects videos (B, T, C={channels}, H, W), got {tuple(video.shape)}")
        return self.network(video.permute(0, 2, 1, 3, 4)).squeeze(1)

    @torch.no_grad()
    def predict_ef(self, videos: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
        """EF (percent) of each clip: ``(B, T, C, H, W)`` pixels in [-1, 1] or latents → float32 ``(B,)``.

        Runs in eval mode (the previous mode is restored) without gradients, ``chunk_size`` clips per forward pass on
        the module's device; the result is on ``videos``' device. Inputs should have the size and clip length the
        model was trained on (latents scaled as in training).
        """
        was_training = self.training
        self.eval()
        try:
            predictions = [self(chunk.to(self.device, self.dtype)).float().to(videos.device)
                           for chunk in videos.split(chunk_size)]
        finally:
            self.train(was_training)
        return torch.cat(predictions) if predictions else videos.new_zeros(0)

    def predict_video_ef(self, video: torch.Tensor, clip_length: int, stride: int = 1) -> torch.Tensor:
        """EF of a whole video ``(T, C, H, W)``: the mean over every clip of ``clip_length`` frames, starts
        ``stride`` apart (a video shorter than a clip is padded by reflection). Returns a float32 scalar."""
        length = video.shape[0]
        starts = range(0, max(length - clip_length, 0) + 1, stride)
        clips = torch.stack([torch.from_numpy(clip_indices(length, clip_length, 1, start)) for start in starts])
        chunk = self.hparams.clip_batch_size
        # Clips are gathered a chunk at a time: memory stays at chunk × clip_length frames for any video length.
        predictions = [self.predict_ef(video[rows.to(video.device)], chunk) for rows in clips.split(chunk)]
        return torch.cat(predictions).mean()

    def read_ef(self, videos: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """The EF this regressor reads from whole videos ``(B, T, C, H, W)`` (e.g. generated ones): each frame resized
        to ``size`` × ``size`` when given (bilinear with antialias, then clamped to [-1, 1], as the DataModule resizes
        the training clips), then :meth:`predict_video_ef` over clips of the training length. float32 ``(B,)``."""
        if size is not None and videos.shape[-1] != size:
            videos = F.interpolate(videos.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).clamp_(-1.0, 1.0).unflatten(0, videos.shape[:2])
        clip_length = int(self.train_clip_length) or videos.shape[1]
        if len(videos) == 0:
            return videos.new_zeros(0)
        return torch.stack([self.predict_video_ef(video, clip_length) for video in videos]).float()

    # ---------------------------------------------------------------------------------------------- training
    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        video, target = batch["video"], batch["ef"].float()
        clip_length = int(self.train_clip_length)
        if stage == "train":
            self.train_clip_length.fill_(video.shape[1])
            predictions = self(self._augment(video) if self.hparams.augment > 0 else video)
        elif clip_length and video.shape[1] != clip_length:
            predictions = torch.stack([self.predict_video_ef(v, clip_length, self.hparams.test_clip_stride)
                                       for v in video])
        else:
            predictions = self(video)
        distance = F.mse_loss if self.hparams.loss == "mse" else F.l1_loss
        loss = distance(predictions, target)
        self._metrics(stage).update(batch["index"], predictions, target)
        self.log(f"{stage}/loss", loss, batch_size=len(video), prog_bar=True, sync_dist=stage != "train")
        return loss

    def _augment(self, video: torch.Tensor) -> torch.Tensor:
        """One random EF-preserving transform per clip of ``video (B, T, C, H, W)``, drawn from torch's RNG (so
        ``seed_everything`` fixes it)."""
        size = video.shape[-1]
        limits = {**RANDOM_LIMITS, "shift": RANDOM_LIMITS["shift"] * size / 112.0,
                  "blur": RANDOM_LIMITS["blur"] * size / 112.0}
        seeds = torch.randint(0, 2**31 - 1, (len(video),)).tolist()
        clips = []
        for clip, seed in zip(video, seeds):
            transform = FrameTransform.random(np.random.default_rng(seed), limits, self.hparams.augment)
            generator = torch.Generator().manual_seed(seed)
            clips.append(transform.apply(clip.cpu(), generator).to(video.device))
        return torch.stack(clips)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _metrics(self, stage: str) -> EFRegressionMetrics:
        return getattr(self, f"{stage}_metrics")

    def _log_metrics(self, stage: str) -> None:
        metric = self._metrics(stage)
        if metric.update_count:  # equal on every rank: DistributedSampler gives each rank as many batches
            values = metric.compute()  # a collective: every rank calls it, and gets the same values
            # sync_dist averages identical numbers (a no-op) and keeps Lightning's per-rank-value warning away.
            self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=stage == "val",
                          sync_dist=True)
        metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.network.parameters(), lr=hp.lr, momentum=hp.momentum,
                                        weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.network.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_step_period is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step_period, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
