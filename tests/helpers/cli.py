"""The repository, its configs, and the two ways tests run ``echo-lvdm``: a subprocess of the console script, or
``main()`` in-process for ``--print_config``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from echo_lvdm.main import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``echo-lvdm <args>`` as a user runs it (the venv's console script), output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).with_name("echo-lvdm")
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def print_config(capsys: pytest.CaptureFixture, *args: str, subcommand: str = "fit") -> dict:
    """The config ``echo-lvdm <subcommand> <args> --print_config`` resolves, as a dict."""
    with pytest.raises(SystemExit) as exited:
        main([subcommand, *args, "--print_config"])
    assert exited.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


DATA_CONFIGS = REPO / "configs" / "data"
REAL_DATA = DATA_CONFIGS / "echonet_dynamic.yaml"


def config_stack(config: Path) -> list[Path]:
    """The configs a user stacks to run ``config``, in the documented order: a data config, the model config, its
    quickstart overlay (``<model>_quickstart.yaml`` overlays ``<model>.yaml``), a logger config — with the real
    dataset's data config wherever a data config goes. A data config is followed by ``ef_pixel.yaml``; one that only
    adds to a dataset (``synthetic_to_real.yaml``: no ``root``) comes after the real dataset's; a logger config comes
    after the VAE quickstart."""
    config = Path(config)
    if config.parent == DATA_CONFIGS:
        adds = "root" not in (yaml.safe_load(config.read_text()) or {}).get("data", {})
        return [*([REAL_DATA] if adds else []), config, REPO / "configs/ef_pixel.yaml"]
    if config.parent.name == "logger":
        return [REAL_DATA, REPO / "configs/vae.yaml", REPO / "configs/vae_quickstart.yaml", config]
    if config.stem.endswith("_quickstart"):
        return [REAL_DATA, config.with_name(config.name.replace("_quickstart", "")), config]
    return [REAL_DATA, config]


def merged_yaml(paths: list[Path]) -> dict:
    """What a stack of configs sets, merged as LightningCLI merges them: mappings key by key, lists replaced."""
    def merge(base: dict, update: dict) -> dict:
        merged = dict(base)
        for key, value in update.items():
            merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
                else value
        return merged

    result: dict = {}
    for path in paths:
        result = merge(result, yaml.safe_load(Path(path).read_text()) or {})
    return result
