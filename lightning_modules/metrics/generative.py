"""FID, IS and FVD with the feature extractors the field publishes them with (StyleGAN-V's protocol, which
EchoNet-Synthetic reports: FID 28.8, FVD16 103.5, FVD128 280.2, IS 2.26 for its LVDM).

The extractors are TorchScript files the user downloads once and gives by path; nothing is fetched at run time, and
no other network stands in for a missing one (a Fréchet distance in another feature space is another number):

- **Inception**: StyleGAN2-ADA's ``inception-2015-12-05.pt`` (:data:`INCEPTION_URL`), a TorchScript translation of
  TensorFlow's Inception v3. It takes uint8 frames ``(N, 3, H, W)`` and resizes them to 299² itself. FID uses its 2048
  pool features (``return_features=True``), IS its 1008 class probabilities without the output bias
  (``no_output_bias=True``), as StyleGAN-V's ``fid50k_full`` and ``is50k`` call it.
- **I3D**: StyleGAN-V's ``i3d_torchscript.pt`` (:data:`I3D_URL`), the Kinetics-400 I3D of the original FVD. It takes
  clips ``(N, 3, T, H, W)`` with values in [0, 255]; ``rescale=True, resize=True`` map them to [-1, 1] and 224², and
  FVD uses its 400 features (``return_features=True``), as StyleGAN-V's ``fvd2048_16f`` calls it.

``torch.jit.load`` reads a TorchScript archive (code and tensors); it does not unpickle arbitrary Python objects.

The metrics are torchmetrics' (``FrechetInceptionDistance`` with these extractors, states summed across processes);
two details differ from StyleGAN-V's numpy code and are kept, documented: covariances divide by N − 1 (StyleGAN-V:
N; a relative change of 1/N, 0.05 % at 2048 clips), and IS is computed by :class:`OrderedInceptionScore` as StyleGAN-V
does (ten splits in sample order, population standard deviation) rather than by torchmetrics' ``compute``, which
shuffles with the global random generator.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities.data import dim_zero_cat

from datamodules.errors import UserInputError

log = logging.getLogger(__name__)

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_MIN_FRAMES = 9  # the Kinetics I3D's temporal pooling needs at least this many frames (named in errors)


@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    option: str
    url: str
    arguments: tuple[str, ...]  # keyword arguments its forward must take

    def missing(self, path: Path | None) -> str:
        return (f"{self.name} weights not found at {path}: download {self.url} once (the field's TorchScript file) "
                f"and give its path ({self.option} to evaluate, {self.option[2:]}: to CoverageCallback); nothing is "
                "downloaded at run time")


INCEPTION = ExtractorSpec("Inception", "--inception", INCEPTION_URL, ("return_features", "no_output_bias"))
I3D = ExtractorSpec("I3D", "--i3d", I3D_URL, ("rescale", "resize", "return_features"))


def load_extractor(path: str | Path | None, spec: ExtractorSpec, device: str | torch.device = "cpu"):
    """The TorchScript extractor at ``path``, checked to take ``spec``'s arguments; a clear error otherwise."""
    path = None if path is None else Path(path)
    if path is None or not path.is_file():
        raise UserInputError(spec.missing(path))
    try:
        with warnings.catch_warnings():  # the field publishes these as TorchScript: there is no other format to read
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated", category=DeprecationWarning)
            network = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{path}: not a TorchScript archive ({first}); {spec.option} takes the TorchScript file "
                             f"{spec.url}, not a pickle or a state dict") from err
    arguments = [argument.name for argument in network.forward.schema.arguments][1:]
    if any(name not in arguments for name in spec.arguments):
        raise UserInputError(f"{path}: its forward takes ({', '.join(arguments)}), not the {spec.name} interface "
                             f"({', '.join(spec.arguments)}); {spec.option} takes {spec.url}")
    return network.eval()


def file_checksum(path: str | Path) -> str:
    """SHA-256 of a file (the record of which extractor weights a number came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Adapter(nn.Module):
    """One way of calling a TorchScript extractor; ``num_features`` is measured on a probe input of the shape the
    metric will feed it, so an extractor that cannot take that input fails here, with the shape in the message."""

    def __init__(self, network, probe: torch.Tensor) -> None:
        super().__init__()
        self.network = network
        try:
            with torch.no_grad():
                self.num_features = int(self(probe).shape[-1])
        except (RuntimeError, torch.jit.Error) as err:  # TorchScript's message ends with the error raised inside
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            hint = f" (the Kinetics I3D needs at least {I3D_MIN_FRAMES} frames)" if probe.ndim == 5 else ""
            raise UserInputError(f"the {type(self).__name__} extractor fails on an input of shape "
                                 f"{tuple(probe.shape)}{hint}: {last}") from err


class InceptionFeatures(_Adapter):
    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, H, W) → (N, 2048)
        return self.network(frames, return_features=True)


class InceptionProbabilities(_Adapter):
    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, H, W) → (N, 1008) probabilities
        return self.network(frames, no_output_bias=True)


class I3DFeatures(_Adapter):
    def forward(self, clips: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, T, H, W) → (N, 400)
        return self.network(clips.float(), rescale=True, resize=True, return_features=True)


class TooFewFrames(ValueError):
    """Fewer frames than IS has splits."""


class OrderedInceptionScore(InceptionScore):
    """IS as StyleGAN-V's ``is50k`` computes it: ``splits`` consecutive parts in sample order, exp of the mean KL
    divergence of each sample's class probabilities from its part's mean, then the mean and population standard
    deviation over parts. torchmetrics' state of every sample's probabilities, plus each sample's place in the order
    (``update(images, order)``; default: the order of the calls), both concatenated across processes (torchmetrics'
    own list state is gathered element by element, which deadlocks when processes hold different numbers of batches),
    so the parts are the same in one process or several."""

    def __init__(self, feature: nn.Module, splits: int = 10) -> None:
        super().__init__(feature, splits=splits)
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("order", [], dist_reduce_fx="cat")
        self._fed = 0

    def update(self, imgs: torch.Tensor, order: torch.Tensor | None = None) -> None:
        if order is None:
            order = torch.arange(self._fed, self._fed + imgs.shape[0], device=imgs.device)
        self._fed += imgs.shape[0]
        self.features.append(self.inception(imgs))
        self.order.append(order.to(imgs.device, torch.float64))  # float64: exact for integers below 2**53

    def reset(self) -> None:
        super().reset()
        self._fed = 0

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = dim_zero_cat(self.features).double()[torch.argsort(dim_zero_cat(self.order), stable=True)]
        count = probabilities.shape[0]
        if count < self.splits:
            raise TooFewFrames(f"IS needs at least {self.splits} frames (one per split), got {count}")
        scores = []
        for part in range(self.splits):
            p = probabilities[part * count // self.splits:(part + 1) * count // self.splits]
            kl = torch.xlogy(p, p) - p * p.mean(dim=0, keepdim=True).log()
            scores.append(kl.sum(dim=1).mean().exp())
        scores = torch.stack(scores)
        return scores.mean(), scores.std(unbiased=False)


def rgb(videos: torch.Tensor) -> torch.Tensor:
    """uint8 videos ``(B, T, C, H, W)`` with C = 1 or 3 → ``(B, T, 3, H, W)`` (grey repeated, as StyleGAN-V does)."""
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 videos (B, T, 1 or 3, H, W), got {videos.dtype} {tuple(videos.shape)}")
    return videos.expand(-1, -1, 3, -1, -1) if videos.shape[2] == 1 else videos


class GenerativeMetrics(nn.Module):
    """FID and IS over every frame, FVD over the first L frames of each video for each L in ``fvd_lengths``, of
    uint8 videos ``(B, T, C, H, W)``. The real set's statistics are kept across :meth:`reset_synthetic`, so one
    reference serves several synthetic (or held-out real) sets.

    ``inception``/``i3d``: loaded extractors (:func:`load_extractor`) or None to leave their metrics out.
    ``frame_size``: ``(H, W)`` of the videos (for the probes that measure the feature sizes).
    """

    def __init__(self, inception=None, i3d=None, *, fvd_lengths: tuple[int, ...] = (16,),
                 frame_size: tuple[int, int] = (112, 112), is_splits: int = 10) -> None:
        super().__init__()
        if inception is None and i3d is None:
            raise ValueError("GenerativeMetrics needs an Inception or an I3D extractor")
        self.fvd_lengths = tuple(sorted({int(length) for length in fvd_lengths})) if i3d is not None else ()
        if any(length < 1 for length in self.fvd_lengths):
            raise UserInputError(f"FVD clip lengths must be ≥ 1, got {fvd_lengths}")
        self.fid = self.inception_score = None
        frame = torch.zeros(1, 3, *frame_size, dtype=torch.uint8)
        with warnings.catch_warnings():  # torchmetrics warns that IS keeps every sample's probabilities: it must
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            if inception is not None:
                self.fid = FrechetInceptionDistance(InceptionFeatures(inception, frame), reset_real_features=False)
                self.inception_score = OrderedInceptionScore(InceptionProbabilities(inception, frame),
                                                             splits=is_splits)
        self.fvd = nn.ModuleDict()
        for length in self.fvd_lengths:  # one adapter, probed at the shortest clip length
            if length == self.fvd_lengths[0]:
                adapter = I3DFeatures(i3d, torch.zeros(1, 3, length, *frame_size, dtype=torch.uint8))
            self.fvd[str(length)] = FrechetInceptionDistance(adapter, reset_real_features=False)

    @property
    def frames_needed(self) -> int:
        """Frames per video the FVD clips need (0 without I3D)."""
        return max(self.fvd_lengths, default=0)

    def update(self, videos: torch.Tensor, real: bool, order: torch.Tensor | None = None) -> None:
        """Add uint8 videos ``(B, T, C, H, W)`` to the real or the synthetic set. ``order``: each video's place in
        the synthetic set (IS splits in that order; default: the order of the calls)."""
        videos = rgb(videos)
        if videos.shape[1] < self.frames_needed:
            raise ValueError(f"FVD{self.frames_needed} needs clips of {self.frames_needed} frames, got "
                             f"{videos.shape[1]}")
        if self.fid is not None:
            frames = videos.flatten(0, 1)
            self.fid.update(frames, real=real)
            if not real:
                steps = torch.arange(videos.shape[1], device=videos.device)
                self.inception_score.update(frames, None if order is None else
                                            (order.to(videos.device)[:, None] * videos.shape[1] + steps).flatten())
        for length, metric in zip(self.fvd_lengths, self.fvd.values()):
            metric.update(videos[:, :length].permute(0, 2, 1, 3, 4).contiguous(), real=real)

    def reset_synthetic(self) -> None:
        """Forget the synthetic set; the real set's statistics stay."""
        for metric in (self.fid, self.inception_score, *self.fvd.values()):
            if metric is not None:
                metric.reset()

    def compute(self) -> dict[str, float]:
        values = {}
        if self.fid is not None:
            values["fid"] = float(self.fid.compute())
            try:
                mean, std = self.inception_score.compute()
                values.update({"is": float(mean), "is_std": float(std)})
            except TooFewFrames as err:  # e.g. a small validation split as the ground-truth row
                log.warning("IS left out: %s", err)
        for length, metric in zip(self.fvd_lengths, self.fvd.values()):
            values[f"fvd{length}"] = float(metric.compute())
        return values


def long_enough(dataset, length: int) -> list[int]:
    """Rows of an :class:`~datamodules.dataset.EchoNetVideoDataset` whose video holds a clip of ``length`` frames at
    the dataset's period or fps without padding (StyleGAN-V discards shorter videos: a padded clip is not a video);
    every row when the dataset serves frames rather than clips."""
    from datamodules.clips import clip_span
    from datamodules.dataset import resolve_step

    if dataset.sampling != "clip":
        return list(range(len(dataset.records)))
    return [row for row, record in enumerate(dataset.records)
            if record.num_frames >= clip_span(length, resolve_step(record.fps, dataset.period, dataset.target_fps))]


def measure_dataset(metrics: GenerativeMetrics, dataset, *, real: bool, limit: int | None = None,
                    batch_size: int = 8, device: str | torch.device = "cpu",
                    shard: tuple[int, int] = (0, 1)) -> dict[str, int]:
    """Feed the first ``limit`` long-enough videos of ``dataset`` (pixels in [-1, 1]) to ``metrics`` as the real or
    the synthetic set; returns how many were used and how many were too short. ``shard = (rank, world size)``: this
    process feeds videos rank, rank + world size, … of them (torchmetrics sums the states across processes)."""
    from torch.utils.data import DataLoader, Subset

    from lightning_modules.image_logging import to_uint8

    rows = long_enough(dataset, dataset.clip_length)
    used = rows[:limit] if limit is not None else rows
    rank, world = shard
    places = torch.arange(len(used))[rank::world]  # each video's place in the set: IS splits the same in any sharding
    # A subset keeps each video's row: evaluation clip positions are drawn from it, so a shard reads the same clips
    loader = DataLoader(Subset(dataset, used[rank::world]), batch_size=batch_size)
    with torch.no_grad():
        for batch_places, batch in zip(places.split(batch_size), loader):
            metrics.update(to_uint8(batch["video"]).to(device), real=real, order=batch_places)
    return {"videos": len(used), "too_short": len(dataset.records) - len(rows)}
