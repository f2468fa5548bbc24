"""The one LightningDataModule every echo-lvdm model trains, validates, tests and predicts from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from datamodules.clips import PAD_MODES, PadMode
from datamodules.dataset import EchoNetVideoDataset, Sampling
from datamodules.errors import UserInputError
from datamodules.filelist import (
    SPLITS,
    BadEntry,
    DataValidationError,
    OnBad,
    Verify,
    list_bad,
    read_split,
    report_bad,
    report_corrected,
)
from datamodules.latents import ENCODE_COMMAND, EchoNetLatentDataset, cached_records
from datamodules.requests import GenerationRequests, RequestDataset, padded_length
from datamodules.sampler import EpochSampler, ResumableLoader, global_seed, resume_position

Split = Literal["train", "val", "test"]
NO_ROOT = ("EchoNetDataModule: no dataset folder. Give --data.root DIR (or data.train_root / val_root / test_root), "
           "or stack a data config before the model config: --config configs/data/phantom.yaml, or "
           "configs/data/echonet_dynamic.yaml for the real dataset")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class EchoNetDataModule(L.LightningDataModule):
    """EchoNet-Dynamic-layout folders (``FileList.csv`` + ``Videos/``) → batches of the shared contract.

    Batches are dicts: ``video`` float32 ``(B, T, C, H, W)`` in [-1, 1], ``ef`` float32 ``(B,)`` percent, ``index``
    int64 ``(B,)`` row in the split's table, ``patient`` int64 ``(B,)`` identity, ``fps`` float32 ``(B,)``.

    Args:
        root: dataset folder used for every split not given its own root.
        train_root / val_root / test_root: per-split folders (e.g. train on a synthetic folder, validate and test on
            real data). Each is read for its own split label (``Split`` column, any letter case).
        sampling: ``"clip"`` (contiguous clips) or ``"frames"`` (``num_frames`` random frames of one video, as the
            re-identification model needs).
        clip_length: frames per clip. ``period``: take every n-th source frame. ``fps``: instead of ``period``,
            resample every video to this frame rate (real EchoNet videos run at 38–50 fps).
        pad: rule for videos shorter than a clip — ``reflect`` (default), ``loop``, ``last`` or ``zeros``
            (EchoNet-Dynamic's); see :mod:`datamodules.clips`.
        channels: 1 = grayscale (RGB videos converted by luma), 3 = RGB. ``size``: resize frames to this (int or
            (H, W)) with antialiased bilinear interpolation; None keeps the file's size.
        on_bad: ``"error"`` reports every broken entry in one error at ``setup()``; ``"skip"`` drops them with one
            counted warning. ``verify``: ``"count"`` (default) counts each video's frames at setup without decoding
            them — a file cut short is a broken entry, and a ``NumberOfFrames`` that is not the video's length is
            corrected, with one warning; ``"decode"`` also decodes every frame (slow); ``"open"`` decodes the first
            frame and trusts ``NumberOfFrames``; ``"none"`` trusts the FileList. See :func:`~datamodules.filelist.read_split`.
        eval_seed: fixes val/test/predict clip positions. ``eval_start``: ``"first"`` starts every val/test/predict clip
            at the video's first frame (``clip_length: 1`` then serves each video's first frame), ``"random"`` at a
            position fixed by ``eval_seed``.
        seed: seeds the training order and clips per epoch; None follows ``seed_everything``. Training items are a
            function of (seed, epoch) only, so a run resumed with ``--ckpt_path`` sees what an uninterrupted one would.
        group_by_patient: training batches hold a patient's videos together (shuffled patients, then their videos),
            so a frame model finds positive pairs across videos of one patient inside a batch (re-identification).
        predict_split: the split ``predict`` iterates; ``"all"``: every row, of whichever splits the FileList has;
            ``"requests"``: no video, but one generation request per attempt of ``requests`` (a synthetic dataset
            written by :class:`~callbacks.synthetic_writer.SyntheticDatasetWriter`; see :mod:`datamodules.requests`).
        requests: what to generate when ``predict_split`` is ``"requests"``.
        augment_frames: with ``sampling: frames``, each training item also carries ``augmented`` ``(A, C, H, W)``:
            copies of its first A frames *in pixels* (read from the video in latent space too), each under a random
            near-copy transform (:mod:`datamodules.augment`) — extra positives for the re-identification model,
            which encodes them with the VAE in latent space (``ReIDModule(augment_vae=…)``). 0: off.
        train_videos: train on this many of the training split's videos (after skips), the same ones in every run
            and process (a fixed-seed draw without replacement, kept in FileList order) — e.g. a regressor trained
            on real videos at the size of a synthetic training set. None: all.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        train_root: str | Path | None = None,
        val_root: str | Path | None = None,
        test_root: str | Path | None = None,
        sampling: Sampling = "clip",
        clip_length: int = 16,
        period: int = 1,
        fps: float | None = None,
        num_frames: int = 2,
        pad: PadMode = "reflect",
        channels: Literal[1, 3] = 1,
        size: int | tuple[int, int] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad: OnBad = "error",
        verify: Verify = "count",
        eval_seed: int = 0,
        eval_start: Literal["random", "first"] = "random",
        seed: int | None = None,
        group_by_patient: bool = False,
        predict_split: Split | Literal["all", "requests"] = "test",
        requests: GenerationRequests | None = None,
        space: Literal["pixel", "latent"] = "pixel",
        latent_dir: str | Path | None = None,
        latent_posterior: Literal["sample", "mean"] = "sample",
        latent_scaled: bool = True,
        vae_checksum: str | None = None,
        augment_frames: int = 0,
        train_videos: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key in ("root", "train_root", "val_root", "test_root", "latent_dir"):
            # Paths as strings: checkpoints must load with torch.load(weights_only=True), which refuses PosixPath.
            if self.hparams[key] is not None:
                self.hparams[key] = str(self.hparams[key])
        if pad not in PAD_MODES:
            raise UserInputError(f"pad must be one of {PAD_MODES}, got {pad!r}")
        if fps is not None and period != 1:
            raise UserInputError(f"give either period ({period}) or fps ({fps}), not both")
        if train_videos is not None and train_videos < 1:
            raise UserInputError(f"train_videos must be ≥ 1 (or null: all), got {train_videos}")
        if clip_length < 1 or num_frames < 1 or period < 1 or batch_size < 1:
            raise UserInputError("clip_length, num_frames, period and batch_size must be ≥ 1")
        if space not in ("pixel", "latent"):
            raise UserInputError(f"space must be 'pixel' or 'latent', got {space!r}")
        if predict_split == "requests" and requests is None:
            raise UserInputError("predict_split 'requests' needs data.requests (attempts, distribution, ef_range, seed)")
        if space == "latent" and latent_dir is None:
            raise UserInputError(f"space='latent' needs data.latent_dir — a data config (configs/data/*.yaml) sets it, "
                             f"or --data.latent_dir DIR — the cache written by: {ENCODE_COMMAND}")
        roots = {"train": train_root or root, "val": val_root or root, "test": test_root or root}
        if not any(roots.values()):
            raise UserInputError(NO_ROOT)
        self.roots = {split: Path(path) if path is not None else None for split, path in roots.items()}
        self.datasets: dict[str, EchoNetVideoDataset] = {}
        self.skipped: dict[str, list[BadEntry]] = {}
        self.corrected: dict[str, list] = {}

    def root_for(self, split: Split) -> Path:
        root = self.roots[split]
        if root is None:
            raise UserInputError(f"no dataset folder for the {split} split: set data.root or data.{split}_root")
        return root

    def _build(self, split: Split, allow_empty: bool = False) -> EchoNetVideoDataset | None:
        hp = self.hparams
        # In latent space the videos are not decoded: lengths and frame rates come from the cache.
        table = read_split(self.root_for(split), split, verify=hp.verify if hp.space == "pixel" else "none")
        self.skipped[split] = table.skipped
        self.corrected[split] = table.corrected
        if not table.records and not table.skipped:
            if allow_empty:
                return None
            filelist = table.root / "FileList.csv"
            if not table.rows:
                raise DataValidationError(f"{filelist}: a header and no rows (expected one row per video)")
            labels = "/".join(SPLITS)
            raise DataValidationError(f"{filelist}: no row has Split={split.upper()} (expected {labels})")
        records = table.records
        if split == "train" and hp.train_videos is not None:
            records = self._train_subset(records, table.root / "FileList.csv")
        options = dict(sampling=hp.sampling, clip_length=hp.clip_length, period=hp.period if hp.fps is None else None,
                       target_fps=hp.fps, num_frames=hp.num_frames, pad=hp.pad, channels=hp.channels, size=hp.size,
                       eval_seed=hp.eval_seed, eval_start=hp.eval_start,
                       augment_frames=hp.augment_frames if split == "train" else 0)
        if hp.space == "pixel":
            return EchoNetVideoDataset(records, **options)
        records, scaling_factor, problems = cached_records(records, hp.latent_dir, hp.vae_checksum)
        if problems:
            filelist = table.root / "FileList.csv"
            bad = [BadEntry(filelist, r.line, r.file_name, "latent cache", problem) for r, problem in problems]
            raise DataValidationError(
                f"latent cache {hp.latent_dir} is missing or stale for {len(bad)} {split} video(s):\n{list_bad(bad)}\n"
                f"Build or refresh it with: {ENCODE_COMMAND} (with the same data.root and "
                f"data.latent_dir={hp.latent_dir}); up-to-date entries are skipped."
            )
        options.pop("size")
        return EchoNetLatentDataset(records, hp.latent_dir, scaling_factor=scaling_factor,
                                    posterior=hp.latent_posterior, scaled=hp.latent_scaled, **options)

    def _train_subset(self, records: list, filelist: Path) -> list:
        wanted = self.hparams.train_videos
        if wanted > len(records):
            raise DataValidationError(f"{filelist}: data.train_videos {wanted} asks for more training videos than the "
                                      f"split has ({len(records)} usable TRAIN rows)")
        keep = np.sort(np.random.default_rng(0).permutation(len(records))[:wanted])
        return [records[i] for i in keep]

    def setup(self, stage: str | None = None) -> None:
        """Read and check every split the stage needs; all broken entries of all of them are reported together."""
        if stage == "predict" and self.hparams.predict_split == "requests":
            return  # requests need no video; the training EFs are read when the loader is built
        if stage == "predict":
            split = self.hparams.predict_split
            splits = ("train", "val", "test") if split == "all" else (split,)
        else:
            splits = _STAGE_SPLITS.get(stage, ("train", "val", "test"))
        every_row = stage == "predict" and self.hparams.predict_split == "all"  # a folder may hold one split only
        wanted = [split for split in splits if split not in self.datasets]
        built = {split: self._build(split, allow_empty=every_row) for split in wanted}
        built = {split: dataset for split, dataset in built.items() if dataset is not None}
        if every_row and not built and not any(split in self.datasets for split in splits):
            raise DataValidationError(f"{self.hparams.root}/FileList.csv: no row has a Split of "
                                      f"{'/'.join(SPLITS)}")
        bad = [entry for split in wanted for entry in self.skipped[split]]
        total = sum(len(dataset) for dataset in built.values()) + len(bad)
        report_bad(bad, self.hparams.on_bad, total=total)
        report_corrected([entry for split in wanted for entry in self.corrected.get(split, [])])
        for split, dataset in built.items():
            if len(dataset) == 0:
                raise DataValidationError(f"{self.root_for(split) / 'FileList.csv'}: every {split} row was skipped")
        self.datasets.update(built)
        if every_row:
            parts = [self.datasets[split] for split in ("train", "val", "test") if split in self.datasets]
            self.datasets["all"] = parts[0].with_records([record for part in parts for record in part.records])

    def _loader(self, split: Split, train: bool = False, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}.get(split, "predict"))
        dataset = self.datasets[split]
        workers = self.hparams.num_workers
        if train:  # training keys carry (seed, epoch): order and clips survive resumes; evaluation is plain in-order
            groups = dataset.patient_ids if self.hparams.group_by_patient else None
            sampler = EpochSampler(len(dataset), seed=self.hparams.seed, groups=groups)
            if self._resume is not None:  # the first training loader of a resumed fit
                self._check_resume_order()
                sampler.resume(self._resume["epoch"], self._resume["batches"] * self.hparams.batch_size)
                self._resume = None
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
        )

    _resume: dict | None = None

    def state_dict(self) -> dict:
        """Where training is, saved in every checkpoint: the epoch, its batches already trained, and what they mean
        (the order's seed, batch size, rank count and training videos). A fit resumed from the checkpoint starts its
        sampler there (:mod:`datamodules.sampler`)."""
        if self.trainer is None or "train" not in self.datasets:
            return {}
        epoch, batches = resume_position(self.trainer)
        return {"epoch": epoch, "batches": batches, **self._order()}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if "epoch" in state else None

    def _order(self) -> dict:
        seed = self.hparams.seed if self.hparams.seed is not None else global_seed()
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {"seed": seed, "batch_size": self.hparams.batch_size, "world_size": world_size,
                "videos": len(self.datasets["train"])}

    def _check_resume_order(self) -> None:
        if not self._resume["batches"]:
            return  # a new epoch: any seed, batch size or rank count starts it cleanly
        changed = [f"{key} {self._resume[key]} → {now}" for key, now in self._order().items()
                   if key in self._resume and self._resume[key] != now]
        if changed:
            rank_zero_warn(f"resumed inside epoch {self._resume['epoch']} with a different training order "
                           f"({', '.join(changed)}): the rest of that epoch is not what the interrupted run would have "
                           "trained")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_split == "requests":
            return self.request_dataloader()
        return self._loader(self.hparams.predict_split)

    def request_dataloader(self) -> DataLoader:
        """Generation requests, padded to whole rounds of ``batch_size × world size`` (see :mod:`datamodules.requests`)."""
        requests = self.hparams.requests
        if isinstance(requests, dict):  # as a checkpoint's hyperparameters give it back
            requests = GenerationRequests(**requests)
        train_ef = None
        if requests.distribution == "train":
            train_ef = [record.ef for record in read_split(self.root_for("train"), "train", verify="none").records]
        world_size = self.trainer.world_size if self.trainer is not None else 1
        length = padded_length(requests.attempts, self.hparams.batch_size, world_size)
        return DataLoader(RequestDataset(requests, length, train_ef), batch_size=self.hparams.batch_size,
                          shuffle=False, num_workers=0)

    def eval_dataloader(self, split: Split, *, shard: tuple[int, int] | None = None) -> DataLoader:
        """Any split the way val/test see it (in order, clip positions fixed by ``eval_seed``), for models that embed
        or score a whole split outside Lightning's loops. ``shard=(rank, world_size)`` gives one rank its items
        ``rank, rank + world_size, …`` without padding."""
        sampler = None
        if shard is not None:
            if split not in self.datasets:
                self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
            rank, world_size = shard
            sampler = range(rank, len(self.datasets[split]), world_size)
        return self._loader(split, sampler=sampler)
