"""Reading and validating an EchoNet-Dynamic ``FileList.csv``.

Everything that can be wrong with an entry is found here, in ``setup()``, and reported together: one error naming the
file, the CSV line and what was expected — or, with ``on_bad="skip"``, one warning counting what was skipped. Nothing
reaches a DataLoader worker that has not been checked.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn

from datamodules.errors import UserInputError
from datamodules.video_io import VideoReadError, count_frames, probe_video

OnBad = Literal["error", "skip"]
Verify = Literal["none", "open", "count", "decode"]
SPLITS = ("TRAIN", "VAL", "TEST")
_SPLIT_ALIASES = {"VALIDATION": "VAL", "VALID": "VAL", "TESTING": "TEST", "TRAINING": "TRAIN"}
REQUIRED_COLUMNS = ("FileName", "EF", "Split")
_MAX_LISTED = 25


class DataValidationError(UserInputError):
    """A FileList or its videos have entries that cannot be used; the message lists each with file and line."""


@dataclass(frozen=True)
class VideoRecord:
    """One usable FileList row. ``line`` is the CSV line number (the header is line 1)."""

    line: int
    file_name: str
    path: Path
    ef: float
    split: str
    patient: str
    fps: float
    num_frames: int


@dataclass(frozen=True)
class BadEntry:
    filelist: Path
    line: int | None
    file_name: str
    kind: str  # short category, for counting: "bad EF", "missing video", ...
    problem: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        name = f" (FileName={self.file_name})" if self.file_name else ""
        return f"{self.filelist}, {where}{name}: {self.problem}"


@dataclass(frozen=True)
class CorrectedLength:
    """A row whose ``NumberOfFrames`` is not its video's length; the record carries the video's."""

    filelist: Path
    line: int
    file_name: str
    listed: int
    frames: int

    def __str__(self) -> str:
        return (f"{self.filelist}, line {self.line} (FileName={self.file_name}): NumberOfFrames {self.listed}, the "
                f"video has {self.frames}")


@dataclass
class SplitTable:
    """The checked rows of one split of one dataset folder, plus what was skipped and which lengths were corrected."""

    root: Path
    split: str
    records: list[VideoRecord]
    skipped: list[BadEntry] = field(default_factory=list)
    corrected: list[CorrectedLength] = field(default_factory=list)
    rows: int = 0  # rows of the FileList, all splits


def normalize_split(value: str) -> str:
    """``train``/``Train``/``TRAIN`` → ``TRAIN``; ``validation`` → ``VAL``."""
    upper = value.strip().upper()
    return _SPLIT_ALIASES.get(upper, upper)


def video_path(root: Path, file_name: str) -> Path:
    """EchoNet's FileList omits the extension: ``0X1A..`` lives at ``Videos/0X1A...avi``."""
    name = file_name if Path(file_name).suffix else f"{file_name}.avi"
    return root / "Videos" / name


def _parse_float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def read_split(
    root: str | Path,
    split: str,
    *,
    verify: Verify = "count",
    verify_workers: int = 4,
) -> SplitTable:
    """Check the rows of ``split`` in ``root/FileList.csv``: usable ones become records, the rest ``skipped``.

    Checks per row: FileName present and unique in the file; EF a finite number in [0, 100]; FPS (when the column
    exists) positive; the video exists under ``root/Videos``; and, by ``verify``:

    * ``"count"`` (default): counts the video's packets without decoding (but the first frame) — a file cut short,
      fewer frames than its header records or a damaged last frame, is a bad entry, and the count is the length;
    * ``"decode"``: the same, then decodes every frame, and a video whose frames do not all decode is a bad entry;
    * ``"open"``: decodes the first frame and trusts ``NumberOfFrames`` (a truncated file passes);
    * ``"none"``: trusts the FileList.

    Where the length is measured (``count``, ``decode``) a ``NumberOfFrames`` that differs from it is corrected and
    listed in ``corrected`` (EchoNet-Synthetic's released writer records its batch size there).
    Split labels match in any case. Extra columns are ignored. A missing FileList or required column always raises;
    broken rows are returned, and the caller reports them with :func:`report_bad`.
    """
    root = Path(root)
    split = normalize_split(split)
    filelist = root / "FileList.csv"
    if not filelist.is_file():
        raise FileNotFoundError(f"{filelist}: no FileList.csv (expected the EchoNet-Dynamic layout: FileList.csv + Videos/)")
    with filelist.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataValidationError(f"{filelist}: file is empty, expected a header with {', '.join(REQUIRED_COLUMNS)}")
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        missing = [c for c in REQUIRED_COLUMNS if c.lower() not in columns]
        if missing:
            raise DataValidationError(
                f"{filelist}: missing required column(s) {', '.join(missing)}; found {', '.join(header)}"
            )
        rows = [(line, row) for line, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]

    def cell(row: list[str], column: str) -> str | None:
        i = columns.get(column.lower())
        return row[i].strip() if i is not None and i < len(row) else None

    names = Counter(Path(cell(row, "FileName") or "").stem for _, row in rows)
    present = {}  # stem → file names in Videos/, for the hint when a FileName's implied .avi is absent
    if (root / "Videos").is_dir():
        for path in (root / "Videos").iterdir():
            present.setdefault(path.stem, []).append(path.name)
    has_patient = "patientid" in columns
    has_fps = "fps" in columns
    candidates: list[tuple[int, str, float, str, float | None, int | None]] = []
    bad: list[BadEntry] = []
    for line, row in rows:
        if normalize_split(cell(row, "Split") or "") != split:
            continue
        name = cell(row, "FileName") or ""
        ef = _parse_float(cell(row, "EF"))
        fps = _parse_float(cell(row, "FPS"))
        frames = _parse_float(cell(row, "NumberOfFrames"))
        kind = problem = None
        if not name:
            kind = problem = "empty FileName"
        elif names[Path(name).stem] > 1:
            kind, problem = "duplicate FileName", f"duplicate FileName ({names[Path(name).stem]} rows share it)"
        elif ef is None or not math.isfinite(ef) or not 0.0 <= ef <= 100.0:
            kind, problem = "bad EF", f"EF is {cell(row, 'EF')!r}, expected a number in [0, 100] (percent)"
        elif has_fps and (fps is None or not math.isfinite(fps) or fps <= 0):
            kind, problem = "bad FPS", f"FPS is {cell(row, 'FPS')!r}, expected a positive number"
        elif not video_path(root, name).is_file():
            kind, problem = "missing video", f"video missing: {video_path(root, name)}"
            others = present.get(Path(name).stem if Path(name).suffix else name, [])
            if others:
                problem += (f" (Videos/ has {', '.join(sorted(others))}: a FileName without an extension means .avi, "
                            "as in EchoNet-Dynamic; write the extension in FileName)")
        if problem:
            bad.append(BadEntry(filelist, line, name, kind, problem))
            continue
        patient = (cell(row, "PatientID") or name) if has_patient else name
        n = int(frames) if frames is not None and frames >= 1 else None
        candidates.append((line, name, float(ef), patient, fps, n))

    def probe(candidate) -> tuple[int | None, float | None, BadEntry | None]:
        """(length, fps, problem) of a candidate's video, as ``verify`` asks; None where not measured."""
        line, name, _, _, _, frames = candidate
        path = video_path(root, name)
        try:
            if verify == "none":
                return None, None, None
            if verify == "open":
                # Without a NumberOfFrames column the length has to come from decoding: headers lie.
                info = probe_video(path, decode=frames is None)
                return (info.num_frames if frames is None else None), info.fps, None
            count = count_frames(path)
            if count.problem():
                return None, None, BadEntry(filelist, line, name, "truncated video", count.problem())
            if verify == "decode":
                decoded = probe_video(path, decode=True).num_frames
                if decoded < count.frames:
                    problem = f"only {decoded} of its {count.frames} frames decode"
                    return None, None, BadEntry(filelist, line, name, "undecodable video", problem)
            return count.frames, count.fps, None
        except VideoReadError as err:
            return None, None, BadEntry(filelist, line, name, "undecodable video", f"undecodable video ({err})")

    with ThreadPoolExecutor(max_workers=max(1, verify_workers)) as pool:
        probes = list(pool.map(probe, candidates))

    records, corrected = [], []
    for (line, name, ef, patient, fps, listed), (length, measured_fps, problem) in zip(candidates, probes, strict=True):
        if problem:
            bad.append(problem)
            continue
        fps = fps or measured_fps
        frames = length if length is not None else listed
        if length is not None and listed is not None and length != listed:
            corrected.append(CorrectedLength(filelist, line, name, listed, length))
        if not frames or not fps:
            # Without a verified length or frame rate there is no way to plan clips: say so rather than guess.
            problem = "unknown NumberOfFrames/FPS (add the columns or use verify='count')"
            bad.append(BadEntry(filelist, line, name, "unknown length", problem))
            continue
        records.append(VideoRecord(line, name, video_path(root, name), ef, split, patient, float(fps), int(frames)))

    bad.sort(key=lambda entry: entry.line or 0)
    return SplitTable(root, split, records, bad, corrected, len(rows))


def list_bad(bad: list[BadEntry]) -> str:
    """One indented line per entry (the first 25, then a count)."""
    listed = "\n".join(f"  {entry}" for entry in bad[:_MAX_LISTED])
    return listed + (f"\n  … and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")


def report_corrected(corrected: list[CorrectedLength]) -> None:
    """One warning counting the rows served at their video's length instead of their ``NumberOfFrames``."""
    if corrected:
        listed = "\n".join(f"  {entry}" for entry in corrected[:_MAX_LISTED])
        more = f"\n  … and {len(corrected) - _MAX_LISTED} more" if len(corrected) > _MAX_LISTED else ""
        rank_zero_warn(f"{len(corrected)} FileList row(s) give a NumberOfFrames their video does not have; each "
                       f"video is served at its own length:\n{listed}{more}")


def report_bad(bad: list[BadEntry], on_bad: OnBad, *, total: int) -> None:
    """Raise one error listing ``bad`` (``on_bad="error"``) or warn once with their count (``"skip"``)."""
    if not bad:
        return
    if on_bad == "error":
        raise DataValidationError(
            f"{len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} in the dataset:\n{list_bad(bad)}\n"
            "Fix them, or skip them with on_bad='skip' (CLI: --data.on_bad=skip)."
        )
    if on_bad != "skip":
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    kinds = Counter(entry.kind for entry in bad)
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    rank_zero_warn(f"skipped {len(bad)} of {total} FileList rows ({summary}):\n{list_bad(bad)}")
