"""Loading a project checkpoint a user names: checked to be a whole file of the expected model before it is read.

A checkpoint cut short (an interrupted copy) fails in torch with "PytorchStreamReader failed reading zip archive" and
no path; a checkpoint of another model fails in Lightning with a message about blocked classes. Here both are a
:class:`~datamodules.errors.UserInputError` naming the file and what it is.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch

from datamodules.errors import UserInputError

Module = TypeVar("Module", bound=L.LightningModule)


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a Path, if it is a complete ``torch.save`` file (its zip directory is readable)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise UserInputError(f"{path}: not a complete checkpoint (cut short, e.g. by an interrupted copy, or not "
                             "written by torch.save)")
    return path


def saved_class(path: str | Path) -> str | None:
    """The class path a Lightning checkpoint was saved from (its ``hyper_parameters``), or None."""
    saved = torch.load(check_checkpoint_file(path), map_location="cpu", weights_only=True, mmap=True)
    hyper_parameters = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    return hyper_parameters.get("_class_path") if isinstance(hyper_parameters, dict) else None


def load_module(cls: type[Module], path: str | Path, *, map_location="cpu") -> Module:
    """``cls.load_from_checkpoint(path)`` with safe loading, after checking that ``path`` is a whole checkpoint of a
    ``cls`` (a clear error naming the file and the class it holds otherwise)."""
    found = saved_class(path)
    expected = f"{cls.__module__}.{cls.__qualname__}"
    if found is not None and found != expected:
        raise UserInputError(f"{path}: a {found.rsplit('.', 1)[-1]} checkpoint ({found}), not a {cls.__name__}")
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
