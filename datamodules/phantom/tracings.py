"""LV tracings in the EchoNet-Dynamic ``VolumeTracings.csv`` layout, and volumes / EF from them by the method of disks.

Per traced frame EchoNet lists one line per row as ``X1,Y1,X2,Y2`` (px in the 112 × 112 frame): first the LV long axis
(apex → mitral-annulus midpoint), then 20 chords perpendicular to it with both ends on the endocardial border.
Volume by the single-plane method of disks (Simpson's rule), each chord the diameter of a disk whose height is the
long-axis length over the number of chords::

    V = sum_i  pi / 4 * d_i^2 * L / N          (px^3, times (cm/px)^3 for mL)

EDV and ESV are the largest and smallest volume among a video's traced frames, so the order in which frames are listed
does not matter, and EF = 100 (EDV - ESV) / EDV.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from datamodules.phantom.anatomy import CM_PER_PIXEL_AT_112, HeartGeometry

log = logging.getLogger(__name__)

TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")
NUM_CHORDS = 20

Row = Sequence[object] | Mapping[str, object]


def lv_tracing(geo: HeartGeometry, frame: int, chords: int = NUM_CHORDS) -> np.ndarray:
    """The tracing of ``frame`` as ``(chords + 1, 4)`` float64 ``X1, Y1, X2, Y2`` in image px.

    Row 0 is the long axis from the apex to the midpoint of the mitral annulus; rows 1… are chords at the midpoints of
    ``chords`` equal slices of that axis, apex first, ``(X1, Y1)`` on the septal border and ``(X2, Y2)`` on the lateral
    one. Disks built on these chords integrate the rendered truncated-ellipse LV by the midpoint rule.
    """
    length = float(geo.lv_length[frame])
    along = (np.arange(chords) + 0.5) / chords * length
    half = geo.lv_half_width(along, frame)
    centres = geo.apex[None, :] + along[:, None] * geo.u[None, :]
    septal = centres - half[:, None] * geo.v[None, :]
    lateral = centres + half[:, None] * geo.v[None, :]
    axis = np.concatenate([geo.apex, geo.apex + length * geo.u])[None, :]
    return np.concatenate([axis, np.concatenate([septal, lateral], axis=1)], axis=0)


def disk_volume(lines: np.ndarray, cm_per_pixel: float = CM_PER_PIXEL_AT_112) -> float:
    """Method-of-disks volume (mL) of one traced frame: ``lines`` ``(1 + N, 4)``, the long axis then N chords, px."""
    lines = np.asarray(lines, dtype=np.float64)
    lengths = np.hypot(lines[:, 2] - lines[:, 0], lines[:, 3] - lines[:, 1])
    axis, chords = lengths[0], lengths[1:]
    return float(np.sum(np.pi / 4.0 * chords**2) * axis / len(chords) * cm_per_pixel**3)


def geometry_volumes(geo: HeartGeometry, cm_per_pixel: float, chords: int = NUM_CHORDS) -> np.ndarray:
    """Method-of-disks LV volume (mL) of every frame ``(T,)``, from the same tracings that would be written."""
    return np.array([disk_volume(lv_tracing(geo, t, chords), cm_per_pixel) for t in range(len(geo.lv_length))])


def format_rows(file_name: str, frame: int, lines: np.ndarray, decimals: int = 4) -> list[tuple[str, ...]]:
    """CSV rows ``(FileName, X1, Y1, X2, Y2, Frame)`` as strings, coordinates rounded to ``decimals``."""
    return [(file_name, *(f"{value:.{decimals}f}" for value in line), str(frame)) for line in lines]


def read_tracings(path: str | os.PathLike) -> list[list[str]]:
    """Rows of a ``VolumeTracings.csv`` (header checked, not returned). Raises naming the file if the header differs."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a spreadsheet's byte-order mark
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if tuple(header) != TRACING_COLUMNS:
            found = ",".join(header) or "nothing"
            raise ValueError(f"{path}: header must be {','.join(TRACING_COLUMNS)}, found {found}")
        return [row for row in reader if row]


def _video_key(file_name: str) -> str:
    """FileList's spelling of a tracing's FileName: EchoNet's tracings carry ``.avi``, its FileList does not."""
    return file_name[:-4] if file_name.lower().endswith(".avi") else file_name


def ef_from_tracings(
    path_or_rows: str | os.PathLike | Iterable[Row], *, cm_per_pixel: float = CM_PER_PIXEL_AT_112
) -> dict[str, tuple[float, float, float]]:
    """``FileName`` (without ``.avi``, as in FileList.csv) → ``(EF %, ESV mL, EDV mL)`` by the method of disks.

    ``path_or_rows`` is a ``VolumeTracings.csv`` (EchoNet-Dynamic's own or a phantom's) or its rows, each a sequence
    ``(FileName, X1, Y1, X2, Y2, Frame)`` or a mapping with those keys; numbers may be strings. ``cm_per_pixel`` is the
    pixel spacing: 0.14 suits 112-px frames (the phantom's :func:`~datamodules.phantom.anatomy.cm_per_pixel` gives it
    for other sizes); EF does not depend on it. Videos with fewer than two usable traced frames (a frame needs the
    axis and at least one chord) are left out. Raises ``ValueError`` naming the row for a malformed one.
    """
    where = str(path_or_rows) if isinstance(path_or_rows, (str, os.PathLike)) else "tracing rows"
    first_line = 2 if isinstance(path_or_rows, (str, os.PathLike)) else 0
    rows = read_tracings(path_or_rows) if isinstance(path_or_rows, (str, os.PathLike)) else path_or_rows
    frames: dict[str, dict[int, list[tuple[float, float, float, float]]]] = {}
    for number, row in enumerate(rows, start=first_line):
        fields = [row[c] for c in TRACING_COLUMNS] if isinstance(row, Mapping) else list(row)
        if len(fields) != len(TRACING_COLUMNS):
            raise ValueError(f"{where}, row {number}: expected {len(TRACING_COLUMNS)} fields, found {len(fields)}")
        try:
            coords = tuple(float(value) for value in fields[1:5])
            frame = int(str(fields[5]).strip())
        except ValueError as err:
            raise ValueError(f"{where}, row {number} ({fields[0]}): {err}") from err
        if not all(math.isfinite(value) for value in coords):
            raise ValueError(f"{where}, row {number} ({fields[0]}): non-finite coordinate in {coords}")
        frames.setdefault(_video_key(str(fields[0]).strip()), {}).setdefault(frame, []).append(coords)

    result, incomplete = {}, 0
    for name, traced in frames.items():
        volumes = [disk_volume(np.array(lines), cm_per_pixel) for lines in traced.values() if len(lines) >= 2]
        if len(volumes) < 2 or max(volumes) <= 0:
            incomplete += 1
            continue
        edv, esv = max(volumes), min(volumes)
        result[name] = (100.0 * (edv - esv) / edv, esv, edv)
    if incomplete:
        log.debug("%s: %d video(s) without two usable traced frames left out", where, incomplete)
    return result
