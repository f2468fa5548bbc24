"""``CoverageCallback``: while a generator trains, how much of the training set does what it ships cover, how much does
it copy, and does it show the EF it was asked for? (Definitions: DESIGN.md, "Metrics".)

What is sampled decides what a number means, so the callback measures the chain a synthetic dataset is made by:

* **anatomy fit** (an image-mode :class:`~lightning_modules.diffusion.VideoDiffusionModule`): ``num_samples`` of the
  model's own frames — coverage, memorisation, density / PRDC, Fréchet distance against the training split's frames;
* **video fit with** ``anatomy``: fully synthetic videos — each request's reference frame drawn from the frozen anatomy
  model, then animated — exactly as :class:`~callbacks.synthetic_writer.SyntheticDatasetWriter` makes them for the
  same requests: coverage, memorisation, density / PRDC, FD, temporal consistency, EF faithfulness;
* **video fit without** ``anatomy``: videos animated from the first frame of *real* validation videos inherit that
  patient, so no coverage or memorisation is logged — only identity preservation (``val/identity_score``,
  ``val/identity_above_tau``), EF faithfulness, temporal consistency and FD.

Videos are compared under one :class:`~lightning_modules.protocols.Protocol` (default: clips of the model's training
length at the run's period or fps; an anatomy model's frames: ``first_frame``), and τ is calibrated for it from the
run's validation split against its training split (``val/tau``). Given the VAE, samples are measured as a written
file of them is — decoded, quantised to 8 bits, encoded again — which is what ``echo-lvdm evaluate`` and the privacy
filter see: on the quickstart this reproduces the written dataset's best matches 40 of 40 and the filter's drops,
where the generated latents themselves agreed on 19 of 40. Every measure is a torchmetrics state keyed by index,
so DDP ranks gather their samples and sampler padding counts once.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.coverage_figures import coverage_curves, score_histogram
from callbacks.coverage_generative import GenerativeMeasures
from callbacks.coverage_measures import CoverageMeasures, IdentityMeasures, coverage_sizes
from datamodules import EchoNetDataModule, GenerationRequests
from lightning_modules.calibration import calibrate
from lightning_modules.diffusion import load_diffusion
from lightning_modules.diffusion_sampling import SAMPLERS, anatomy_references, generate_requested
from lightning_modules.image_logging import log_image
from lightning_modules.joint_sampling import JointSchedule
from lightning_modules.protocols import Protocol
from lightning_modules.reid import load_reid
from lightning_modules.reid_embeddings import EncodedReID, embed_split
from lightning_modules.vae_utils import decode_as_written, load_frozen_vae

__all__ = ["CoverageCallback", "CoverageMeasures", "IdentityMeasures", "coverage_sizes", "protocol_datamodule"]


def protocol_datamodule(datamodule: EchoNetDataModule, protocol: Protocol, **overrides: Any) -> EchoNetDataModule:
    """The same data as ``datamodule`` served under ``protocol`` (latents as posterior means, the re-ID model's
    input), for embedding whole splits."""
    accepted = inspect.signature(EchoNetDataModule).parameters  # LightningCLI adds keys of its own (_instantiator)
    options = {key: value for key, value in datamodule.hparams.items() if key in accepted}
    options.update(protocol.data_options(), num_workers=0, **overrides)
    if options.get("space") == "latent":
        options["latent_posterior"] = "mean"
    return EchoNetDataModule(**options)


class CoverageCallback(L.Callback):
    """Coverage, memorisation and EF faithfulness of a diffusion model while it trains (see the module's docs),
    measured at every ``every_n_validations``-th validation of a fit (never the sanity check) and at every
    ``validate``.

    Once per fit the training and validation splits are embedded under the protocol by the re-ID model (each rank a
    shard, gathered, cached under ``cache_dir`` by the re-ID weights and the data setup) and τ is calibrated from the
    validation videos at ``quantile`` (default: the re-ID model's). Then each measured validation samples:

    * with an anatomy model, or in an anatomy fit: requests 0 … ``num_samples`` − 1 of ``requests`` (EF and noise
      seed per request, :class:`~datamodules.GenerationRequests`; rank r takes r, r + W, …), sampled in batches of
      ``batch_size``;
    * otherwise: one video per validation video with ``index < num_samples``, on its first frame and EF.

    Logged as ``val/<name>``: ``coverage`` (at |S| = the samples), ``coverage@n`` (the first n samples, n in ¼, ½, 1,
    2 × |R| and the validation set's size), ``reference_coverage`` (validation videos), ``relative_coverage`` (at equal
    counts), ``memorization_rate``, ``memorized_coverage``, ``density``, ``prdc_coverage``, ``fd_reid``,
    ``temporal_consistency``, ``ef_r2``, ``ef_mae``, ``tau`` — or, animating real frames, ``identity_score``,
    ``identity_above_tau``, ``ef_r2``, ``ef_mae``, ``fd_reid``, ``temporal_consistency``, ``tau`` — and figures
    ``val/coverage_scores`` (best scores with τ) and ``val/coverage_curve`` (coverage against |S|).

    Args:
        reid: re-ID checkpoint in the diffusion model's latent space (its own τ is not used: τ is calibrated for the
            protocol here). ef_regressor: EF regressor checkpoint (None: no EF faithfulness; not for anatomy fits).
        vae: exported VAE folder. With it, samples are measured as a written video is — decoded, quantised to 8 bits
            and encoded again, as ``evaluate`` and the writer see them (the re-ID model reads generated latents
            differently from their re-encoding); needed when the EF regressor reads pixels. ef_size: frame size the
            regressor was trained at (None: the VAE's output size).
        anatomy: image-mode checkpoint whose frames a video model animates (a video fit without it measures
            identity preservation instead of coverage). A loaded model may instead be set as ``callback.anatomy``.
        protocol: ``first_frame``, ``frames:N``, ``clip:L``, ``clip:L/pP`` or ``clip:L@Ffps`` (None: the default above).
        num_samples: samples per measured validation. requests: their EFs and seeds (``distribution``,
            ``ef_range``, ``seed``; default uniform EF 10–90, seed 0, as configs/generate.yaml).
        every_n_validations, steps, sampler, guidance_scale: when and how to sample (None: the model's defaults;
            with an anatomy model, they apply to the video model: its frames are sampled as the writer samples them).
        joint: joint image-and-video sampling of the video model (JVID; :class:`~lightning_modules.joint_sampling.
            JointSchedule` settings such as ``{every: 2}``; None: the video model alone), as the writer samples with
            the same settings. image_model: the image-mode checkpoint taking those steps (None: ``anatomy``).
        inception, i3d: the field's TorchScript extractors (StyleGAN2-ADA's ``inception-2015-12-05.pt``,
            StyleGAN-V's ``i3d_torchscript.pt``; :mod:`lightning_modules.metrics.generative`): with them and the VAE,
            ``val/fid``, ``val/is``, ``val/is_std``, ``val/fvd<L>`` of the decoded, 8-bit samples against the
            training split's pixel clips under the protocol (each rank feeds its shard), beside ``val/real_*``: the
            first ``num_samples`` validation videos measured the same way (the ground truth, once per fit). Not
            in identity mode (those videos inherit real patients). fvd_lengths: FVD clip lengths (None: the
            samples' length). At ``num_samples`` far below the field's 2048 these are biased upward: compare them
            across validations and with ``val/real_*``, not with published values.
        quantile: of τ. seed: noise seed when animating real frames. k: neighbours of density and PRDC coverage.
        batch_size: requests sampled together. cache_dir: embedding cache (None: under the first logger's
            directory, else the trainer's ``default_root_dir``, ``reid_cache/``).
    """

    def __init__(self, reid: str, ef_regressor: str | None = None, vae: str | None = None, ef_size: int | None = None,
                 anatomy: str | None = None, protocol: str | None = None, num_samples: int = 64,
                 requests: dict | GenerationRequests | None = None, every_n_validations: int = 1, steps: int | None = None,
                 sampler: str | None = None, guidance_scale: float | None = None, quantile: float | None = None,
                 seed: int = 0, k: int = 5, batch_size: int = 8, cache_dir: str | None = None,
                 joint: dict | str | None = None, image_model: str | None = None, inception: str | None = None,
                 i3d: str | None = None, fvd_lengths: list[int] | None = None) -> None:
        if min(every_n_validations, steps or 1, k, num_samples, batch_size) < 1:
            raise ValueError("CoverageCallback: every_n_validations, steps, k, num_samples and batch_size must be ≥ 1, "
                             f"got {every_n_validations}, {steps}, {k}, {num_samples}, {batch_size}")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"CoverageCallback: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        for name, path in (("reid", reid), ("ef_regressor", ef_regressor), ("anatomy", anatomy),
                           ("image_model", image_model)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"CoverageCallback: {name} checkpoint {path} not found")
        self.generative = None if inception is None and i3d is None else GenerativeMeasures(
            inception, i3d, fvd_lengths, vae=vae, num_samples=num_samples)
        self.joint = JointSchedule.parse(joint)
        self.joint = None if self.joint == JointSchedule() else self.joint
        self.image_model_path = None if image_model is None else Path(image_model)
        self.reid_path, self.ef_path = Path(reid), None if ef_regressor is None else Path(ef_regressor)
        self.anatomy_path = None if anatomy is None else Path(anatomy)
        self.vae_path, self.ef_size = None if vae is None else Path(vae), ef_size
        self.protocol_name = None if protocol is None else Protocol.parse(protocol).name
        requests = requests if isinstance(requests, dict) else vars(requests) if requests is not None else {}
        self.requests = GenerationRequests(**{**requests, "attempts": num_samples})
        self.every_n_validations, self.num_samples, self.steps = every_n_validations, num_samples, steps
        self.sampler, self.guidance_scale, self.quantile, self.seed, self.k = sampler, guidance_scale, quantile, seed, k
        self.batch_size, self.cache_dir = batch_size, None if cache_dir is None else Path(cache_dir)
        self.validations = 0  # finished validations of fits, sanity check excluded (saved with the checkpoint)
        self.reid = self.regressor = self.vae = self.anatomy = self.image_model = None
        self._mode: str | None = None  # decided in setup, from the model being fitted
        self.protocol: Protocol | None = None
        self.bank = self.heldout = self.calibration = None  # per fit: the training and validation splits, τ
        self.measures: CoverageMeasures | IdentityMeasures | None = None
        self.active = False
        self.last: dict[str, float] = {}  # the values logged at the last measured validation

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def mode(self) -> str:
        """``anatomy`` (an image-mode fit), ``synthetic`` (video fit with an anatomy model) or ``identity``."""
        return self._mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        hp = pl_module.hparams
        if hp.get("mode") not in ("video", "image"):
            raise ValueError("CoverageCallback measures diffusion models (VideoDiffusionModule); got "
                             f"{type(pl_module).__name__}")
        if hp.mode == "image" and (self.anatomy_path is not None or self.ef_path is not None):
            raise ValueError("CoverageCallback: an anatomy (image-mode) fit samples its own frames; give it no anatomy "
                             "and no EF regressor (EF cannot be read from one frame)")
        animates = self.anatomy_path is not None or self.anatomy is not None
        self._mode = "anatomy" if hp.mode == "image" else "synthetic" if animates else "identity"
        device = trainer.strategy.root_device
        if self.reid is None:
            self.reid = load_reid(self.reid_path)
            if self.reid.hparams.in_channels != hp.latent_channels:
                raise ValueError(f"CoverageCallback: {self.reid_path} takes {self.reid.hparams.in_channels}-channel "
                                 f"frames; the diffusion model's latents have {hp.latent_channels} channels — use a "
                                 "re-ID model trained in latent space (configs/reid_latent.yaml)")
        if self.ef_path is not None and self.regressor is None:
            from lightning_modules.checkpoints import load_module
            from lightning_modules.ef_regressor import EFRegressorModule

            self.regressor = load_module(EFRegressorModule, self.ef_path, map_location=device)
            self.regressor.eval().requires_grad_(False)
            if self.regressor.hparams.in_channels != hp.latent_channels and self.vae_path is None:
                raise ValueError(f"CoverageCallback: the EF regressor {self.ef_path} reads pixels; give the VAE "
                                 "that decodes the diffusion model's latents (vae: <exported VAE folder>)")
        if self.vae_path is not None and self.vae is None:
            self.vae = load_frozen_vae(self.vae_path)
        if self.anatomy_path is not None and self.anatomy is None:
            self.anatomy = load_diffusion(self.anatomy_path, mode="image", map_location=device)
        if self.anatomy is not None:
            if self.anatomy.hparams.latent_channels != hp.latent_channels:
                raise ValueError(f"CoverageCallback: anatomy {self.anatomy_path} makes "
                                 f"{self.anatomy.hparams.latent_channels}-channel latents, the video model "
                                 f"{hp.latent_channels}")
        if self.joint is not None:
            if hp.mode == "image":
                raise ValueError("CoverageCallback: joint sampling is for video models; an anatomy fit samples frames")
            if self.image_model_path not in (None, self.anatomy_path):
                self.image_model = load_diffusion(self.image_model_path, mode="image", map_location=device)
            else:
                self.image_model = self.anatomy
            if self.image_model is None:
                raise ValueError("CoverageCallback: joint sampling needs an image model: give image_model: "
                                 "<image-mode checkpoint> (or anatomy:, which it defaults to)")
        if self.generative is not None:
            self.generative.load(self._mode, device)
        for model in (self.reid, self.regressor, self.vae, self.anatomy, self.image_model):
            if model is not None:
                model.to(device)
        self.bank = None  # the training split may differ between fits: embed it again (from the cache when unchanged)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reid=str(self.reid_path), anatomy=str(self.anatomy_path),
                                        num_samples=self.num_samples, seed=self.requests.seed)

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = int(state_dict["validations"])

    # -------------------------------------------------------------------------------- bank, held-out set, τ
    def _protocol(self, pl_module: L.LightningModule, datamodule: EchoNetDataModule) -> Protocol:
        if self.protocol_name is not None:
            return Protocol.parse(self.protocol_name)
        if self.mode == "anatomy":
            return Protocol("first_frame")
        hp = datamodule.hparams
        length = int(pl_module.train_num_frames) or int(hp.clip_length)
        fps = hp.get("fps")
        return Protocol("clip", length, 1 if fps is not None else int(hp.period), fps)

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Embed the training and validation splits under the protocol and calibrate τ (every rank: collectives)."""
        datamodule = trainer.datamodule
        if not isinstance(datamodule, EchoNetDataModule):
            raise ValueError("CoverageCallback embeds the training split through the run's EchoNetDataModule; "
                             "pass the datamodule to the Trainer (not bare dataloaders)")
        self.protocol = self._protocol(pl_module, datamodule)
        data = protocol_datamodule(datamodule, self.protocol)
        cache = self._cache_dir(trainer)
        self.bank = embed_split(self.reid, data, "train", cache_dir=cache)
        self.heldout = embed_split(self.reid, data, "val", cache_dir=cache)
        if self.mode == "anatomy":  # a sample is one frame: so is each held-out query
            self.heldout.embedding = self.heldout.embedding[:, :1]
        quantile = self.quantile if self.quantile is not None else float(self.reid.hparams.quantile)
        self.calibration = calibrate(self.reid, self.bank, self.heldout, quantile=quantile, protocol=self.protocol,
                                     heldout_name="val", weights_checksum=self.reid.weights_checksum(),
                                     data=datamodule.root_for("train"))
        self.train_ef = torch.tensor([record.ef for record in data.datasets["train"].records]).numpy()
        rank_zero_info(f"CoverageCallback ({self.mode}): {len(self.bank)} training and {len(self.heldout)} validation "
                       f"videos under protocol {self.protocol.name}; τ = {self.calibration.tau:.4g} "
                       f"(quantile {quantile} of the validation videos)")
        if self.generative is not None:
            length = 1 if self.mode == "anatomy" else self._length(int(pl_module.train_num_frames))
            size = self.generative.frame_size(self.vae, pl_module.latent_shape)
            pixels = protocol_datamodule(datamodule, self.protocol, space="pixel", channels=1, latent_dir=None,
                                         size=size)
            self.generative.prepare(trainer, pl_module, pixels, length, self.batch_size)

    # ------------------------------------------------------------------------------------------- measuring
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = not trainer.sanity_checking and (
            trainer.state.fn != "fit" or (self.validations + 1) % self.every_n_validations == 0)
        if not self.active:
            return
        if self.bank is None:
            self._prepare(trainer, pl_module)
        kind = IdentityMeasures if self.mode == "identity" else CoverageMeasures
        self.measures = kind(self.reid, self.bank, self.calibration, self.protocol, ef=self.regressor is not None,
                             k=self.k).to(pl_module.device)
        if self.mode != "identity":  # every rank gives the same rows: the index de-duplicates them
            self.measures.update_reference(self.heldout.index.to(pl_module.device),
                                           self.heldout.embedding.to(pl_module.device))

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.active or dataloader_idx != 0 or self.mode != "identity":
            return
        index = batch["index"]
        chosen = index < self.num_samples
        if not bool(chosen.any()):
            return
        index, real, ef = index[chosen], batch["video"][chosen], batch["ef"][chosen].float()
        generators = [torch.Generator().manual_seed(self.seed * 1_000_003 + int(i)) for i in index.tolist()]
        reference = real[:, 0] if pl_module.hparams.reference_conditioning else None
        latents = pl_module.sample(ef=ef, reference=reference, num_frames=self._length(real.shape[1]),
                                   generator=generators, **self._options())
        rows = torch.searchsorted(self.heldout.index.to(index.device), index)
        source = self.heldout.embedding.to(index.device)[rows]  # the source videos, under the protocol
        embedding, read, _ = self._measure(latents, index)
        self.measures.update(index, embedding, source, ef, read)

    def _options(self) -> dict:
        """The model's sampling options (the anatomy fit's too: there joint sampling is refused)."""
        options = dict(steps=self.steps, scheduler=self.sampler, guidance_scale=self.guidance_scale)
        if self.joint is not None:
            options.update(image_model=self.image_model, joint=self.joint)
        return options

    def _length(self, default: int) -> int:
        return self.protocol.length if self.protocol.kind == "clip" else default

    def _as_written(self, latents: torch.Tensor) -> torch.Tensor:
        """Generated latents as a video file holds them: decoded by the VAE and quantised to 8 bits, in [-1, 1]."""
        return decode_as_written(self.vae, latents)

    def _measure(self, latents: torch.Tensor, index: torch.Tensor, read_ef: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-frame re-ID embeddings of the protocol's frames of generated latents; (with an EF regressor and
        ``read_ef``) the EF it reads from them; and, with a VAE, the videos as written. With a VAE every measure reads
        one decoding, quantised as a written video is (``evaluate``, the writer): a pixel regressor reads it, and the
        re-ID its encoding again (posterior mean × scaling factor) — generated latents read differently from the VAE's
        encoding of their own decoding."""
        written = None if self.vae is None else self._as_written(latents)
        read = None
        if read_ef and self.regressor is not None:
            pixels = self.regressor.hparams.in_channels != latents.shape[2]
            read = self.regressor.read_ef(written if pixels else latents, self.ef_size)
        frames = self.protocol.frames_of(latents if written is None else written, index)
        if written is not None:
            frames = EncodedReID(self.reid, self.vae).latents(frames)
        return self.reid.embed_videos(frames.to(self.reid.device, self.reid.dtype)), read, written

    @torch.no_grad()
    def _sample_requests(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """This rank's share of the requests (r, r + W, …), sampled and measured."""
        mine = list(range(trainer.global_rank, self.num_samples, trainer.world_size))
        options = self._options()
        if self.mode == "synthetic":
            options["num_frames"] = self._length(int(pl_module.train_num_frames))
        for start in range(0, len(mine), self.batch_size):
            attempts = mine[start:start + self.batch_size]
            ef = torch.tensor([self.requests.ef(i, self.train_ef) for i in attempts], device=pl_module.device)
            seeds = [self.requests.noise_seed(i) for i in attempts]
            if self.mode == "anatomy":  # the frames the writer would take as reference frames
                latents = anatomy_references(pl_module, ef, seeds, **options)[:, None]
            else:
                latents = generate_requested(pl_module, self.anatomy, ef, seeds, **options)
            index = torch.tensor(attempts, device=pl_module.device)
            embedding, read, written = self._measure(latents, index, read_ef=self.mode == "synthetic")
            self.measures.update_synthetic(index, embedding, ef if read is not None else None, read)
            if self.generative is not None:  # it needs the VAE: the videos as written
                self.generative.update(written, index)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the module's own epoch end: the EMA weights it swapped in are still in place.
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self.validations += 1
        if not self.active:
            return
        self.active = False
        if self.mode != "identity":
            self._sample_requests(trainer, pl_module)
        result = self.measures.compute()  # every rank: a collective
        self.measures.reset()
        if result is None and self.generative is not None:
            self.generative.reset()
        if result is None:
            rank_zero_info("CoverageCallback: nothing was sampled (num_samples, an empty validation split?)")
            return
        values, details = result
        if self.generative is not None:  # every rank: torchmetrics gathers the states
            values.update(self.generative.compute())
        self.last = {name: float(value) for name, value in values.items()}
        for name, value in values.items():  # identical on every rank: computed from gathered states
            pl_module.log(f"val/{name}", value.float(), sync_dist=False)
        if trainer.is_global_zero and self.mode != "identity":
            title = f"protocol {self.protocol.name}"
            scores = {"synthetic": details["synthetic_score"], "real (validation)": details["reference_score"]}
            log_image(trainer, "val/coverage_scores", score_histogram(scores, self.calibration.tau, title=title),
                      step=trainer.global_step)
            curves = {"synthetic": details["synthetic_curve"], "real (validation)": details["reference_curve"]}
            log_image(trainer, "val/coverage_curve", coverage_curves(curves, len(self.bank), title=title),
                      step=trainer.global_step)

    def _cache_dir(self, trainer: L.Trainer) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        folder = getattr(trainer.logger, "save_dir", None) or trainer.default_root_dir
        return Path(folder) / "reid_cache"
