"""``ReIDModule``: the Siamese re-identification model — privacy filter and the coverage metrics' instrument."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.functional.classification import binary_accuracy, binary_auroc

from lightning_modules.checkpoints import load_module
from lightning_modules.metrics import IndexedCat
from lightning_modules.protocols import Protocol
from lightning_modules.components.pair_head import NegativeHead
from lightning_modules.components.resnet import BlockKind, NormKind, ResNetEncoder, StemKind
from lightning_modules.reid_embeddings import EmbeddedSplit, EncodedReID, embed_split
from lightning_modules.reid_search import (
    CROSS_VIDEO,
    NEGATIVE,
    SAME_VIDEO,
    evaluation_pairs,
    hardest_negatives,
    max_scores,
    pair_scores,
    privacy_threshold,
    training_pairs,
)
from lightning_modules.vae_utils import checksum_of_weights, encode_means

EVAL_STAGES = ("val", "test")


class NotCalibratedError(RuntimeError):
    """The model has no privacy threshold τ and so cannot act as a filter."""


class ReIDModule(L.LightningModule):
    """Siamese re-identification on single frames: ResNet → 128-d embedding → sigmoid; the head is a linear layer on
    ``|f₁ − f₂|`` giving one logit (the score ``s``); loss BCE-with-logits.

    Batches follow the shared contract with ``data.sampling: frames``: ``video`` ``(B, F, C, H, W)`` — F ≥ 2 frames of
    one video per item, pixels (C = 1–3, [-1, 1]) or latents (C = 4) — plus ``patient`` and ``index``. Training pairs
    are built inside the batch (:func:`~lightning_modules.reid_search.training_pairs`; ``data.group_by_patient: true``
    puts a patient's videos in one batch so positives span videos). Evaluation collects every frame's embedding and
    scores fixed pairs over the whole split (:func:`~lightning_modules.reid_search.evaluation_pairs`), so ``val/auc``
    is comparable across epochs, batch sizes and rank counts; ``val/auc_same_video`` and ``val/auc_cross_video`` split
    it by kind of positive.

    Normalisation (``normalize="frame_minmax"``): each frame to [-1, 1] by its own min and max over all channels and
    pixels, so real, cached and generated inputs are treated alike (EchoNet-Synthetic normalised them differently).

    Calibration: at the end of every ``calibrate_every_n_epochs``-th validation the training split is embedded and
    τ (:func:`~lightning_modules.reid_search.privacy_threshold` at ``quantile``) is computed from the validation videos
    against it, so each checkpoint carries the τ of its own weights (``tau`` buffer, ``nan`` until calibrated) and the
    protocol it holds under (``tau_protocol``: the DataModule's, e.g. ``frames:4``; see
    :mod:`lightning_modules.protocols`); ``validate`` recalibrates on demand, ``test`` reports ``test/tau`` from the
    test split. A video's score against a bank is the best over its frames and the bank's frames. The checkpoint
    callback of ``echo-lvdm fit`` writes τ to a JSON next to each checkpoint. Measuring under another protocol needs a
    τ of that protocol (:mod:`lightning_modules.calibration`, ``echo-lvdm calibrate``).

    Args:
        in_channels: 4 for latents, 1–3 for pixels. layers, block, width, stem, embedding_dim, norm: the
            :class:`~lightning_modules.components.resnet.ResNetEncoder` (default: ResNet-50 with a latent stem and
            GroupNorm, which stays stable with patient-grouped batches where BatchNorm did not).
        head: ``"linear"`` — the papers' ``nn.Linear`` on ``|f₁ − f₂|``, whose weights take either sign, so two
            identical frames score only the bias and a different frame can score higher (an exact copy's score is
            then not the ceiling) —, or ``"negative"``: :class:`NegativeHead`, every weight < 0, so the closer two
            embeddings, the higher their score.
        layout_grid: ``0`` (off) or ``G``: add to the ResNet's output a linear map of the normalised frame pooled to
            ``G × G`` cells: global pooling discards *where* things are, most of a phantom patient's identity (96
            patients: test AUC 0.83 without it, 0.90–0.97 with it).
        hard_negatives: share of the training negatives (0–1) replaced by the anchor's hardest in-batch negative (the
            other patient's frame the head scores highest): random ones are mostly easy, held-out errors look-alikes
            (96 patients, batch 32: 1.0 raised test AUC from 0.90–0.97 to 0.996–0.999).
        lr, weight_decay: AdamW. lr_schedule: ``"cosine"`` decays to 0 over the run after a linear warm-up of
            ``warmup_fraction`` of the steps (the held-out AUC of a constant rate kept swinging by ±0.1 between
            epochs on the phantom); ``"constant"``.
        quantile: of held-out best scores that defines τ (0.95: 5 % of real unseen videos would be filtered).
        calibrate_every_n_epochs: 0 calibrates only on :meth:`calibrate`.
        eval_pair_seed: seeds the evaluation negatives.
        search_max_elements: memory bound of the nearest-neighbour search (score-block elements).
        augment_vae: exported VAE folder (``echo-lvdm export-vae``; the VAE that wrote the latent cache) for a latent
            model trained with ``data.augment_frames``: the batch's ``augmented`` pixel frames — near-copies of its
            frames (:mod:`datamodules.augment`) — are encoded by it (posterior mean × scaling factor, as the cache
            and the filter encode) and join their item as extra frames: positives of its frames, negatives of all
            others. A pixel model uses them as they are. Frozen, not in the checkpoint; only fitting reads it.
    """

    def __init__(
        self,
        in_channels: int = 4,
        layers: list[int] = (3, 4, 6, 3),
        block: BlockKind = "bottleneck",
        width: int = 64,
        stem: StemKind = "small",
        embedding_dim: int = 128,
        norm: NormKind = "group",
        normalize: Literal["frame_minmax", "none"] = "frame_minmax",
        head: Literal["linear", "negative"] = "linear",
        layout_grid: int = 0,
        hard_negatives: float = 0.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_fraction: float = 0.05,
        quantile: float = 0.95,
        calibrate_every_n_epochs: int = 1,
        eval_pair_seed: int = 0,
        search_max_elements: int = 2**24,
        augment_vae: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if normalize not in ("frame_minmax", "none"):
            raise ValueError(f"normalize must be 'frame_minmax' or 'none', got {normalize!r}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if not 0.0 <= hard_negatives <= 1.0:
            raise ValueError(f"hard_negatives must be in [0, 1], got {hard_negatives}")
        if layout_grid < 0:
            raise ValueError(f"layout_grid must be ≥ 0 (0 = off), got {layout_grid}")
        self.encoder = ResNetEncoder(in_channels, layers=tuple(layers), block=block, width=width, stem=stem,
                                     embedding_dim=embedding_dim, norm=norm)
        self.layout = nn.Linear(in_channels * layout_grid**2, embedding_dim) if layout_grid else None
        if head not in ("linear", "negative"):
            raise ValueError(f"head must be 'linear' or 'negative', got {head!r}")
        self.head = nn.Linear(embedding_dim, 1) if head == "linear" else NegativeHead(embedding_dim)
        self.register_buffer("tau", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("tau_quantile", torch.tensor(math.nan, dtype=torch.float64))
        self.tau_protocol: str | None = None  # the protocol τ was calibrated under; in the checkpoint
        self.train_accuracy = BinaryAccuracy()
        self.collectors = nn.ModuleDict({stage: IndexedCat(["embedding", "patient"]) for stage in EVAL_STAGES})

    # ---- the model ----------------------------------------------------------------------------------------------
    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        if self.hparams.normalize == "none":
            return frames
        flat = frames.flatten(1)
        low, high = flat.amin(dim=1), flat.amax(dim=1)
        scale = 2.0 / (high - low).clamp_min(1e-6)
        shape = (-1,) + (1,) * (frames.ndim - 1)
        return (frames - low.view(shape)) * scale.view(shape) - 1.0

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``(N, C, H, W)`` → embeddings ``(N, D)`` in (0, 1), float32 also under bf16 autocast."""
        frames = self.normalize(frames)
        features = self.encoder(frames)
        if self.layout is not None:
            cells = F.adaptive_avg_pool2d(frames, self.hparams.layout_grid).flatten(1)
            features = features + self.layout(cells)
        return torch.sigmoid(features.float())

    def embed_videos(self, video: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, F, C, H, W)`` → per-frame embeddings ``(B, F, D)``."""
        return self.embed(video.flatten(0, 1)).unflatten(0, video.shape[:2])

    def score(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The head's logit for matched pairs of embeddings ``(N, D)``, ``(N, D)`` → ``(N,)``."""
        return pair_scores(first, second, self.head.weight, self.head.bias)

    def search(self, queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best score and its bank row for each query: embeddings ``(Q, D)`` against ``(R, D)``, exact, chunked."""
        return max_scores(queries, bank, self.head.weight.detach(), self.head.bias.detach(),
                          max_elements=self.hparams.search_max_elements)

    def video_search(self, queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best score of each query video over its frames and every bank frame, and the bank *video* giving it.

        ``queries (N, F, D)``, ``bank (M, F', D)`` → ``values (N,)``, ``indices (N,)`` into the bank's videos.
        """
        values, rows = self.search(queries.flatten(0, 1), bank.flatten(0, 1))
        values, best_frame = values.view(queries.shape[:2]).max(dim=1)
        rows = rows.view(queries.shape[:2]).gather(1, best_frame[:, None]).squeeze(1)
        return values, torch.div(rows, bank.shape[1], rounding_mode="floor")

    # ---- privacy ------------------------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.tau))

    def calibration(self) -> dict[str, float | str]:
        """τ, its quantile and the weights checksum, as written next to checkpoints."""
        return {"tau": float(self.tau), "quantile": float(self.tau_quantile), "protocol": self.tau_protocol,
                "score": "logit", "weights_checksum": self.weights_checksum()}

    def privacy_filter(self, queries: torch.Tensor, bank: torch.Tensor,
                       protocol: Protocol | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Which query videos may be kept: ``(keep (N,) bool, best score (N,))``; a video is dropped when its best
        score against the training bank exceeds τ. ``protocol``: how ``queries`` and ``bank`` were embedded. Refuses
        without τ (:class:`NotCalibratedError`) and with a τ of another protocol
        (:class:`~lightning_modules.protocols.ProtocolMismatchError`)."""
        if not self.calibrated:
            raise NotCalibratedError(
                "this re-identification model has no privacy threshold τ, so it cannot filter: calibrate it "
                "(`echo-lvdm validate --config <reid config> --ckpt_path <ckpt>`, or ReIDModule.calibrate)")
        Protocol.parse(protocol).require(self.tau_protocol or "unrecorded", "this checkpoint's τ")
        values, _ = self.video_search(queries, bank)
        return values <= float(self.tau), values

    def weights_checksum(self) -> str:
        """sha256 of the encoder, layout and head weights (BatchNorm statistics included): the embedding caches' key."""
        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        if self.layout is not None:
            state.update({f"layout.{k}": v for k, v in self.layout.state_dict().items()})
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return checksum_of_weights(state)

    def calibrate(self, datamodule: L.LightningDataModule, heldout: EmbeddedSplit | str = "val") -> float:
        """Compute and store τ from a held-out split (name, or its embeddings) against the training split."""
        if isinstance(heldout, str):
            heldout = embed_split(self, datamodule, heldout)
        bank = embed_split(self, datamodule, "train")
        tau = self.threshold_from(heldout, bank)
        self.tau.fill_(tau)
        self.tau_quantile.fill_(self.hparams.quantile)
        self.tau_protocol = Protocol.of_data(datamodule.hparams).name
        return tau

    def threshold_from(self, heldout: EmbeddedSplit, bank: EmbeddedSplit) -> float:
        values, _ = self.video_search(heldout.embedding, bank.embedding.to(heldout.embedding))
        return privacy_threshold(values, self.hparams.quantile)

    # ---- training -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.augment_vae and self.hparams.in_channels == 4 \
                and self.__dict__.get("_augment_vae") is None:
            from lightning_modules.vae_utils import load_frozen_vae

            self.__dict__["_augment_vae"] = load_frozen_vae(self.hparams.augment_vae)  # not a submodule: no state

    def on_fit_start(self) -> None:
        vae = self.__dict__.get("_augment_vae")
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.hparams.get("augment_frames") and self.hparams.in_channels == 4 \
                and vae is None:
            raise ValueError(f"data.augment_frames {datamodule.hparams.augment_frames} serves near-copies in pixels "
                             "and this latent re-ID model has no VAE to encode them: set model.augment_vae to the "
                             "exported VAE folder that wrote the latent cache (or data.augment_frames 0 for the "
                             "papers' setting)")
        if vae is None or datamodule is None or datamodule.hparams.get("space") != "latent":
            return
        from datamodules.latents import entry_path, read_meta

        records = datamodule.datasets["train"].records
        meta = read_meta(entry_path(datamodule.hparams.latent_dir, records[0])) if records else None
        checksum = checksum_of_weights(vae)
        if meta is not None and meta.vae_checksum != checksum:
            raise ValueError(f"model.augment_vae {self.hparams.augment_vae} (weights {checksum[:12]}…) is not the VAE "
                             f"that wrote the latent cache {datamodule.hparams.latent_dir} ({meta.vae_checksum[:12]}…):"
                             " augmented frames would be encoded differently from the frames they pair with")

    def augmented_views(self, augmented: torch.Tensor) -> torch.Tensor:
        """The batch's ``augmented`` pixel frames ``(B, A, C, H, W)`` in this model's input space."""
        if self.hparams.in_channels != 4:
            return augmented.to(self.dtype)
        vae = self.__dict__.get("_augment_vae")
        if vae is None:
            raise ValueError("the batch carries augmented pixel frames (data.augment_frames) but this latent re-ID "
                             "model has no VAE to encode them: set model.augment_vae to the exported VAE folder")
        vae.to(self.device)
        mean = encode_means(vae, augmented.flatten(0, 1))
        return (mean * float(vae.config.scaling_factor)).to(self.dtype).unflatten(0, augmented.shape[:2])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        video = batch["video"]
        if "augmented" in batch:  # near-copies join their item: positives of its frames
            video = torch.cat([video, self.augmented_views(batch["augmented"])], dim=1)
        generator = torch.Generator().manual_seed(self.global_step * 1_000_003 + self.current_epoch)
        first, second, label = training_pairs(batch["patient"], batch["index"], video.shape[1], generator)
        if label.numel() == 0:
            raise ValueError("a re-ID batch needs items of ≥ 2 patients and data.num_frames ≥ 2 (or several videos "
                             f"per patient) to form pairs; got patients {batch['patient'].tolist()}")
        embedding = self.embed_videos(video)
        if self.hparams.hard_negatives > 0:
            second = self._harden(embedding, batch["patient"], first, second, label, generator)
        label = label.to(embedding)
        logits = self.score(embedding[first[:, 0], first[:, 1]], embedding[second[:, 0], second[:, 1]])
        loss = F.binary_cross_entropy_with_logits(logits, label)
        self.train_accuracy(torch.sigmoid(logits), label.long())  # probabilities: logits in [0, 1] would pass as such
        self.log("train/loss", loss, prog_bar=True, batch_size=len(label))
        self.log("train/acc", self.train_accuracy, batch_size=len(label))
        return loss

    def _harden(self, embedding: torch.Tensor, patient: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``second`` with a ``hard_negatives`` share of the negatives replaced by the anchor's hardest in-batch
        negative under the current weights (chosen without gradient)."""
        negative = (label == 0).nonzero().flatten()
        chosen = negative[torch.rand(len(negative), generator=generator) < self.hparams.hard_negatives]
        if len(chosen) == 0:
            return second
        second = second.clone()
        with torch.no_grad():
            second[chosen] = hardest_negatives(embedding, patient, first[chosen].to(embedding.device),
                                               self.head.weight, self.head.bias)
        return second

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        self.collectors[stage].update(batch["index"], embedding=self.embed_videos(batch["video"]),
                                      patient=batch["patient"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        collected = self.collectors[stage].compute()  # synced across ranks, padding removed, sorted by index
        self.collectors[stage].reset()
        embedding = collected["embedding"]
        first, second, kind = evaluation_pairs(collected["patient"], embedding.shape[1], self.hparams.eval_pair_seed)
        kind = kind.to(embedding.device)
        logits = self.score(embedding[first[:, 0], first[:, 1]], embedding[second[:, 0], second[:, 1]])
        label = (kind != NEGATIVE).long()
        metrics = {"loss": F.binary_cross_entropy_with_logits(logits, label.to(logits)),
                   "acc": binary_accuracy(torch.sigmoid(logits), label)}
        if 0 < int(label.sum()) < len(label):
            metrics["auc"] = binary_auroc(logits, label)
            for name, positive in (("auc_same_video", SAME_VIDEO), ("auc_cross_video", CROSS_VIDEO)):
                chosen = (kind == positive) | (kind == NEGATIVE)
                if bool((kind == positive).any()):
                    metrics[name] = binary_auroc(logits[chosen], label[chosen])
        if not self.trainer.sanity_checking and self._should_calibrate(stage):
            heldout = EmbeddedSplit(collected["index"], embedding, collected["patient"])
            bank = embed_split(self, self.trainer.datamodule, "train")
            tau = self.threshold_from(heldout, bank)
            if stage == "val":
                self.tau.fill_(tau)
                self.tau_quantile.fill_(self.hparams.quantile)
                self.tau_protocol = Protocol.of_data(self.trainer.datamodule.hparams).name
            metrics["tau"] = torch.tensor(tau)
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value.float(), sync_dist=True)  # identical on every rank already

    def _should_calibrate(self, stage: str) -> bool:
        if stage == "test" or self.trainer.state.fn == "validate":  # on demand
            return True
        every = self.hparams.calibrate_every_n_epochs
        return every > 0 and (self.current_epoch + 1) % every == 0

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tau_protocol"] = self.tau_protocol

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tau_protocol = checkpoint.get("tau_protocol")  # None in checkpoints written before it was recorded

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_fraction * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"index": batch["index"], "embedding": self.embed_videos(batch["video"]), "patient": batch["patient"]}


def load_reid(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> ReIDModule:
    """A trained :class:`ReIDModule` from a Lightning checkpoint, read with ``weights_only=True``, in eval mode."""
    module = load_module(ReIDModule, checkpoint, map_location=map_location)
    return module.eval().requires_grad_(False)


def load_reid_encoder(checkpoint: str | Path, vae: str | Path | None, *, device: str | torch.device = "cpu",
                      command: str = "echo-lvdm") -> tuple[ReIDModule, EncodedReID, int]:
    """A trained re-ID model, what embeds pixel videos for it (through the exported VAE ``vae`` when it works in
    latent space; refused without one) and the pixel channels it reads: ``(reid, encoder, channels)``."""
    from lightning_modules.vae_utils import load_frozen_vae

    reid = load_reid(checkpoint, map_location=device)
    latent = reid.hparams.in_channels == 4
    if latent and vae is None:
        raise ValueError(f"{command}: the re-ID model works in latent space; give --vae <exported VAE folder>")
    network = load_frozen_vae(vae).to(device) if latent else None
    channels = int(network.config.in_channels) if latent else int(reid.hparams.in_channels)
    return reid, EncodedReID(reid, network), channels
