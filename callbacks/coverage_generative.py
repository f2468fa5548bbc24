"""FID, IS and FVD of the coverage callback's samples (:class:`GenerativeMeasures`), with the field's TorchScript
extractors (:mod:`lightning_modules.metrics.generative`): the decoded, 8-bit samples against the training split's
pixel clips under the callback's protocol, beside the ground truth — the first ``num_samples`` validation videos
measured the same way, once per fit. Every rank feeds its shard of the real videos and its own requests; torchmetrics
sums the states and IS keeps the requests' order, so W processes log what one logs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules import EchoNetDataModule
from lightning_modules.image_logging import to_uint8
from lightning_modules.metrics.generative import I3D, INCEPTION, GenerativeMetrics, load_extractor, measure_dataset


class GenerativeMeasures:
    """``inception``/``i3d``: paths of the extractors (either may be None); ``fvd_lengths``: FVD clip lengths (None:
    the samples' length)."""

    def __init__(self, inception: str | None, i3d: str | None, fvd_lengths: list[int] | None, *, vae: str | None,
                 num_samples: int) -> None:
        if vae is None:
            raise ValueError("CoverageCallback: FID/IS/FVD are measured on decoded pixels; give the VAE (vae: <exported "
                             "VAE folder>) with inception: / i3d:")
        if num_samples < 2:
            raise ValueError(f"CoverageCallback: FID/IS/FVD need num_samples ≥ 2, got {num_samples}")
        self.paths = {"inception": None if inception is None else Path(inception),
                      "i3d": None if i3d is None else Path(i3d)}
        self.fvd_lengths = None if fvd_lengths is None else tuple(int(length) for length in fvd_lengths)
        self.num_samples = num_samples
        self.extractors: dict | None = None
        self.metrics: GenerativeMetrics | None = None  # per fit: holds the training split's statistics
        self.truth: dict[str, float] = {}
        self.size: tuple[int, int] | None = None

    def load(self, mode: str, device: torch.device) -> None:
        """Load the extractors once (``mode``: the callback's)."""
        if mode == "identity":
            raise ValueError("CoverageCallback: FID/IS/FVD measure what the generator ships, fully synthetic videos: "
                             "give anatomy: (without it, the video fit animates real validation frames)")
        if mode == "anatomy" and self.paths["i3d"] is not None:
            raise ValueError("CoverageCallback: an anatomy fit samples frames: FVD needs videos (give inception: only)")
        if self.extractors is None:
            self.extractors = {name: None if path is None else load_extractor(path, spec, device)
                               for (name, path), spec in zip(self.paths.items(), (INCEPTION, I3D))}

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule, pixels: EchoNetDataModule, length: int,
                batch_size: int) -> None:
        """The training split of ``pixels`` (the run's data in pixels under the protocol, read at the VAE's output
        size :meth:`frame_size`) as the real set, and its validation split's first ``num_samples`` videos as the
        ground-truth row (every rank: collectives)."""
        self.metrics = GenerativeMetrics(self.extractors["inception"], self.extractors["i3d"],
                                         fvd_lengths=self.fvd_lengths or (length,),
                                         frame_size=self.size).to(pl_module.device)
        if self.metrics.frames_needed > length:
            raise ValueError(f"CoverageCallback: fvd_lengths {self.metrics.fvd_lengths} exceed the {length}-frame "
                             "samples")
        splits = self.metrics.inception_score.splits if self.metrics.fid is not None else 0
        if self.num_samples * length < splits:
            raise ValueError(f"CoverageCallback: IS needs ≥ {splits} frames; num_samples × {length} frames is "
                             f"{self.num_samples * length}")
        if self.num_samples < trainer.world_size:
            raise ValueError(f"CoverageCallback: FID/IS/FVD need a sample on every process: num_samples "
                             f"({self.num_samples}) < {trainer.world_size} processes")
        options = dict(batch_size=batch_size, device=pl_module.device, shard=(trainer.global_rank, trainer.world_size))
        pixels.setup("fit")
        train = measure_dataset(self.metrics, pixels.datasets["train"], real=True, **options)
        heldout = measure_dataset(self.metrics, pixels.datasets["val"], real=False, limit=self.num_samples, **options)
        self.truth = {f"real_{name}": value for name, value in self.metrics.compute().items()}
        self.metrics.reset_synthetic()
        rank_zero_info(f"CoverageCallback: FID/IS/FVD against {train['videos']} training videos "
                       f"({train['too_short']} too short); the first {heldout['videos']} validation videos read "
                       + ", ".join(f"{name} {value:.4g}" for name, value in self.truth.items()))

    def frame_size(self, vae, latent_shape: torch.Tensor) -> tuple[int, int]:
        """The size the VAE decodes latents of ``latent_shape`` (C, h, w) to: the size its training frames had."""
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size = tuple(int(side) * factor for side in latent_shape[1:].tolist())
        return self.size

    def update(self, written: torch.Tensor, index: torch.Tensor) -> None:
        """Generated videos of requests ``index`` as written: decoded and quantised, in [-1, 1] (``decode_as_written``)."""
        pixels = to_uint8(written)
        if tuple(pixels.shape[-2:]) != self.size:
            raise ValueError(f"CoverageCallback: the VAE decodes {tuple(pixels.shape[-2:])} frames, not the "
                             f"{self.size} its latent shape implies: FID/FVD would compare different sizes")
        self.metrics.update(pixels, real=False, order=index)

    def compute(self) -> dict[str, torch.Tensor]:
        """This validation's values and the ground truth's (every rank: torchmetrics gathers), then a reset."""
        values = {name: torch.tensor(value) for name, value in {**self.metrics.compute(), **self.truth}.items()}
        self.metrics.reset_synthetic()
        return values

    def reset(self) -> None:
        self.metrics.reset_synthetic()
