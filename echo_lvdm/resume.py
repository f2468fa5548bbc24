"""Where a fit resumes: ``--ckpt_path last``, and back into the run folder its checkpoint came from.

Lightning's loggers open a new ``version_<n+1>/`` for every run, so a fit resumed from ``version_0/checkpoints/last.ckpt``
would train on in ``version_1/`` and leave ``version_0/checkpoints/last.ckpt`` at the interrupted state — the file every
later command names. Here a fit whose ``--ckpt_path`` lies in ``<default_root_dir>/version_<n>/checkpoints/`` continues in
``version_<n>/``: its checkpoints replace the old ones and the CSV log keeps the rows logged before the checkpoint (those
after it are trained again and logged again).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from datamodules.errors import UserInputError, read_yaml
from datamodules.video_io import atomic_output
from echo_lvdm.cli_errors import config_paths
from lightning_modules.checkpoints import check_checkpoint_file

_VERSION = re.compile(r"version_(\d+)")
METRICS_FILE = "metrics.csv"  # CSVLogger's


def last_checkpoint(root: str | Path) -> Path:
    """The ``last.ckpt`` of the newest run under ``root`` (highest ``version_<n>`` that has one)."""
    root = Path(root)
    found = [(int(match.group(1)), path) for path in root.glob("version_*/checkpoints/last.ckpt")
             if (match := _VERSION.fullmatch(path.parent.parent.name))]
    if not found:
        raise UserInputError(f"--ckpt_path last: no {root}/version_*/checkpoints/last.ckpt (trainer.default_root_dir "
                             f"is {root}); give the checkpoint's path")
    return max(found)[1]


def run_version(checkpoint: str | Path, root: str | Path) -> int | None:
    """``n`` when ``checkpoint`` is ``<root>/version_<n>/checkpoints/<file>``, else None."""
    checkpoint = Path(checkpoint).resolve()
    match = _VERSION.fullmatch(checkpoint.parent.parent.name)
    if checkpoint.parent.name != "checkpoints" or match is None or checkpoint.parents[2] != Path(root).resolve():
        return None
    return int(match.group(1))


def checked_checkpoint(value: str | None, root: str | Path) -> str | None:
    """``--ckpt_path`` as given, ``last`` resolved, checked to be a file before anything is built or written."""
    if value is None:
        return None
    path = last_checkpoint(root) if value == "last" else Path(value)
    if not path.is_file():
        raise UserInputError(f"--ckpt_path {value}: no such checkpoint file")
    return str(check_checkpoint_file(path))


def logged_before(log_dir: str | Path, step: int) -> tuple[list[str], list[dict[str, str]]] | None:
    """The header and the rows of ``log_dir/metrics.csv`` logged before global step ``step``; None without a log."""
    path = Path(log_dir) / METRICS_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row.get("step", "").isdigit() and int(row["step"]) < step]
        return list(reader.fieldnames or []), rows


def restore_rows(writer, header: list[str], rows: list[dict[str, str]]) -> None:
    """Put ``rows`` back into a CSVLogger's freshly opened log (Lightning's writer empties ``metrics.csv`` when it
    opens a folder that has one); later rows are appended under the same header, widened if new keys appear."""
    with atomic_output(writer.metrics_file_path) as tmp:
        with open(tmp, "w", newline="") as handle:
            table = csv.DictWriter(handle, fieldnames=header)
            table.writeheader()
            table.writerows(rows)
    writer.metrics_keys = list(header)


def model_arguments_given(args: Sequence[str]) -> set[str]:
    """The model arguments ``args`` set by name: ``model.init_args`` keys of its ``--config`` files, and
    ``--model.init_args.<name>`` / ``--model.<name>`` words. (A config that names only ``model.class_path`` leaves
    the rest to a checkpoint's hyper_parameters, as ``configs/generate.yaml`` does.)"""
    names: set[str] = set()
    for path in config_paths(args):
        try:
            content = read_yaml(path) or {}
        except (OSError, UserInputError):
            continue  # LightningCLI reports it
        model = content.get("model") if isinstance(content, dict) else None
        if isinstance(model, dict):
            names |= set(model.get("init_args") or {}) | set(model.get("dict_kwargs") or {})
            names |= set(model) - {"class_path", "init_args", "dict_kwargs", "__path__"}
    for arg in args:
        if arg.startswith("--model."):
            name = arg.split("=", 1)[0].removeprefix("--model.").removeprefix("init_args.")
            if name and name != "class_path":
                names.add(name.split(".", 1)[0])
    return names


def replaced_model_arguments(given: dict, restored: dict, names: set[str]) -> list[str]:
    """The model arguments a checkpoint's ``hyper_parameters`` replaced: ``name given → restored`` for each of
    ``names`` (those the command set) whose value in ``given`` (the model's config before the checkpoint was read)
    ``restored`` (after LightningCLI parsed the checkpoint's hyperparameters over it) no longer holds, and the class
    when the two differ. Both as LightningCLI keeps a model's config: ``class_path`` and ``init_args``."""
    replaced = []
    if given.get("class_path") != restored.get("class_path"):
        replaced.append(f"class_path {given.get('class_path')} → {restored.get('class_path')}")
    before = {**(given.get("init_args") or {}), **(given.get("dict_kwargs") or {})}
    after = {**(restored.get("init_args") or {}), **(restored.get("dict_kwargs") or {})}
    for name, value in before.items():
        if name in names and name in after and after[name] != value:
            replaced.append(f"{name} {value!r} → {after[name]!r}")
    return replaced
