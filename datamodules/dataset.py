"""Pixel-space EchoNet dataset: checked FileList rows in, batch-contract items out."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from datamodules.clips import PadMode, clip_indices, frame_sample_indices, max_clip_start
from datamodules.filelist import VideoRecord
from datamodules.sampler import SampleKey
from datamodules.video_io import ShortVideoError, read_video

Sampling = Literal["clip", "frames", "video"]
# SeedSequence ignores trailing zeros ((s, e, 0) == (s, e)): nonzero tags keep the streams apart.
_TRAIN_STREAM, _EVAL_STREAM = 1, 2
_PLAN_STREAM, NOISE_STREAM, _AUGMENT_STREAM = 1, 2, 3


def key_index(key: int | SampleKey) -> int:
    """The row index of a dataset key (an int, or ``(index, seed, epoch)`` from the training sampler)."""
    return int(key[0]) if isinstance(key, tuple | list) else int(key)


def patient_id(name: str) -> int:
    """A stable int64 identity for a patient name: the same in every split, folder, process and run."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1


def resolve_step(source_fps: float, period: float | None, target_fps: float | None) -> float:
    """Source frames between two returned frames: the period, or source fps / target fps (fractional allowed)."""
    if target_fps is not None:
        if target_fps <= 0:
            raise ValueError(f"target fps must be positive, got {target_fps}")
        return source_fps / target_fps
    return float(period or 1)


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W[, C])`` → float32 ``(T, C, H, W)`` in [-1, 1].

    In numpy on purpose: torch's elementwise ops here go through its OpenMP pool, which in the main process of a busy
    machine costs 5–40× more than this single-threaded conversion.
    """
    scaled = frames.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    layout = scaled[:, None] if scaled.ndim == 3 else np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))
    return torch.from_numpy(layout)


class EchoNetVideoDataset(Dataset):
    """Items of the shared batch contract (see DESIGN.md) from checked :class:`VideoRecord` rows.

    Each item: ``video`` float32 ``(T, C, H, W)`` in [-1, 1]; ``ef`` float32 (percent, the FileList value); ``index``
    int64 (position in ``records``); ``patient`` int64 (:func:`patient_id` of the PatientID, or of the FileName when
    the FileList has no PatientID column; ``patient_names`` maps it back);
    ``fps`` float32 (of the returned frames).

    ``sampling="clip"``: ``clip_length`` contiguous frames every ``period`` source frames, or resampled to
    ``target_fps``; short videos padded by ``pad`` (see :mod:`datamodules.clips`). ``sampling="frames"``:
    ``num_frames`` distinct random frames of the video, in time order. ``sampling="video"``: the whole video at the
    period / target fps (variable length: batch size 1), as encoding for the latent cache needs.

    Items are fetched by key: an int ``index`` gives the evaluation plan, a fixed function of ``(eval_seed, index)``
    (with ``eval_start="first"``, evaluation clips start at the video's first frame, as a protocol comparing first
    frames needs);
    a key ``(index, seed, epoch)`` from :class:`~datamodules.sampler.EpochSampler` (training) gives a random plan drawn
    from that key alone, so runs are reproducible across resumes, worker counts and processes.
    """

    pad_value = -1.0  # black, in the [-1, 1] pixel range

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        sampling: Sampling = "clip",
        clip_length: int = 16,
        period: int | None = 1,
        target_fps: float | None = None,
        num_frames: int = 2,
        pad: PadMode = "reflect",
        channels: int = 1,
        size: int | tuple[int, int] | None = None,
        eval_seed: int = 0,
        eval_start: Literal["random", "first"] = "random",
        augment_frames: int = 0,
    ) -> None:
        if sampling not in ("clip", "frames", "video"):
            raise ValueError(f"sampling must be 'clip', 'frames' or 'video', got {sampling!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if period is not None and target_fps is not None and period != 1:
            raise ValueError("give either period or target fps, not both")
        if eval_start not in ("random", "first"):
            raise ValueError(f"eval_start must be 'random' or 'first', got {eval_start!r}")
        if augment_frames < 0 or (augment_frames and sampling != "frames"):
            raise ValueError(f"augment_frames ({augment_frames}) must be ≥ 0, and > 0 only with sampling='frames'")
        self.records = list(records)
        self.sampling = sampling
        self.clip_length = clip_length
        self.period = period
        self.target_fps = target_fps
        self.num_frames = num_frames
        self.pad: PadMode = pad
        self.channels = channels
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        self.eval_seed = eval_seed
        self.eval_start = eval_start
        self.augment_frames = augment_frames
        self._index_patients()

    def _index_patients(self) -> None:
        self.patient_ids = [patient_id(record.patient) for record in self.records]
        self.patient_names = {pid: record.patient for pid, record in zip(self.patient_ids, self.records, strict=True)}

    def with_records(self, records: Sequence[VideoRecord]) -> EchoNetVideoDataset:
        """The same dataset (settings, class) over other records; ``index`` then refers to the new list."""
        clone = copy.copy(self)
        clone.records = list(records)
        clone._index_patients()
        return clone

    def __len__(self) -> int:
        return len(self.records)

    def generator(self, key: int | SampleKey, stream: int) -> np.random.Generator:
        """The random stream ``stream`` of item ``key``: from (seed, epoch, index) in training, (eval_seed, index)
        otherwise."""
        if isinstance(key, tuple | list):
            index, seed, epoch = (int(k) for k in key)
            return np.random.default_rng((seed, epoch, index, _TRAIN_STREAM, stream))
        return np.random.default_rng((self.eval_seed, int(key), _EVAL_STREAM, stream))

    def frame_plan(self, key: int | SampleKey) -> tuple[np.ndarray, float]:
        """Source frame indices of item ``key`` (-1 = pad frame) and the fps of the returned frames."""
        record = self.records[key_index(key)]
        rng = self.generator(key, _PLAN_STREAM)
        if self.sampling == "frames":
            return frame_sample_indices(record.num_frames, self.num_frames, rng), record.fps
        step = resolve_step(record.fps, self.period, self.target_fps)
        if self.sampling == "video":  # every position round(i * step) inside the video
            length = math.ceil((record.num_frames - 0.5) / step)
            return clip_indices(record.num_frames, length, step, 0, self.pad), record.fps / step
        start = int(rng.integers(0, max_clip_start(record.num_frames, self.clip_length, step) + 1))
        if self.eval_start == "first" and not isinstance(key, tuple | list):
            start = 0
        return clip_indices(record.num_frames, self.clip_length, step, start, self.pad), record.fps / step

    def load_frames(self, key: int | SampleKey, frame_indices: np.ndarray) -> torch.Tensor:
        """The frames ``frame_indices`` of item ``key`` as float32 ``(n, C, H, W)`` in [-1, 1]."""
        record = self.records[key_index(key)]
        video = to_model_range(read_video(record.path, gray=self.channels == 1, indices=frame_indices))
        if self.size is not None and tuple(video.shape[-2:]) != self.size:
            video = F.interpolate(video, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            video = video.clamp_(-1.0, 1.0)
        return video

    def _planned_frames(self, key: int | SampleKey) -> tuple[torch.Tensor, float]:
        plan, fps = self.frame_plan(key)
        present = plan >= 0
        frames = self.load_frames(key, plan[present])
        if present.all():
            return frames, fps
        video = torch.full((len(plan), *frames.shape[1:]), self.pad_value, dtype=frames.dtype)
        video[torch.from_numpy(present)] = frames
        return video, fps

    def __getitem__(self, key: int | SampleKey) -> dict[str, torch.Tensor]:
        index = key_index(key)
        record = self.records[index]
        try:
            video, fps = self._planned_frames(key)
        except ShortVideoError as err:
            # The FileList overstated the length (verify="decode" would have caught it at setup): plan again on the
            # decoded length rather than stop a long run inside a worker.
            warnings.warn(f"{err}; using {err.decoded} frames (FileList line {record.line})", stacklevel=2)
            self.records[index] = dataclasses.replace(record, num_frames=err.decoded)
            video, fps = self._planned_frames(key)
        item = {
            "video": video,
            "ef": torch.tensor(record.ef, dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
            "patient": torch.tensor(self.patient_ids[index], dtype=torch.int64),
            "fps": torch.tensor(fps, dtype=torch.float32),
        }
        if self.augment_frames and isinstance(key, tuple | list):  # training items only
            item["augmented"] = self.augmented(key, video)
        return item

    def augment_source(self, key: SampleKey, video: torch.Tensor) -> torch.Tensor:
        """The pixel frames ``augment_frames`` transforms: the item's first ones (here the item is in pixels)."""
        return video[:self.augment_frames]

    def augmented(self, key: SampleKey, video: torch.Tensor) -> torch.Tensor:
        """``augment_frames`` pixel frames ``(A, C, H, W)`` in [-1, 1]: the item's first frames, each under its own
        random :class:`~datamodules.augment.FrameTransform` drawn from the item's key (reproducible like the
        frames). Near-copies of the item as extra positives for the re-identification model."""
        from datamodules.augment import FrameTransform

        rng = self.generator(key, _AUGMENT_STREAM)
        source = self.augment_source(key, video)
        frames = [FrameTransform.random(rng).apply(frame[None], torch.Generator().manual_seed(int(rng.integers(2**62))))
                  for frame in source]
        return torch.cat(frames)
