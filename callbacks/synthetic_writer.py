"""``SyntheticDatasetWriter``: ``echo-lvdm predict --config configs/generate.yaml`` writes a privacy-filtered
synthetic dataset in EchoNet-Dynamic layout.

The DataModule serves generation requests (``data.predict_split: requests``, :mod:`datamodules.requests`): one item
per attempt, with its EF and noise seed. For each batch the writer gives the generator its reference frames (from an
anatomy model), the generator samples latents (:meth:`VideoDiffusionModule.predict_step`), and the writer decodes
them with the VAE, writes each video as an AVI, reads the file back and scores what was written with the re-ID model
against the training split — exactly what ``echo-lvdm evaluate`` would score under the same protocol (clips of
``num_frames`` at the data's period or fps). A video whose best score exceeds τ — of that protocol — is deleted. Kept
videos are numbered in attempt order until ``num_videos`` are kept; later passes are surplus. The folder's files and
what the field's loaders read of them: :mod:`callbacks.synthetic_layout`.

Before the first attempt the filter is audited (``audit``): canaries — near-copies of training videos — are written
and scored as attempts are; the recall per transform and the false-flag rate go into ``dataset.json``, and by default
a filter below its floors writes nothing.

Fail-closed: without a re-ID model the writer refuses, unless ``unfiltered: true``; an unfiltered dataset says so in
``dataset.json`` and in a ``NOT_PRIVACY_FILTERED.txt`` beside its FileList. Resumable: a re-run with the same setup
reads ``audit.csv`` and generates only the attempts not in it (a video written but not yet listed is deleted first).
DDP: rank r generates attempts r, r + W, … of each round, the ranks gather their results after every batch and every
rank applies them in attempt order, so the dataset does not depend on the number of ranks. The output folder must be
on a file system every rank sees.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.synthetic_layout import (AUDIT_COLUMNS, ECHOSYN_MIN_SECONDS, FILELIST_COLUMNS, check_folder,
                                        filelist_rows, mark_unfiltered, read_audit, reconcile, split_fractions,
                                        split_plan, write_csv)
from datamodules.dataset import to_model_range
from datamodules.requests import GenerationRequests
from datamodules.video_io import atomic_output, read_video, write_video
from lightning_modules.diffusion_sampling import anatomy_references
from lightning_modules.joint_sampling import JointSchedule

class SyntheticDatasetWriter(BasePredictionWriter):
    """Writes ``num_videos`` privacy-filtered synthetic videos in EchoNet layout to ``out`` (see module docs).

    Args:
        out: output folder. num_videos: videos to keep; the cap on attempts is ``data.requests.attempts``.
        reid: re-ID checkpoint; required unless ``unfiltered``. Its τ is the one of the filter's protocol (clips of
            ``num_frames`` at the data's period or fps): stored beside the checkpoint for this data by
            ``echo-lvdm calibrate``, else calibrated on the real validation split at the model's quantile.
        vae: exported VAE folder (``echo-lvdm export-vae``): decodes the generator's latents, and encodes the written
            videos for a latent re-ID model.
        anatomy: image-mode diffusion checkpoint whose samples (at each request's EF) are the reference frames of a
            reference-conditioned video model; None: no reference (the model's trained no-reference mode).
        unfiltered: write without a privacy filter (marked as such).
        splits: fractions of kept videos per Split label, assigned by a seeded shuffle.
        num_frames, steps, sampler, guidance_scale: sampling options (None: the model's training clip length and
            defaults). fps: FPS written (None: the model's training frame rate).
        joint: joint image-and-video sampling (JVID) — the steps an image model takes, as
            :class:`~lightning_modules.joint_sampling.JointSchedule` settings (``{every: 2}``, ``{end: 0.2}``, …);
            None: the video model alone. image_model: the image-mode checkpoint that takes them (None: ``anatomy``).
        cache_dir: where the training split's re-ID embeddings are cached (None: the trainer's default_root_dir
            under ``reid_cache/``; never inside ``out``: they derive from patient videos).
        prefix: video name prefix.
        audit: before generating, the privacy audit (:mod:`lightning_modules.privacy_audit`, as ``echo-lvdm
            audit``) of this re-ID model and τ under this protocol — near-copies of ``audit_sources`` training videos
            and the real TEST videos, written and scored as attempts are — recorded in ``dataset.json``.
            ``"refuse"`` (default): write nothing when the filter misses near-copies (recall below the floors; too
            many false flags on real videos only warn: they cost samples, not privacy); ``"record"``: write and
            record the failure; ``"off"``: no audit (recorded as not audited).
        audit_sources: training videos the canaries are made of. audit_floors: ``floor`` (every single transform's
            recall), ``combined_floor``, ``max_false_flags`` (default
            :data:`~lightning_modules.privacy_audit.DEFAULT_FLOORS`).
    """

    def __init__(self, out: str | Path, num_videos: int, *, reid: str | None = None, vae: str | None = None,
                 anatomy: str | None = None, unfiltered: bool = False,
                 splits: dict[str, float] | None = None, num_frames: int | None = None, steps: int | None = None,
                 sampler: str | None = None, guidance_scale: float | None = None, fps: float | None = None,
                 cache_dir: str | None = None, prefix: str = "synthetic", audit: str = "refuse",
                 audit_sources: int = 24, audit_floors: dict[str, float] | None = None,
                 joint: dict | str | None = None, image_model: str | None = None) -> None:
        super().__init__(write_interval="batch")
        if num_videos < 1:
            raise ValueError(f"SyntheticDatasetWriter: num_videos must be ≥ 1, got {num_videos}")
        if reid is None and not unfiltered:
            raise ValueError("SyntheticDatasetWriter: no re-ID model, so no privacy filter. Give reid: <re-ID "
                             "checkpoint>, or set unfiltered: true to write a dataset marked as not filtered")
        splits = split_fractions(splits)
        for name, path in (("reid", reid), ("anatomy", anatomy), ("image_model", image_model)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"SyntheticDatasetWriter: {name} checkpoint {path} not found")
        self.joint = JointSchedule.parse(joint)
        if self.joint == JointSchedule():
            self.joint = None
        if self.joint is not None and image_model is None and anatomy is None:
            raise ValueError("SyntheticDatasetWriter: joint sampling needs an image model: give image_model: "
                             "<image-mode checkpoint> (or anatomy:, which it defaults to)")
        self.image_model_path = image_model
        if not prefix or any(character in prefix for character in "./\\"):
            raise ValueError(f"SyntheticDatasetWriter: prefix {prefix!r} must be a plain name without '.' or a path "
                             "separator (EchoNet's loaders take the FileName up to the first '.' as the video name)")
        self.out, self.num_videos, self.unfiltered = Path(out), num_videos, unfiltered
        self.reid_path = None if reid is None else Path(reid)
        self.vae_path, self.anatomy_path = vae, anatomy
        self.splits, self.prefix, self.fps = splits, prefix, fps
        self.sampling = {key: value for key, value in dict(num_frames=num_frames, steps=steps, scheduler=sampler,
                                                             guidance_scale=guidance_scale).items() if value is not None}
        if self.joint is not None:
            self.sampling["joint"] = self.joint.describe()
        self.cache_dir = cache_dir
        if audit not in ("refuse", "record", "off"):
            raise ValueError(f"SyntheticDatasetWriter: audit must be 'refuse', 'record' or 'off', got {audit!r}")
        from lightning_modules.privacy_audit import DEFAULT_FLOORS

        unknown = set(audit_floors or {}) - set(DEFAULT_FLOORS)
        if unknown:
            raise ValueError(f"SyntheticDatasetWriter: audit_floors takes {sorted(DEFAULT_FLOORS)}, got {sorted(unknown)}")
        self.audit, self.audit_sources = audit, audit_sources
        self.audit_floors = {**DEFAULT_FLOORS, **(audit_floors or {})}
        self.audit_summary: dict[str, Any] | None = None
        self.real = None
        self.reid = self.vae = self.anatomy = self.encoder = self.bank = self.calibration = self.protocol = None
        self.image_model = None
        self.tau = float("nan")
        self.rows: dict[int, dict[str, Any]] = {}  # attempt → audit row
        self.split_plan: list[str] = []

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        datamodule = trainer.datamodule
        if datamodule is None or datamodule.hparams.get("predict_split") != "requests":
            raise ValueError("SyntheticDatasetWriter needs generation requests: data.predict_split: requests and "
                             "data.requests (see configs/generate.yaml)")
        requests = datamodule.hparams.requests
        self.requests = GenerationRequests(**requests) if isinstance(requests, dict) else requests
        if self.requests.attempts < self.num_videos:
            raise ValueError(f"SyntheticDatasetWriter: num_videos {self.num_videos} > data.requests.attempts "
                             f"{self.requests.attempts} (the cap on attempts)")
        self._load_models(pl_module, trainer.strategy.root_device)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in setup: `predict --ckpt_path` loads the generator's weights (frame rate, clip length) after setup.
        datamodule = trainer.datamodule
        self.fps = float(self.fps or pl_module.train_fps)
        pl_module.predict_options = dict(self.sampling)
        if self.joint is not None:
            pl_module.predict_options["image_model"] = self.image_model
        self.num_frames = int(self.sampling.get("num_frames") or pl_module.train_num_frames)
        if self.num_frames / self.fps <= ECHOSYN_MIN_SECONDS:
            rank_zero_warn(f"SyntheticDatasetWriter: {self.num_frames} frames at {self.fps:g} fps last "
                           f"{self.num_frames / self.fps:.2f} s; EchoNet-Synthetic's loaders keep only videos longer "
                           f"than their clip ({ECHOSYN_MIN_SECONDS:g} s at its settings: README, synthetic datasets)")
        if self.reid is not None:
            self.bank = self._privacy_bank(trainer, datamodule)
        self.split_plan = split_plan(self.splits, self.num_videos, self.requests.seed)
        self.signature = self._signature(pl_module)
        check_folder(self.out, self.signature)  # every rank, so that all of them raise together
        if self.reid is not None:
            self._run_audit(trainer)
        _barrier()
        if trainer.is_global_zero:
            self.rows = reconcile(self.out)
            self._write_lists()
        _barrier()
        self.rows = read_audit(self.out / "audit.csv")
        rank_zero_info(f"SyntheticDatasetWriter: {self.kept} of {self.num_videos} videos kept so far in {self.out}"
                       + ("" if self.reid is None else f"; privacy filter τ = {self.tau:.4g}"))

    def _load_models(self, pl_module: L.LightningModule, device: torch.device) -> None:
        from lightning_modules.diffusion import load_diffusion
        from lightning_modules.reid import load_reid
        from lightning_modules.reid_embeddings import EncodedReID
        from lightning_modules.vae_utils import load_frozen_vae

        if self.vae_path is not None and self.vae is None:
            self.vae = load_frozen_vae(self.vae_path).to(device)
        if self.reid_path is not None and self.reid is None:
            self.reid = load_reid(self.reid_path).to(device)
            latent = self.reid.hparams.in_channels != 1 and self.vae is not None \
                and self.reid.hparams.in_channels == self.vae.config.latent_channels
            if self.reid.hparams.in_channels not in (1, 3) and not latent:
                raise ValueError(f"SyntheticDatasetWriter: {self.reid_path} works in latent space; give vae: "
                                 "<exported VAE folder> to encode the written videos")
            self.encoder = EncodedReID(self.reid, self.vae if latent else None)
        if self.anatomy_path is not None and self.anatomy is None:
            self.anatomy = load_diffusion(self.anatomy_path, mode="image", map_location=device)
        hp = getattr(pl_module, "hparams", {})
        if hp.get("reference_conditioning") and self.anatomy is None:
            if not hp.get("reference_dropout"):
                raise ValueError("SyntheticDatasetWriter: the video model always saw a reference frame in training; "
                                 "give anatomy: <image-mode checkpoint> for its reference frames")
            rank_zero_warn("SyntheticDatasetWriter: no anatomy model; sampling in the model's no-reference mode")
        if self.joint is not None and self.image_model is None:
            self.image_model = self.anatomy if self.image_model_path in (None, self.anatomy_path) else \
                load_diffusion(self.image_model_path, mode="image", map_location=device)

    def _privacy_bank(self, trainer: L.Trainer, datamodule) -> Any:
        """The real training videos embedded under the filter's protocol — clips of ``num_frames`` at the data's
        period or fps, as written videos are scored — and τ of that protocol: stored beside the re-ID checkpoint for
        this data (``echo-lvdm calibrate``), else calibrated here on the real validation split."""
        from datamodules.datamodule import EchoNetDataModule
        from lightning_modules.calibration import filter_bank
        from lightning_modules.protocols import Protocol

        hp = datamodule.hparams
        self.protocol = Protocol("clip", self.num_frames, 1 if hp.fps is not None else hp.period, hp.fps)
        channels = int(self.vae.config.in_channels) if self.encoder.vae is not None else int(self.reid.hparams.in_channels)
        real = EchoNetDataModule(datamodule.root_for("train"), val_root=datamodule.root_for("val"), pad="reflect",
                                 channels=channels, size=hp.size, batch_size=hp.batch_size, num_workers=0,
                                 eval_seed=hp.eval_seed, **self.protocol.data_options())
        cache = Path(self.cache_dir) if self.cache_dir is not None else Path(trainer.default_root_dir) / "reid_cache"
        self.real = real
        bank, self.calibration, _ = filter_bank(self.encoder, self.reid, self.reid_path, real, self.protocol,
                                                cache_dir=cache)
        self.tau = self.calibration.holds_for(self.protocol, "the privacy filter's τ")
        rank_zero_info(f"SyntheticDatasetWriter: {len(bank)} training videos embedded as the privacy bank; protocol "
                       f"{self.protocol.name}, τ = {self.tau:.4g} from {self.calibration.heldout_videos} "
                       f"{self.calibration.heldout} videos")
        return bank

    def _run_audit(self, trainer: L.Trainer) -> None:
        """The privacy audit of this filter (rank 0 runs it, every rank gets the summary); a dataset continued with
        the same setup keeps the audit it recorded."""
        if self.audit == "off":
            self.audit_summary = {"audited": False}
            return
        meta_path = self.out / "dataset.json"
        previous = json.loads(meta_path.read_text()).get("privacy_audit") if meta_path.is_file() else None
        summary = None
        if previous and previous.get("audited") and previous.get("tau") == self.tau:
            summary = previous
        elif trainer.is_global_zero:
            from lightning_modules.privacy_audit import audit_filter

            summary = audit_filter(self.encoder, self.reid, self.bank, self.calibration, self.protocol, self.real,
                                   sources=self.audit_sources, floors=self.audit_floors)
        self.audit_summary = summary = trainer.strategy.broadcast(summary, src=0)
        missed = ", ".join(f"{name} {entry['recall']:.2f}" for name, entry in summary["recall"].items()
                           if entry["recall"] < 1)
        verdict = "passed" if summary["passed"] else "FAILED" if not summary.get("recall_passed") else \
            "caught the near-copies but failed the false-flag floor"
        rank_zero_info(f"SyntheticDatasetWriter: privacy audit {verdict}" +
                       f": least single-transform recall {summary['min_single_recall']:.3f}, combined "
                       f"{summary['combined_recall']:.3f}, held-out false flags "
                       f"{summary['heldout_false_flags']['flagged']}/{summary['heldout_false_flags']['videos']}"
                       + (f" (below 1: {missed})" if missed else ""))
        if not summary.get("recall_passed", summary["passed"]) and self.audit == "refuse":
            raise RuntimeError("SyntheticDatasetWriter: the privacy filter failed its audit ("
                               + "; ".join(summary["failures"]) + f"): with this re-ID model and τ = {self.tau:.4g} it "
                               "misses near-copies of training videos, so its filtering would not protect them. "
                               "Train the re-ID model with near-copy positives (data.augment_frames), or set "
                               "audit: record to write the dataset with the failure recorded in dataset.json")
        if not summary["passed"]:  # near-copies are caught, but more real videos are flagged than allowed
            rank_zero_warn("SyntheticDatasetWriter: privacy audit: " + "; ".join(summary["failures"]) + " — the "
                           "filter drops more new-patient videos than its floor allows (recorded in dataset.json)")

    def _signature(self, pl_module: L.LightningModule) -> dict[str, Any]:
        from lightning_modules.vae_utils import checksum_of_weights

        state = dict(pl_module.state_dict())
        ema = getattr(pl_module, "ema", None)
        if ema is not None:  # samples come from the EMA weights
            state.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
        requests = asdict(self.requests)
        requests.pop("attempts")  # the cap may be raised on a re-run
        requests["ef_range"] = list(requests["ef_range"])
        return {"generator": checksum_of_weights(state),
                "vae": None if self.vae is None else checksum_of_weights(self.vae),
                "anatomy": None if self.anatomy is None else checksum_of_weights(self.anatomy.state_dict()),
                "joint_image_model": None if self.joint is None else checksum_of_weights(self.image_model.state_dict()),
                "reid": None if self.reid is None else self.reid.weights_checksum(),
                "tau": None if self.reid is None else self.tau,
                "tau_protocol": None if self.reid is None else self.protocol.name,
                "requests": requests, "num_videos": self.num_videos,
                "splits": self.splits, "sampling": self.sampling, "num_frames": self.num_frames, "fps": self.fps,
                "prefix": self.prefix, "privacy_filtered": not self.unfiltered}

    # --------------------------------------------------------------------------------------------- writing
    @property
    def kept(self) -> int:
        return sum(row["Decision"] == "kept" for row in self.rows.values())

    @property
    def complete(self) -> bool:
        return self.kept >= self.num_videos

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        """Mark the requests still to generate (``batch["todo"]``) and give them their reference frames."""
        done = torch.tensor([int(i) in self.rows for i in batch["index"].tolist()], device=batch["valid"].device)
        batch["todo"] = batch["valid"] & ~done & (not self.complete)
        if self.anatomy is not None and bool(batch["todo"].any()):
            todo = batch["todo"]
            frames = anatomy_references(self.anatomy, batch["ef"][todo], batch["seed"][todo].tolist())
            reference = torch.zeros(len(todo), *frames.shape[1:], dtype=frames.dtype, device=frames.device)
            reference[todo] = frames
            batch["reference"] = reference

    @torch.no_grad()
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.complete:  # the same on every rank: each applies every rank's results
            return
        todo = batch["todo"]
        results = []
        if prediction is not None:
            if isinstance(prediction, dict):
                pixels = prediction["pixels"]
            else:
                from lightning_modules.vae_utils import decode_frames

                if self.vae is None:
                    raise ValueError("SyntheticDatasetWriter: the generator returns latents; give vae: <exported VAE "
                                     "folder> to decode them")
                pixels = decode_frames(self.vae, prediction)
            requests = zip(batch["index"][todo].tolist(), batch["ef"][todo].tolist(), batch["seed"][todo].tolist())
            for (attempt, ef, seed), video in zip(requests, pixels.clamp(-1.0, 1.0)):
                results.append(self._write_and_score(attempt, ef, seed, video))
        for result in sorted((r for part in _gather(results) for r in part), key=lambda r: r["Attempt"]):
            self._decide(result)
        if trainer.is_global_zero:
            self._write_lists()

    def _write_and_score(self, attempt: int, ef: float, seed: int, video: torch.Tensor) -> dict[str, Any]:
        from callbacks.video_logging import video_array

        name = f"{self.prefix}_{attempt:06d}"
        path = write_video(self.out / "Videos" / f"{name}.avi", video_array(video), fps=self.fps)
        written = read_video(path, gray=video.shape[1] == 1)  # score exactly what was written
        score = None
        if self.encoder is not None:
            embedding = self.encoder.embed_videos(to_model_range(written)[None].to(self.reid.device))
            score = float(self.reid.video_search(embedding, self.bank.embedding.to(embedding))[0][0])
        passed = score is None or score <= self.tau
        if not passed:
            path.unlink()
        return {"Attempt": attempt, "FileName": name, "Split": "", "EF": round(ef, 3), "Seed": seed,
                "Score": "" if score is None else round(score, 6), "Tau": "" if score is None else round(self.tau, 6),
                "TauProtocol": "" if score is None else self.protocol.name,
                "Decision": "passed" if passed else "dropped", "FrameHeight": written.shape[1],
                "FrameWidth": written.shape[2], "NumberOfFrames": len(written)}

    def _decide(self, result: dict[str, Any]) -> None:
        if result["Decision"] == "passed":
            if self.complete:
                result["Decision"] = "surplus"
                (self.out / "Videos" / f"{result['FileName']}.avi").unlink(missing_ok=True)
            else:
                result["Decision"] = "kept"
        self.rows[result["Attempt"]] = result

    def _write_lists(self) -> None:
        rows = [self.rows[attempt] for attempt in sorted(self.rows)]
        kept = [row for row in rows if row["Decision"] == "kept"]
        for row, split in zip(kept, self.split_plan):  # the k-th kept attempt: the same after a resume
            row["Split"] = split
        write_csv(self.out / "audit.csv", AUDIT_COLUMNS, rows)
        write_csv(self.out / "FileList.csv", FILELIST_COLUMNS, filelist_rows(kept, self.fps))
        counts = {kind: sum(row["Decision"] == kind for row in rows) for kind in ("kept", "dropped", "surplus")}
        meta = {"created_by": "echo-lvdm SyntheticDatasetWriter", "privacy_filtered": not self.unfiltered,
                "privacy_threshold": None if self.reid is None else self.calibration.as_dict(),
                "privacy_audit": self.audit_summary,
                "complete": len(kept) >= self.num_videos, "attempts": len(rows), **counts,
                "attempt_cap": self.requests.attempts, "setup": self.signature}
        with atomic_output(self.out / "dataset.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
        if self.unfiltered:
            mark_unfiltered(self.out)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _barrier()
        dropped = sum(row["Decision"] == "dropped" for row in self.rows.values())
        summary = (f"{self.kept} of {self.num_videos} videos kept after {len(self.rows)} attempts "
                   f"({dropped} dropped above τ)")
        if not self.complete:
            raise RuntimeError(f"SyntheticDatasetWriter: {summary}: the cap data.requests.attempts="
                               f"{self.requests.attempts} was hit. {self.out} holds the kept videos; re-run with a "
                               "higher cap to continue (many drops mean the model reproduces training patients)")
        rank_zero_info(f"SyntheticDatasetWriter: {summary} → {self.out}"
                       + (" (NOT privacy-filtered)" if self.unfiltered else ""))


def _gather(results: list) -> list[list]:
    if dist.is_available() and dist.is_initialized():
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, results)
        return parts
    return [results]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
