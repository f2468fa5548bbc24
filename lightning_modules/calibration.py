"""Privacy thresholds per protocol (DESIGN.md, "Metrics"): τ = the q-quantile over held-out real videos of their best
re-ID score against the training split, both embedded under one :class:`~lightning_modules.protocols.Protocol`.

A :class:`Calibration` carries its protocol, and every consumer (the coverage callback, ``echo-lvdm evaluate``, the
synthetic dataset writer) calibrates for the protocol it compares under or reads a stored τ of exactly that protocol;
``echo-lvdm calibrate`` stores them beside the re-ID checkpoint in ``<checkpoint>.calibrations.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datamodules.video_io import atomic_output
from lightning_modules.protocols import Protocol
from lightning_modules.reid_search import privacy_threshold


@dataclass(frozen=True)
class Calibration:
    """τ and everything it depends on: the protocol, the quantile, the held-out split and its size, the bank's size,
    the embedding model's weights checksum (re-ID, and the VAE a latent re-ID sees pixels through) and the data."""

    tau: float
    protocol: str
    quantile: float
    heldout: str
    heldout_videos: int
    bank_videos: int
    weights_checksum: str
    data: str
    rule: str = "linear"  # how τ sits among the held-out scores (reid_search.privacy_threshold); stored before: linear

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def holds_for(self, protocol: Protocol | str, what: str = "τ") -> float:
        """τ, after checking it was calibrated under ``protocol`` (refuses otherwise)."""
        Protocol.parse(protocol).require(self.protocol, what)
        return self.tau


def calibrate(reid, bank, heldout, *, quantile: float, protocol: Protocol | str, heldout_name: str,
              weights_checksum: str, data: str | Path, rule: str = "conformal") -> Calibration:
    """τ from ``heldout`` against ``bank`` (:class:`~lightning_modules.reid_embeddings.EmbeddedSplit` of one
    protocol) at ``quantile``, with the head of ``reid`` (:meth:`~lightning_modules.reid.ReIDModule.video_search`).

    ``rule``: ``"conformal"`` (default) — τ is the ⌈(n + 1)q⌉-th smallest held-out score, so a new real video
    exceeds it with probability at most 1 − q; ``"linear"`` — the interpolated quantile of the seed paper
    (:func:`~lightning_modules.reid_search.privacy_threshold`). Warns when the held-out set is too small for the
    quantile: with n·(1 − q) < 1 τ is (nearly) their maximum, and then promises less than it says.
    """
    values, _ = reid.video_search(heldout.embedding, bank.embedding.to(heldout.embedding))
    tau = privacy_threshold(values, quantile, rule)
    if len(heldout) * (1.0 - quantile) < 1.0 and quantile < 1.0:
        warnings.warn(f"τ at quantile {quantile} from only {len(heldout)} held-out videos is nearly their maximum: "
                      f"{math.ceil(1 / (1 - quantile))} or more make the quantile mean what it says", stacklevel=2)
    return Calibration(tau=tau, protocol=Protocol.parse(protocol).name, quantile=float(quantile),
                       heldout=heldout_name, heldout_videos=len(heldout), bank_videos=len(bank),
                       weights_checksum=weights_checksum, data=str(Path(data).resolve()), rule=rule)


def calibrations_path(checkpoint: str | Path) -> Path:
    """``…/name.ckpt`` → ``…/name.calibrations.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.calibrations.json")


def stored_calibrations(checkpoint: str | Path) -> list[Calibration]:
    path = calibrations_path(checkpoint)
    if not path.is_file():
        return []
    return [Calibration(**entry) for entry in json.loads(path.read_text())["calibrations"]]


def store_calibration(checkpoint: str | Path, calibration: Calibration) -> Path:
    """Add ``calibration`` to the checkpoint's calibrations (replacing one for the same protocol, quantile, held-out
    split, weights and data); written atomically."""
    def same(other: Calibration) -> bool:
        keys = ("protocol", "quantile", "heldout", "weights_checksum", "data", "rule")
        return all(getattr(other, key) == getattr(calibration, key) for key in keys)

    entries = [entry for entry in stored_calibrations(checkpoint) if not same(entry)] + [calibration]
    path = calibrations_path(checkpoint)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({"checkpoint": Path(checkpoint).name,
                                   "calibrations": [entry.as_dict() for entry in entries]}, indent=2) + "\n")
    return path


def find_calibration(checkpoint: str | Path, *, protocol: Protocol | str, quantile: float, weights_checksum: str,
                     data: str | Path, heldout: str | None = None, rule: str | None = None) -> Calibration | None:
    """A stored τ of exactly this protocol, quantile, model and data (and held-out split and rule, when given), or
    None."""
    name, root = Protocol.parse(protocol).name, str(Path(data).resolve())
    for entry in stored_calibrations(checkpoint):
        if (entry.protocol, entry.quantile, entry.weights_checksum, entry.data) == (name, quantile, weights_checksum,
                                                                                    root) \
                and heldout in (None, entry.heldout) and rule in (None, entry.rule):
            return entry
    return None


def filter_bank(encoder, reid, reid_path: str | Path, real, protocol: Protocol | str, *, cache_dir: str | Path | None,
                quantile: float | None = None, heldout: str = "val"):
    """What the privacy filter compares against, and with which τ: the training split of ``real`` (an
    :class:`~datamodules.EchoNetDataModule` built for ``protocol``) embedded by ``encoder``, and τ of ``protocol`` —
    stored beside ``reid_path`` for this data (``echo-lvdm calibrate``), else calibrated here on ``heldout``.
    Returns ``(bank, calibration, source)`` where ``source`` says where τ came from."""
    from lightning_modules.reid_embeddings import embed_split

    bank = embed_split(encoder, real, "train", cache_dir=cache_dir)
    quantile = float(reid.hparams.quantile) if quantile is None else float(quantile)
    weights, data = encoder.weights_checksum(), real.root_for("train")
    stored = find_calibration(reid_path, protocol=protocol, quantile=quantile, weights_checksum=weights, data=data)
    if stored is not None:
        return bank, stored, f"stored in {calibrations_path(reid_path).name}"
    held = embed_split(encoder, real, heldout, cache_dir=cache_dir)
    calibration = calibrate(reid, bank, held, quantile=quantile, protocol=protocol, heldout_name=heldout,
                            weights_checksum=weights, data=data)
    return bank, calibration, f"calibrated on the {len(held)} {heldout.upper()} videos"
