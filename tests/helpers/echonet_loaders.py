"""The row filters of the field's loaders of EchoNet-layout folders, re-implemented to check what they would keep of
a folder this project writes (nothing of theirs is imported: they are not dependencies).

* :func:`echonet_dynamic_rows` — EchoNet-Dynamic's ``echonet.datasets.Echo``: rows whose ``Split`` equals the
  requested split upper-cased (case-sensitive: its ``.upper()`` of the column is discarded), whose ``FileName`` has no
  extension (``.avi`` is appended; a name with an extension is dropped); every listed video must exist in ``Videos/``
  (FileNotFoundError); ``VolumeTracings.csv`` must exist with the header ``FileName,X1,Y1,X2,Y2,Frame``, and a video
  with fewer than two traced frames is dropped.
* :func:`echosyn_echo_rows` — the fork EchoNet-Synthetic evaluates EF with (``HReynaud/echonet``): the same, except
  that names with an extension are kept, ``VolumeTracings.csv`` is optional (absent, or with another header: no
  video is dropped for missing traces) and an empty result is an error.
* :func:`echosyn_dynamic_rows` — EchoNet-Synthetic's ``echosyn.common.datasets.Dynamic``: rows whose ``Split`` is
  in the requested list (case-sensitive), whose duration ``NumberOfFrames / FPS`` is longer than its clip
  (``target_nframes / target_fps``), and whose video ``Videos/<FileName up to the first '.'>.avi`` exists.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

TRACINGS_HEADER = ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]


def _filelist(root: Path) -> list[dict[str, str]]:
    with (root / "FileList.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _traced_frames(path: Path, add_avi: bool) -> dict[str, set[int]] | None:
    """Traced frames per video file name; None when the header is not EchoNet's."""
    with path.open() as handle:
        if handle.readline().strip().split(",") != TRACINGS_HEADER:
            return None
        frames: dict[str, set[int]] = defaultdict(set)
        for line in handle:
            name, *_, frame = line.strip().split(",")
            frames[name + ".avi" if add_avi and not Path(name).suffix else name].add(int(frame))
    return frames


def _present(root: Path, names: list[str]) -> None:
    missing = sorted(set(names) - {path.name for path in (root / "Videos").iterdir()})
    if missing:
        raise FileNotFoundError(root / "Videos" / missing[0])


def echonet_dynamic_rows(root: Path, split: str) -> list[str]:
    """The video files EchoNet-Dynamic's ``Echo(root, split)`` serves (see the module docs)."""
    rows = [row for row in _filelist(root) if row["Split"] == split.upper()]
    names = [row["FileName"] + ".avi" for row in rows if not Path(row["FileName"]).suffix]
    _present(root, names)
    tracings = root / "VolumeTracings.csv"
    if not tracings.is_file():
        raise FileNotFoundError(tracings)
    frames = _traced_frames(tracings, add_avi=False)
    assert frames is not None, f"{tracings}: header is not {','.join(TRACINGS_HEADER)}"
    return [name for name in names if len(frames.get(name, ())) >= 2]


def echosyn_echo_rows(root: Path, split: str) -> list[str]:
    """The video files EchoNet-Synthetic's fork of ``Echo`` serves (see the module docs)."""
    rows = [row for row in _filelist(root) if row["Split"] == split.upper()]
    names = [row["FileName"] + ".avi" if not Path(row["FileName"]).suffix else row["FileName"] for row in rows]
    _present(root, names)
    tracings = root / "VolumeTracings.csv"
    frames = _traced_frames(tracings, add_avi=True) if tracings.is_file() else None
    if frames is not None:
        names = [name for name in names if len(frames.get(name, ())) >= 2]
    assert names, "No videos found."
    return names


def echosyn_dynamic_rows(root: Path, splits: list[str], target_nframes: int = 64,
                         target_fps: int = 32) -> list[str]:
    """The video files EchoNet-Synthetic's ``Dynamic`` serves for ``splits`` at its clip settings (default: its
    configs' 64 frames at 32 fps)."""
    seconds = target_nframes / target_fps
    kept = [row for row in _filelist(root) if row["Split"] in splits
            and int(row["NumberOfFrames"]) / float(row["FPS"]) > seconds]
    names = [row["FileName"] if row["FileName"].endswith(".avi") else row["FileName"].split(".")[0] + ".avi"
             for row in kept]
    return [name for name in names if (root / "Videos" / name).is_file()]
