"""``CalibratedCheckpoint``: the name configs written before :class:`~callbacks.checkpoint.Checkpoint` took over its
job (τ beside each checkpoint) still use."""

from __future__ import annotations

from callbacks.checkpoint import Checkpoint, calibration_path

__all__ = ["CalibratedCheckpoint", "calibration_path"]


class CalibratedCheckpoint(Checkpoint):
    """:class:`~callbacks.checkpoint.Checkpoint` under its former name: it writes ``<name>.tau.json`` beside every
    checkpoint of a re-ID model, as every ``Checkpoint`` now does."""
