"""The privacy audit: does the filter catch near-copies of training videos, and how often does it flag new patients?

A memorising generator leaks near-copies, not byte copies: a training video shifted, turned, rescaled, noisier,
brighter or blurrier, started later or re-timed, re-encoded. The audit builds such *canaries* from ``K`` training
videos — each transform alone at several magnitudes, and combined (:data:`DEFAULT_CANARIES`) — writes each one as the
synthetic writer writes a video (MJPEG AVI at the protocol's frame rate), reads it back and scores what was read
against every training video under the filter's protocol, exactly as
:class:`~callbacks.synthetic_writer.SyntheticDatasetWriter` scores its attempts. Held-out real videos (patients the
model never saw, and that did not calibrate τ) go through the same path: the share of them above τ is the filter's
false-flag rate.

Canaries live in a temporary folder deleted when the audit ends — also when its process is killed, by a watchdog
process that waits on a pipe from it (:func:`scratch_folder`). Results hold scores and ordinal canary numbers, never
training file names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.augment import FrameTransform
from datamodules.clips import clip_indices, max_clip_start
from datamodules.dataset import to_model_range
from datamodules.video_io import read_video, write_video
from lightning_modules.protocols import Protocol


@dataclass(frozen=True)
class Canary:
    """A near-copy recipe: ``transform`` on every frame, the clip started ``start`` of the video later and sampled
    at ``rate`` × the protocol's frame step (re-timed), written once, and ``reencode``: read back and written again
    at this MJPEG quality (2 is the writer's; larger is lossier)."""

    kind: str
    magnitude: str
    transform: FrameTransform = field(default_factory=FrameTransform)
    start: float = 0.0
    rate: float = 1.0
    reencode: int | None = None
    shift: float = 0.0  # pixels, in a direction that turns from one source video to the next

    @property
    def name(self) -> str:
        return self.kind if not self.magnitude else f"{self.kind} {self.magnitude}"

    def transform_for(self, number: int) -> FrameTransform:
        """The frame transform for the ``number``-th source video: ``shift`` pixels at ``number`` golden angles."""
        if not self.shift:
            return self.transform
        angle = number * math.pi * (3.0 - math.sqrt(5.0))
        return dataclasses.replace(self.transform, shift=(self.shift * math.cos(angle), self.shift * math.sin(angle)))


def _canaries() -> list[Canary]:
    T = FrameTransform
    rows = [Canary("exact", "")]
    rows += [Canary("shift", f"{m:g} px", shift=m) for m in (0.5, 1.0, 2.0, 4.0)]
    rows += [Canary("rotate", f"{m:g}°", T(rotate=m)) for m in (2.0, 5.0)]
    rows += [Canary("scale", f"×{m:g}", T(scale=m)) for m in (0.95, 1.05)]
    rows += [Canary("noise", f"σ {m:g}", T(noise=m)) for m in (4.0, 8.0)]
    rows += [Canary("gain", f"×{m:g}", T(gain=m)) for m in (0.9, 1.1)]
    rows += [Canary("gamma", f"{m:g}", T(gamma=m)) for m in (0.9, 1.1)]
    rows += [Canary("blur", f"σ {m:g} px", T(blur=m)) for m in (0.5, 1.0)]
    rows += [Canary("later start", f"+{m:g} video", start=m) for m in (0.25, 0.5)]
    rows += [Canary("frame rate", f"×{m:g}", rate=m) for m in (0.8, 1.25)]
    rows += [Canary("re-encode", f"q {m}", reencode=m) for m in (5, 10)]
    rows.append(Canary("combined", "", T(rotate=2.0, scale=1.03, blur=0.5, gain=1.05, gamma=0.95, noise=4.0),
                       start=0.25, rate=1.25, reencode=5, shift=2.0))
    return rows


DEFAULT_CANARIES: tuple[Canary, ...] = tuple(_canaries())
COMBINED = "combined"
# A filter passes when every single transform's recall is ≥ floor, the combination's ≥ combined_floor, and at most
# max_false_flags of held-out real videos are flagged (τ's q = 0.95 implies about 0.05).
DEFAULT_FLOORS = dict(floor=0.99, combined_floor=0.95, max_false_flags=0.10)


@contextlib.contextmanager
def scratch_folder(parent: str | Path | None = None, prefix: str = "echo-lvdm-canaries-") -> Iterator[Path]:
    """A temporary folder removed on exit — and, through a watchdog process in its own session that waits for this
    process's end of a pipe to close, also when this process is killed (SIGKILL included)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    watchdog = subprocess.Popen(
        [sys.executable, "-c", "import shutil, sys; sys.stdin.buffer.read(); shutil.rmtree(sys.argv[1], True)",
         str(path)], stdin=subprocess.PIPE, start_new_session=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=30)


def canary_clip(num_frames: int, length: int, step: float, start: int, canary: Canary) -> np.ndarray:
    """Source frame indices of ``canary``'s clip from a video of ``num_frames``: ``length`` frames at ``step`` ×
    ``canary.rate`` from ``start`` + ``canary.start`` of the video, clamped to the last possible start."""
    step = step * canary.rate
    later = start + int(round(canary.start * num_frames))
    return clip_indices(num_frames, length, step, min(later, max_clip_start(num_frames, length, step)), "reflect")


def make_canary(video: np.ndarray, canary: Canary, *, length: int, step: float, start: int, number: int,
                generator: torch.Generator) -> np.ndarray:
    """uint8 ``(T, H, W[, 3])`` source video → the canary's uint8 frames before writing (``number``: the source's
    ordinal, which turns the shift's direction)."""
    frames = to_model_range(video[canary_clip(len(video), length, step, start, canary)])
    frames = canary.transform_for(number).apply(frames, generator)
    array = ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = array[:, 0] if array.shape[1] == 1 else array.permute(0, 2, 3, 1)
    return np.ascontiguousarray(array.numpy())


def write_canary(path: Path, frames: np.ndarray, fps: float, canary: Canary) -> np.ndarray:
    """Write as the synthetic writer writes, read back (and re-encode when asked): the frames the filter sees."""
    gray = frames.ndim == 3
    written = read_video(write_video(path, frames, fps=fps), gray=gray)
    if canary.reencode is not None:
        written = read_video(write_video(path, written, fps=fps, quality=canary.reencode), gray=gray)
    path.unlink()
    return written


def as_model_input(frames: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    video = to_model_range(frames)
    if size is not None and tuple(video.shape[-2:]) != tuple(size):
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    return video


@dataclass
class AuditResult:
    """Every canary's and held-out video's best score, with what the audit needs to summarise them."""

    tau: float
    protocol: str
    canaries: list[dict[str, Any]]  # Canary, Kind, Magnitude, Source (ordinal), Score, Flagged, BestIsSource
    heldout_scores: list[float]
    calibration: dict[str, Any] | None = None
    sources: int = 0

    def recall(self) -> dict[str, dict[str, Any]]:
        """Per canary name: count, flagged, recall, and how many had their own source as best match."""
        table: dict[str, dict[str, Any]] = {}
        for row in self.canaries:
            entry = table.setdefault(row["Canary"], {"kind": row["Kind"], "magnitude": row["Magnitude"], "canaries": 0,
                                                    "flagged": 0, "best_is_source": 0})
            entry["canaries"] += 1
            entry["flagged"] += int(row["Flagged"])
            entry["best_is_source"] += int(row["BestIsSource"])
        for entry in table.values():
            entry["recall"] = entry["flagged"] / entry["canaries"]
        return table

    def summary(self, *, floor: float, combined_floor: float, max_false_flags: float) -> dict[str, Any]:
        recall = self.recall()
        single = [entry["recall"] for name, entry in recall.items() if entry["kind"] != COMBINED]
        combined = [entry["recall"] for name, entry in recall.items() if entry["kind"] == COMBINED]
        heldout = np.asarray(self.heldout_scores, dtype=np.float64)
        flagged = int((heldout > self.tau).sum())
        false_flags = {"videos": len(heldout), "flagged": flagged,
                       "rate": flagged / len(heldout) if len(heldout) else math.nan,
                       "interval_95": list(wilson_interval(flagged, len(heldout)))}
        promised = None
        if self.calibration is not None:
            promised = promised_false_flags(int(self.calibration["heldout_videos"]),
                                            float(self.calibration["quantile"]),
                                            self.calibration.get("rule", "linear"), heldout=len(heldout),
                                            max_false_flags=max_false_flags)
        failures = []
        if single and min(single) < floor:
            worst = min((entry for entry in recall.values() if entry["kind"] != COMBINED), key=lambda e: e["recall"])
            failures.append(f"recall {worst['recall']:.2f} < {floor:g} for {worst['kind']} {worst['magnitude']}")
        if combined and min(combined) < combined_floor:
            failures.append(f"combined recall {min(combined):.2f} < {combined_floor:g}")
        recall_passed = not failures  # the privacy question: are near-copies caught?
        if len(heldout) and false_flags["rate"] > max_false_flags:
            chance = (promised or {}).get("chance_over_floor")
            by_chance = (f" (a τ that keeps its promise shows this on {len(heldout)} videos with chance "
                         f"{chance:.2f})" if chance is not None else "")
            failures.append(f"held-out false flags {false_flags['rate']:.2f} > {max_false_flags:g}{by_chance}")
        return {"passed": not failures, "recall_passed": recall_passed, "failures": failures, "tau": self.tau,
                "protocol": self.protocol,
                "calibration": self.calibration, "sources": self.sources, "canaries": len(self.canaries),
                "min_single_recall": min(single) if single else None,
                "combined_recall": min(combined) if combined else None,
                "floors": {"single": floor, "combined": combined_floor, "max_false_flags": max_false_flags},
                "recall": recall, "heldout_false_flags": false_flags, "promised_false_flags": promised}


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default); (nan, nan) without trials."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def promised_false_flags(n: int, quantile: float, rule: str = "conformal", draws: int = 200_000, *,
                         heldout: int = 0, max_false_flags: float | None = None) -> dict[str, Any]:
    """What a τ at ``quantile`` of ``n`` held-out scores promises for a new real video of the same kind.

    For exchangeable scores the chance that a new one exceeds the k-th smallest of n is Beta(n + 1 − k, k)-distributed
    with mean (n + 1 − k)/(n + 1). The conformal τ is the k-th, k = ⌈(n + 1)q⌉; the linear one interpolates above the
    k-th, k = ⌊q(n − 1)⌋ + 1, so that Beta bounds it from above. Returns the mean and a 90 % interval (seeded Monte
    Carlo): with n = 18 and q = 0.95 the linear τ promises up to 0.105 on average, not 0.05.

    With ``heldout`` videos and a floor ``max_false_flags``, also ``chance_over_floor``: how often a filter that keeps
    this promise still shows more than the floor on that many videos (at most, for the linear τ) — the power of the
    false-flag check. With 18 calibration and 18 held-out videos at q 0.95 it is 0.24: one run in four fails the 0.10
    floor by chance; with 36 and 36, 0.06.
    """
    if rule == "conformal":
        k = min(n, math.ceil((n + 1) * quantile - 1e-9))
    else:
        k = min(n, math.floor(quantile * (n - 1)) + 1)
    samples = np.random.default_rng(0).beta(n + 1 - k, k, size=draws) if n > 0 else np.array([math.nan])
    promise = {"calibration_videos": n, "quantile": quantile, "rule": rule, "nominal": 1.0 - quantile,
               "mean_at_most": (n + 1 - k) / (n + 1) if n > 0 else math.nan,
               "interval_90": [float(np.quantile(samples, 0.05)), float(np.quantile(samples, 0.95))]}
    if heldout > 0 and max_false_flags is not None and n > 0:
        promise["heldout_videos"] = heldout
        promise["chance_over_floor"] = beta_binomial_tail(heldout, n + 1 - k, k, math.floor(max_false_flags * heldout
                                                                                              + 1e-9) + 1)
    return promise


def beta_binomial_tail(trials: int, a: float, b: float, at_least: int) -> float:
    """P(K ≥ ``at_least``) for K ~ BetaBinomial(``trials``, a, b): flags among ``trials`` new videos when each is
    flagged with a Beta(a, b)-distributed chance (the same for all, as one τ serves them all)."""
    def log_beta(x: float, y: float) -> float:
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    return float(sum(math.exp(math.lgamma(trials + 1) - math.lgamma(j + 1) - math.lgamma(trials - j + 1)
                              + log_beta(j + a, trials - j + b) - log_beta(a, b))
                     for j in range(max(0, at_least), trials + 1)))


def run_audit(encoder, reid, bank, tau: float, protocol: Protocol, train_records: Sequence, *,
              heldout_records: Sequence = (), sources: int = 24, canaries: Sequence[Canary] = DEFAULT_CANARIES,
              seed: int = 0, size: tuple[int, int] | None = None, batch_size: int = 8,
              scratch: str | Path | None = None, calibration: dict[str, Any] | None = None,
              progress=None) -> AuditResult:
    """Score ``canaries`` of ``sources`` training videos and every held-out video under ``protocol`` (a clip
    protocol: the synthetic writer's) against ``bank`` (the training videos embedded under it; row i =
    ``train_records[i]``), with τ. ``encoder``: what embeds pixel videos (:class:`EncodedReID`)."""
    if protocol.kind != "clip":
        raise ValueError(f"the privacy audit scores videos as the synthetic writer does, under a clip protocol; "
                         f"got {protocol.name}")
    if len(bank) != len(train_records):
        raise ValueError(f"bank has {len(bank)} videos but {len(train_records)} training records were given")
    channels = encoder.vae.config.in_channels if encoder.vae is not None else reid.hparams.in_channels
    gray = int(channels) == 1
    chosen = canary_sources(len(train_records), sources, seed)
    bank_embedding, bank_index = bank.embedding.to(encoder.device), bank.index.tolist()
    rows: list[dict[str, Any]] = []
    heldout_scores: list[float] = []
    pending: list[tuple[dict[str, Any] | None, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():  # one video at a time: sizes may differ when `size` is None
            embedding = torch.cat([encoder.embed_videos(as_model_input(frames, size)[None].to(encoder.device))
                                   for _, frames in pending])
            values, best = reid.video_search(embedding, bank_embedding)
        for (row, _), value, match in zip(pending, values.tolist(), best.tolist(), strict=True):
            if row is None:
                heldout_scores.append(float(value))
            else:
                row.update(Score=float(value), Flagged=bool(value > tau),
                           BestIsSource=int(bank_index[match]) == row.pop("_source"))
                rows.append(row)
        pending.clear()
        if progress is not None:
            progress(len(rows), len(chosen) * len(canaries), len(heldout_scores), len(heldout_records))

    with scratch_folder(scratch) as folder:
        for number, source in enumerate(chosen):
            record = train_records[source]
            video = read_video(record.path, gray=gray)
            step = protocol_step(protocol, record.fps)
            fps = record.fps / step
            start = canary_start(len(video), protocol.length, step, seed, number)
            for c, canary in enumerate(canaries):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + number * 1_009 + c)
                frames = make_canary(video, canary, length=protocol.length, step=step, start=start,
                                     number=number, generator=generator)
                written = write_canary(folder / f"canary_{number:04d}_{c:02d}.avi", frames, fps, canary)
                pending.append(({"Canary": canary.name, "Kind": canary.kind, "Magnitude": canary.magnitude,
                                 "Source": number, "_source": source}, written))
                if len(pending) >= batch_size:
                    flush()
        flush()
        for number, record in enumerate(heldout_records):
            video = read_video(record.path, gray=gray)
            step = protocol_step(protocol, record.fps)
            start = canary_start(len(video), protocol.length, step, seed, number, stream=37)
            frames = make_canary(video, DEFAULT_CANARIES[0], length=protocol.length, step=step, start=start,
                                 number=number, generator=torch.Generator())
            pending.append((None, write_canary(folder / f"heldout_{number:04d}.avi", frames, record.fps / step,
                                               DEFAULT_CANARIES[0])))
            if len(pending) >= batch_size:
                flush()
        flush()
    return AuditResult(tau=float(tau), protocol=protocol.name, canaries=rows, heldout_scores=heldout_scores,
                       calibration=calibration, sources=len(chosen))


def canary_sources(videos: int, sources: int, seed: int) -> list[int]:
    """Which training videos (rows) the canaries are made of: the first ``sources`` of a seeded permutation."""
    return np.random.default_rng((seed, 29)).permutation(videos)[:min(sources, videos)].tolist()


def canary_start(num_frames: int, length: int, step: float, seed: int, number: int, stream: int = 31) -> int:
    """Where the ``number``-th source's clip starts before a canary moves it: seeded, anywhere a clip fits."""
    return int(np.random.default_rng((seed, stream, number)).integers(0, max_clip_start(num_frames, length, step) + 1))


def protocol_step(protocol: Protocol, source_fps: float) -> float:
    """Source frames between two compared frames under a clip protocol."""
    return source_fps / protocol.fps if protocol.fps is not None else float(protocol.period)


def audit_filter(encoder, reid, bank, calibration, protocol: Protocol, real, *, sources: int,
                 floors: dict[str, float]) -> dict[str, Any]:
    """The synthetic writer's audit of its own filter: canaries of ``sources`` TRAIN videos of ``real`` (the
    DataModule its bank was embedded from) and false flags on its TEST videos unless they calibrated τ. Returns the
    summary recorded in ``dataset.json``."""
    import warnings

    heldout = ()
    if "test" not in calibration.heldout.split("+"):  # false flags on real videos that did not calibrate τ
        try:
            real.setup("test")
            heldout = real.datasets["test"].records
        except ValueError:
            warnings.warn("privacy audit: the real data has no TEST split; no false flags are counted", stacklevel=2)
    size = real.hparams.size
    result = run_audit(encoder, reid, bank, calibration.tau, protocol, real.datasets["train"].records,
                       heldout_records=heldout, sources=sources, size=(size, size) if isinstance(size, int) else size,
                       calibration=calibration.as_dict())
    return {"audited": True, **result.summary(**floors)}
