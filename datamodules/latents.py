"""The latent cache: VAE posteriors of every video, one safetensors file per video, and the dataset that reads them.

An entry ``<cache>/<FileName stem>.safetensors`` holds ``mean`` and ``logvar`` float16 ``(T, 4, h, w)`` (the unscaled
posterior of every frame) and string metadata: the checksum of the VAE weights that encoded it, the latent scaling
factor, fps, frame count, and the source video's size and mtime. safetensors is memory-mapped and sliceable, so a clip
reads only its own frames; it holds no code, so a downloaded cache is safe to open.

An entry is *up to date* when it exists, was written by the expected VAE and its source video has not changed since.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from datamodules.dataset import NOISE_STREAM, EchoNetVideoDataset, key_index, to_model_range
from datamodules.filelist import VideoRecord
from datamodules.sampler import SampleKey
from datamodules.video_io import atomic_output, read_video

FORMAT_VERSION = "1"
ENCODE_COMMAND = ("echo-lvdm predict --config configs/data/<dataset>.yaml --config configs/vae_encode.yaml "
                  "--ckpt_path <vae checkpoint>")


@dataclass(frozen=True)
class LatentEntryMeta:
    """Metadata stored with each cache entry (safetensors metadata is str → str)."""

    vae_checksum: str
    scaling_factor: float
    fps: float
    num_frames: int
    source_size: int
    source_mtime_ns: int

    def to_strings(self) -> dict[str, str]:
        return {"format": FORMAT_VERSION, **{k: str(v) for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> LatentEntryMeta:
        if values.get("format") != FORMAT_VERSION:
            raise ValueError(f"cache format {values.get('format')!r}, expected {FORMAT_VERSION!r}")
        return cls(values["vae_checksum"], float(values["scaling_factor"]), float(values["fps"]),
                   int(values["num_frames"]), int(values["source_size"]), int(values["source_mtime_ns"]))


def entry_path(cache_dir: str | Path, record: VideoRecord) -> Path:
    return Path(cache_dir) / f"{Path(record.file_name).stem}.safetensors"


def source_signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def write_entry(path: Path, mean: torch.Tensor, logvar: torch.Tensor, meta: LatentEntryMeta) -> None:
    """Write one entry atomically (a killed writer leaves no entry under ``path``)."""
    if mean.shape != logvar.shape or mean.ndim != 4 or mean.shape[0] != meta.num_frames:
        raise ValueError(f"{path}: mean/logvar must be (T={meta.num_frames}, C, h, w), got {tuple(mean.shape)} "
                         f"and {tuple(logvar.shape)}")
    tensors = {"mean": mean.detach().to("cpu", torch.float16).contiguous(),
               "logvar": logvar.detach().to("cpu", torch.float16).contiguous()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta.to_strings())


def read_meta(path: Path) -> LatentEntryMeta | None:
    """The entry's metadata, or None when there is no readable entry."""
    try:
        with safe_open(str(path), "pt") as handle:
            return LatentEntryMeta.from_strings(handle.metadata() or {})
    except (OSError, ValueError, KeyError, RuntimeError):  # missing, truncated, foreign or old-format file
        return None


def entry_problem(cache_dir: str | Path, record: VideoRecord, vae_checksum: str | None) -> str | None:
    """Why the entry of ``record`` is not usable (None when it is up to date).

    ``vae_checksum=None`` accepts any VAE (the caller then checks that all entries agree).
    """
    meta = read_meta(entry_path(cache_dir, record))
    if meta is None:
        return "no latent cache entry"
    if vae_checksum is not None and meta.vae_checksum != vae_checksum:
        return f"encoded by another VAE (checksum {meta.vae_checksum[:12]}…, expected {vae_checksum[:12]}…)"
    if record.path.exists() and source_signature(record.path) != (meta.source_size, meta.source_mtime_ns):
        return "source video changed since it was encoded"
    return None


def read_frames(path: Path, frame_indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``logvar`` float32 ``(n, C, h, w)`` of the frames ``frame_indices``, reading only their span."""
    low, high = int(frame_indices.min()), int(frame_indices.max()) + 1
    local = torch.from_numpy(frame_indices - low)
    with safe_open(str(path), "pt") as handle:
        mean = handle.get_slice("mean")[low:high]
        logvar = handle.get_slice("logvar")[low:high]
    return mean[local].float(), logvar[local].float()


class EchoNetLatentDataset(EchoNetVideoDataset):
    """The batch contract served from the latent cache: ``video`` is float32 ``(T, 4, h, w)``.

    Same clip planning, keys and padding rules as pixel space (pad frames are 0, the latent mean). ``posterior``:
    ``"sample"`` draws ``mean + exp(logvar / 2) · ε`` with ε fixed by the item key (reproducible like the clips), or
    ``"mean"``. ``scaled`` multiplies by the VAE's scaling factor (what diffusion models train on).
    """

    pad_value = 0.0

    def __init__(self, records: Sequence[VideoRecord], cache_dir: str | Path, *, scaling_factor: float,
                 posterior: str = "sample", scaled: bool = True, **kwargs) -> None:
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
        if kwargs.get("size") is not None:
            raise ValueError("size (resizing) applies to pixel space only; the latent size is fixed by the VAE")
        super().__init__(records, **kwargs)
        self.cache_dir = Path(cache_dir)
        self.scaling_factor = scaling_factor
        self.posterior = posterior
        self.scaled = scaled

    def load_frames(self, key: int | SampleKey, frame_indices: np.ndarray) -> torch.Tensor:
        mean, logvar = read_frames(entry_path(self.cache_dir, self.records[key_index(key)]), frame_indices)
        latents = mean
        if self.posterior == "sample":
            noise = self.generator(key, NOISE_STREAM).standard_normal(mean.shape, dtype=np.float32)
            latents = mean + torch.exp(0.5 * logvar) * torch.from_numpy(noise)
        return latents * self.scaling_factor if self.scaled else latents

    def augment_source(self, key: SampleKey, video: torch.Tensor) -> torch.Tensor:
        """The item's first ``augment_frames`` frames read in pixels from the source video (the model encodes their
        transformed copies with the VAE that wrote this cache)."""
        plan, _ = self.frame_plan(key)
        return to_model_range(read_video(self.records[key_index(key)].path, gray=self.channels == 1,
                                         indices=plan[:self.augment_frames]))


def cached_records(records: Sequence[VideoRecord], cache_dir: str | Path,
                   vae_checksum: str | None) -> tuple[list[VideoRecord], float, list[tuple[VideoRecord, str]]]:
    """Records with frame count and fps taken from their cache entries, the cache's scaling factor, and the records
    whose entries are missing or stale (with why). All entries must come from one VAE."""
    usable, problems, metas = [], [], {}
    for record in records:
        problem = entry_problem(cache_dir, record, vae_checksum)
        if problem:
            problems.append((record, problem))
            continue
        meta = read_meta(entry_path(cache_dir, record))
        metas.setdefault(meta.vae_checksum, []).append(record)
        usable.append(dataclasses.replace(record, num_frames=meta.num_frames, fps=meta.fps))
    if len(metas) > 1:
        by_vae = ", ".join(f"{checksum[:12]}… ({len(rows)} videos)" for checksum, rows in metas.items())
        problems += [(record, f"cache mixes entries of {len(metas)} VAEs: {by_vae}") for record in usable]
    factor = read_meta(entry_path(cache_dir, usable[0])).scaling_factor if usable else math.nan
    return usable, factor, problems
