"""``benchmarks/gpu_check.py --dry-run``: the prepared GPU check runs on CPU — every full-size config of ``configs/``
takes one training step at its real widths with finite logged values, and one generation batch of
``configs/generate.yaml`` decodes to finite pixels — and prints one row for each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers.cli import REPO


@pytest.mark.slow
def test_the_gpu_checks_dry_run_steps_every_full_size_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(row["config"], row["variant"]) for row in rows[:-1]] == [
        ("vae", "eager"), ("reid_latent", "eager"), ("reid_latent", "channels_last"), ("reid_pixel", "eager"),
        ("ef_pixel", "eager"), ("lidm", "eager"), ("lvdm", "eager")]
    assert rows[-1]["config"] == "generate"
    widths = {row["config"]: row["parameters_m"] for row in rows}
    # Real widths, not the quickstart's: the 86 M VAE, ResNet-50 re-ID models, R(2+1)D-18, the 128–512 SVD UNets.
    assert widths["vae"] > 80 and widths["reid_pixel"] > 20 and widths["ef_pixel"] > 30
    assert widths["lidm"] > 50 and widths["lvdm"] > 50
    assert all(row["finite"] and math.isfinite(row["step_ms"]) and row["step_ms"] > 0 for row in rows)
    assert "| lvdm | eager |" in (tmp_path / "gpu_check.md").read_text()
