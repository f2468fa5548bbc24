"""The layout the user fixed: imports run one way (datamodules ← lightning_modules ← callbacks ← echo_lvdm), the
packages export their public classes, and test modules share helpers instead of importing each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers.cli import REPO
from tests.helpers.imports import LAYERS, import_violations, imported_modules


def test_imports_run_one_way():
    violations = import_violations(REPO)
    assert not violations, "\n".join(map(str, violations))


def test_the_import_check_names_file_and_line_of_a_planted_violation(tmp_path):
    for layer in LAYERS:
        shutil.copytree(REPO / layer, tmp_path / layer, ignore=shutil.ignore_patterns("__pycache__"))
    assert import_violations(tmp_path) == []
    clips = tmp_path / "datamodules" / "clips.py"
    lines = clips.read_text().splitlines()
    lines.append("\n\ndef _late():\n    from callbacks.coverage import CoverageCallback  # noqa: F401")
    clips.write_text("\n".join(lines) + "\n")
    writer = tmp_path / "callbacks" / "latent_cache.py"
    writer.write_text(writer.read_text() + "\nfrom ..echo_lvdm import main  # noqa: E402\n")
    found = [str(violation) for violation in import_violations(tmp_path)]
    line = len(lines) + 3
    order = "against the one-way order datamodules ← lightning_modules ← callbacks ← echo_lvdm"
    assert found == [f"datamodules/clips.py:{line}: datamodules imports callbacks.coverage {order}",
                     f"callbacks/latent_cache.py:{len(writer.read_text().splitlines())}: callbacks imports echo_lvdm "
                     f"{order}"]


def test_relative_and_dynamic_imports_are_resolved(tmp_path):
    path = tmp_path / "pkg" / "sub" / "mod.py"
    path.parent.mkdir(parents=True)
    path.write_text("from . import sibling\nfrom ..other import thing\nimport importlib\n"
                    "importlib.import_module('echo_lvdm.phantom')\n")
    assert imported_modules(path, "pkg.sub.mod") == [(1, "pkg.sub"), (2, "pkg.other"), (3, "importlib"),
                                                    (4, "echo_lvdm.phantom")]


def test_package_faces_export_the_public_classes():
    code = ("from datamodules import EchoNetDataModule; "
            "from lightning_modules import VideoDiffusionModule, ReIDModule, EFRegressorModule, VAEModule; "
            "from callbacks import CoverageCallback, SyntheticDatasetWriter, LatentCacheWriter, VideoLogger; "
            "import echo_lvdm.main")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_test_modules_import_no_other_test_module():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        offenders += [f"{path.relative_to(REPO)}:{line}: {name}" for line, name in imported_modules(path, module)
                      if name.startswith(("tests.test_", "tests.conftest")) or name.split(".")[0].startswith("test_")]
    assert not offenders, "\n".join(offenders)
