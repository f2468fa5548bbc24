"""``CoverageCallback``: while a video diffusion model trains, how much of the training set does it cover, how much
does it copy, and does it show the EF it was asked for? (Definitions: DESIGN.md, "Metrics".)

At each validation step the callback samples one video per validation video (up to a cap), conditioned on that
video's EF and first latent frame, and measures the samples with a frozen, calibrated re-identification model
against the training split, and with a frozen EF regressor. Every measure is a torchmetrics ``Metric`` keyed by the
batch contract's ``index``, so DDP ranks gather their samples and DistributedSampler padding counts once.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.coverage_figures import score_histogram
from lightning_modules.diffusion_sampling import SAMPLERS
from lightning_modules.image_logging import log_image
from lightning_modules.metrics import CoverageMetric, EFRegressionMetrics, EmbeddingDistributionMetrics, MeanPerVideo
from lightning_modules.metrics.functional import hit_counts, temporal_consistency
from lightning_modules.reid import NotCalibratedError, load_reid
from lightning_modules.reid_embeddings import embed_split
from lightning_modules.vae_utils import decode_frames, load_frozen_vae

__all__ = ["CoverageCallback", "CoverageMeasures", "METRIC_NAMES"]

METRIC_NAMES = ("coverage", "reference_coverage", "relative_coverage", "memorization_rate", "memorized_coverage",
                "ef_r2", "ef_mae", "density", "prdc_coverage", "fd_reid", "temporal_consistency")


class CoverageMeasures(torch.nn.Module):
    """The coverage measures of one set of synthetic videos against a training bank — the state behind
    :class:`CoverageCallback` and ``echo-lvdm evaluate``.

    ``reid``: a calibrated :class:`~lightning_modules.reid.ReIDModule`; ``bank``: the training split's embeddings
    (:class:`~lightning_modules.reid_embeddings.EmbeddedSplit`). Update with embeddings (the re-ID model's own input
    space is the caller's business) and, with an EF regressor, the EF requested and read; ``compute()`` gathers every
    rank's rows (a collective under DDP: every rank calls it) and returns the values of ``METRIC_NAMES`` plus each
    set's per-video best scores and matches. ``synthetic`` and ``reference`` rows are keyed by their own ``index``.
    """

    def __init__(self, reid, bank, *, ef: bool, k: int = 5) -> None:
        super().__init__()
        self.reid, self.bank, self.tau = reid, bank, float(reid.tau)
        self.synthetic = CoverageMetric(len(bank), self.tau)
        self.reference = CoverageMetric(len(bank), self.tau)
        self.distribution = EmbeddingDistributionMetrics(bank.embedding.mean(dim=1).double(), k)
        self.temporal = MeanPerVideo()
        self.ef = EFRegressionMetrics() if ef else None

    def update_synthetic(self, index: torch.Tensor, embedding: torch.Tensor, requested_ef: torch.Tensor | None = None,
                         read_ef: torch.Tensor | None = None) -> torch.Tensor:
        """Synthetic videos' per-frame embeddings ``(N, F, D)``; returns their best scores ``(N,)``."""
        score, match = self.reid.video_search(embedding, self.bank.embedding.to(embedding))
        self.synthetic.update(index, score=score, match=match)
        self.distribution.update(index, embedding=embedding.mean(dim=1).double())
        if embedding.shape[1] >= 2:
            self.temporal.update(index, value=temporal_consistency(embedding, self.reid.head.weight,
                                                                   self.reid.head.bias))
        if self.ef is not None:
            if requested_ef is None or read_ef is None:
                raise ValueError("CoverageMeasures was built with EF faithfulness: give requested_ef and read_ef")
            self.ef.update(index, preds=read_ef.float(), target=requested_ef.float())
        return score

    def update_reference(self, index: torch.Tensor, embedding: torch.Tensor) -> None:
        """Held-out real videos' per-frame embeddings ``(N, F, D)`` (the reference coverage)."""
        score, match = self.reid.video_search(embedding, self.bank.embedding.to(embedding))
        self.reference.update(index, score=score, match=match)

    def compute(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """``(values, details)`` or None when no rank saw a synthetic video. ``details``: ``synthetic_index``,
        ``synthetic_score``, ``synthetic_match``, the same for ``reference_``, and ``hits`` per training video."""
        self._fill_empty_rank()
        if not _anything(self.synthetic):
            return None
        synthetic = self.synthetic.compute()
        values = {name: synthetic[name] for name in ("coverage", "memorization_rate", "memorized_coverage")}
        if len(synthetic["index"]) > self.distribution.k:  # the same count on every rank: all call compute or none
            distribution = self.distribution.compute()
            values.update(density=distribution["density"], prdc_coverage=distribution["prdc_coverage"],
                          fd_reid=distribution["fd"])
        else:
            rank_zero_warn(f"CoverageMeasures: density, PRDC coverage and Fréchet distance need more than "
                           f"k={self.distribution.k} synthetic videos, got {len(synthetic['index'])}; not computed")
        details = {f"synthetic_{key}": synthetic[key] for key in ("index", "score", "match")}
        details["hits"] = hit_counts(synthetic["match"], len(self.bank))
        if _anything(self.reference):
            reference = self.reference.compute()
            values.update(reference_coverage=reference["coverage"],
                          relative_coverage=synthetic["coverage"] / reference["coverage"])
            details.update({f"reference_{key}": reference[key] for key in ("index", "score", "match")})
        if _anything(self.temporal):
            values["temporal_consistency"] = self.temporal.compute()
        if self.ef is not None:
            ef = self.ef.compute()
            values.update(ef_r2=ef["r2"], ef_mae=ef["mae"])
            details["ef_read"], details["ef_requested"] = self.ef.per_video()[1:]
        return values, details

    def reset(self) -> None:
        for metric in (self.synthetic, self.reference, self.distribution, self.temporal, self.ef):
            if metric is not None:
                metric.reset()

    def _fill_empty_rank(self) -> None:
        # A rank that saw no video still joins the gathers, with empty states of the right dtypes and widths.
        device = self.bank.embedding.device
        empty, index = torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device)
        for metric in (self.synthetic, self.reference):
            if not metric.update_count:
                metric.update(index, score=empty, match=index)
        if not self.distribution.update_count:
            width = self.bank.embedding.shape[-1]
            self.distribution.update(index, embedding=torch.zeros(0, width, dtype=torch.float64, device=device))
        if not self.temporal.update_count:
            self.temporal.update(index, value=empty)
        if self.ef is not None and not self.ef.update_count:
            self.ef.update(index, preds=empty, target=empty)


class CoverageCallback(L.Callback):
    """Coverage, memorisation and EF faithfulness of a :class:`~lightning_modules.diffusion.VideoDiffusionModule`
    (video mode), measured at every ``every_n_validations``-th validation.

    Once per fit (lazily, at the first measured validation) the training split of the run's DataModule is embedded
    by the re-ID model — each rank a shard, gathered, cached on disk under ``cache_dir`` keyed by the re-ID weights'
    checksum. Then, for every validation video whose ``index`` is below ``max_samples`` (the same videos on any
    number of ranks), the callback samples a video with its EF and its first latent frame as reference (noise seeded
    by ``seed`` and the index, so a sample does not depend on batch composition), and updates:

    * ``val/coverage``, ``val/memorization_rate``, ``val/memorized_coverage``: the samples' best re-ID matches in
      the training split (distinct matches / min(|R|, |S|); share of best scores above the re-ID model's τ; share of
      training videos matched above τ — the ones the model reproduces);
    * ``val/reference_coverage``: the same coverage for the real validation videos the samples were conditioned on
      (what held-out real data of that size achieves), and ``val/relative_coverage`` = coverage / reference;
    * ``val/density``, ``val/prdc_coverage`` (Naeem et al. 2020, ``k`` neighbours) and ``val/fd_reid`` (Fréchet
      distance), between the samples' and the training videos' embeddings (mean over frames);
    * ``val/temporal_consistency``: mean re-ID similarity of each sample's frame 0 with its other frames;
    * ``val/ef_r2``, ``val/ef_mae``: requested EF against the EF the frozen regressor reads from the sample (decoded
      by the VAE at ``vae`` when the regressor works on pixels), logged when ``ef_regressor`` is given.

    and logs ``val/coverage_scores``, a histogram of the samples' and the real videos' best scores with τ marked
    (TensorBoard or wandb image, else a PNG beside the logs). Cost per measured validation: at most ``max_samples``
    sampled videos of ``steps`` steps, and the same number of real and synthetic re-ID and EF passes.

    The re-ID model must work in the diffusion model's latent space (``in_channels`` = latent channels) and carry τ
    (a calibrated checkpoint); checkpoints are read with ``weights_only=True``.

    Args:
        reid: re-ID checkpoint (calibrated). ef_regressor: EF regressor checkpoint (None: no EF faithfulness).
        vae: exported VAE folder, needed when the EF regressor reads pixels. ef_size: frame size the regressor was
            trained at (None: the VAE's output size).
        every_n_validations: measure at validations n, 2n, … of a fit (never the sanity check); every ``validate``.
        max_samples: validation videos sampled per measured validation (those with ``index`` < max_samples; None:
            all). steps, sampler, guidance_scale: passed to ``sample`` (None: the model's defaults). seed: noise seed.
        k: neighbours of density and coverage. cache_dir: where training-split embeddings are cached (None: the
            first logger's directory, else the trainer's ``default_root_dir``, under ``reid_cache/``).
    """

    def __init__(self, reid: str, ef_regressor: str | None = None, vae: str | None = None, ef_size: int | None = None,
                 every_n_validations: int = 1, max_samples: int | None = 64, steps: int = 25,
                 sampler: str | None = None, guidance_scale: float | None = None, seed: int = 0, k: int = 5,
                 cache_dir: str | None = None) -> None:
        if every_n_validations < 1 or steps < 1 or k < 1 or (max_samples is not None and max_samples < 1):
            raise ValueError("CoverageCallback: every_n_validations, steps, k and max_samples must be ≥ 1, got "
                             f"{every_n_validations}, {steps}, {k}, {max_samples}")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"CoverageCallback: sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        for name, path in (("reid", reid), ("ef_regressor", ef_regressor)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"CoverageCallback: {name} checkpoint {path} not found")
        self.reid_path, self.ef_path = Path(reid), None if ef_regressor is None else Path(ef_regressor)
        self.vae_path, self.ef_size = None if vae is None else Path(vae), ef_size
        self.every_n_validations, self.max_samples, self.steps = every_n_validations, max_samples, steps
        self.sampler, self.guidance_scale, self.seed, self.k = sampler, guidance_scale, seed, k
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.validations = 0  # finished validations of fits, sanity check excluded (saved with the checkpoint)
        self.reid = self.regressor = self.vae = None
        self.bank = None  # training-split embeddings (N, F, D), gathered on every rank
        self.measures: CoverageMeasures | None = None
        self.active = False
        self.last: dict[str, float] = {}  # the values logged at the last measured validation

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        hp = pl_module.hparams
        if hp.get("mode") != "video":
            raise ValueError("CoverageCallback measures video diffusion models (VideoDiffusionModule, mode: video); "
                             f"got {type(pl_module).__name__} with mode {hp.get('mode')!r}")
        device = trainer.strategy.root_device
        if self.reid is None:
            self.reid = load_reid(self.reid_path).to(device)
            if not self.reid.calibrated:
                raise NotCalibratedError(f"CoverageCallback: {self.reid_path} has no privacy threshold τ; calibrate it "
                                         "(`echo-lvdm validate --config <reid config> --ckpt_path <ckpt>`)")
            if self.reid.hparams.in_channels != hp.latent_channels:
                raise ValueError(f"CoverageCallback: {self.reid_path} takes {self.reid.hparams.in_channels}-channel "
                                 f"frames; the diffusion model's latents have {hp.latent_channels} channels — use a "
                                 "re-ID model trained in latent space (configs/reid_latent.yaml)")
        if self.ef_path is not None and self.regressor is None:
            from lightning_modules.ef_regressor import EFRegressorModule

            self.regressor = EFRegressorModule.load_from_checkpoint(self.ef_path, map_location=device,
                                                                    weights_only=True)
            self.regressor.eval().requires_grad_(False)
            if self.regressor.hparams.in_channels != hp.latent_channels:  # a pixel regressor reads decoded videos
                if self.vae_path is None:
                    raise ValueError(f"CoverageCallback: the EF regressor {self.ef_path} reads pixels; give the VAE "
                                     "that decodes the diffusion model's latents (vae: <exported VAE folder>)")
                self.vae = load_frozen_vae(self.vae_path)
        for model in (self.reid, self.regressor, self.vae):
            if model is not None:
                model.to(device)
        self.bank = None  # the training split may differ between fits: embed it again (from the cache when unchanged)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reid=str(self.reid_path), max_samples=self.max_samples, seed=self.seed)

    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = int(state_dict["validations"])

    # ------------------------------------------------------------------------------------------- measuring
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = not trainer.sanity_checking and (
            trainer.state.fn != "fit" or (self.validations + 1) % self.every_n_validations == 0)
        if not self.active:
            return
        if self.bank is None:  # every rank: embed_split gathers the shards
            if not hasattr(trainer.datamodule, "eval_dataloader"):
                raise ValueError("CoverageCallback embeds the training split through the run's EchoNetDataModule; "
                                 "pass the datamodule to the Trainer (not bare dataloaders)")
            self.bank = embed_split(self.reid, trainer.datamodule, "train", cache_dir=self._cache_dir(trainer))
            rank_zero_info(f"CoverageCallback: {len(self.bank)} training videos embedded by {self.reid_path.name}")
        self.measures = CoverageMeasures(self.reid, self.bank, ef=self.regressor is not None, k=self.k)
        self.measures.to(pl_module.device)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.active or dataloader_idx != 0:
            return
        index = batch["index"]
        chosen = index < self.max_samples if self.max_samples is not None else torch.ones_like(index, dtype=torch.bool)
        if not bool(chosen.any()):
            return
        index, real, ef = index[chosen], batch["video"][chosen], batch["ef"][chosen].float()
        generators = [torch.Generator().manual_seed(self.seed * 1_000_003 + int(i)) for i in index.tolist()]
        reference = real[:, 0] if pl_module.hparams.reference_conditioning else None
        latents = pl_module.sample(ef=ef, reference=reference, num_frames=real.shape[1], steps=self.steps,
                                   scheduler=self.sampler, guidance_scale=self.guidance_scale, generator=generators)
        self.update(index, latents, real, ef)

    def update(self, index: torch.Tensor, synthetic: torch.Tensor, real: torch.Tensor, ef: torch.Tensor) -> None:
        """Measure ``synthetic`` latent videos ``(N, T, C, h, w)`` conditioned on the real ``(N, T, C, h, w)`` with
        EF ``ef (N,)``, all keyed by the real videos' ``index (N,)``."""
        reid = self.reid
        read = None
        if self.regressor is not None:
            videos = synthetic if self.vae is None else decode_frames(self.vae, synthetic).clamp(-1.0, 1.0)
            read = self.regressor.read_ef(videos, self.ef_size)
        self.measures.update_synthetic(index, reid.embed_videos(synthetic.to(reid.device, reid.dtype)), ef, read)
        self.measures.update_reference(index, reid.embed_videos(real.to(reid.device, reid.dtype)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self.validations += 1
        if not self.active:
            return
        self.active = False
        result = self.measures.compute()
        self.measures.reset()
        if result is None:
            rank_zero_info("CoverageCallback: no validation video was sampled (max_samples, empty split?)")
            return
        values, details = result
        self.last = {name: float(value) for name, value in values.items()}
        for name, value in values.items():  # identical on every rank: computed from gathered states
            pl_module.log(f"val/{name}", value.float(), sync_dist=False)
        if trainer.is_global_zero:
            figure = score_histogram({"synthetic": details["synthetic_score"],
                                      "real (validation)": details["reference_score"]}, float(self.reid.tau))
            log_image(trainer, "val/coverage_scores", figure, step=trainer.global_step)

    def _cache_dir(self, trainer: L.Trainer) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        folder = getattr(trainer.logger, "save_dir", None) or trainer.default_root_dir
        return Path(folder) / "reid_cache"


def _anything(metric) -> bool:
    """Whether any rank gave ``metric`` a row (a collective under DDP)."""
    count = torch.tensor(sum(len(part) for part in metric.index), device=metric.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    return bool(count > 0)
